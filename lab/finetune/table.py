"""The fine-tuning results table: results.json files of several checkpoints and tasks collected into
one CSV and one bar chart, next to the paper's GLUE numbers.

    results_table(["runs/ft"], "runs/ft/glue_results")
    python -m lab table --runs runs/ft --out-dir runs/ft     # the same: runs/ft/glue_results.csv and .png
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lab.cli import config_parser, param, parse_config, run_verb
from lab.finetune.glue import GLUE_TASKS
from lab.finetune.tasks import TASKS, get_task

# GLUE dev results, in percent, main metric of each task (MNLI: matched): DeBERTaV3 from the paper
# (§5.1: the large models' GLUE table, MNLI of base / small / xsmall); ELECTRA-Small as re-implemented
# in PyTorch by richarddwang/electra_pytorch (README, mean of 10 fine-tuning runs).
# a table, one entry per line, easier to read across than reflowed (so the formatter skips it)
PAPER_RESULTS = {
    "DeBERTaV3-large (paper)": {"cola": 75.3, "sst2": 96.9, "mrpc": 92.2, "stsb": 93.0, "qqp": 93.0,
                                "mnli": 91.8, "qnli": 96.0, "rte": 92.7},
    "DeBERTaV3-base (paper)": {"mnli": 90.6},
    "DeBERTaV3-small (paper)": {"mnli": 88.3},
    "DeBERTaV3-xsmall (paper)": {"mnli": 88.1},
    "ELECTRA-Small re-impl. (paper)": {"cola": 58.7, "sst2": 88.0, "mrpc": 86.0, "stsb": 86.2, "qqp": 88.6,
                                       "mnli": 80.4, "qnli": 87.5, "rte": 67.5},
}  # fmt: skip


def checkpoint_label(init: str) -> str:
    """A short row name for a checkpoint: the run dir's name, or the hub/dir name."""
    path = Path(init)
    if path.name == "discriminator" and path.parent.name == "export":
        return path.parent.parent.name
    return path.name or str(init)


def results_table(
    paths, out_stem: str | Path = "runs/glue_results", include_paper: bool = True
) -> list[dict]:
    """Collect results.json files (or folders searched for them) into one table of main metrics in percent.

    Rows are checkpoints (plus the paper's rows), columns are tasks; writes `<out_stem>.csv` and
    `<out_stem>.png` (grouped bars), and returns the rows. Per task the CSV has the mean over seeds of
    the test score of the epoch chosen on validation (`<task>`), its std, the number of seeds, the mean
    test score of the last epoch (`<task>_last`), and the test examples scored next to the official
    test size (`<task>_n_test`, `<task>_test_official`: they differ for a `max_eval_examples` slice or
    a split that lost rows; results.json's `splits` says which). GLUE's test splits are its dev files
    (lab/finetune/glue.py), so its columns compare with the paper's dev numbers.
    """
    files = []
    for p in [paths] if isinstance(paths, str | Path) else paths:
        p = Path(p)
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no results.json found in {paths}; run `python -m lab finetune ...` first")
    by_label: dict[str, dict] = {}
    for f in files:
        r = json.loads(Path(f).read_text())
        key = r["main_metric"]
        row = by_label.setdefault(
            checkpoint_label(r["init"]), {"checkpoint": checkpoint_label(r["init"]), "source": "ours"}
        )
        t = r["task"]
        row[t] = 100 * r["mean"][key]
        row[f"{t}_std"] = 100 * r["std"][key]
        row[f"{t}_seeds"] = len(r["metrics_per_seed"])
        if f"last_{key}" in r["mean"]:
            row[f"{t}_last"] = 100 * r["mean"][f"last_{key}"]
        row[f"{t}_n_test"] = r["n_test_examples"]
        row[f"{t}_test_official"] = r.get("official_test_examples")
    rows = list(by_label.values())
    if include_paper:
        rows += [{"checkpoint": name, "source": "paper", **scores} for name, scores in PAPER_RESULTS.items()]
    ours = [t for t in TASKS if any(t in r for r in rows if r["source"] == "ours")]
    names = ours or [t.name for t in GLUE_TASKS]
    columns = ["checkpoint", "source"] + [
        f"{t}{suffix}"
        for t in names
        for suffix in ("", "_std", "_seeds", "_last", "_n_test", "_test_official")
    ]

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(out_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {c: (f"{row[c]:.2f}" if isinstance(row.get(c), float) else row.get(c, "")) for c in columns}
            )
    _plot_table(rows, names, out_stem.with_suffix(".png"))
    return rows


def _plot_table(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if any(t in r for t in tasks)]
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(shown)) ** 0.5), 4))
    for i, row in enumerate(shown):
        xs = [j + i * width for j, t in enumerate(tasks) if t in row]
        ys = [row[t] for t in tasks if t in row]
        err = [row.get(f"{t}_std", 0.0) for t in tasks if t in row]
        ax.bar(
            xs, ys, width, yerr=err, label=row["checkpoint"], hatch="//" if row["source"] == "paper" else None
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({get_task(t).main_key})" for t in tasks])
    ax.set_ylabel("test score (%; GLUE: dev files)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class TableConfig:
    runs: tuple[str, ...] = param((), "results.json files, or folders searched for them (comma list)")
    out_dir: str = param("runs", "folder for glue_results.csv and glue_results.png")
    paper: bool = param(True, "add the paper's rows (DeBERTaV3, ELECTRA-Small) to the table")


def cli(argv: list[str]) -> int:
    """`python -m lab table --runs DIR[,DIR...] --out-dir OUT`: OUT/glue_results.csv and .png."""
    parser = config_parser(TableConfig, "python -m lab table", __doc__.split("\n")[0])
    cfg = parse_config(TableConfig, parser, argv)
    if not cfg.runs:
        parser.error("--runs is required: the fine-tuning outputs (results.json files or folders) to collect")

    def action() -> None:
        stem = Path(cfg.out_dir) / "glue_results"
        rows = results_table(cfg.runs, stem, include_paper=cfg.paper)
        print(f"wrote {stem}.csv and .png ({len(rows)} rows)")

    return run_verb(action)
