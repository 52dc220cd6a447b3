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
from typing import NamedTuple

from tqdm.auto import tqdm

from lab import sharing
from lab.cli import check_choices, may_change_on_resume, param
from lab.finetune import loop as finetune
from lab.finetune.config import FinetuneConfig
from lab.finetune.tasks import get_task
from lab.pretrain import checkpoint
from lab.pretrain import loop as pretrain
from lab.pretrain.config import PretrainConfig, scaled_to_steps
from lab.pretrain.data import prepare_corpus
from lab.pretrain.meter import PROGRESS, duration
from lab.util import atomic_write_json, replace_strict

# The experiment's own sizes for the runs (every other field: PretrainConfig's and FinetuneConfig's
# defaults). Per run the experiment sets out_dir, sharing and seed (pre-training; the intervals and the
# warmup left at PretrainConfig's defaults scale with the steps: lab.pretrain.config.scaled_to_steps)
# and task, out_dir, seeds and init (fine-tuning).
PRETRAIN = PretrainConfig(
    preset="mini",
    vocab_size=4000,
    steps=300,
    batch_size=16,
    seq_len=64,
    lr=1e-3,
    eval_batches=4,
    progress="none",
)
FINETUNE = FinetuneConfig()
# What the experiment sets in each run's config itself (no command-line flag)
PER_RUN = ("pretrain.out_dir", "pretrain.sharing", "pretrain.seed", "finetune.task", "finetune.out_dir",
           "finetune.seeds", "finetune.init")  # fmt: skip
# Settings of the nested configs that may differ between invocations of one experiment: where a run
# trains does not change what it is (any other nested setting does, steps included).
NESTED_MAY_CHANGE = ("pretrain.device", "finetune.device")


@dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str = param(
        "runs/experiment",
        "the experiment directory (see lab/analysis/experiment.py)",
        may_change_on_resume=True,
    )
    report_dir: str = param(
        "", "where tables and figures go; '' = <out_dir>/report", may_change_on_resume=True
    )
    modes: tuple[str, ...] = param(
        sharing.names(), "sharing modes to compare (lab/sharing.py)", may_change_on_resume=True
    )
    pretrain_seeds: tuple[int, ...] = param(
        (0, 1, 2), "one pre-training run per mode and seed", may_change_on_resume=True
    )
    finetune_seeds: tuple[int, ...] = param(
        (1, 2, 3), "one fine-tuning run per discriminator, task and seed", may_change_on_resume=True
    )
    tasks: tuple[str, ...] = param(
        ("synth_tag", "synth_gram"),
        "fine-tuning tasks (synthetic or GLUE); '' = none, pre-training and the tug-of-war only",
        may_change_on_resume=True,
    )
    primary_tasks: tuple[str, ...] = param(
        (),
        "tasks whose main metric is claim (c)'s primary family (fixed before the run); () = every task; "
        "the others are exploratory",
    )
    compare_with: str = param(
        "",
        "the report folder of the same recipe on another language or corpus: the page says which of its "
        "primary verdicts agree (agreement.csv)",
        may_change_on_resume=True,
    )
    pretrain: PretrainConfig = param(PRETRAIN, "every pre-training run's settings (PretrainConfig)")
    finetune: FinetuneConfig = param(
        FINETUNE, "every fine-tuning run's settings (FinetuneConfig; none = the task's default)"
    )
    progress: str = param(
        "line",
        "line: a status line every `progress_every` s; bar: tqdm; none",
        PROGRESS,
        may_change_on_resume=True,
    )
    progress_every: float = param(30.0, "seconds between status lines", may_change_on_resume=True)
    calibration_steps: int = param(6, "pre-training steps timed for the estimates")
    control: bool = param(
        True,
        "an untrained control per pre-training seed: the same architecture and tokenizer, randomly "
        "initialised (0 steps), fine-tuned like the modes",
        may_change_on_resume=True,
    )
    # Threads change the last bits of a CPU run (reductions split differently), so they are part of what
    # a run is; the runs are independent, so `workers` processes of `threads` threads each use the cores
    threads: int = param(0, "torch threads per run (torch.set_num_threads); 0 = torch's default")
    workers: int = param(1, "runs trained at once, each in its own process", may_change_on_resume=True)
    cpu_kernels: str = param(
        "native",
        "avx2: pin torch, oneDNN and MKL to their AVX2 kernels (KERNEL_PIN in lab/analysis/experiment.py: the "
        "same digits on any AVX2 machine); native: this CPU's best",
        ("avx2", "native"),
    )

    def __post_init__(self) -> None:
        for name in ("modes", "pretrain_seeds", "finetune_seeds", "tasks", "primary_tasks"):
            value = getattr(self, name)
            value = (
                tuple(v for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
            )
            if name.endswith("seeds"):
                value = tuple(int(v) for v in value)
            if not value and "tasks" not in name:  # no tasks: pre-training and the tug-of-war only
                raise ValueError(f"ExperimentConfig.{name} is empty; give at least one")
            if len(set(value)) != len(value):
                raise ValueError(f"ExperimentConfig.{name}={value} repeats an entry")
            object.__setattr__(self, name, value)
        if set(self.primary_tasks) - set(self.tasks):
            raise ValueError(
                f"ExperimentConfig.primary_tasks={self.primary_tasks} names tasks not in tasks={self.tasks}"
            )
        unknown = sorted(set(self.modes) - set(sharing.names()))
        if unknown:
            raise ValueError(f"ExperimentConfig.modes has {unknown}; choose from {sharing.names()}")
        check_choices(self)
        if self.threads < 0 or self.workers < 1:
            raise ValueError(
                f"ExperimentConfig: threads must be >= 0 and workers >= 1, got {self.threads}, {self.workers}"
            )
        if self.calibration_steps <= 0:
            raise ValueError(
                f"ExperimentConfig.calibration_steps must be positive, got {self.calibration_steps}"
            )


# ---------------------------------------------------------------------------------------------- the runs

# The untrained control's name where a sharing mode's would stand: the discriminator of a "pre-training"
# run of 0 steps (lab.pretrain.loop.train exports the initialised model), built as NES builds it (its
# own embedding table), fine-tuned like the modes. Not a sharing mode: it takes no part in the claims.
CONTROL = "untrained"
CONTROL_SHARING = sharing.NES.name


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
    """Every run in execution order: per pre-training seed, the modes' pre-training (and the untrained
    control's 0 steps), then their fine-tuning."""
    tasks = cfg.tasks if tasks is None else tasks
    arms = (*cfg.modes, CONTROL) if cfg.control and tasks else cfg.modes
    runs = []
    for seed in cfg.pretrain_seeds:
        runs += [PlannedRun("pretrain", mode, seed) for mode in arms]
        runs += [
            PlannedRun("finetune", mode, seed, task, f)
            for mode in arms
            for task in tasks
            for f in cfg.finetune_seeds
        ]
    return runs


def depends_on(run: PlannedRun) -> PlannedRun | None:
    """The run that must finish first: a fine-tuning run's pre-training run; None for a pre-training run."""
    return PlannedRun("pretrain", run.mode, run.pretrain_seed) if run.kind == "finetune" else None


def status(run: PlannedRun, cfg: ExperimentConfig) -> str:
    """'done' (reused as is), 'resume' (a checkpoint to continue from) or 'todo'. A finished run whose
    saved configuration differs from the one this experiment would use now (e.g. a task default that
    changed in the code since) raises instead of being mixed into the statistics."""
    path = run.path(cfg)
    if run.kind == "pretrain":
        summary = read_json(path / "summary.json")
        if summary.get("completed") and summary.get("steps") == pretrain_config(cfg, run).steps:
            _check_same(run, path / "config.json", pretrain_config(cfg, run))
            return "done"
        return "resume" if checkpoint.candidates(path / "checkpoints") else "todo"
    results = read_json(path / "results.json")
    seeds = [m.get("seed") for m in results.get("metrics_per_seed", [])]
    if run.finetune_seed not in seeds:
        return "todo"
    _check_same(run, path / "results.json", finetune_config(cfg, run).resolved(), "config")
    return "done"


def _check_same(run: PlannedRun, file: Path, config, key: str | None = None) -> None:
    """Refuse a finished run whose saved config differs from `config` in a field not marked
    `may_change_on_resume` (settings a finished run may differ in without changing its result)."""
    saved = read_json(file)
    saved = saved.get(key, {}) if key else saved
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, like the saved file
    free = may_change_on_resume(config)
    # None is "resolved when the run starts" (e.g. a synthetic task's seed comes from the init run)
    fixed = [k for k in now if k in saved and k not in free and now[k] is not None]
    changed = sorted(k for k in fixed if saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{run.name} in {file.parent} was run with other settings ({detail}); move that folder away "
            "to rerun it, or use a new out_dir"
        )


def pretrain_config(cfg: ExperimentConfig, run: PlannedRun) -> PretrainConfig:
    """The PretrainConfig of one pre-training run: the experiment's, for this mode and seed, its intervals
    and warmup scaled with the steps (`scaled_to_steps`); the untrained control's is NES's of 0 steps."""
    fields = dict(out_dir=str(run.path(cfg)), sharing=run.mode, seed=run.pretrain_seed)
    if run.mode == CONTROL:
        return replace_strict(cfg.pretrain, **{**fields, "sharing": CONTROL_SHARING, "steps": 0})
    return scaled_to_steps(replace_strict(cfg.pretrain, **fields))


def finetune_config(cfg: ExperimentConfig, run: PlannedRun, init: Path | None = None, **changes):
    """The FinetuneConfig of one fine-tuning run (one seed); `changes` override its fields."""
    fields = dict(
        task=run.task,
        out_dir=str(run.path(cfg)),
        seeds=(run.finetune_seed,),
        init=str(init or PlannedRun("pretrain", run.mode, run.pretrain_seed).path(cfg)),
    )
    return replace_strict(cfg.finetune, **{**fields, **changes})


# ---------------------------------------------------------------------------------------------- tasks


def missing_data(task: str, cfg: ExperimentConfig) -> str:
    """Why `task` cannot run here ("" when it can): a GLUE task needs its train and dev files; the
    synthetic tasks (lab/finetune/synthetic_tasks.py) are generated, never missing. An unknown name raises."""
    missing = get_task(task).missing_files(cfg.finetune.glue_dir or None)
    return f"no data: {', '.join(missing)} missing" if missing else ""


class TaskSizes(NamedTuple):
    """Examples one fine-tuning run uses of each role of split (lab/finetune/task.py)."""

    train: int  # fitted, every epoch
    validation: int  # scored after every epoch, picks the epoch
    test: int  # all test splits together (MNLI: matched + mismatched), scored twice after training


def task_sizes(task: str, cfg: ExperimentConfig) -> TaskSizes:
    """TaskSizes(train, validation, test) one fine-tuning run uses: the task's splits under the caps,
    validation and each test split capped on its own (lab.finetune.data.load_data); for the time
    estimate and design.csv."""
    spec = get_task(task)
    splits = spec.load(cfg.finetune.glue_dir or None)

    def cap(n, limit):
        return min(n, limit) if limit else n

    evaluated = cfg.finetune.max_eval_examples
    return TaskSizes(
        cap(len(splits["train"]), cfg.finetune.max_train_examples),
        cap(len(splits["validation"]), evaluated),
        sum(cap(len(splits[name]), evaluated) for name in spec.test_splits),
    )


# ---------------------------------------------------------------------------------------------- estimates


def calibrate(cfg: ExperimentConfig, tasks: tuple[str, ...]) -> dict:
    """Time a few pre-training steps and a small fine-tuning run per task on this machine.

    Pre-training: `calibration_steps` steps of the experiment's GDES configuration (the costliest mode)
    after the corpus is prepared (cached, so tokenising is not timed); the median step time plus the
    fixed cost of a run (model build, two evaluations, export). Fine-tuning: two epochs on a slice of
    each task from that run's discriminator; the second epoch gives seconds per training example
    (validation examples count a third: forward only), the rest the fixed cost of a run (the two test
    evaluations included). Cached in
    calibration.json, so a rerun does not re-measure.
    """
    cache = Path(cfg.out_dir) / "calibration.json"
    known = read_json(cache)
    key = {k: getattr(cfg.pretrain, k) for k in ("preset", "corpus", "vocab_size", "batch_size", "seq_len",
                                                  "device", "dtype", "eval_batches")}  # fmt: skip
    key["calibration_steps"] = cfg.calibration_steps
    if known.get("key") == key and set(tasks) <= set(known.get("finetune_fixed_s", {})):
        return known
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
        weight = results["n_train_examples"] + results["n_validation_examples"] / 3
        result["finetune_s_per_example"][task] = epoch_s / max(1.0, weight)
        result["finetune_fixed_s"][task] = max(0.0, seconds - 2 * epoch_s)
    atomic_write_json(cache, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def estimate(run: PlannedRun, cfg: ExperimentConfig, calibration: dict, sizes: dict[str, TaskSizes]) -> float:
    """Seconds one run should take on this machine, from the calibration (one run at a time: with
    `workers` processes the experiment's wall time is about the sum over workers)."""
    if run.kind == "pretrain":
        pcfg = pretrain_config(cfg, run)
        if pcfg.steps == 0:  # the untrained control: build, evaluate once, export
            return calibration["pretrain_fixed_s"]
        step_s = calibration["pretrain_step_s"]
        probes = pcfg.steps // pcfg.probe_every + 1
        evals = pcfg.steps // pcfg.eval_every + 2
        # a probe costs about one more backward; an evaluation batch about a third of a step
        return (pcfg.steps + probes + evals * pcfg.eval_batches / 3) * step_s + calibration[
            "pretrain_fixed_s"
        ]

    epochs = finetune_config(cfg, run).resolved().epochs
    n = sizes[run.task]
    rate, fixed = calibration["finetune_s_per_example"][run.task], calibration["finetune_fixed_s"][run.task]
    # validation every epoch, the test split(s) twice at the end; evaluation a third of a training example
    return fixed + (epochs * (n.train + n.validation / 3) + 2 * n.test / 3) * rate


# ---------------------------------------------------------------------------------------------- progress


class ExperimentProgress:
    """One status line (or tqdm bar) for the whole experiment: runs done, the running runs' own progress
    (read from their metrics.jsonl by a background thread), elapsed time and an ETA. The ETA scales the
    remaining estimated seconds by how fast the finished part went against its estimate."""

    def __init__(self, runs: list[PlannedRun], estimates: dict[PlannedRun, float], cfg: ExperimentConfig):
        self.runs, self.estimates, self.cfg = runs, estimates, cfg
        self.total = sum(estimates[r] for r in runs) or 1.0
        self.done_estimate = 0.0
        self.finished = 0
        self.current: list[PlannedRun] = []  # running now (several with workers > 1)
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.bar = None
        if cfg.progress == "bar":
            self.bar = tqdm(total=100, desc="experiment", unit="%", bar_format="{l_bar}{bar}| {postfix}")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if cfg.progress != "none":
            self.thread.start()

    def start(self, run: PlannedRun) -> None:
        self.current.append(run)
        self.show()

    def finish(self, run: PlannedRun) -> None:
        self.done_estimate += self.estimates[run]
        self.finished += 1
        self.current.remove(run)
        if self.bar is not None:
            self.show()

    def _fraction(self, run: PlannedRun) -> tuple[float, str]:
        """How far a running run is (0..1) and a short description, from its metrics.jsonl."""
        if run.kind == "pretrain":
            rows = _jsonl(run.path(self.cfg) / "metrics.jsonl")
            step = max((r["step"] for r in rows if r.get("split") == "train"), default=0)
            steps = pretrain_config(self.cfg, run).steps
            return (min(1.0, step / steps) if steps else 0.0), f"{run.name} step {step}/{steps}"
        return 0.0, run.name  # a fine-tuning run writes its rows when it ends: no partial progress to read

    def show(self) -> None:
        if self.cfg.progress == "none":
            return
        running = list(self.current)  # the background thread reads while runs start and finish
        parts = [self._fraction(r) for r in running]
        now = ", ".join(text for _, text in parts)
        done = self.done_estimate + sum(f * self.estimates[r] for (f, _), r in zip(parts, running))
        elapsed = time.perf_counter() - self.t0
        # actual seconds per estimated second so far (before anything is done: the workers share the runs)
        speed = elapsed / done if done > 0 else 1.0 / self.cfg.workers
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
