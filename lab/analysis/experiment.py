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

The statistics (lab/analysis/stats.py, lab/analysis/claims.py): the pre-training seed is the unit.
Downstream scores are averaged over the fine-tuning seeds of each pre-training seed, then GDES − ES,
GDES − NES and ES − NES (the paper's ordering, claim (c)) are compared paired over pre-training seeds
(t interval, Holm within each claim's named primary family, power at the observed effect, the exact
sign-flip p Holm-adjusted with its floor, bootstrap with its small-n caveat, two-level bootstrap); the
same for the tug-of-war quantities of each pre-training run (GDES − ES, GDES − NES, NES − ES). Every
table is computed from the per-run rows the report writes first (tug_of_war_runs.csv,
downstream_runs.csv), and the results page (README.md in the report folder, written by
lab/analysis/results_page.py) is generated from those tables: `--report-only` rebuilds it all from the
rows alone.

Kernel pinning: CPU kernels round differently per instruction set, and a few hundred steps amplify
the last bits, so a recipe with cpu_kernels="avx2" (cpu-results) pins torch, oneDNN and MKL to their
AVX2 code paths (KERNEL_PIN); `python -m lab experiment` re-executes itself with them set, since they
only act before torch is imported. `--cpu-kernels native` turns it off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from lab.analysis import claims, stats
from lab.analysis import tug_of_war as analysis
from lab.analysis.results_page import (
    ANALYSIS_FIXED,
    FLATTENING_COLUMNS,
    FLATTENING_RULE,
    design_settings,
    difference_rows,
    read_csv,
    results_page,
)
from lab.analysis.runs import (
    CONTROL,
    NESTED_MAY_CHANGE,
    PER_RUN,
    ExperimentConfig,
    ExperimentProgress,
    PlannedRun,
    calibrate,
    depends_on,
    estimate,
    finetune_config,
    missing_data,
    planned_runs,
    pretrain_config,
    read_json,
    status,
    task_sizes,
)
from lab.cli import INTERRUPTED, config_parser, dotted, may_change_on_resume, parse_values, run_verb
from lab.finetune import loop as finetune
from lab.pretrain import loop as pretrain
from lab.pretrain.meter import duration
from lab.sharing import ES, GDES, NES
from lab.util import append_jsonl, atomic_write_json, data_dir, read_jsonl, replace_strict

COMPARISONS = claims.TUG_OF_WAR_COMPARISONS
# The primary comparisons, fixed in code before the run (lab/analysis/claims.py), one family per claim of
# the paper, Holm within each: (a) and (b) on each pre-training run's quantities (claims.TUG_OF_WAR_CLAIMS),
# (c) the paper's ordering GDES > ES > NES on every task's main metric (claims.ORDERING, filled in per
# task by ordering_family). Every other comparison in the tables is exploratory.
PRIMARY = claims.TUG_OF_WAR_CLAIMS
DOWNSTREAM_FAMILY = claims.ORDERING_FAMILY
# (c)'s three differences, then each mode's gain over the untrained control (exploratory)
DOWNSTREAM_COMPARISONS = (
    *(c.modes for c in claims.ORDERING),
    *((mode.name, CONTROL) for mode in (GDES, ES, NES)),
)
# set before torch is imported, they make torch (ATen), oneDNN and MKL use their AVX2 kernels only
KERNEL_PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


# Named recipes. Each is sized for its machine; the README states how long each took.
# a table, one entry per line, easier to read across than reflowed (so the formatter skips it)
RECIPES: dict[str, dict] = {
    # the test suite and the notebook's default: minutes of nothing, every code path once
    "smoke": dict(
        pretrain=dict(preset="tiny", corpus="synthetic:seed=0,words=30000", steps=8, batch_size=4, seq_len=32,
                      eval_batches=2),
        finetune=dict(epochs=1, max_train_examples=48, max_eval_examples=48),
        pretrain_seeds=(0, 1), finetune_seeds=(1, 2), calibration_steps=3,
    ),
    # `make results`: 3 modes x 10 pre-training seeds (+ the untrained control) x 2 fine-tuning seeds on
    # synth_gram (primary: grammaticality, which takes context) and synth_tag (exploratory), sized for
    # <= 60 min of `--plan`'s estimate on a 2-core CPU. `tiny` on the synthetic language's ~900 pieces:
    # in a pilot its held-out MLM loss and its discriminator's fixed-corruption error flatten by 1,500
    # steps (the last quarter under 5 % of the drop; the page checks every run). Ten seeds: the earlier
    # design's (c) effect (dz ~ 1) needs 10 for 80 % power at 0.05. One thread per run and two runs at
    # once: the digits do not depend on the machine's core count; kernels pinned to AVX2.
    "cpu-results": dict(
        pretrain=dict(preset="tiny", corpus="synthetic", vocab_size=1000, steps=1500, batch_size=16, seq_len=64,
                      lr=2e-3, eval_every=75, eval_batches=4),
        pretrain_seeds=tuple(range(10)), finetune_seeds=(1, 2), tasks=("synth_gram", "synth_tag"),
        primary_tasks=("synth_gram",), report_dir="figures/experiment_synthetic", cpu_kernels="avx2",
        threads=1, workers=2,
    ),
    # the same recipe on a second language: another grammar's lexicon, frequencies and topics
    # (`synthetic:1`); its page says which verdicts agree with cpu-results'
    "cpu-results-lang1": dict(
        pretrain=dict(preset="tiny", corpus="synthetic:1", vocab_size=1000, steps=1500, batch_size=16, seq_len=64,
                      lr=2e-3, eval_every=75, eval_batches=4),
        pretrain_seeds=tuple(range(10)), finetune_seeds=(1, 2), tasks=("synth_gram", "synth_tag"),
        primary_tasks=("synth_gram",), report_dir="figures/experiment_synthetic_lang1", cpu_kernels="avx2",
        threads=1, workers=2, compare_with="figures/experiment_synthetic",
    ),
    # `make results-wikitext`: real text on the CPU, claims (a) and (c) (WikiText-2 has no word classes,
    # so (b)'s class gap is not measured): `tiny` with an 8,000-piece SentencePiece vocabulary x 3
    # pre-training seeds (+ the untrained control), GLUE CoLA / SST-2 / STS-B x 1 fine-tuning seed (2,000
    # training examples; validation carved from train, the official dev set as test, 1,000 scored).
    # Resumable like every recipe; `--plan` gives the time on this machine first.
    "cpu-wikitext": dict(
        pretrain=dict(preset="tiny", corpus="{data_dir}/wikitext-2/wiki.train.tokens", vocab_size=8000,
                      steps=1500, batch_size=16, seq_len=128, lr=2e-3, eval_every=75, eval_batches=4),
        finetune=dict(glue_dir="{data_dir}/glue", max_train_examples=2000, max_eval_examples=1000),
        pretrain_seeds=(0, 1, 2), finetune_seeds=(1,), tasks=("cola", "sst2", "stsb"),
        report_dir="figures/experiment_wikitext2", cpu_kernels="avx2", threads=1, workers=2,
    ),
    # `make gpu-recipe`: xsmall on WikiText-2 (3.3M tokens per run) x 3 pre-training seeds and three GLUE
    # tasks (2,000 training examples, 3 epochs) x 3 fine-tuning seeds: the same number of pre-training
    # steps and fine-tuning examples as the earlier one-seed recipe that fit <= 10 min on one H100, spread
    # over three pre-training seeds so the claims can be tested (n = 3). `--plan` there measures the
    # estimate before anything trains.
    "gpu": dict(
        pretrain=dict(preset="xsmall", corpus="{data_dir}/wikitext-2/wiki.train.tokens", vocab_size=8000,
                      steps=400, batch_size=64, seq_len=128, lr=5e-4, warmup_steps=40, eval_batches=8,
                      device="cuda"),
        finetune=dict(glue_dir="{data_dir}/glue", epochs=3, max_train_examples=2000, device="cuda"),
        pretrain_seeds=(0, 1, 2), finetune_seeds=(1, 2, 3), tasks=("cola", "sst2", "stsb"),
    ),
}  # fmt: skip


def recipe(name: str, data_root: str | Path | None = None, **overrides) -> ExperimentConfig:
    """The named recipe's config, `{data_dir}` filled with `data_root` ($LAB_DATA_DIR by default), the
    experiment directory runs/experiment/<name> unless given, and `overrides` on top (a nested config's
    as dotted keys, "pretrain.steps", or a dict of its own: pretrain={"steps": 5})."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    root = str(Path(data_root).expanduser() if data_root else data_dir())
    fields = {
        k: v.replace("{data_dir}", root) if isinstance(v, str) else v
        for k, v in dotted(RECIPES[name]).items()
    }
    return replace_strict(
        ExperimentConfig(out_dir=f"runs/experiment/{name}"), **{**fields, **dotted(overrides)}
    )


# ---------------------------------------------------------------------------------------------- the experiment


def pin_threads(threads: int) -> None:
    """torch's intra-op threads for this process (0: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def execute(run: PlannedRun, cfg: ExperimentConfig) -> None:
    """Train one run (a pre-training run resumes from its checkpoint by itself)."""
    pin_threads(cfg.threads)
    if run.kind == "pretrain":
        pretrain.train(pretrain_config(cfg, run))
    else:
        finetune.train(finetune_config(cfg, run))


def check_settings(cfg: ExperimentConfig) -> None:
    """Refuse to mix runs of different settings in one directory. The fields marked
    `may_change_on_resume` (the lists of modes, seeds and tasks, the report folder, the progress
    display) and the devices (NESTED_MAY_CHANGE) may change between invocations."""
    saved = dotted(read_json(Path(cfg.out_dir) / "experiment.json"))
    free = {*may_change_on_resume(cfg), *NESTED_MAY_CHANGE}
    now = dotted(json.loads(json.dumps(dataclasses.asdict(cfg))))  # tuples as lists, like the saved file
    changed = sorted(k for k in now if k not in free and k in saved and saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{cfg.out_dir} holds an experiment with other settings ({detail}); use a new out_dir, "
            "or the same settings to resume it"
        )


def kernel_path(cfg: ExperimentConfig) -> str:
    """The CPU kernel path torch runs here ("AVX2", "AVX512", ...). With cpu_kernels="avx2" on a CPU
    run, anything but AVX2 is refused: the pin acts only when set before torch is imported."""
    capability = torch.backends.cpu.get_cpu_capability()
    if cfg.cpu_kernels == "avx2" and cfg.pretrain.device != "cuda" and capability != "AVX2":
        pins = " ".join(f"{k}={v}" for k, v in KERNEL_PIN.items())
        raise ValueError(
            f"cpu_kernels='avx2' but this Python runs torch's {capability} CPU kernels; start it with "
            f"{pins} set (`python -m lab experiment` does that itself), or use cpu_kernels='native' "
            "(--cpu-kernels native) and a new out_dir"
        )
    return capability


def plan(cfg: ExperimentConfig, calibrate_now: bool = True) -> dict:
    """Every run with its status and estimated time; `calibrate_now` times a few steps here first.
    Trains nothing beyond the calibration."""
    check_settings(cfg)
    pin_threads(cfg.threads)  # the calibration times a run as the runs will train
    if calibrate_now:
        kernel_path(cfg)
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
    return {
        "runs": rows,
        "skipped_tasks": skipped,
        "total_estimate_s": total,
        "wall_estimate_s": total / cfg.workers,  # workers share the runs (each run's cost measured alone)
        "workers": cfg.workers,
        "calibration": calibration,
    }


def print_plan(result: dict) -> None:
    for task, why in result["skipped_tasks"].items():
        print(f"skipped task {task}: {why}")
    width = max((len(r["run"]) for r in result["runs"]), default=10)
    for i, r in enumerate(result["runs"], 1):
        shown = "reuse" if r["status"] == "done" else f"{r['status']:<6} ~{duration(r['estimate_s'])}"
        print(f"{i:>3}  {r['run']:<{width}}  {shown}")
    todo = sum(r["status"] != "done" for r in result["runs"])
    cal = result["calibration"] or {}
    workers = result.get("workers", 1)
    shared = f", about {duration(result['wall_estimate_s'])} on {workers} workers" if workers > 1 else ""
    print(
        f"{len(result['runs'])} runs, {todo} to do; estimated {duration(result['total_estimate_s'])} of runs "
        f"on this machine{shared} (calibrated: {cal.get('pretrain_step_s', math.nan):.3f} s per "
        "pre-training step)"
    )


def code_version() -> str:
    """The git commit of the code that runs (with "+changes" when files under lab/ differ from it), or
    "unknown" outside a git checkout: recorded with every invocation, so a results page names the code
    its runs came from."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lab"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def run(cfg: ExperimentConfig, command: str = "") -> dict:
    """Run (or resume) the whole experiment, then write the report; returns the report's summary.
    `command`: how it was started (the CLI passes its command line), recorded in experiment.jsonl."""
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
            "commit": code_version(),
            "command": command,
            "workers": cfg.workers,
            "runs": len(runs),
            "cpu_kernels": kernel_path(cfg),
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
        train_all(todo, cfg, log, progress, estimates)
    finally:
        progress.close()
    summary = report(cfg, tasks, skipped=planned["skipped_tasks"])
    append_jsonl(log, {"event": "report", "time": _now(), "dir": str(report_dir(cfg))})
    return summary


def train_all(todo: list[PlannedRun], cfg: ExperimentConfig, log: Path, progress, estimates: dict) -> None:
    """Train the runs `todo`, `cfg.workers` at a time, each in its own process when workers > 1 (spawned:
    a fresh torch, the kernel pin inherited through the environment). A run starts once the run it needs
    is finished (runs.depends_on); among the ready ones, the first in plan order. Every start and finish is
    logged in experiment.jsonl; a failed run stops the experiment (after the running ones end) with its
    error; Ctrl-C stops it (rerun to resume)."""

    def started(r: PlannedRun) -> float:
        event = "resumed" if status(r, cfg) == "resume" else "started"
        append_jsonl(log, {"event": event, "run": r.name, "time": _now()})
        progress.start(r)
        return time.perf_counter()

    def finished(r: PlannedRun, t0: float) -> None:
        wall = time.perf_counter() - t0
        append_jsonl(log, {"event": "finished", "run": r.name, "time": _now(), "wall_s": wall,
                           "estimate_s": estimates[r]})  # fmt: skip
        progress.finish(r)

    if cfg.workers == 1:
        for r in todo:
            t0 = started(r)
            try:
                execute(r, cfg)
            except KeyboardInterrupt:
                append_jsonl(log, {"event": "interrupted", "run": r.name, "time": _now()})
                raise
            finished(r, t0)
        return
    pending, running = list(todo), {}
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        while pending or running:
            busy = {r for r, _ in running.values()} | set(pending)
            for r in [r for r in pending if depends_on(r) not in busy][: cfg.workers - len(running)]:
                pending.remove(r)
                running[pool.submit(execute, r, cfg)] = (r, started(r))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                r, t0 = running.pop(future)
                future.result()  # a failed run raises here, with the worker's traceback
                finished(r, t0)
    except BaseException:
        for r, _ in running.values():
            append_jsonl(log, {"event": "interrupted", "run": r.name, "time": _now()})
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def report_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.report_dir) if cfg.report_dir else Path(cfg.out_dir) / "report"


def _now() -> str:
    """UTC time for experiment.jsonl's rows."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


# ---------------------------------------------------------------------------------------------- report

# a pre-training run failed when one of these is not finite (a flattening fraction is nan for a curve
# that never dropped: the flattening section reports it, it is no failure)
FAILURE_QUANTITIES = ("final_mlm_loss", "mean_train_mlm_loss", "mlm_area")


def downstream_records(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> list[dict]:
    """One record per fine-tuning run and test metric: {mode, task, metric, main, pretrain_seed,
    finetune_seed, value, best_epoch, epochs}. `metric` is the results' key at the epoch chosen on the
    validation split, or `last_<key>` (the last epoch); the validation metrics, which chose the epoch,
    are not reported. `mode` is a sharing mode or the untrained control (runs.CONTROL)."""
    records = []
    for r in planned_runs(cfg, tasks):
        if r.kind != "finetune":
            continue
        results = read_json(r.path(cfg) / "results.json")
        for per_seed in results.get("metrics_per_seed", []):
            if per_seed.get("seed") != r.finetune_seed:
                continue
            for metric, value in per_seed.items():
                if metric in ("seed", "best_epoch", "epochs") or metric.startswith("validation_"):
                    continue
                if not isinstance(value, int | float):
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
                        "best_epoch": per_seed["best_epoch"],
                        "epochs": per_seed["epochs"],
                    }
                )
    return records


