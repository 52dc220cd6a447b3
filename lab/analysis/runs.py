"""The sharing experiment's config and its runs (driven by lab/analysis/experiment.py), one at a time:
where each lives, the PretrainConfig / FinetuneConfig it gets, whether it is done, whether its task's
data is here, how long it should take on this machine (timed by `calibrate`), and the progress line
over all of them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab import sharing
from lab.cli import check_choices, param
from lab.pretrain import checkpoint
from lab.pretrain.meter import PROGRESS, duration
from lab.rtd import RTD_WEIGHT
from lab.training import DTYPES
from lab.util import atomic_write_json, replace_strict


@dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str = param("runs/experiment", "the experiment directory (see lab/analysis/experiment.py)")
    report_dir: str = param("", "where tables and figures go; '' = <out_dir>/report")
    modes: tuple[str, ...] = param(sharing.names(), "sharing modes to compare (lab/sharing.py)")
    pretrain_seeds: tuple[int, ...] = param((0, 1, 2), "one pre-training run per mode and seed")
    finetune_seeds: tuple[int, ...] = param((1, 2, 3), "one fine-tuning run per discriminator, task and seed")
    tasks: tuple[str, ...] = param(
        ("synth_tag", "synth_gram"),
        "fine-tuning tasks (synthetic or GLUE); '' = none, pre-training and the tug-of-war only",
    )
    # pre-training (lab.pretrain.loop.PretrainConfig)
    preset: str = param("mini", "model size of every pre-training run")
    corpus: str = param("synthetic", "pre-training corpus (as PretrainConfig.corpus)")
    vocab_size: int = param(4000, "SentencePiece size of the trained tokenizer")
    steps: int = param(300, "pre-training steps per run")
    batch_size: int = param(16, "pre-training examples per step")
    seq_len: int = param(64, "pre-training tokens per example")
    lr: float = param(1e-3, "pre-training peak learning rate")
    warmup_steps: int = param(0, "pre-training warmup; 0 = a tenth of the steps, at most 100")
    rtd_weight: float = param(RTD_WEIGHT, "lambda in L_MLM + lambda * L_RTD")
    eval_batches: int = param(4, "held-out batches per pre-training evaluation")
    # fine-tuning (lab.finetune.config.FinetuneConfig); None = the task's default
    glue_dir: str = param("", "GLUE root for GLUE tasks; '' = $LAB_DATA_DIR/glue")
    epochs: int | None = param(None, "fine-tuning epochs; none = the task's default")
    finetune_lr: float | None = param(None, "fine-tuning peak learning rate; none = the task's default")
    max_train_examples: int | None = param(None, "fine-tuning training slice; none = all")
    max_eval_examples: int | None = param(None, "dev examples scored per split; none = all")
    # runtime
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = param("auto", "pre-training autocast dtype; auto: bf16 on CUDA, fp32 on the CPU", DTYPES)
    progress: str = param("line", "line: a status line every `progress_every` s; bar: tqdm; none", PROGRESS)
    progress_every: float = param(30.0, "seconds between status lines")
    calibration_steps: int = param(6, "pre-training steps timed for the estimates")
    cpu_kernels: str = param(
        "native",
        "avx2: pin torch, oneDNN and MKL to their AVX2 kernels (KERNEL_PIN in lab/analysis/experiment.py: the "
        "same digits on any AVX2 machine); native: this CPU's best",
        ("avx2", "native"),
    )

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
        unknown = sorted(set(self.modes) - set(sharing.names()))
        if unknown:
            raise ValueError(f"ExperimentConfig.modes has {unknown}; choose from {sharing.names()}")
        check_choices(self)
        for name in ("steps", "batch_size", "seq_len", "calibration_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExperimentConfig.{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class PlannedRun:
    """One pre-training or fine-tuning run of the experiment (hashable: it keys the time estimates)."""

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


def planned_runs(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None) -> list[PlannedRun]:
    """Every run in execution order: per pre-training seed, the modes' pre-training, then their fine-tuning."""
    tasks = cfg.tasks if tasks is None else tasks
    runs = []
    for seed in cfg.pretrain_seeds:
        runs += [PlannedRun("pretrain", mode, seed) for mode in cfg.modes]
        runs += [
            PlannedRun("finetune", mode, seed, task, f)
            for mode in cfg.modes
            for task in tasks
            for f in cfg.finetune_seeds
        ]
    return runs


