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
    pretrain/<mode>-s<seed>/                 lab.pretrain run directories
    finetune/<mode>-s<seed>/<task>/f<seed>/  lab.finetune outputs (results.json), one fine-tuning seed each
    report/ (or `report_dir`)                tables (CSV + markdown), figures next to their CSV, summary.json

Resuming: a pre-training run whose summary.json says it completed `steps` is reused; one with a
checkpoint resumes from it (train() does that); a fine-tuning run with a results.json is reused.
Runs go in pre-training-seed order (all modes of seed 0, their fine-tuning, then seed 1, ...), so an
experiment cut short still has complete, paired groups.

The statistics (lab/stats.py): per task and mode mean ± std over seeds, and the paired differences
GDES − ES, GDES − NES and NES − ES over (pre-training seed, fine-tuning seed) pairs with a bootstrap
95 % CI; the same for the tug-of-war quantities of each pre-training run (pairs: pre-training seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab import analysis, checkpoint, stats
from lab.util import append_jsonl, atomic_write_json, data_dir, replace_strict

MODES = ("es", "nes", "gdes")
COMPARISONS = (("gdes", "es"), ("gdes", "nes"), ("nes", "es"))


@dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str = "runs/experiment"  # the experiment directory (see the module docstring)
    report_dir: str = ""  # where tables and figures go; "" = <out_dir>/report
    modes: tuple[str, ...] = MODES  # sharing modes to compare
    pretrain_seeds: tuple[int, ...] = (0, 1, 2)  # one pre-training run per mode and seed
    finetune_seeds: tuple[int, ...] = (1, 2, 3)  # one fine-tuning run per discriminator, task and seed
    tasks: tuple[str, ...] = ("synth_tag", "synth_gram")  # fine-tuning tasks (synthetic or GLUE); () = none
    # pre-training (lab.pretrain.PretrainConfig)
    preset: str = "mini"
    corpus: str = "synthetic"
    vocab_size: int = 4000
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-3
    warmup_steps: int = 0  # 0 = a tenth of the steps, at most 100
    rtd_weight: float = 50.0
    eval_batches: int = 4
    # fine-tuning (lab.finetune.FinetuneConfig); None = the task's default
    glue_dir: str = ""  # GLUE root for GLUE tasks; "" = $LAB_DATA_DIR/glue
    epochs: int | None = None
    finetune_lr: float | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # pre-training autocast: auto (bf16 on CUDA) | fp32 | bf16
    progress: str = "line"  # line (a status line every `progress_every` s) | bar (tqdm) | none
    progress_every: float = 30.0
    calibration_steps: int = 6  # pre-training steps timed for the estimates

    def __post_init__(self) -> None:
        for name in ("modes", "pretrain_seeds", "finetune_seeds", "tasks"):
            value = getattr(self, name)
            value = (
                tuple(v for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
            )
            if name.endswith("seeds"):
                value = tuple(int(v) for v in value)
            if not value and name != "tasks":  # no tasks: pre-training and the tug-of-war only
                raise ValueError(f"ExperimentConfig.{name} is empty; give at least one")
            if len(set(value)) != len(value):
                raise ValueError(f"ExperimentConfig.{name}={value} repeats an entry")
            object.__setattr__(self, name, value)
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ValueError(f"ExperimentConfig.modes has {unknown}; choose from {MODES}")
        if self.progress not in ("line", "bar", "none"):
            raise ValueError(f"ExperimentConfig.progress={self.progress!r}; choose line, bar or none")
        for name in ("steps", "batch_size", "seq_len", "calibration_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExperimentConfig.{name} must be positive, got {getattr(self, name)}")


# Named recipes. Each is sized for its machine; the README states how long each took.
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


# ---------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    kind: str  # "pretrain" | "finetune"
    mode: str
    pretrain_seed: int
    task: str = ""
    finetune_seed: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain {self.mode} s{self.pretrain_seed}"
        return f"finetune {self.mode} s{self.pretrain_seed} {self.task} f{self.finetune_seed}"

    def path(self, cfg: ExperimentConfig) -> Path:
        base = Path(cfg.out_dir)
        if self.kind == "pretrain":
            return base / "pretrain" / f"{self.mode}-s{self.pretrain_seed}"
        return base / "finetune" / f"{self.mode}-s{self.pretrain_seed}" / self.task / f"f{self.finetune_seed}"


def planned_runs(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None) -> list[Run]:
    """Every run in execution order: per pre-training seed, the modes' pre-training, then their fine-tuning."""
    tasks = cfg.tasks if tasks is None else tasks
    runs = []
    for seed in cfg.pretrain_seeds:
        runs += [Run("pretrain", mode, seed) for mode in cfg.modes]
        runs += [Run("finetune", mode, seed, task, f) for mode in cfg.modes for task in tasks
                 for f in cfg.finetune_seeds]  # fmt: skip
    return runs


def status(run: Run, cfg: ExperimentConfig) -> str:
    """'done' (reused as is), 'resume' (a checkpoint to continue from) or 'todo'. A finished run whose
    saved configuration differs from the one this experiment would use now (e.g. a task default that
    changed in the code since) raises instead of being mixed into the statistics."""
    path = run.path(cfg)
    if run.kind == "pretrain":
        summary = _read_json(path / "summary.json")
        if summary.get("completed") and summary.get("steps") == cfg.steps:
            _check_same(run, path / "config.json", dataclasses.asdict(pretrain_config(cfg, run)))
            return "done"
        return "resume" if checkpoint.candidates(path / "checkpoints") else "todo"
    results = _read_json(path / "results.json")
    seeds = [m.get("seed") for m in results.get("metrics_per_seed", [])]
    if run.finetune_seed not in seeds:
        return "todo"
    _check_same(
        run, path / "results.json", dataclasses.asdict(finetune_config(cfg, run).resolved()), "config"
    )
    return "done"


# settings a finished run may differ in without changing its result
_RUNTIME_FIELDS = {"out_dir", "init", "device", "progress", "compile", "stop_after", "length_bucket"}


def _check_same(run: Run, file: Path, now: dict, key: str | None = None) -> None:
    saved = _read_json(file)
    saved = saved.get(key, {}) if key else saved
    now = json.loads(json.dumps(now))  # tuples as lists, like the saved file
    # None is "resolved when the run starts" (e.g. a synthetic task's seed comes from the init run)
    fixed = [k for k in now if k in saved and k not in _RUNTIME_FIELDS and now[k] is not None]
    changed = sorted(k for k in fixed if saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{run.name} in {file.parent} was run with other settings ({detail}); move that folder away "
            "to rerun it, or use a new out_dir"
        )


def pretrain_config(cfg: ExperimentConfig, run: Run):
    """The PretrainConfig of one pre-training run; intervals scale with the steps so every run logs
    about 50 train rows, 8 evaluations and 16 probes."""
    from lab.pretrain import PretrainConfig

    steps = cfg.steps
    return PretrainConfig(
        out_dir=str(run.path(cfg)), preset=cfg.preset, seq_len=cfg.seq_len, corpus=cfg.corpus,
        vocab_size=cfg.vocab_size, sharing=run.mode, rtd_weight=cfg.rtd_weight, steps=steps,
        batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps or min(100, max(1, steps // 10)),
        seed=run.pretrain_seed, device=cfg.device, dtype=cfg.dtype, log_every=max(1, steps // 50),
        eval_every=max(5, steps // 8), eval_batches=cfg.eval_batches, probe_every=max(2, steps // 16),
        ckpt_every=max(10, steps // 4), progress="none",
    )  # fmt: skip


def finetune_config(cfg: ExperimentConfig, run: Run, init: Path | None = None, **changes):
    """The FinetuneConfig of one fine-tuning run (one seed); `changes` override its fields."""
    from lab.finetune import FinetuneConfig

    fields = dict(
        task=run.task, glue_dir=cfg.glue_dir, out_dir=str(run.path(cfg)), epochs=cfg.epochs,
        lr=cfg.finetune_lr, seeds=(run.finetune_seed,), max_train_examples=cfg.max_train_examples,
        max_eval_examples=cfg.max_eval_examples, device=cfg.device,
        init=str(init or Run("pretrain", run.mode, run.pretrain_seed).path(cfg)),
    )  # fmt: skip
    return FinetuneConfig(**{**fields, **changes})


def execute(run: Run, cfg: ExperimentConfig) -> None:
    if run.kind == "pretrain":
        from lab import pretrain

        pretrain.train(pretrain_config(cfg, run))
    else:
        from lab import finetune

        finetune.train(finetune_config(cfg, run))


# ---------------------------------------------------------------------------------------------- tasks


def is_glue(task: str) -> bool:
    from lab import glue

    try:
        glue.get_task(task)
    except ValueError:
        return False
    return True


def missing_data(task: str, cfg: ExperimentConfig) -> str:
    """Why `task` cannot run here ("" when it can): a GLUE task needs its train and dev files; the
    synthetic tasks (lab/tasks.py) are generated, never missing. An unknown name raises."""
    from lab import glue, tasks

    tasks.get_task(task)  # raises on an unknown task, listing the known ones
    if not is_glue(task):
        return ""
    t = glue.get_task(task)
    root = cfg.glue_dir or None
    missing = [str(glue.split_path(t.name, s, root)) for s in ("train", *t.dev_splits)]
    missing = [p for p in missing if not Path(p).is_file()]
    return f"no data: {', '.join(missing)} missing" if missing else ""


def task_sizes(task: str, cfg: ExperimentConfig) -> tuple[int, int]:
    """(training examples, dev examples) one fine-tuning run uses, for the time estimate."""
    from lab import tasks

    splits = tasks.load(task, cfg.glue_dir or None)
    dev = sum(len(split) for name, split in splits.items() if name != "train")
    cap = lambda n, limit: min(n, limit) if limit else n  # noqa: E731
    return cap(len(splits["train"]), cfg.max_train_examples), cap(dev, cfg.max_eval_examples)


# ---------------------------------------------------------------------------------------------- estimates


def calibrate(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> dict:
    """Time a few pre-training steps and a small fine-tuning run per task on this machine.

    Pre-training: `calibration_steps` steps of the experiment's GDES configuration (the costliest mode)
    after the corpus is prepared (cached, so tokenising is not timed); the median step time plus the
    fixed cost of a run (model build, two evaluations, export). Fine-tuning: two epochs on a slice of
    each task from that run's discriminator; the second epoch gives seconds per training example (dev
    examples count a third: forward only), the rest the fixed cost of a run. Cached in
    calibration.json, so a rerun does not re-measure.
    """
    cache = Path(cfg.out_dir) / "calibration.json"
    known = _read_json(cache)
    key = {k: getattr(cfg, k) for k in ("preset", "corpus", "vocab_size", "batch_size", "seq_len", "device",
                                         "dtype", "eval_batches", "calibration_steps")}  # fmt: skip
    if known.get("key") == key and set(tasks) <= set(known.get("finetune_fixed_s", {})):
        return known
    from lab import finetune, pretrain
    from lab.data import prepare_corpus

    work = Path(cfg.out_dir) / "calibration"
    shutil.rmtree(work, ignore_errors=True)
    run = Run("pretrain", "gdes", 0)
    pcfg = replace_strict(pretrain_config(cfg, run), out_dir=str(work / "pretrain"), steps=cfg.calibration_steps,
                          log_every=1, eval_every=10**9, probe_every=0, ckpt_every=10**9, warmup_steps=1)  # fmt: skip
    prepare_corpus(
        pcfg.corpus, vocab_size=pcfg.vocab_size, seq_len=pcfg.seq_len, heldout_fraction=pcfg.heldout_fraction
    )
    t0 = time.perf_counter()
    pretrain.train(pcfg)
    wall = time.perf_counter() - t0
    rows = [r for r in _jsonl(work / "pretrain" / "metrics.jsonl") if r["split"] == "train"]
    step_times = sorted(r["ms_per_step"] / 1000 for r in rows[1:]) or [wall / cfg.calibration_steps]
    step_s = step_times[len(step_times) // 2]
    result = {"key": key, "pretrain_step_s": step_s, "pretrain_fixed_s": max(0.0, wall - step_s * len(rows)),
              "finetune_s_per_example": {}, "finetune_fixed_s": {}}  # fmt: skip
    for task in tasks:
        # two epochs on a slice: the second epoch's time is the per-example rate, the rest is the fixed
        # cost of a run (loading the model, generating or reading and tokenising the task)
        ft = Run("finetune", "gdes", 0, task, 0)
        fcfg = finetune_config(cfg, ft, init=work / "pretrain", epochs=2, max_train_examples=64,
                               max_eval_examples=64, out_dir=str(work / "finetune" / task))  # fmt: skip
        t0 = time.perf_counter()
        results = finetune.train(fcfg)
        seconds = time.perf_counter() - t0
        epochs = [r["elapsed_s"] for r in _jsonl(work / "finetune" / task / "metrics.jsonl")]
        epoch_s = epochs[1] - epochs[0] if len(epochs) == 2 else seconds / 2
        weight = results["n_train_examples"] + results["n_dev_examples"] / 3
        result["finetune_s_per_example"][task] = epoch_s / max(1.0, weight)
        result["finetune_fixed_s"][task] = max(0.0, seconds - 2 * epoch_s)
    atomic_write_json(cache, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def estimate(run: Run, cfg: ExperimentConfig, calibration: dict, sizes: dict[str, tuple[int, int]]) -> float:
    """Seconds one run should take on this machine, from the calibration."""
    if run.kind == "pretrain":
        pcfg = pretrain_config(cfg, run)
        step_s = calibration["pretrain_step_s"]
        probes = cfg.steps // pcfg.probe_every + 1
        evals = cfg.steps // pcfg.eval_every + 2
        # a probe costs about one more backward; an evaluation batch about a third of a step
        return (cfg.steps + probes + evals * cfg.eval_batches / 3) * step_s + calibration["pretrain_fixed_s"]

    epochs = finetune_config(cfg, run).resolved().epochs
    train, dev = sizes[run.task]
    rate, fixed = calibration["finetune_s_per_example"][run.task], calibration["finetune_fixed_s"][run.task]
    return fixed + epochs * (train + dev / 3) * rate


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """One status line (or tqdm bar) for the whole experiment: runs done, the current run's own progress
    (read from its metrics.jsonl by a background thread), elapsed time and an ETA. The ETA scales the
    remaining estimated seconds by how fast the finished part went against its estimate."""

    def __init__(self, runs: list[Run], estimates: dict[Run, float], cfg: ExperimentConfig):
        self.runs, self.estimates, self.cfg = runs, estimates, cfg
        self.total = sum(estimates[r] for r in runs) or 1.0
        self.done_estimate = 0.0
        self.finished = 0
        self.current: Run | None = None
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.bar = None
        if cfg.progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, desc="experiment", unit="%", bar_format="{l_bar}{bar}| {postfix}")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if cfg.progress != "none":
            self.thread.start()

    def start(self, run: Run) -> None:
        self.current = run
        self.show()

    def finish(self, run: Run) -> None:
        self.done_estimate += self.estimates[run]
        self.finished += 1
        self.current = None
        if self.bar is not None:
            self.show()

    def _fraction(self) -> tuple[float, str]:
        """How far the current run is (0..1) and a short description, from its metrics.jsonl."""
        run = self.current
        if run is None:
            return 0.0, ""
        rows = _jsonl(run.path(self.cfg) / "metrics.jsonl")
        if run.kind == "pretrain":
            step = max((r["step"] for r in rows if r.get("split") == "train"), default=0)
            return min(1.0, step / self.cfg.steps), f"{run.name} step {step}/{self.cfg.steps}"
        return 0.0, run.name  # a fine-tuning run writes its rows when it ends: no partial progress to read

    def show(self) -> None:
        if self.cfg.progress == "none":
            return
        fraction, now = self._fraction()
        done = self.done_estimate + fraction * (self.estimates[self.current] if self.current else 0.0)
        elapsed = time.perf_counter() - self.t0
        speed = elapsed / done if done > 0 else 1.0  # actual seconds per estimated second so far
        eta = (self.total - done) * speed
        text = (f"{self.finished}/{len(self.runs)} runs | {now or 'between runs'} | "
                f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}")  # fmt: skip
        if self.bar is not None:
            self.bar.n = round(100 * done / self.total)
            self.bar.set_postfix_str(text)
        else:
            print(f"experiment {100 * done / self.total:5.1f}% | {text}", flush=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.cfg.progress_every):
            self.show()

    def close(self) -> None:
        self.stop.set()
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- the experiment


def check_settings(cfg: ExperimentConfig) -> None:
    """Refuse to mix runs of different settings in one directory. The lists (modes, seeds, tasks), the
    device, the report folder and the progress display may change between invocations."""
    saved = _read_json(Path(cfg.out_dir) / "experiment.json")
    free = {"modes", "pretrain_seeds", "finetune_seeds", "tasks", "device", "report_dir", "progress",
            "progress_every", "out_dir"}  # fmt: skip
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
        rows.append({"run": run.name, "status": state, "estimate_s": seconds if state != "done" else 0.0,
                     "path": str(run.path(cfg))})  # fmt: skip
    return {"runs": rows, "skipped_tasks": skipped, "total_estimate_s": total, "calibration": calibration}


def print_plan(result: dict) -> None:
    for task, why in result["skipped_tasks"].items():
        print(f"skipped task {task}: {why}")
    width = max((len(r["run"]) for r in result["runs"]), default=10)
    for i, r in enumerate(result["runs"], 1):
        shown = "reuse" if r["status"] == "done" else f"{r['status']:<6} ~{_duration(r['estimate_s'])}"
        print(f"{i:>3}  {r['run']:<{width}}  {shown}")
    todo = sum(r["status"] != "done" for r in result["runs"])
    cal = result["calibration"] or {}
    print(f"{len(result['runs'])} runs, {todo} to do; estimated {_duration(result['total_estimate_s'])} on this "
          f"machine (calibrated: {cal.get('pretrain_step_s', math.nan):.3f} s per pre-training step)")  # fmt: skip


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
    append_jsonl(log, {"event": "invocation", "time": _now(), "runs": len(runs),
                       "skipped_tasks": planned["skipped_tasks"], "estimate_s": planned["total_estimate_s"]})  # fmt: skip
    estimates = {r: row["estimate_s"] for r, row in zip(runs, planned["runs"])}
    todo = [r for r in runs if status(r, cfg) != "done"]
    for r in runs:
        if r not in todo:
            append_jsonl(log, {"event": "reused", "run": r.name, "time": _now()})
    progress = Progress(todo, estimates, cfg)
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
            append_jsonl(log, {"event": "finished", "run": r.name, "time": _now(),
                               "wall_s": time.perf_counter() - t0, "estimate_s": estimates[r]})  # fmt: skip
            progress.finish(r)
    finally:
        progress.close()
    summary = report(cfg, tasks, skipped=planned["skipped_tasks"])
    append_jsonl(log, {"event": "report", "time": _now(), "dir": str(report_dir(cfg))})
    return summary


def report_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.report_dir) if cfg.report_dir else Path(cfg.out_dir) / "report"


# ---------------------------------------------------------------------------------------------- report


def downstream_records(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> list[dict]:
    """One record per fine-tuning run and metric: {mode, task, metric, pretrain_seed, finetune_seed,
    value}. `metric` is the results' key (best epoch) or `last_<key>` (the last epoch)."""
    records = []
    for r in planned_runs(cfg, tasks):
        if r.kind != "finetune":
            continue
        results = _read_json(r.path(cfg) / "results.json")
        for per_seed in results.get("metrics_per_seed", []):
            if per_seed.get("seed") != r.finetune_seed:
                continue
            for metric, value in per_seed.items():
                if metric in ("seed", "best_epoch") or not isinstance(value, int | float):
                    continue
                records.append({"mode": r.mode, "task": r.task, "metric": metric, "main": results["main_metric"],
                                "pretrain_seed": r.pretrain_seed, "finetune_seed": r.finetune_seed,
                                "value": float(value)})  # fmt: skip
    return records


def report(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None, skipped: dict | None = None) -> dict:
    """The tug-of-war over seeds (lab.analysis.seeded_report) and the downstream tables, into report_dir.
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
        [r for r in records if r["metric"] == r["main"]], "task", "value", "mode", out / "downstream",
        title="Fine-tuned discriminator, best dev epoch (mean ± std over seeds)",
    )  # fmt: skip
    return {"table": shown, "differences": [r for r in diffs if (r["task"], r["metric"]) in main],
            "figures": [str(p) for p in figure or []]}  # fmt: skip


def _pretty(row: dict) -> dict:
    """A table row with the numbers rounded for markdown (the CSV keeps full precision)."""
    return {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------- small helpers


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _jsonl(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return rows


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab experiment", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="cpu-results", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--plan", action="store_true", help="list every run with an estimated time; train nothing")
    p.add_argument("--data-dir", help="data root with wikitext-2/ and glue/ (default $LAB_DATA_DIR)")
    p.add_argument("--out-dir", help="experiment directory (default runs/experiment/<recipe>)")
    p.add_argument("--report-dir", help="tables and figures (default <out-dir>/report)")
    p.add_argument("--modes", help="comma list, e.g. es,nes,gdes")
    p.add_argument("--pretrain-seeds", help="comma list, e.g. 0,1,2")
    p.add_argument("--finetune-seeds", help="comma list, e.g. 1,2,3")
    p.add_argument("--tasks", help="comma list: synth_tag, synth_gram, or GLUE tasks (cola, sst2, ...)")
    p.add_argument("--steps", type=int, help="pre-training steps per run")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--progress", choices=("line", "bar", "none"))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other ExperimentConfig field, e.g. --set epochs=3")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = {}
    for flag in (
        "out_dir",
        "report_dir",
        "modes",
        "pretrain_seeds",
        "finetune_seeds",
        "tasks",
        "steps",
        "device",
        "progress",
    ):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for item in args.set:
        name, _, text = item.partition("=")
        if name not in fields or not _:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        overrides[name] = _parse_value(text, str(fields[name].type))
    return recipe(args.recipe, args.data_dir, **overrides)


def _parse_value(text: str, kind: str):
    if text.lower() == "none":
        return None
    if "tuple" in kind:
        return text
    if "int" in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


def cli(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(args)
        if args.plan:
            print_plan(plan(cfg))
            return 0
        summary = run(cfg)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report_dir(cfg)} (summary.json, tables, figures)")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
