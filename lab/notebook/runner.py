"""Running the notebooks, and the small helpers they share.

    python -m lab run notebooks/01_pretrain.ipynb -p sharing nes -p steps 200 [--out-dir DIR]
    python -m lab sweep --pretrain.corpus synthetic --pretrain.preset mini --pretrain.steps 300 --out-dir runs/demo

`run` executes a notebook with papermill (kernel "python3" of the active environment) into
--out-dir (default runs/<notebook>/): the executed copy `<notebook>.ipynb` plus whatever the notebook
writes (its `out_dir` parameter is set to the same folder). Unlike papermill alone, a parameter name that the notebook's
`parameters` cell does not define is an error, not a silently injected variable.
`sweep` runs 01_pretrain for ES, NES and GDES with the same seed and data, then 02_tug_of_war on the
three runs.

Relative paths given to notebooks are resolved against the project root (`project_path`), so a
notebook behaves the same whether it runs from notebooks/ (Jupyter, nbval) or from the root (papermill).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from IPython.display import Image, Markdown
from jupyter_client.manager import AsyncKernelManager
from traitlets import CaselessStrEnum

from lab import sharing
from lab.analysis.stats import save_figure
from lab.analysis.tug_of_war import load_run, new_figure
from lab.cli import USER_ERROR, config_parser, param, parse_config
from lab.pretrain.config import PretrainConfig, scaled_to_steps
from lab.pretrain.loop import train
from lab.util import atomic_write_json, replace_strict, write_csv

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def project_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones under the project root (or the working directory when
    the package is installed somewhere without a project around it)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = ROOT if (ROOT / "pyproject.toml").exists() else Path.cwd()
    return base / path


def relative_path(path: str | Path) -> Path:
    """`path` relative to the project root when it lies under it (as printed in a notebook, the same on
    every machine; project_path turns it back), else as given."""
    path = Path(path)
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# ---------------------------------------------------------------------------------------------- parameters


def find_notebook(name: str | Path) -> Path:
    """A path to a notebook, or a name in notebooks/ with or without `.ipynb` ("01_pretrain")."""
    candidates = [Path(name), NOTEBOOKS / name, NOTEBOOKS / f"{name}.ipynb"]
    for path in candidates:
        if path.is_file():
            return path
    available = ", ".join(sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")))
    raise FileNotFoundError(f"no notebook {str(name)!r}; available in {NOTEBOOKS}: {available}")


def notebook_parameters(path: str | Path) -> dict[str, object]:
    """Names and default values of the notebook's `parameters` cell (it must be the first code cell)."""
    cells = json.loads(Path(path).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1 or code[0] is not tagged[0]:
        raise ValueError(
            f"{path}: expected exactly one code cell tagged 'parameters', first among the code cells "
            f"(found {len(tagged)})"
        )
    source = "".join(tagged[0]["source"])
    values = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                values[target.id] = ast.literal_eval(node.value)
    return values


def parse_value(text: str) -> object:
    """A command-line value as a Python literal (3, 0.1, True, None, [1, 2], 'x'), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_parameters(path: str | Path, given: dict[str, object]) -> None:
    valid = notebook_parameters(path)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"{Path(path).name} has no parameter(s) {', '.join(unknown)}; valid names: {', '.join(valid)}"
        )


def short_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a notebook shows it: "Category: message", paths under the project relative to it. The
    source file and line add nothing for a reader, and absolute paths would differ from machine to machine
    in the committed outputs."""
    return f"{category.__name__}: {str(message).replace(f'{ROOT}{os.sep}', '')}\n"


if "ipykernel" in sys.modules:  # inside a notebook's kernel (Jupyter, papermill, nbval), not the CLI
    warnings.formatwarning = short_warning


class LocalKernelManager(AsyncKernelManager):
    """The kernel of a notebook run, on IPC sockets (files beside its connection file in Jupyter's runtime
    folder) where the OS has them: only this process talks to it, so it needs no TCP port, and ipykernel's
    warning about unencrypted TCP, which nobody running `lab run` could act on, does not apply."""

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc" if os.name == "posix" else "tcp")


def run_notebook(notebook: str | Path, parameters: dict[str, object], out_dir: str | Path) -> Path:
    """Execute `notebook` with `parameters` (checked against its parameters cell) into out_dir; returns
    the executed copy. `out_dir` is also passed as the notebook's `out_dir` unless one is given."""
    import papermill  # here: only executing a notebook needs it, not the kernels that import these helpers

    path = find_notebook(notebook)
    check_parameters(path, parameters)
    out_dir = project_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "out_dir" in notebook_parameters(path):
        parameters = {"out_dir": str(out_dir), **parameters}
    executed = out_dir / path.name
    papermill.execute_notebook(
        str(path),
        str(executed),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
        kernel_manager_class=LocalKernelManager,
    )
    return executed


def _read_summary(out_dir: Path) -> dict:
    file = out_dir / "summary.json"
    return json.loads(file.read_text()) if file.exists() else {}


# ---------------------------------------------------------------------------------------------- notebook helpers


def pretrain_config(out_dir: str | Path, steps: int, **fields) -> PretrainConfig:
    """A PretrainConfig for a notebook run: its log / eval / probe / checkpoint intervals and warmup
    scaled with `steps` (`scaled_to_steps`), 4 evaluation batches and a progress bar; `fields` on top."""
    base = PretrainConfig(eval_batches=4, progress="bar")
    return scaled_to_steps(replace_strict(base, out_dir=str(project_path(out_dir)), steps=steps, **fields))


def as_shown(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` as a notebook shows it: its out_dir relative to the project root, so the committed output
    reads the same on every machine (project_path turns it back)."""
    return dataclasses.replace(cfg, out_dir=str(relative_path(cfg.out_dir)))


def ensure_runs(run_dirs: dict[str, str], work_dir: str | Path, **fields) -> dict[str, Path]:
    """Run directories by mode; an empty entry is trained now under work_dir/runs/<mode> (PretrainConfig
    fields from `fields`, e.g. steps=30, preset="tiny"). A finished run there is resumed, not retrained:
    train() only re-evaluates it (or trains on to a larger `steps`, or refuses a different config)."""
    runs = {}
    for mode, path in run_dirs.items():
        if path:
            runs[mode] = project_path(path)
            continue
        runs[mode] = project_path(work_dir) / "runs" / mode
        train(pretrain_config(runs[mode], sharing=mode, **{"progress": "none", **fields}))
    return runs


def resolve_init(init: str | Path) -> str:
    """A checkpoint for fine-tuning: an existing path (relative ones under the project root), else the
    string as given (a hub name such as microsoft/deberta-v3-xsmall)."""
    path = project_path(init)
    return str(path) if path.exists() else str(init)


def run_curves(run_dir: str | Path) -> Path:
    """Loss curves of one run from its metrics.jsonl: total, MLM and RTD train loss plus the held-out
    rows; written as figures/curves.{csv,png,svg} in the run directory. Returns the PNG."""
    run = load_run(project_path(run_dir))
    out = run.path / "figures"
    train, held = run.rows("train"), run.rows("eval")
    write_csv(out / "curves.csv", train + held)
    keys = [("loss", "total loss"), ("mlm_loss", "MLM loss"), ("rtd_loss", "RTD loss")]
    fig, axes = new_figure(width=12, height=3.2, ncols=3)
    for ax, (key, title) in zip(axes, keys):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        pts = [(r["step"], r[key]) for r in held if key in r]
        if pts:
            ax.plot(*zip(*pts), "o--", label="held-out")
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "curves")[0]


def show(path: str | Path):
    """A PNG (or a markdown table file) as a notebook display object."""
    path = Path(path)
    return Markdown(path.read_text()) if path.suffix == ".md" else Image(filename=str(path))


def write_summary(out_dir: str | Path, values: dict) -> Path:
    """summary.json in out_dir: every notebook run leaves its final numbers in a file."""
    path = project_path(out_dir) / "summary.json"
    atomic_write_json(path, values)
    return path


# ---------------------------------------------------------------------------------------------- CLI


def cli_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lab run", description="Run a notebook with parameters.")
    p.add_argument("notebook", help="path, or a name in notebooks/ such as 01_pretrain")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("--out-dir", help="where the executed notebook and its outputs go [runs/<notebook>]")
    args = p.parse_args(argv)
    try:
        path = find_notebook(args.notebook)
        parameters = {name: parse_value(value) for name, value in args.parameter}
        check_parameters(path, parameters)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    out_dir = project_path(args.out_dir or Path("runs") / path.stem)
    start = time.time()
    try:
        executed = run_notebook(path, parameters, out_dir)
    except Exception as err:  # papermill's error carries the cell's traceback; the copy keeps the rest
        if type(err).__name__ != "PapermillExecutionError":
            raise
        print(
            f"error: {path.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr
        )
        print(f"the executed copy with the full traceback: {out_dir / path.name}", file=sys.stderr)
        return 1
    print(f"ran {path.name} in {time.time() - start:.0f}s -> {executed}")
    summary_dir = Path(parameters.get("out_dir", out_dir))
    if (project_path(summary_dir) / "summary.json").exists():
        print(f"summary: {project_path(summary_dir) / 'summary.json'}")
    return 0


def _flags(parameters: dict) -> list[str]:
    return [item for name, value in parameters.items() for item in ("-p", name, repr(value))]


# The sweep's runs, sized so `make demo` (three mini runs + the report) stays under ~15 minutes on 2 CPU
# cores; the intervals and the warmup scale with the steps (lab/notebook/runner.py `pretrain_config`).
SWEEP_PRETRAIN = PretrainConfig(preset="mini", steps=300, batch_size=16, seq_len=64, lr=1e-3)
# The PretrainConfig fields notebook 01 takes as parameters: the sweep's flags (the other fields would
# not reach the runs); `sharing` and `out_dir` the sweep sets per run.
NOTEBOOK_FIELDS = ("corpus", "preset", "steps", "batch_size", "seq_len", "lr", "rtd_weight", "seed", "device")


@dataclass(frozen=True)
class SweepConfig:
    pretrain: PretrainConfig = param(SWEEP_PRETRAIN, "the three runs' settings (one seed for all three)")
    out_dir: str = param("runs/sweep", "the runs (<out_dir>/<mode>) and the report (<out_dir>/tug_of_war)")


def cli_sweep(argv: list[str]) -> int:
    per_run = [
        f"pretrain.{f.name}" for f in dataclasses.fields(PretrainConfig) if f.name not in NOTEBOOK_FIELDS
    ]
    parser = config_parser(
        SweepConfig,
        "python -m lab sweep",
        "Pre-train ES, NES and GDES with the same seed and data, then the tug-of-war analysis.",
        per_run,
    )
    args = parse_config(SweepConfig, parser, argv)
    common = {k: getattr(args.pretrain, k) for k in NOTEBOOK_FIELDS}
    root = project_path(args.out_dir)
    start = time.time()
    runs = {}
    for mode in sharing.names():
        runs[mode] = root / mode
        t = time.time()
        if cli_run(["01_pretrain", "--out-dir", str(runs[mode]), *_flags({**common, "sharing": mode})]):
            return 1
        final = _read_summary(runs[mode]).get("final_eval", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        print(f"[{mode}] {time.time() - t:.0f}s  {shown}  -> {runs[mode]}", flush=True)
    report = root / "tug_of_war"
    parameters = {"runs": {m: str(relative_path(p)) for m, p in runs.items()}}
    if cli_run(["02_tug_of_war", "--out-dir", str(report), *_flags(parameters)]):
        return 1
    summary = _read_summary(report)
    print(f"tug-of-war report ({time.time() - start:.0f}s total): {report}")
    for claim, holds in summary.get("paper_claims", {}).items():
        print(f"  {claim}: {holds}")
    print(f"executed notebooks: {', '.join(str(p / '*.ipynb') for p in [*runs.values(), report])}")
    return 0
