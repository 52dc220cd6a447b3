"""The sharing experiment end to end: pre-train ES, NES and GDES over seeds, fine-tune every
discriminator on a list of tasks over seeds, and write the tug-of-war report and the downstream table,
with paired statistics, into one experiment directory.

    python -m lab experiment --recipe cpu-results --plan    # every run, with a measured time estimate
    python -m lab experiment --recipe cpu-results           # run (a rerun resumes where it stopped)
    python -m lab experiment --recipe gpu --data-dir /data  # xsmall on WikiText-2 + GLUE, one GPU

Experiment directory (`out_dir`):
    experiment.json                          the settings; a rerun with other settings is refused
    experiment.jsonl                         run log: every invocation, run started / reused / finished
    calibration.json                         measured seconds per pre-training step, per fine-tuning example
    pretrain/<mode>-s<seed>/                 lab.pretrain.loop run directories
    finetune/<mode>-s<seed>/<task>/f<seed>/  lab.finetune.loop outputs (results.json), one fine-tuning seed each
    report/ (or `report_dir`)                tables (CSV + markdown), figures next to their CSV, summary.json

Resuming: a pre-training run whose summary.json says it completed `steps` is reused; one with a
checkpoint resumes from it (train() does that); a fine-tuning run with a results.json is reused.
Runs go in pre-training-seed order (all modes of seed 0, their fine-tuning, then seed 1, ...), so an
experiment cut short still has complete, paired groups.
Each run's path, configuration, status and time estimate, and the progress line over the runs, are
in lab/analysis/runs.py, with the experiment's config; this module drives them and writes the report.

The statistics (lab/analysis/stats.py): per task and mode mean ± std over seeds, and the paired differences
GDES − ES, GDES − NES and NES − ES over (pre-training seed, fine-tuning seed) pairs with a bootstrap
95 % CI; the same for the tug-of-war quantities of each pre-training run (pairs: pre-training seeds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from lab.analysis import stats
from lab.analysis import tug_of_war as analysis
from lab.analysis.runs import (
    ExperimentConfig,
    ExperimentProgress,
    PlannedRun,
    calibrate,
    estimate,
    finetune_config,
    missing_data,
    planned_runs,
    pretrain_config,
    read_json,
    status,
    task_sizes,
)
from lab.cli import INTERRUPTED, config_parser, parse_values, run_verb
from lab.pretrain.meter import duration
from lab.util import append_jsonl, atomic_write_json, data_dir, replace_strict

COMPARISONS = (("gdes", "es"), ("gdes", "nes"), ("nes", "es"))


# Named recipes. Each is sized for its machine; the README states how long each took.
# a table, one entry per line, easier to read across than reflowed (so the formatter skips it)
RECIPES: dict[str, dict] = {
    # the test suite and the notebook's default: minutes of nothing, every code path once
    "smoke": dict(
        preset="tiny", corpus="synthetic:seed=0,words=30000", steps=8, batch_size=4, seq_len=32,
        pretrain_seeds=(0, 1), finetune_seeds=(1, 2), epochs=1, max_train_examples=48,
        max_eval_examples=48, eval_batches=2, calibration_steps=3,
    ),
    # `make results`: 3 modes x 3 pre-training seeds x 3 fine-tuning seeds on synth_tag, sized for a
    # 2-core CPU shared with other jobs: `make demo`'s pre-training at 120 steps instead of 300;
    # fine-tuning 5 epochs on 300 training and 300 dev sentences. (synth_gram stayed at chance with this
    # little fine-tuning, for 500 sentences x 5 epochs: add it with --tasks synth_tag,synth_gram)
    "cpu-results": dict(
        preset="mini", corpus="synthetic", steps=120, batch_size=16, seq_len=64, lr=1e-3,
        pretrain_seeds=(0, 1, 2), finetune_seeds=(1, 2, 3), tasks=("synth_tag",),
        epochs=5, max_train_examples=500, max_eval_examples=300, report_dir="figures/experiment_synthetic",
    ),
    # `make gpu-recipe`: xsmall on WikiText-2 (8.2M tokens per run) and five GLUE tasks (4,000 training
    # examples, 3 epochs) x 3 fine-tuning seeds, sized for <= 10 min on one H100 / H200; `--plan` there
    # measures the estimate before anything trains. MRPC and RTE are skipped (with the reason) when their
    # files are missing under <data_dir>/glue.
    "gpu": dict(
        preset="xsmall", corpus="{data_dir}/wikitext-2/wiki.train.tokens", vocab_size=8000, steps=1000,
        batch_size=64, seq_len=128, lr=5e-4, warmup_steps=100, eval_batches=8, pretrain_seeds=(0,),
        finetune_seeds=(1, 2, 3), tasks=("cola", "sst2", "mrpc", "stsb", "rte"), glue_dir="{data_dir}/glue",
        epochs=3, max_train_examples=4000, device="cuda",
    ),
}  # fmt: skip


def recipe(name: str, data_root: str | Path | None = None, **overrides) -> ExperimentConfig:
    """The named recipe's config, `{data_dir}` filled with `data_root` ($LAB_DATA_DIR by default), the
    experiment directory runs/experiment/<name> unless given, and `overrides` on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    root = str(Path(data_root).expanduser() if data_root else data_dir())
    fields = {k: v.replace("{data_dir}", root) if isinstance(v, str) else v for k, v in RECIPES[name].items()}
    return replace_strict(ExperimentConfig(out_dir=f"runs/experiment/{name}"), **{**fields, **overrides})