def report(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None, skipped: dict | None = None) -> dict:
    """The per-run rows (tug_of_war_runs.csv via lab.analysis.tug_of_war.seeded_report, downstream_runs.csv),
    design.csv, then every table, figure and the results page from those rows (`tables_from_rows`),
    into report_dir. `skipped`: tasks left out, with the reason (recorded in summary.json)."""
    tasks = cfg.tasks if tasks is None else tasks
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    finished = {
        (r.mode, r.pretrain_seed): r.path(cfg)
        for r in planned_runs(cfg, tasks)
        if r.kind == "pretrain" and r.mode != CONTROL and status(r, cfg) == "done"
    }
    summary = {"experiment": str(cfg.out_dir), "skipped_tasks": skipped or {}, "notes": []}
    for stale in ("tug_of_war_runs.csv", "downstream_runs.csv"):
        (out / stale).unlink(missing_ok=True)  # rows of an earlier design must not enter these tables
    if finished:
        summary["tug_of_war"] = analysis.seeded_report(finished, out, COMPARISONS, PRIMARY)
    records = downstream_records(cfg, tasks)
    if records:
        analysis.write_csv(out / "downstream_runs.csv", records, digits=None)
    analysis.write_csv(out / "design.csv", design_rows(cfg, tasks))
    analysis.write_csv(out / "provenance.csv", provenance(Path(cfg.out_dir) / "experiment.jsonl"))
    summary.update(tables_from_rows(out))
    if not stats.plotting_available():
        summary["notes"].append(stats.PLOTTING_UNAVAILABLE)
    atomic_write_json(out / "summary.json", summary)
    return summary