def status(run: PlannedRun, cfg: ExperimentConfig) -> str:
    """'done' (reused as is), 'resume' (a checkpoint to continue from) or 'todo'. A finished run whose
    saved configuration differs from the one this experiment would use now (e.g. a task default that
    changed in the code since) raises instead of being mixed into the statistics."""
    path = run.path(cfg)
    if run.kind == "pretrain":
        summary = read_json(path / "summary.json")
        if summary.get("completed") and summary.get("steps") == cfg.steps:
            _check_same(run, path / "config.json", dataclasses.asdict(pretrain_config(cfg, run)))
            return "done"
        return "resume" if checkpoint.candidates(path / "checkpoints") else "todo"
    results = read_json(path / "results.json")
    seeds = [m.get("seed") for m in results.get("metrics_per_seed", [])]
    if run.finetune_seed not in seeds:
        return "todo"
    _check_same(
        run, path / "results.json", dataclasses.asdict(finetune_config(cfg, run).resolved()), "config"
    )
    return "done"


# settings a finished run may differ in without changing its result
_RUNTIME_FIELDS = {"out_dir", "init", "device", "progress", "compile", "stop_after", "length_bucket"}


def _check_same(run: PlannedRun, file: Path, now: dict, key: str | None = None) -> None:
    saved = read_json(file)
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