# ---------------------------------------------------------------------------------------------- the experiment


def execute(run: PlannedRun, cfg: ExperimentConfig) -> None:
    """Train one run (a pre-training run resumes from its checkpoint by itself)."""
    if run.kind == "pretrain":
        from lab.pretrain import loop as pretrain

        pretrain.train(pretrain_config(cfg, run))
    else:
        from lab.finetune import loop as finetune

        finetune.train(finetune_config(cfg, run))


def check_settings(cfg: ExperimentConfig) -> None:
    """Refuse to mix runs of different settings in one directory. The lists (modes, seeds, tasks), the
    device, the report folder and the progress display may change between invocations."""
    saved = read_json(Path(cfg.out_dir) / "experiment.json")
    free = {
        "modes",
        "pretrain_seeds",
        "finetune_seeds",
        "tasks",
        "device",
        "report_dir",
        "progress",
        "progress_every",
        "out_dir",
    }
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the saved file
    changed = sorted(k for k in now if k not in free and k in saved and saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{cfg.out_dir} holds an experiment with other settings ({detail}); use a new out_dir, "
            "or the same settings to resume it"
        )


def plan(cfg: ExperimentConfig, calibrate_now: bool = True) -> dict:
    """Every run with its status and estimated time; `calibrate_now` times a few steps here first.
    Trains nothing beyond the calibration."""
    check_settings(cfg)
    skipped = {t: why for t in cfg.tasks if (why := missing_data(t, cfg))}
    tasks = tuple(t for t in cfg.tasks if t not in skipped)
    runs = planned_runs(cfg, tasks)
    rows, calibration, total = [], None, 0.0
    if calibrate_now:
        calibration = calibrate(cfg, tasks)
        sizes = {t: task_sizes(t, cfg) for t in tasks}
    for run in runs:
        state = status(run, cfg)
        seconds = estimate(run, cfg, calibration, sizes) if calibration else math.nan
        if state != "done":
            total += seconds
        rows.append(
            {
                "run": run.name,
                "status": state,
                "estimate_s": seconds if state != "done" else 0.0,
                "path": str(run.path(cfg)),
            }
        )
    return {"runs": rows, "skipped_tasks": skipped, "total_estimate_s": total, "calibration": calibration}