def provenance(log: Path) -> list[dict]:
    """provenance.csv from experiment.jsonl: per invocation that trained something, when it started, the
    code's commit and the command (when recorded), the runs it finished and its wall time in minutes
    (from its start to its last finished run). Invocations that only reused runs are left out."""
    rows, current = [], None
    for event in read_jsonl(log) if log.is_file() else []:
        if event["event"] == "invocation":
            current = {"started": event["time"], "commit": event.get("commit", "not recorded"),
                       "command": event.get("command", "") or "not recorded", "workers": event.get("workers", "not recorded"),
                       "runs_finished": 0, "wall_minutes": 0.0}  # fmt: skip
            rows.append(current)
        elif event["event"] == "finished" and current is not None:
            current["runs_finished"] += 1
            span = time.mktime(time.strptime(event["time"], "%Y-%m-%dT%H:%M:%S")) - time.mktime(
                time.strptime(current["started"], "%Y-%m-%dT%H:%M:%S")
            )
            current["wall_minutes"] = round(span / 60, 1)
    return [r for r in rows if r["runs_finished"]]


def design_rows(cfg: ExperimentConfig, tasks: tuple[str, ...], analysis_fixed: str = ANALYSIS_FIXED[0]):
    """design.csv's rows {setting, value}: the settings the runs used; per task the training and dev
    examples one fine-tuning run really used (the task's splits under the caps, runs.task_sizes), not the
    caps; the levels the page quotes. `analysis_fixed`: "before the runs" when the claims, their families
    and the report's columns were in code before the runs (a run's own report writes that); "after the
    runs" for a re-analysis of committed rows by newer code, which the results page then says plainly."""
    if analysis_fixed not in ANALYSIS_FIXED:
        raise ValueError(f"analysis_fixed must be one of {ANALYSIS_FIXED}, got {analysis_fixed!r}")
    sizes = {t: task_sizes(t, cfg) for t in tasks}
    pre = cfg.pretrain
    finetuning = {t: finetune_config(cfg, PlannedRun("finetune", ES.name, 0, t, 0)).resolved() for t in tasks}
    settings = [
        ("preset", pre.preset),
        ("corpus", pre.corpus),
        ("vocab_size", pre.vocab_size),
        ("steps", pre.steps),
        ("batch_size", pre.batch_size),
        ("seq_len", pre.seq_len),
        ("lr", pre.lr),
        ("eval_every", pretrain_config(cfg, PlannedRun("pretrain", ES.name, 0)).eval_every),
        ("pretrain_seeds", len(cfg.pretrain_seeds)),
        ("finetune_seeds", len(cfg.finetune_seeds)),
        ("untrained_control", "yes" if cfg.control and tasks else "no"),
        ("tasks", " ".join(tasks)),
        ("primary_tasks", " ".join(cfg.primary_tasks or tasks)),
        *((f"epochs {t}", f.epochs) for t, f in finetuning.items()),
        *((f"finetune_lr {t}", f.lr) for t, f in finetuning.items()),
        *(
            (f"{split}_examples {t}", n)
            for t, split_sizes in sizes.items()
            for split, n in split_sizes._asdict().items()
        ),
        ("threads", cfg.threads or "default"),
        ("cpu_kernels", cfg.cpu_kernels),
        ("confidence", stats.CONFIDENCE),
        ("power_target", stats.POWER_TARGET),
        ("bootstrap_bca_min_seeds", stats.BCA_MIN_N),
        ("class_gap_margin", claims.CLASS_GAP_MARGIN),
        ("flattening_rule", FLATTENING_RULE),
        *((("compare_with", cfg.compare_with),) if cfg.compare_with else ()),
        ("analysis_fixed", analysis_fixed),
    ]
    return [{"setting": k, "value": v} for k, v in settings]