def pretrain_config(cfg: ExperimentConfig, run: PlannedRun):
    """The PretrainConfig of one pre-training run; intervals scale with the steps so every run logs
    about 50 train rows, 8 evaluations and 16 probes."""
    from lab.pretrain.loop import PretrainConfig

    steps = cfg.steps
    return PretrainConfig(
        out_dir=str(run.path(cfg)),
        preset=cfg.preset,
        seq_len=cfg.seq_len,
        corpus=cfg.corpus,
        vocab_size=cfg.vocab_size,
        sharing=run.mode,
        rtd_weight=cfg.rtd_weight,
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps or min(100, max(1, steps // 10)),
        seed=run.pretrain_seed,
        device=cfg.device,
        dtype=cfg.dtype,
        log_every=max(1, steps // 50),
        eval_every=max(5, steps // 8),
        eval_batches=cfg.eval_batches,
        probe_every=max(2, steps // 16),
        ckpt_every=max(10, steps // 4),
        progress="none",
    )


def finetune_config(cfg: ExperimentConfig, run: PlannedRun, init: Path | None = None, **changes):
    """The FinetuneConfig of one fine-tuning run (one seed); `changes` override its fields."""
    from lab.finetune.loop import FinetuneConfig

    fields = dict(
        task=run.task,
        glue_dir=cfg.glue_dir,
        out_dir=str(run.path(cfg)),
        epochs=cfg.epochs,
        lr=cfg.finetune_lr,
        seeds=(run.finetune_seed,),
        max_train_examples=cfg.max_train_examples,
        max_eval_examples=cfg.max_eval_examples,
        device=cfg.device,
        init=str(init or PlannedRun("pretrain", run.mode, run.pretrain_seed).path(cfg)),
    )
    return FinetuneConfig(**{**fields, **changes})


# ---------------------------------------------------------------------------------------------- tasks


def is_glue(task: str) -> bool:
    from lab.finetune import glue

    try:
        glue.get_task(task)
    except ValueError:
        return False
    return True


def missing_data(task: str, cfg: ExperimentConfig) -> str:
    """Why `task` cannot run here ("" when it can): a GLUE task needs its train and dev files; the
    synthetic tasks (lab/finetune/tasks.py) are generated, never missing. An unknown name raises."""
    from lab.finetune import glue, tasks

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
    from lab.finetune import tasks

    splits = tasks.load(task, cfg.glue_dir or None)
    dev = sum(len(split) for name, split in splits.items() if name != "train")

    def cap(n, limit):
        return min(n, limit) if limit else n

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
    known = read_json(cache)
    key = {k: getattr(cfg, k) for k in ("preset", "corpus", "vocab_size", "batch_size", "seq_len", "device",
                                         "dtype", "eval_batches", "calibration_steps")}  # fmt: skip
    if known.get("key") == key and set(tasks) <= set(known.get("finetune_fixed_s", {})):
        return known
    from lab.finetune import loop as finetune
    from lab.pretrain import loop as pretrain
    from lab.pretrain.data import prepare_corpus

    work = Path(cfg.out_dir) / "calibration"
    shutil.rmtree(work, ignore_errors=True)
    run = PlannedRun("pretrain", "gdes", 0)
    pcfg = replace_strict(
        pretrain_config(cfg, run),
        out_dir=str(work / "pretrain"),
        steps=cfg.calibration_steps,
        log_every=1,
        eval_every=10**9,
        probe_every=0,
        ckpt_every=10**9,
        warmup_steps=1,
    )
    prepare_corpus(
        pcfg.corpus, vocab_size=pcfg.vocab_size, seq_len=pcfg.seq_len, heldout_fraction=pcfg.heldout_fraction
    )
    t0 = time.perf_counter()
    pretrain.train(pcfg)
    wall = time.perf_counter() - t0
    rows = [r for r in _jsonl(work / "pretrain" / "metrics.jsonl") if r["split"] == "train"]
    step_times = sorted(r["ms_per_step"] / 1000 for r in rows[1:]) or [wall / cfg.calibration_steps]
    step_s = step_times[len(step_times) // 2]
    result = {
        "key": key,
        "pretrain_step_s": step_s,
        "pretrain_fixed_s": max(0.0, wall - step_s * len(rows)),
        "finetune_s_per_example": {},
        "finetune_fixed_s": {},
    }
    for task in tasks:
        # two epochs on a slice: the second epoch's time is the per-example rate, the rest is the fixed
        # cost of a run (loading the model, generating or reading and tokenising the task)
        ft = PlannedRun("finetune", "gdes", 0, task, 0)
        fcfg = finetune_config(
            cfg,
            ft,
            init=work / "pretrain",
            epochs=2,
            max_train_examples=64,
            max_eval_examples=64,
            out_dir=str(work / "finetune" / task),
        )
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


def estimate(
    run: PlannedRun, cfg: ExperimentConfig, calibration: dict, sizes: dict[str, tuple[int, int]]
) -> float:
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


# ---------------------------------------------------------------------------------------------- progress


class ExperimentProgress:
    """One status line (or tqdm bar) for the whole experiment: runs done, the current run's own progress
    (read from its metrics.jsonl by a background thread), elapsed time and an ETA. The ETA scales the
    remaining estimated seconds by how fast the finished part went against its estimate."""

    def __init__(self, runs: list[PlannedRun], estimates: dict[PlannedRun, float], cfg: ExperimentConfig):
        self.runs, self.estimates, self.cfg = runs, estimates, cfg
        self.total = sum(estimates[r] for r in runs) or 1.0
        self.done_estimate = 0.0
        self.finished = 0
        self.current: PlannedRun | None = None
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.bar = None
        if cfg.progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, desc="experiment", unit="%", bar_format="{l_bar}{bar}| {postfix}")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if cfg.progress != "none":
            self.thread.start()

    def start(self, run: PlannedRun) -> None:
        self.current = run
        self.show()

    def finish(self, run: PlannedRun) -> None:
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
        text = (
            f"{self.finished}/{len(self.runs)} runs | {now or 'between runs'} | "
            f"elapsed {duration(elapsed)} | ETA {duration(eta)}"
        )
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


# ---------------------------------------------------------------------------------------------- small helpers


def read_json(path: Path) -> dict:
    """The JSON file's content; {} when it is missing or half-written (a run still writing it)."""
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