def print_plan(result: dict) -> None:
    for task, why in result["skipped_tasks"].items():
        print(f"skipped task {task}: {why}")
    width = max((len(r["run"]) for r in result["runs"]), default=10)
    for i, r in enumerate(result["runs"], 1):
        shown = "reuse" if r["status"] == "done" else f"{r['status']:<6} ~{duration(r['estimate_s'])}"
        print(f"{i:>3}  {r['run']:<{width}}  {shown}")
    todo = sum(r["status"] != "done" for r in result["runs"])
    cal = result["calibration"] or {}
    print(
        f"{len(result['runs'])} runs, {todo} to do; estimated {duration(result['total_estimate_s'])} on this "
        f"machine (calibrated: {cal.get('pretrain_step_s', math.nan):.3f} s per pre-training step)"
    )


def run(cfg: ExperimentConfig) -> dict:
    """Run (or resume) the whole experiment, then write the report; returns the report's summary."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    atomic_write_json(out / "experiment.json", dataclasses.asdict(cfg))
    log = out / "experiment.jsonl"
    planned = plan(cfg)
    for task, why in planned["skipped_tasks"].items():
        print(f"skipping task {task}: {why}", flush=True)
    tasks = tuple(t for t in cfg.tasks if t not in planned["skipped_tasks"])
    runs = planned_runs(cfg, tasks)
    append_jsonl(
        log,
        {
            "event": "invocation",
            "time": _now(),
            "runs": len(runs),
            "skipped_tasks": planned["skipped_tasks"],
            "estimate_s": planned["total_estimate_s"],
        },
    )
    estimates = {r: row["estimate_s"] for r, row in zip(runs, planned["runs"])}
    todo = [r for r in runs if status(r, cfg) != "done"]
    for r in runs:
        if r not in todo:
            append_jsonl(log, {"event": "reused", "run": r.name, "time": _now()})
    progress = ExperimentProgress(todo, estimates, cfg)
    try:
        for r in todo:
            state = status(r, cfg)
            append_jsonl(
                log, {"event": "resumed" if state == "resume" else "started", "run": r.name, "time": _now()}
            )
            progress.start(r)
            t0 = time.perf_counter()
            try:
                execute(r, cfg)
            except KeyboardInterrupt:
                append_jsonl(log, {"event": "interrupted", "run": r.name, "time": _now()})
                raise
            append_jsonl(
                log,
                {
                    "event": "finished",
                    "run": r.name,
                    "time": _now(),
                    "wall_s": time.perf_counter() - t0,
                    "estimate_s": estimates[r],
                },
            )
            progress.finish(r)
    finally:
        progress.close()
    summary = report(cfg, tasks, skipped=planned["skipped_tasks"])
    append_jsonl(log, {"event": "report", "time": _now(), "dir": str(report_dir(cfg))})
    return summary


def report_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.report_dir) if cfg.report_dir else Path(cfg.out_dir) / "report"


def _now() -> str:
    """UTC time for experiment.jsonl's rows."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


# ---------------------------------------------------------------------------------------------- report