def primary_tasks(out: Path) -> tuple[str, ...]:
    """The tasks of claim (c)'s family, from design.csv (() when it does not say: every task)."""
    return tuple(design_settings(out).get("primary_tasks", "").split())


def _primary_rows(out: Path) -> dict[tuple[str, str, str], dict]:
    """The primary comparisons of a report folder: (family, quantity, comparison) -> row."""
    return {
        (r["family"], r["what"], r["comparison"]): r
        for r in difference_rows(out)
        if r["family"] != "exploratory"
    }


def agreement(out: Path, other: Path) -> list[dict]:
    """agreement.csv: each primary comparison of this report beside the same comparison in `other` (the
    same recipe on another language or corpus): both readings, both differences, and whether the
    verdicts agree (same reading; "not resolved" on both counts as agreeing, and says so)."""
    if not other.is_dir():
        raise FileNotFoundError(f"compare_with: {other} is no report folder; run that recipe first")
    here, there = _primary_rows(out), _primary_rows(other)
    table = []
    for key, r in here.items():
        o = there.get(key, {})
        table.append(
            {
                "family": key[0],
                "quantity": key[1],
                "comparison": key[2],
                "difference": r["difference"],
                "reads": r["reads"],
                "other_difference": o.get("difference", ""),
                "other_reads": o.get("reads", "not in the other report"),
                "same_verdict": "yes" if o and o["reads"] == r["reads"] else "no",
                "same_sign": "yes"
                if o and np.sign(float(o["difference"])) == np.sign(float(r["difference"]))
                else "no",
            }
        )
    analysis.write_csv(out / "agreement.csv", table, digits=None)
    counts = {
        "primary_comparisons": len(table),
        **{k: sum(r[k] == "yes" for r in table) for k in ("same_verdict", "same_sign")},
    }
    analysis.write_csv(out / "agreement_counts.csv", [counts])
    return table


