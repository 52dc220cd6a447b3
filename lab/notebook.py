"""Running the notebooks, and the small helpers they share.

    python -m lab run notebooks/01_pretrain.ipynb -p sharing nes -p steps 200 [--name NAME]
    python -m lab sweep --corpus synthetic --preset mini --steps 300 --name demo

`run` executes a notebook with papermill (kernel "python3" of the active environment) into
runs/<name>/: the executed copy `<notebook>.ipynb` plus whatever the notebook writes (its `out_dir`
defaults to runs/<name>/ too). Unlike papermill alone, a parameter name that the notebook's
`parameters` cell does not define is an error, not a silently injected variable.
`sweep` runs 01_pretrain for ES, NES and GDES with the same seed and data, then 02_tug_of_war on the
three runs.

Relative paths given to notebooks are resolved against the project root (`project_path`), so a
notebook behaves the same whether it runs from notebooks/ (Jupyter, nbval) or from the root (papermill).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MODES = ("es", "nes", "gdes")


def project_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones under the project root (or the working directory when
    the package is installed somewhere without a project around it)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = ROOT if (ROOT / "pyproject.toml").exists() else Path.cwd()
    return base / path


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


def run_notebook(notebook: str | Path, parameters: dict[str, object], out_dir: str | Path) -> Path:
    """Execute `notebook` with `parameters` (checked against its parameters cell) into out_dir; returns
    the executed copy. `out_dir` is also passed as the notebook's `out_dir` unless one is given."""
    import papermill

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
    )
    return executed


def _read_summary(out_dir: Path) -> dict:
    file = out_dir / "summary.json"
    return json.loads(file.read_text()) if file.exists() else {}


# ---------------------------------------------------------------------------------------------- CLI


def cli_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lab run", description="Run a notebook with parameters.")
    p.add_argument("notebook", help="path, or a name in notebooks/ such as 01_pretrain")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("--name", help="outputs go to runs/<name>/ (default: the notebook's name)")
    args = p.parse_args(argv)
    try:
        path = find_notebook(args.notebook)
        parameters = {name: parse_value(value) for name, value in args.parameter}
        check_parameters(path, parameters)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = project_path(Path("runs") / (args.name or path.stem))
    start = time.time()
    executed = run_notebook(path, parameters, out_dir)
    print(f"ran {path.name} in {time.time() - start:.0f}s -> {executed}")
    summary_dir = Path(parameters.get("out_dir", out_dir))
    if (project_path(summary_dir) / "summary.json").exists():
        print(f"summary: {project_path(summary_dir) / 'summary.json'}")
    return 0


def cli_sweep(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lab sweep",
        description="Pre-train ES, NES and GDES with the same seed and data, then the tug-of-war analysis.",
    )
    p.add_argument("--corpus", default="synthetic", help="synthetic, a file/folder of text, or hf:NAME")
    p.add_argument("--preset", default="mini", help="model size: tiny, mini, xsmall, small, base, large")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 01's default)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rtd-weight", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="sweep", help="results go to runs/<name>/")
    args = p.parse_args(argv)
    common = {"corpus": args.corpus, "preset": args.preset, "seed": args.seed, "device": args.device}
    for key in ("steps", "batch_size", "lr", "rtd_weight"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    root = project_path(Path("runs") / args.name)
    start = time.time()
    runs = {}
    for mode in MODES:
        runs[mode] = root / mode
        t = time.time()
        run_notebook("01_pretrain", {**common, "sharing": mode}, runs[mode])
        final = _read_summary(runs[mode]).get("final_eval", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        print(f"[{mode}] {time.time() - t:.0f}s  {shown}  -> {runs[mode]}", flush=True)
    report = root / "tug_of_war"
    parameters = {f"{mode}_run": str(path) for mode, path in runs.items()}
    run_notebook("02_tug_of_war", parameters, report)
    summary = _read_summary(report)
    print(f"tug-of-war report ({time.time() - start:.0f}s total): {report}")
    for claim, holds in summary.get("paper_claims", {}).items():
        print(f"  {claim}: {holds}")
    print(f"executed notebooks: {', '.join(str(p / '*.ipynb') for p in [*runs.values(), report])}")
    return 0