def downstream_records(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> list[dict]:
    """One record per fine-tuning run and metric: {mode, task, metric, pretrain_seed, finetune_seed,
    value}. `metric` is the results' key (best epoch) or `last_<key>` (the last epoch)."""
    records = []
    for r in planned_runs(cfg, tasks):
        if r.kind != "finetune":
            continue
        results = read_json(r.path(cfg) / "results.json")
        for per_seed in results.get("metrics_per_seed", []):
            if per_seed.get("seed") != r.finetune_seed:
                continue
            for metric, value in per_seed.items():
                if metric in ("seed", "best_epoch") or not isinstance(value, int | float):
                    continue
                records.append(
                    {
                        "mode": r.mode,
                        "task": r.task,
                        "metric": metric,
                        "main": results["main_metric"],
                        "pretrain_seed": r.pretrain_seed,
                        "finetune_seed": r.finetune_seed,
                        "value": float(value),
                    }
                )
    return records


def report(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None, skipped: dict | None = None) -> dict:
    """The tug-of-war over seeds (lab.analysis.tug_of_war.seeded_report) and the downstream tables, into report_dir.
    `skipped`: tasks left out, with the reason (recorded in summary.json)."""
    tasks = cfg.tasks if tasks is None else tasks
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    finished = {
        (r.mode, r.pretrain_seed): r.path(cfg)
        for r in planned_runs(cfg, tasks)
        if r.kind == "pretrain" and status(r, cfg) == "done"
    }
    summary = {"experiment": str(cfg.out_dir), "skipped_tasks": skipped or {}, "notes": []}
    if finished:
        summary["tug_of_war"] = analysis.seeded_report(finished, out, COMPARISONS)
    records = downstream_records(cfg, tasks)
    if records:
        summary["downstream"] = downstream_tables(records, out)
    if not stats.plotting_available():
        summary["notes"].append(stats.PLOTTING_UNAVAILABLE)
    atomic_write_json(out / "summary.json", summary)
    return summary


def downstream_tables(records: list[dict], out: Path) -> dict:
    """downstream.{csv,md}: mean ± std per task, metric and mode; downstream_differences.{csv,md}: the
    paired differences between modes; downstream.png: the main metric per task and mode (± std)."""
    table = stats.summarize(records, ("task", "metric", "mode"))
    analysis.write_csv(out / "downstream.csv", table)
    main = {(r["task"], r["metric"]) for r in records if r["metric"] in (r["main"], f"last_{r['main']}")}
    shown = [r for r in table if (r["task"], r["metric"]) in main]
    analysis.write_markdown(out / "downstream.md", [_pretty(r) for r in shown])
    diffs = stats.compare_modes(records, ("task", "metric"), COMPARISONS)
    analysis.write_csv(out / "downstream_differences.csv", diffs)
    analysis.write_markdown(
        out / "downstream_differences.md", [_pretty(r) for r in diffs if (r["task"], r["metric"]) in main]
    )
    figure = stats.bars_with_spread(
        [r for r in records if r["metric"] == r["main"]],
        "task",
        "value",
        "mode",
        out / "downstream",
        title="Fine-tuned discriminator, best dev epoch (mean ± std over seeds)",
    )
    return {
        "table": shown,
        "differences": [r for r in diffs if (r["task"], r["metric"]) in main],
        "figures": [str(p) for p in figure or []],
    }


def _pretty(row: dict) -> dict:
    """A table row with the numbers rounded for markdown (the CSV keeps full precision)."""
    return {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str] | None = None) -> int:
    """`python -m lab experiment`: a recipe, with ExperimentConfig's flags on top of it."""
    parser = config_parser(ExperimentConfig, "python -m lab experiment", __doc__.split("\n")[0])
    parser.add_argument(
        "--recipe", help=f"the named settings to start from, one of {', '.join(RECIPES)} [cpu-results]"
    )
    parser.add_argument(
        "--plan", action="store_true", help="list every run with an estimated time; train nothing"
    )
    parser.add_argument("--data-dir", help="data root with wikitext-2/ and glue/ [$LAB_DATA_DIR]")
    values = parse_values(parser, sys.argv[1:] if argv is None else argv)
    name, only_plan = values.pop("recipe", "cpu-results"), values.pop("plan", False)
    data_root = values.pop("data_dir", None)

    def action() -> None:
        cfg = recipe(name, data_root, **values)
        if only_plan:
            print_plan(plan(cfg))
            return
        summary = run(cfg)
        print(f"report: {report_dir(cfg)} (summary.json, tables, figures)")
        for note in summary.get("notes", []):
            print(f"note: {note}")

    code = run_verb(action)
    if code == INTERRUPTED:
        print("rerun the same command to resume", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(cli())