def tables_from_rows(out: Path) -> dict:
    """Every table, the differences figures, failures.csv, crossings.csv and the results page
    README.md, computed from the per-run rows in `out` alone (tug_of_war_runs.csv, downstream_runs.csv,
    mlm_loss_heldout.csv, design.csv): so every number on the page can be rechecked from committed rows."""
    out = Path(out)
    result: dict = {}
    tug = out / "tug_of_war_runs.csv"
    down = out / "downstream_runs.csv"
    if not tug.is_file() and not down.is_file():
        raise FileNotFoundError(
            f"{out} has no tug_of_war_runs.csv or downstream_runs.csv; run the experiment first"
        )
    failures = []
    if tug.is_file():
        records = analysis.read_run_rows(tug)
        result["tug_of_war_tables"] = analysis.tug_of_war_tables(records, out, COMPARISONS, PRIMARY)
        # a run failed when its losses are not finite; a curve's flattening fraction is nan for a curve
        # that never dropped, which the flattening section reports, not a failure
        losses = [r for r in records if r["quantity"] in FAILURE_QUANTITIES]
        failures += _failures(losses, "pre-training", ("pretrain_seed",))
    if down.is_file():
        records = read_csv(down)
        for r in records:
            r.update(
                pretrain_seed=int(r["pretrain_seed"]),
                finetune_seed=int(r["finetune_seed"]),
                value=float(r["value"]),
            )
        result["downstream"] = downstream_tables(records, out, primary_tasks(out))
        main = [r for r in records if r["metric"] == r["main"]]
        failures += _failures(main, "fine-tuning", ("pretrain_seed", "finetune_seed", "task"))
    analysis.write_csv(out / "failures.csv", failures)
    result["failures"] = failures
    heldout = out / "mlm_loss_heldout.csv"
    if heldout.is_file():
        result["crossings"] = crossings(read_csv(heldout), out)
    if tug.is_file():
        result["flattening"] = flattening_table(out)
    other = design_settings(out).get("compare_with")
    if other:
        result["agreement"] = agreement(out, Path(other))
    (out / "README.md").write_text(results_page(out))
    return result


