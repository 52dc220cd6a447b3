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
