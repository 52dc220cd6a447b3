"""The project's own files agree with each other."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_is_in_step_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    version = tuple(int(x) for x in python.split("=")[1].split("."))
    minimum = tuple(int(x) for x in re.findall(r"\d+", pyproject()["project"]["requires-python"]))
    assert version >= minimum, f"environment.yml pins {python}, pyproject requires {minimum}"
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    editable = [p for p in pip if p.startswith("-e")]
    assert editable == ["-e .[dev]"], "environment.yml must install the project itself with its dev extra"
    extras = re.search(r"\[(.*)\]", editable[0]).group(1).split(",")
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    # anything else pip-installed there must also be declared in pyproject
    declared = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in pyproject()["project"]["dependencies"]}
    for group in pyproject()["project"]["optional-dependencies"].values():
        declared |= {re.split(r"[<>=!\[ ]", d)[0].lower() for d in group}
    for entry in pip:
        if not entry.startswith("-"):
            assert re.split(r"[<>=!\[ ]", entry)[0].lower() in declared, entry


def test_core_packages_are_declared():
    declared = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in pyproject()["project"]["dependencies"]}
    core = {
        "torch",
        "jupyterlab",
        "ipywidgets",
        "matplotlib",
        "seaborn",
        "sentencepiece",
        "papermill",
    }
    assert core <= declared
    assert "nbval" not in declared, "nbval is a pytest plugin: it belongs in the dev extra, not the runtime"
    dev = {
        re.split(r"[<>=!\[ ]", d)[0].lower() for d in pyproject()["project"]["optional-dependencies"]["dev"]
    }
    assert {"pytest", "nbval", "ruff", "transformers", "datasets"} <= dev


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_lists_its_commands_and_rejects_unknown_ones():
    ok = subprocess.run([sys.executable, "-m", "lab"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pretrain" in ok.stdout and "finetune" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lab", "pretrian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


# ---------------------------------------------------------------------------------------------- the house


LAYERS = {"pretrain": 1, "finetune": 2, "analysis": 3, "notebook": 4}  # core (lab/*.py) is 0


def lab_imports() -> dict[str, set[str]]:
    """module -> the lab modules it imports anywhere in its body (TYPE_CHECKING and function-level too)."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "lab").rglob("*.py")}  # fmt: skip
    edges = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}  # fmt: skip
        edges[name] = {m for m in found if m in files and m != name}
    return edges


def test_imports_point_one_way_and_nothing_imports_the_benchmark():
    def layer(module):
        part = module.split(".")[1] if module.count(".") >= 1 else ""
        return 9 if part == "bench" else LAYERS.get(part, 0)

    upward = sorted((a, b) for a, bs in lab_imports().items() for b in bs
                    if a != "lab.__main__" and (layer(b) > layer(a) or (layer(b) == 9 and layer(a) != 9)))  # fmt: skip
    assert not upward, f"imports against core <- pretrain <- finetune <- analysis <- notebook: {upward}"


def test_fine_tuning_does_not_reach_into_pre_training():
    """Fine-tuning reads a run's exported files, never pre-training's code (the synthetic language both
    use is the core's lab/synthetic.py)."""
    reaching = sorted((a, b) for a, bs in lab_imports().items() for b in bs
                      if a.startswith("lab.finetune") and b.startswith("lab.pretrain"))  # fmt: skip
    assert not reaching, reaching


def test_no_import_cycle_in_lab():
    edges, state, cycles = lab_imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def verb_configs():
    from lab.analysis.runs import ExperimentConfig
    from lab.bench.benchmark import BenchConfig
    from lab.bench.gpucheck import GpuCheckConfig
    from lab.finetune.config import FinetuneConfig
    from lab.finetune.table import TableConfig
    from lab.notebook.runner import SweepConfig
    from lab.pretrain.config import PretrainConfig

    return [
        PretrainConfig,
        FinetuneConfig,
        TableConfig,
        ExperimentConfig,
        SweepConfig,
        BenchConfig,
        GpuCheckConfig,
    ]


def test_every_flag_is_a_config_field_with_its_help():
    import dataclasses

    from lab.cli import config_parser

    for cls in verb_configs():
        parser = config_parser(cls, "prog", "")
        flags = {a.dest: a for a in parser._actions}
        for field in dataclasses.fields(cls):
            if field.name in ("pretrain", "finetune"):  # BenchConfig's nested loop sizes, set in code
                continue
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
            assert flags[field.name].help.startswith(field.metadata["help"]), (cls.__name__, field.name)


def test_one_vocabulary_across_verbs():
    import dataclasses

    from lab.finetune.config import FinetuneConfig
    from lab.pretrain.config import PretrainConfig

    for cls in verb_configs():
        names = {f.name for f in dataclasses.fields(cls)}
        assert "out" not in names and "out_dir" in names, cls.__name__
    for name in ("dtype", "compile"):
        pre, fine = ({f.name: f for f in dataclasses.fields(c)}[name].metadata["choices"]
                     for c in (PretrainConfig, FinetuneConfig))  # fmt: skip
        assert tuple(pre) == tuple(fine), name


def test_a_config_that_drives_others_holds_them_with_dotted_flags(tmp_path):
    import dataclasses
    import json

    from lab.analysis.runs import PER_RUN, ExperimentConfig
    from lab.cli import config_parser, parse_config
    from lab.pretrain.config import PretrainConfig

    parser = config_parser(ExperimentConfig, "prog", "", PER_RUN)
    text = parser.format_help()
    assert (
        "--pretrain.steps INT" in text
        and "--finetune.epochs INT" in text
        and "--pretrain.sharing" not in text
    )
    steps = {f.name: f for f in dataclasses.fields(PretrainConfig)}["steps"]
    assert steps.metadata["help"] in " ".join(text.split())  # the help comes from the field
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"pretrain": {"steps": 7, "lr": 0.01}, "finetune": {"epochs": 4}}))
    cfg = parse_config(ExperimentConfig, parser, ["--config", str(path), "--pretrain.steps", "9"])
    assert (cfg.pretrain.steps, cfg.pretrain.lr, cfg.finetune.epochs) == (9, 0.01, 4)  # flags over the file
    assert (
        cfg.pretrain.batch_size == ExperimentConfig().pretrain.batch_size
    )  # the rest as the default holds it
    assert {f.name for f in dataclasses.fields(ExperimentConfig)}.isdisjoint(
        {"steps", "epochs", "preset", "lr"}
    )


def test_user_errors_exit_2_with_the_refusal_named(capsys):
    import pytest

    from lab.pretrain.cli import cli

    with pytest.raises(SystemExit) as stop:
        cli(["--steps", "-1"])
    assert stop.value.code == 2 and "PretrainConfig.steps must be >= 0" in capsys.readouterr().err


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