def _failures(records: list[dict], stage: str, run_keys: tuple[str, ...]) -> list[dict]:
    """Per mode: runs of this stage, and how many failed (any non-finite value: diverged or collapsed)."""
    runs: dict[str, dict[tuple, bool]] = {}
    for r in records:
        key = tuple(r[k] for k in run_keys)
        ok = runs.setdefault(r["mode"], {}).get(key, True)
        runs[r["mode"]][key] = ok and math.isfinite(float(r["value"]))
    return [
        {"stage": stage, "mode": mode, "runs": len(v), "failed": sum(not ok for ok in v.values())}
        for mode, v in runs.items()
    ]


def crossings(rows: list[dict], out: Path) -> list[dict]:
    """Where the mean held-out MLM curves of two modes cross (claims.curve_crossings, mean over pre-training
    seeds), for each of COMPARISONS; crossings.csv, one row per crossing (none: one mode stays lower
    throughout, which the page says). Exploratory: it locates the order's changes, the claim is (a)'s area."""
    for r in rows:
        r.update(pretrain_seed=int(r["pretrain_seed"]), step=float(r["step"]), mlm_loss=float(r["mlm_loss"]))
    modes = {r["mode"] for r in rows}
    table = [
        {"comparison": f"{first} - {second}", **crossing}
        for first, second in COMPARISONS
        if first in modes and second in modes
        for crossing in claims.curve_crossings(rows, first, second)
    ]
    analysis.write_csv(out / "crossings.csv", table)
    return table


def flattening_table(out: Path) -> list[dict]:
    """flattening.csv from tug_of_war_runs.csv: per pre-training run the final held-out MLM loss and
    fixed-corruption AUC, each curve's last-quarter share of its total change and whether both meet the
    rule (claims.flattening's defaults); a last row ("all") counts the runs and those flattened."""
    rows = []
    for r in read_csv(out / "tug_of_war_runs.csv"):
        values = {k: float(r[k]) if r.get(k, "") != "" else math.nan for k, _ in FLATTENING_COLUMNS}
        met = {
            f"{curve}_flattened": int(math.isfinite(values[f"{curve}_flatten_fraction"])
                                      and values[f"{curve}_flatten_fraction"] < claims.FLATTEN_MAX_GAIN)
            for curve in ("mlm", "fixed_auc")
        }  # fmt: skip
        rows.append({"mode": r["mode"], "pretrain_seed": r["pretrain_seed"], **values, **met,
                     "flattened": int(all(met.values()))})  # fmt: skip
    if rows:
        counts = {k: sum(r[k] for r in rows) for k in ("mlm_flattened", "fixed_auc_flattened", "flattened")}
        rows.append({"mode": "all", "pretrain_seed": len(rows), **counts})
    analysis.write_csv(out / "flattening.csv", rows, digits=None)
    return rows


def downstream_tables(records: list[dict], out: Path, primary_tasks: tuple[str, ...] = ()) -> dict:
    """downstream.{csv,md}: per task, metric and mode, mean, std and t interval over the pre-training
    seeds, each the mean of its fine-tuning seeds (stats.summarize_by_seed: the pre-training seed is the
    unit; failed seeds counted), `main` naming the task's main metric; downstream_differences.{csv,md}:
    the paired differences between modes over pre-training seeds, the main metric's three comparisons
    of the paper's ordering being claim (c)'s primary family (ordering_family), every other row
    exploratory (`primary_tasks`: the tasks in (c)'s family, () = all); each mode's gain over the untrained
    control beside them; downstream_differences.png: small multiples; downstream.png: the main metric per
    task and mode (mean ± std over pre-training seeds); selection.csv (`selection_table`)."""
    mains = {r["task"]: r["main"] for r in records}
    table = [
        {**r, "main": mains[r["task"]]} for r in stats.summarize_by_seed(records, ("task", "metric", "mode"))
    ]
    analysis.write_csv(out / "downstream.csv", table)
    main = {(t, m) for t, name in mains.items() for m in (name, f"last_{name}")}
    shown = [r for r in table if (r["task"], r["metric"]) in main]
    analysis.write_markdown(out / "downstream.md", shown)
    diffs = ordering_family(
        records, stats.paired_by_seed(records, ("task", "metric"), DOWNSTREAM_COMPARISONS), primary_tasks
    )
    selection = selection_table(records)
    analysis.write_csv(out / "selection.csv", selection)
    analysis.write_csv(out / "downstream_differences.csv", diffs)
    shown_diffs = [r for r in diffs if (r["task"], r["metric"]) in main]
    analysis.write_markdown(out / "downstream_differences.md", shown_diffs)
    figures = (
        stats.differences_plot(
            shown_diffs,
            ("task", "metric"),
            out / "downstream_differences",
            "Downstream paired differences over pre-training seeds",
        )
        or []
    )
    per_seed = [
        {"task": task, "mode": mode, "value": float(np.mean(values))}
        for (task, mode), seeds in stats.seed_means(
            [r for r in records if r["metric"] == r["main"]], ("task", "mode")
        ).items()
        for values in seeds.values()
        if all(map(math.isfinite, values))
    ]
    bars = stats.bars_with_spread(
        per_seed,
        "task",
        "value",
        "mode",
        out / "downstream",
        title="Fine-tuned discriminator, test split at the epoch chosen on validation\n"
        "mean ± std over pre-training seeds",
    )
    return {
        "table": shown,
        "selection": selection,
        "differences": shown_diffs,
        "figures": [str(p) for p in [*figures, *(bars or [])]],
    }


def selection_table(records: list[dict]) -> list[dict]:
    """Per task and mode: fine-tuning runs, and how many chose their last epoch on validation (a run
    still improving when it stopped: fine-tuning too short if that is most of them), from the main
    metric's records; the last row ("all", "all") counts every run."""
    runs: dict[tuple, dict[tuple, tuple[int, int]]] = {}
    for r in records:
        if r["metric"] == r["main"]:
            key = (r["pretrain_seed"], r["finetune_seed"])
            runs.setdefault((r["task"], r["mode"]), {})[key] = (int(r["best_epoch"]), int(r["epochs"]))
    groups = {**runs, ("all", "all"): {(k, g): v for g, per in runs.items() for k, v in per.items()}}
    return [
        {
            "task": task,
            "mode": mode,
            "runs": len(v),
            "chose_last_epoch": sum(best == epochs for best, epochs in v.values()),
            "median_best_epoch": float(np.median([best for best, _ in v.values()])),
            "epochs": max(epochs for _, epochs in v.values()),
        }
        for (task, mode), v in groups.items()
        if v
    ]


def ordering_family(
    records: list[dict], diffs: list[dict], primary_tasks: tuple[str, ...] = ()
) -> list[dict]:
    """Claim (c) on paired_by_seed's rows `diffs`: the paper's ordering GDES > ES > NES (claims.ORDERING)
    on every task's main metric, one family over all tasks (Holm within the claim, like (a) and (b)),
    tested by claims.test_claims and read against the paper whatever direction the data take
    ("agrees with the paper", "against the paper", "not resolved"). Its statistics and readings replace
    those rows' exploratory ones; the two-level bootstrap columns stay. A task whose modes lack two
    paired pre-training seeds stays exploratory ("too few seeds"); so does a task not in `primary_tasks`
    (() = every task)."""
    mains = sorted(
        {(r["task"], r["main"]) for r in records if not primary_tasks or r["task"] in primary_tasks}
    )
    family = [
        dataclasses.replace(c, quantity=f"{task} {main}") for task, main in mains for c in claims.ORDERING
    ]

    def quantity_of(r):
        return f"{r['task']} {r['metric']}"

    return claims.overlay_claims(diffs, claims.test_claims(family, records, quantity_of), quantity_of)


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str] | None = None) -> int:
    """`python -m lab experiment`: a recipe, with ExperimentConfig's flags on top of it."""
    argv = sys.argv[1:] if argv is None else argv
    parser = config_parser(ExperimentConfig, "python -m lab experiment", __doc__.split("\n")[0], PER_RUN)
    parser.add_argument(
        "--recipe", help=f"the named settings to start from, one of {', '.join(RECIPES)} [cpu-results]"
    )
    parser.add_argument(
        "--plan", action="store_true", help="list every run with an estimated time; train nothing"
    )
    parser.add_argument("--data-dir", help="data root with wikitext-2/ and glue/ [$LAB_DATA_DIR]")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the tables, figures and results page from the per-run CSV rows in the report folder",
    )
    values = parse_values(parser, argv)
    name, only_plan = values.pop("recipe", "cpu-results"), values.pop("plan", False)
    data_root, report_only = values.pop("data_dir", None), values.pop("report_only", False)

    def action() -> None:
        cfg = recipe(name, data_root, **values)
        if report_only:
            tables_from_rows(report_dir(cfg))
            print(f"report: {report_dir(cfg)} rebuilt from its rows (README.md, tables, figures)")
            return
        pin = cfg.cpu_kernels == "avx2" and cfg.pretrain.device != "cuda"
        if pin and any(os.environ.get(k) != v for k, v in KERNEL_PIN.items()):
            # the pin acts only before torch is imported: start this command again with it set
            command = [sys.executable, "-m", "lab", "experiment", *argv]
            os.execve(sys.executable, command, {**os.environ, **KERNEL_PIN})
        if only_plan:
            print_plan(plan(cfg))
            return
        summary = run(cfg, " ".join(["python -m lab experiment", *argv]))
        print(f"report: {report_dir(cfg)} (README.md, summary.json, tables, figures)")
        for note in summary.get("notes", []):
            print(f"note: {note}")

    code = run_verb(action)
    if code == INTERRUPTED:
        print("rerun the same command to resume", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(cli())
