"""RTD pre-training: `train(cfg) -> summary`, callable from notebooks, the CLI and torchrun alike.

`train` reads top to bottom in nanoGPT order: setup, then per step lr -> eval -> forward / backward
(with the gradient-conflict probe when due) -> clip -> step -> log -> checkpoint, then the final
evaluation and export. Each phase is a function below it: `setup`, `train_step`, `evaluate` /
`gradient_probe`, `save_checkpoint`, `log_window`, `finish`.
What the loop only calls lives beside it: the RTD step in lab/rtd.py, the log in
lab/pretrain/meter.py, the checkpoint ring in lab/pretrain/checkpoint.py, the probe's measures in
lab/pretrain/probe.py.

A steady-state step never waits for the device: losses and the non-finite flag are summed on the
device (`Meter`) and read at log steps only; batches go to the GPU from pinned memory without
blocking. Evaluation, the probe and checkpoints read values back, so they are timed apart from
training: the log's ms/step and tokens/s are training alone, their cost is the row's `overhead_s`.

One global batch, however it is split. A step's `batch_size` examples are split into processes x
micro-batches (micro-batch m of rank r holds rows (m * world + r) * micro ... of the step's batch, the
order BatchIterator hands them out in). The step's masking and sampling noise is drawn once for the
whole global batch and each part takes its rows; the MLM loss is divided by the global batch's
masked count and the RTD loss by its non-pad count (counted on the device before the first forward,
one all-reduce under torchrun, no host sync), so the parts' losses add up to the global means, and
each part's backward is scaled by the number of processes to undo DDP's average. With dropout off,
any split of the same global batch computes the same losses and updates (tests/test_pretrain.py).

Randomness is a function of (seed, step): `stream_seed` derives every stream (the step's noise,
each micro-batch's dropout on each rank) from the tuple (seed, purpose, step, micro-batch, rank) with
numpy's SeedSequence, so a resumed run repeats an uninterrupted one exactly and no two streams share
a seed.

Non-finite steps are skipped, never applied (`NonFiniteGuard`): the total gradient norm the clip
computes and the step's loss are checked on the device, and a step where either is not finite
reaches AdamW (fused) as `found_inf`, which leaves weights and optimizer state untouched. Skipped
steps are counted in the log rows (`skipped_steps`) and left out of their mean losses; after
`MAX_SKIPPED_IN_A_ROW` consecutive skips the run stops with an error at the next log or checkpoint
step (the weights have not moved since the last good step, so nothing is lost by waiting for it).
Every checkpoint is checked to hold only finite tensors before it is written (lab/pretrain/checkpoint.py).

Run directory (cfg.out_dir): config.json, metrics.jsonl, summary.json, checkpoints/ (a ring of
checksummed checkpoints, see lab/pretrain/checkpoint.py), tokenizer/spm.model, token_counts.npy,
token_classes.json (synthetic corpus), embeddings.safetensors (generator / discriminator / delta
tables), embeddings/ (the same tables over training: lab/pretrain/snapshots.py), export/discriminator and
export/generator (HF format).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import lab.sharing
from lab.cli import check_choices, config_parser, param, parse_config
from lab.hf import save_pretrained
from lab.model import preset
from lab.pretrain import checkpoint, tensorboard
from lab.pretrain import init as continued
from lab.pretrain.checkpoint import CheckpointError
from lab.pretrain.data import BatchIterator, PreparedCorpus, prepare_corpus
from lab.pretrain.meter import PROGRESS, Meter, Progress
from lab.pretrain.probe import gradient_cosine, similarity_pull
from lab.pretrain.snapshots import Recorder
from lab.rtd import MASK_STRATEGIES, RTD_WEIGHT, RTDModel, draw_noise, mask_counts
from lab.training import (
    COMPILE,
    COMPILE_MODES,
    COMPILE_SCOPES,
    DTYPES,
    adamw,
    autocast,
    autocast_dtype,
    compile_model,
    compile_on,
    compile_scope,
    linear_schedule,
    set_lr,
)
from lab.util import append_jsonl, atomic_write_bytes, atomic_write_json, pick_device, to_device

OPTIMIZATIONS = ("joint", "decoupled")
# consecutive skipped (non-finite) steps after which a run stops: one bad batch is survivable, a run
# whose every step overflows is not going to recover by itself
MAX_SKIPPED_IN_A_ROW = 3
# the purposes of the random streams a step draws (see stream_seed)
NOISE, DROPOUT, EVAL_NOISE = 0, 1, 2
# compile_mode="auto": the mode measured fastest per preset on a GPU (bf16, one process). xsmall
# (T=128, batch 128): reduce-overhead 39.3 ms/step against 68.7 eager, the step launch-bound, CUDA graphs
# win; base (T=512, bf16): default 176 ms against 215 eager (GPU-bound, reduce-overhead not timed).
# Presets not listed use "default"; `python -m lab gpucheck` times the modes (compile:* parts) to extend this.
AUTO_COMPILE_MODE = {"xsmall": "reduce-overhead", "base": "default"}


def compile_mode(cfg, world: int) -> str:
    """The torch.compile mode a run uses: cfg.compile_mode, with "auto" resolved (AUTO_COMPILE_MODE)."""
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return AUTO_COMPILE_MODE.get(cfg.preset, "default") if world == 1 else "default"


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = param("runs/pretrain", "run directory; an existing checkpoint there is resumed")
    # model
    preset: str = param("mini", "tiny | mini | xsmall | small | base | large (discriminator size)")
    seq_len: int = param(128, "tokens per example, [CLS] and [SEP] included (official: 512)")
    dropout: float = param(0.1, "hidden and attention dropout")
    gen_depth_ratio: float = param(0.5, "generator layers / discriminator layers")
    gen_width_ratio: float = param(1.0, "generator width / discriminator width (< 1 only with sharing=nes)")
    emd: bool = param(False, "generator's enhanced mask decoder; off: HF's DebertaV2ForMaskedLM has none")
    attention_impl: str = param(
        "sdpa", "sdpa | flex (CUDA: FlexAttention, no [B,H,T,T] bias; CPU: forward only)"
    )
    # data
    corpus: str = param(
        "synthetic", "synthetic[:SEED] | .txt/.jsonl/wiki.*.tokens file, folder or glob | hf:NAME"
    )
    tokenizer: str = param("", "spm.model path; empty: train one on the corpus")
    vocab_size: int = param(4000, "SentencePiece size when a tokenizer is trained")
    heldout_fraction: float = param(0.02, "share of packed examples kept for evaluation")
    # RTD
    sharing: str = param(
        "gdes", "embedding sharing between generator and discriminator (lab/sharing.py)", lab.sharing.NAMES
    )
    mask_prob: float = param(0.15, "share of tokens masked for the generator")
    mask_strategy: str = param("mask", "mask: all [MASK], as released; bert: 80/10/10", MASK_STRATEGIES)
    rtd_weight: float = param(
        RTD_WEIGHT, "lambda in L_MLM + lambda * L_RTD (ELECTRA 50; official DeBERTa code 10)"
    )
    temperature: float = param(1.0, "generator sampling temperature")
    optimization: str = param(
        "joint",
        "joint: one backward (ES needs it); decoupled: the official two-optimizer loop",
        OPTIMIZATIONS,
    )
    # optimisation
    steps: int = param(2000, "optimizer steps")
    batch_size: int = param(32, "global examples per optimizer step (across processes and accumulation)")
    grad_accum: int = param(1, "micro-batches per optimizer step")
    lr: float = param(5e-4, "peak learning rate")
    warmup_steps: int = param(100, "linear warmup steps, then linear decay to 0")
    weight_decay: float = param(0.01, "AdamW decoupled decay; none on biases and LayerNorm weights")
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.999, "AdamW beta2")
    adam_eps: float = param(1e-6, "AdamW epsilon (official DeBERTa: 1e-6)")
    grad_clip: float = param(1.0, "global gradient-norm clip")
    # runtime
    seed: int = param(0, "seed of initialisation, dropout, masking and sampling")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = param("auto", "autocast dtype; auto: bf16 on CUDA, fp32 on the CPU", DTYPES)
    compile: str = param("auto", "torch.compile the RTD model; auto: on for CUDA, off for the CPU", COMPILE)
    # auto: the mode measured fastest for the preset (AUTO_COMPILE_MODE), "default" for unmeasured
    # presets and for multi-process runs (CUDA graphs untested with DDP's hooks)
    compile_mode: str = param(
        "auto", "torch.compile mode; auto: the one measured fastest for the preset", ("auto", *COMPILE_MODES)
    )
    # layers compiles ~5x faster than model on a CPU, and its step ran 3-10 % slower there
    # (figures/bench/README.md, "Compile time"): model pays off past 200-1,200 CPU steps
    compile_scope: str = param(
        "auto",
        "what torch.compile covers: layers (the encoder layer, once) | model; auto: layers, "
        "model under CUDA graphs",
        COMPILE_SCOPES,
    )
    log_every: int = param(20, "steps between log lines")
    eval_every: int = param(200, "steps between held-out evaluations")
    eval_batches: int = param(8, "held-out batches of batch_size rows per evaluation")
    probe_every: int = param(50, "gradient-conflict probe (0 = off)")
    ckpt_every: int = param(200, "steps between checkpoints")
    keep_checkpoints: int = param(
        2, "checkpoints kept in checkpoints/ (the newest; a damaged one falls back)"
    )
    discard_bad_checkpoints: bool = param(
        False, "if no checkpoint is usable: move them to checkpoints/bad/ and start over"
    )
    stop_after: int = param(0, "end this invocation after this step (0 = run to `steps`); a rerun resumes")
    progress: str = param("line", "line: a log line per interval; bar: tqdm, for notebooks; none", PROGRESS)
    # word-table snapshots in embeddings/ (lab/pretrain/snapshots.py): step 0, every snapshot_every steps, the last
    snapshot_every: int = param(0, "steps between word-table snapshots (0 = at the probe steps)")
    snapshot_rows: int = param(
        1024, "at most this many token ids snapshotted, the most frequent (chosen once per run)"
    )
    snapshot_mb: float = param(
        8.0, "bound on embeddings/: fewer rows when the planned snapshots need it; 0 = off"
    )
    tensorboard: bool = param(False, "also write metrics.jsonl's rows as TensorBoard events in tensorboard/")
    # continued pre-training (lab/pretrain/init.py): the architecture and tokenizer come from the checkpoint
    init_discriminator: str = param(
        "",
        "HF folder, hub name or run to continue ('' = from scratch); lr and warmup_steps left at their "
        "defaults become 1e-4 and 10",
    )
    init_generator: str = param(
        "half",
        "with init_discriminator: a generator checkpoint, half (D's embeddings + bottom layers) or new (random)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # config.json files written before compile took auto/on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        check_choices(self)
        for name, value in continued.continuing_defaults(self).items():
            object.__setattr__(self, name, value)
        if self.tensorboard:
            tensorboard.require()
        preset(self.preset, attention_impl=self.attention_impl)  # raises on an unknown preset / impl
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"PretrainConfig.mask_prob={self.mask_prob} must be in (0, 1)")
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "ckpt_every")
        for name in (*positive, "keep_checkpoints", "snapshot_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"PretrainConfig.seed={self.seed} must be >= 0")
        for name in ("snapshot_every", "snapshot_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"PretrainConfig.seq_len={self.seq_len} is too short; use at least 8")
        mode = lab.sharing.get(self.sharing)
        if self.compile == "on" and self.optimization == "decoupled" and mode.shares_generator_table:
            raise ValueError(
                f"PretrainConfig(compile='on', optimization='decoupled', sharing={self.sharing!r}): decoupled "
                f"{mode.label} differentiates each step's graph twice, which a compiled backward refuses; "
                "use compile='off' (or 'auto', which keeps this combination eager)"
            )


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: PretrainConfig) -> dict:
    """Pre-train a generator + discriminator with the chosen sharing mode; returns summary.json."""
    launched = "RANK" in os.environ and not dist.is_initialized()  # under torchrun setup() makes the group
    try:
        return _train(cfg)
    finally:
        if launched and dist.is_initialized():
            # the group this call made ends with it (its backend's threads and sockets), so that a
            # caller can go on or run again; how a torchrun worker then exits is cli()'s concern
            dist.destroy_process_group()


def _train(cfg: PretrainConfig) -> dict:
    run = setup(cfg)
    model, optimizer = run.model, run.optimizer
    step, end = run.start, min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    # the first steps (compilation, CUDA-graph capture, first allocations) are timed as overhead
    meter = Meter(run.device, step, warmup=3 if run.compiled else 1)
    guard = NonFiniteGuard(run.device)
    progress = Progress(cfg.steps, step, f"pretrain {cfg.sharing}", cfg.progress, run.ddp.main)
    snapshots = Recorder(run)  # drops the snapshots past a resumed step; writes on the main process only
    if run.ddp.main and step:
        progress.message(f"resuming {run.out_dir} at step {step} from {run.resumed_from}")
    try:
        while step < end:
            set_lr(optimizer, cfg.lr * linear_schedule(step, cfg.warmup_steps, cfg.steps))
            # eval (before the step, so step 0 records the untrained model)
            if run.ddp.main and step % cfg.eval_every == 0 and run.eval_batches:
                with meter.overhead("eval"):
                    row = evaluate(model, run.eval_batches, run.tok, cfg, run.device, run.amp, run.micro)
                    append_jsonl(run.metrics, {"split": "eval", "step": step, **row})
            if snapshots.due(step):  # the word tables before the step, as eval sees them
                with meter.overhead("probe"):
                    snapshots.write(step)
            # forward / backward over the micro-batches, the probe on the first when due
            probe = cfg.probe_every > 0 and step % cfg.probe_every == 0
            losses = train_step(run, step, meter, probe)
            # clip, then step unless the loss or the gradient is not finite (checked on the device)
            skip = guard.check(clip(model, cfg), losses)
            meter.add(SimpleNamespace(**{k: torch.where(skip, 0.0, v) for k, v in losses.items()}), 1)
            optimizer.found_inf = skip.float()  # fused AdamW leaves everything as it was when it is 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.step_done(step)
            # log (the only place a steady-state step reads values from the device)
            if step % cfg.log_every == 0 or step == end:
                log_window(run, meter, guard, step, end, progress)
            if step % cfg.ckpt_every == 0 or step == end:
                with meter.overhead("checkpoint"):
                    guard.stop_if_stuck(run, step)
                    save_checkpoint(run, step)
    except KeyboardInterrupt:
        save_checkpoint(run, step)
        progress.message(f"interrupted at step {step}; checkpoint saved in {run.ckpt_dir}; rerun to resume")
        progress.close()
        raise
    if snapshots.due(step):  # the final tables (or those of a stop_after step that is due)
        snapshots.write(step)
    progress.close()
    return finish(run, step, meter, guard)


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return Dist()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class Run:
    """What `setup` builds for the loop."""

    cfg: PretrainConfig
    device: torch.device
    ddp: Dist
    amp: torch.dtype | None  # autocast dtype, None = fp32
    out_dir: Path
    corpus: PreparedCorpus
    model: RTDModel  # the module itself: evaluation, the probe, checkpoints and export use it
    net: torch.nn.Module  # the model or its DDP wrapper
    step_fn: torch.nn.Module  # `net`, compiled when cfg.compile says so: the training forward
    compiled: bool
    optimizer: torch.optim.Optimizer
    batches: BatchIterator
    eval_batches: list[torch.Tensor]
    micro: int  # examples per process per micro-step
    start: int  # the step this invocation starts at
    resumed_from: Path | None

    @property
    def tok(self):
        return self.corpus.tokenizer

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def __post_init__(self) -> None:
        self.special = torch.tensor(sorted(self.tok.special_ids), device=self.device)
        self.noise_gen = torch.Generator(device=self.device)


def setup(cfg: PretrainConfig) -> Run:
    """Device and processes, data, model and optimizer, and the resumed state if there is one."""
    device = pick_device(cfg.device)
    ddp = setup_distributed(device)
    if ddp.world > 1 and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    micro = cfg.batch_size // (ddp.world * cfg.grad_accum)
    if micro * ddp.world * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by processes ({ddp.world}) x grad_accum "
            f"({cfg.grad_accum}); choose a multiple of {ddp.world * cfg.grad_accum}"
        )
    out_dir = Path(cfg.out_dir)
    # a continued run's checkpoints, opened and checked before anything is written (None from scratch)
    pretrained = continued.open_checkpoints(cfg)

    corpus = load_corpus(cfg, ddp, None if pretrained is None else pretrained.tokenizer)
    tok = corpus.tokenizer

    # -- model and optimizer
    model_cfg = preset(
        cfg.preset,
        vocab_size=tok.vocab_size,
        max_seq_len=max(cfg.seq_len, 512),
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        attention_impl=cfg.attention_impl,
    )
    torch.manual_seed(cfg.seed)
    if pretrained is None:
        model = RTDModel(model_cfg, cfg.sharing, cfg.gen_depth_ratio, cfg.gen_width_ratio, cfg.emd)
    else:
        model = pretrained.model(cfg)
    model = model.to(device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)

    # -- resume, or start the run directory
    found = start_or_resume(cfg, model, optimizer, corpus, out_dir, device, ddp)
    start, position = (0, 0) if found is None else (found.state["step"], found.state["data"]["position"])

    # -- the training forward: DDP wrapper, then torch.compile
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    compiled = compile_on(cfg.compile, device)
    # decoupled ES stays eager (see __post_init__)
    compiled &= not (cfg.optimization == "decoupled" and model.sharing.shares_generator_table)
    # compile_scope auto: the encoder Layer compiled once for every layer of G and D (regional), or the
    # whole step under CUDA graphs (lab/training.py, COMPILE_SCOPES)
    step_fn = compile_model(net, compile_mode(cfg, ddp.world), scope=cfg.compile_scope) if compiled else net

    # held-out batches of the global batch size, however training is split: the same rows, the same noise
    eval_set = [corpus.heldout[i] for i in range(min(len(corpus.heldout), cfg.eval_batches * cfg.batch_size))]
    return Run(
        cfg=cfg,
        device=device,
        ddp=ddp,
        amp=autocast_dtype(cfg.dtype, device),
        out_dir=out_dir,
        corpus=corpus,
        model=model,
        net=net,
        step_fn=step_fn,
        compiled=compiled,
        optimizer=optimizer,
        batches=BatchIterator(corpus.train, micro, cfg.seed, ddp.rank, ddp.world, position),
        eval_batches=[
            torch.stack(eval_set[i : i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)
        ],
        micro=micro,
        start=start,
        resumed_from=None if found is None else found.path,
    )


def load_corpus(cfg: PretrainConfig, ddp: Dist, tokenizer=None) -> PreparedCorpus:
    """The tokenised corpus (with `tokenizer`, else cfg.tokenizer, else one trained on it); under torchrun
    rank 0 tokenises and caches first, the others then read the cache."""
    if not ddp.main:
        dist.barrier()
    corpus = prepare_corpus(
        cfg.corpus,
        tokenizer=tokenizer or cfg.tokenizer or None,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        heldout_fraction=cfg.heldout_fraction,
    )
    if ddp.main and ddp.world > 1:
        dist.barrier()
    return corpus


def start_or_resume(
    cfg: PretrainConfig, model: RTDModel, optimizer, corpus: PreparedCorpus, out_dir: Path, device, ddp: Dist
) -> checkpoint.Found | None:
    """Load the newest usable checkpoint of out_dir into `model` and `optimizer` and return it; with none,
    start the run directory (config, tokenizer, token counts and classes). Either way the metrics log
    keeps only the rows of the steps before the one this invocation starts at."""
    tok = corpus.tokenizer
    found = resume_point(cfg, out_dir / "checkpoints", device, ddp)
    if found is not None:
        check_resumable(found.state["config"], cfg, found.path)
        rows = found.state["model"]["generator.word_embeddings.weight"].shape[0]
        # a released checkpoint's table may have more rows than its tokenizer has ids (128100 for 128001)
        if rows != model.generator_table.shape[0] or rows < tok.vocab_size:
            raise ValueError(
                f"{found.path} has a vocabulary of {rows} rows but the tokenizer has {tok.vocab_size} ids; "
                "resume with the tokenizer the run started with (its tokenizer/spm.model), or use a new out_dir"
            )
        model.load_state_dict(found.state["model"])
        optimizer.load_state_dict(found.state["optimizer"])
    elif ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_json(out_dir / "config.json", asdict(cfg))
        tok.save(out_dir / "tokenizer")
        np.save(out_dir / "token_counts.npy", corpus.token_counts)
        if corpus.token_classes is not None:
            atomic_write_json(
                out_dir / "token_classes.json", {str(k): v for k, v in corpus.token_classes.items()}
            )
    if ddp.main:
        _truncate_metrics(out_dir / "metrics.jsonl", 0 if found is None else found.state["step"])
    return found


def resume_point(cfg: PretrainConfig, folder: Path, device, ddp: Dist) -> checkpoint.Found | None:
    """The newest usable checkpoint (damaged newer ones are moved to checkpoints/bad/ with a warning),
    or None for a fresh run. With no usable one at all, CheckpointError says what to do, unless
    cfg.discard_bad_checkpoints moves them aside and starts over."""
    try:
        found = checkpoint.latest(folder, map_location=device, warn=ddp.main)
    except CheckpointError as err:
        if not cfg.discard_bad_checkpoints:
            raise
        found, bad = None, err.bad
    else:
        bad = [] if found is None else [path for path, _ in found.bad]
    if ddp.world > 1:
        dist.barrier()  # every rank has chosen before rank 0 moves files
    if bad and ddp.main:
        where = checkpoint.set_aside(bad, folder)
        print(f"moved {len(bad)} unusable checkpoint(s) to {where}", file=sys.stderr, flush=True)
    return found


# ----------------------------------------------------------------------------------------------
# The step


def stream_seed(seed: int, purpose: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """The seed of one random stream: the first 64-bit word of numpy's SeedSequence over the tuple
    (seed, purpose, step, micro-batch, rank). SeedSequence hashes the whole tuple, so distinct tuples
    give unrelated seeds (a linear mix such as seed * a + step * b + m * c + rank collides)."""
    return int(np.random.SeedSequence([seed, purpose, step, micro, rank]).generate_state(1, np.uint64)[0])


def global_totals(batches, masks, special, mask_prob: float, ddp: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked tokens, non-pad tokens) of the step's global batch: this process's micro-batches
    counted on the device, summed over processes with one all-reduce (no host sync)."""
    counts = torch.stack(
        [
            torch.stack([mask_counts(ids, mask, special, mask_prob).sum(), mask.sum()])
            for ids, mask in zip(batches, masks)
        ]
    ).sum(0)  # [2]
    if ddp.world > 1:
        dist.all_reduce(counts)
    return counts[0], counts[1]


def train_step(run: Run, step: int, meter: Meter, probe: bool) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step, over cfg.grad_accum micro-batches; gradients are
    left in .grad (all-reduced across processes on the last micro-batch). Returns this process's
    part of the step's global-mean losses (on the device; summed over processes, the global means)."""
    cfg, ddp = run.cfg, run.ddp
    run.model.train()
    batches = [to_device(next(run.batches), run.device) for _ in range(cfg.grad_accum)]
    masks = [torch.ones_like(ids) for ids in batches]
    totals = global_totals(batches, masks, run.special, cfg.mask_prob, ddp)
    run.noise_gen.manual_seed(stream_seed(cfg.seed, NOISE, step))  # the same on every rank
    noise = draw_noise(cfg.batch_size, cfg.seq_len, cfg.mask_prob, run.noise_gen, run.device)  # global batch
    losses = {k: torch.zeros((), device=run.device) for k in ("loss", "mlm_loss", "rtd_loss")}
    for m, (ids, mask) in enumerate(zip(batches, masks)):
        torch.manual_seed(stream_seed(cfg.seed, DROPOUT, step, m, ddp.rank))
        first = (m * ddp.world + ddp.rank) * run.micro  # this part's rows of the global batch
        part = noise.rows(slice(first, first + run.micro))
        synced = ddp.world > 1 and m == cfg.grad_accum - 1  # DDP all-reduces in this backward
        ctx = run.net.no_sync() if ddp.world > 1 and not synced else contextlib.nullcontext()
        # the probe differentiates the graph twice (retain_graph), which a compiled backward refuses
        # (its buffers are donated): a probe step's forward runs eagerly, on every rank alike
        fn = run.net if probe and m == 0 else run.step_fn
        with ctx:  # one block: a no_sync() context manager can be entered only once
            # packed examples have no padding: None spares the encoders the key-padding bias
            out = rtd_forward(
                fn,
                ids,
                None,
                run.special,
                mask_id=run.tok.mask_id,
                cfg=cfg,
                noise=part,
                amp=run.amp,
                totals=totals,
            )
            if probe and m == 0 and ddp.main:
                with meter.overhead("probe"):
                    # the probe measures this micro-batch's own mean losses, whatever the split
                    own = SimpleNamespace(
                        mlm_loss=out.mlm_loss * totals[0] / out.valid.sum().clamp(min=1),
                        rtd_loss=out.rtd_loss * totals[1] / mask.sum(),
                    )
                    row = gradient_probe(run.model, own, cfg.rtd_weight)
                    append_jsonl(run.metrics, {"split": "probe", "step": step, **row})
            backward(run.model, out, cfg, ddp.world, all_reduce=synced)
        for key, value in losses.items():
            value += getattr(out, key).detach()
    return losses


def backward(model: RTDModel, out, cfg: PretrainConfig, world: int = 1, all_reduce: bool = False) -> None:
    """Joint: one backward of L_MLM + lambda L_RTD. Decoupled (the official two-optimizer loop): under
    ES the shared table keeps only its MLM gradient — which is why decoupled ES is not ES.

    `out`'s losses are this part's share of the global batch's means, so the gradients accumulate
    over micro-batches by plain summation; they are scaled by `world` because DDP averages the
    processes' gradients where the global mean needs their sum.

    Decoupled ES takes the table's MLM gradient with autograd.grad (which leaves .grad and DDP's
    hooks alone), then runs the one joint backward for every other parameter and puts the MLM-only
    gradient back on the table; `all_reduce` (the micro-batch on which DDP synchronises) averages it
    across processes as DDP did the others. Calling backward twice instead breaks under DDP, whose
    reducer expects one backward per forward."""
    if cfg.optimization == "decoupled" and model.sharing.shares_generator_table:
        table = model.generator_table
        (mlm_grad,) = torch.autograd.grad(out.mlm_loss * world, table, retain_graph=True)
        if table.grad is not None:  # earlier micro-batches' MLM-only gradient (local)
            mlm_grad = mlm_grad + table.grad
        (out.loss * world).backward()
        if all_reduce:
            dist.all_reduce(mlm_grad)
            mlm_grad /= dist.get_world_size()
        table.grad.copy_(mlm_grad)
    else:
        (out.loss * world).backward()


def clip_groups(model: RTDModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The decoupled loop's two sides, by ownership as in the official two-optimizer loop: the
    generator's optimizer owns E_G (under ES the one shared table, which the discriminator only
    borrows), its encoder, MLM head and EMD; the discriminator's owns its encoder's other parameters,
    the RTD head and, under GDES, E_delta."""
    g_side = {
        id(p)
        for module in (model.generator, model.mlm_head, model.emd)
        if module is not None
        for p in module.parameters()
    }
    gen = [p for p in model.parameters() if id(p) in g_side]
    disc = [p for p in model.parameters() if id(p) not in g_side]
    return gen, disc


def clip(model: RTDModel, cfg: PretrainConfig) -> torch.Tensor:
    """Global norm clip; the decoupled mode clips generator and discriminator sides separately
    (`clip_groups`). Returns the total gradient norm before clipping (on the device) for the
    non-finite check."""
    if cfg.optimization == "joint":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
    norms = [
        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip, foreach=True) for group in clip_groups(model)
    ]
    return torch.stack(norms).norm()


def rtd_forward(
    fn, ids, mask, special, *, mask_id: int, cfg: PretrainConfig, noise, amp: torch.dtype | None, totals=None
):
    """One RTD forward of `fn` (the model, its DDP wrapper or its compiled form) under the run's autocast;
    `totals` (see RTDModel.forward) makes the losses this batch's share of a global batch's means."""
    with autocast(ids.device, amp):
        return fn(
            ids,
            mask,
            special,
            mask_id=mask_id,
            rtd_weight=cfg.rtd_weight,
            mask_prob=cfg.mask_prob,
            mask_strategy=cfg.mask_strategy,
            temperature=cfg.temperature,
            noise=noise,
            totals=totals,
        )


# ----------------------------------------------------------------------------------------------
# Evaluation and the gradient-conflict probe


@torch.no_grad()
def evaluate(
    model: RTDModel,
    batches: list[torch.Tensor],
    tok,
    cfg: PretrainConfig,
    device,
    amp,
    chunk: int | None = None,
) -> dict:
    """Held-out MLM loss/accuracy, RTD loss/accuracy/AUC and replaced-token rate, with fixed noise.
    Each batch's noise is drawn whole and the forward runs `chunk` rows at a time (the training
    micro-batch), so the numbers do not depend on how training splits its batch.
    Sums stay on the device; they are read back once, at the end."""
    from sklearn.metrics import roc_auc_score

    was_training = model.training
    model.eval()
    special = torch.tensor(sorted(tok.special_ids), device=device)
    names = ("mlm_loss", "mlm_correct", "masked", "rtd_loss", "rtd_correct", "tokens")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    labels, scores = [], []
    gen = torch.Generator(device=device)
    parts = []
    for i, batch in enumerate(batches):
        gen.manual_seed(stream_seed(cfg.seed, EVAL_NOISE, i))  # the same batches, the same noise
        noise = draw_noise(batch.shape[0], batch.shape[1], cfg.mask_prob, gen, device)
        rows = chunk or batch.shape[0]
        parts += [(batch[j : j + rows], noise.rows(slice(j, j + rows))) for j in range(0, len(batch), rows)]
    for ids, noise in parts:
        ids = to_device(ids, device)
        mask = torch.ones_like(ids)
        out = rtd_forward(model, ids, None, special, mask_id=tok.mask_id, cfg=cfg, noise=noise, amp=amp)
        n_masked, n_tokens = out.valid.sum(), mask.sum()
        targets = ids.gather(1, out.positions)  # [B, K]
        sums += torch.stack(
            [
                out.mlm_loss * n_masked,
                ((out.mlm_logits.argmax(-1) == targets) & out.valid).sum(),
                n_masked,
                out.rtd_loss * n_tokens,
                ((out.rtd_logits > 0).float() == out.labels).sum(),
                n_tokens,
            ]
        ).double()
        labels.append(out.labels.flatten())
        scores.append(out.rtd_logits.flatten())
    model.train(was_training)
    total = dict(zip(names, sums.tolist()))
    labels, scores = torch.cat(labels).cpu().numpy(), torch.cat(scores).float().cpu().numpy()
    replaced = float(labels.sum())
    masked, tokens = max(total["masked"], 1), max(total["tokens"], 1)
    return {
        "mlm_loss": total["mlm_loss"] / masked,
        "mlm_acc": total["mlm_correct"] / masked,
        "rtd_loss": total["rtd_loss"] / tokens,
        "rtd_acc": total["rtd_correct"] / tokens,
        "rtd_auc": float(roc_auc_score(labels, scores)) if 0 < replaced < len(labels) else float("nan"),
        "replaced_rate": replaced / tokens,
        "replaced_of_masked": replaced / masked,
    }


def gradient_probe(model: RTDModel, out, rtd_weight: float) -> dict:
    """The tug-of-war, measured: cosine between dL_MLM/dE_G and rtd_weight * dL_RTD/dE_D-own.

    E_D-own is the table the RTD loss trains on D's side: the shared table itself (es), D's own
    table (nes), E_delta (gdes). Under ES both gradients land on one table and the cosine is the
    conflict it must absorb; under NES/GDES it is the conflict that separating the tables avoids.
    `similarity_pull_*`: how one step of each loss changes the average pairwise cosine of the table it
    trains (E_G for MLM, E_D as D sees it for RTD) — the paper's "MLM pulls together, RTD pushes apart".
    `rtd_grad_on_generator` is the RTD gradient that reaches E_G: non-zero only under ES.
    """
    gen_table, own = model.generator_table, model.discriminator_own_table()
    g_mlm = torch.autograd.grad(out.mlm_loss, gen_table, retain_graph=True)[0]
    # a mode whose RTD loss trains no word table (own is None): D's side gets a zero gradient, no conflict
    g_rtd_own, g_rtd_gen = torch.autograd.grad(
        rtd_weight * out.rtd_loss,
        [gen_table if own is None else own, gen_table],
        retain_graph=True,
        allow_unused=True,
    )
    g_rtd_gen = torch.zeros_like(gen_table) if g_rtd_gen is None else g_rtd_gen
    g_rtd_own = torch.zeros_like(gen_table) if g_rtd_own is None else g_rtd_own
    return {
        "grad_cos": gradient_cosine(g_mlm, g_rtd_own),
        # > 0 pulls the rows of the table together, < 0 pushes them apart (per unit learning rate)
        "similarity_pull_mlm": similarity_pull(gen_table, g_mlm),
        "similarity_pull_rtd": similarity_pull(model.discriminator_table(), g_rtd_own),
        "grad_norm_mlm": g_mlm.norm().item(),
        "grad_norm_rtd": g_rtd_own.norm().item(),
        "rtd_grad_on_generator": g_rtd_gen.norm().item(),
    }


# ----------------------------------------------------------------------------------------------
# Checkpoints and exports


def save_checkpoint(run: Run, step: int) -> None:
    """The main process writes the checkpoint of `step` into the ring (see lab/pretrain/checkpoint.py, which
    refuses a state with a non-finite tensor before writing anything)."""
    if run.ddp.main:
        # the data position of the completed steps (an interrupted step may have drawn a batch already)
        state = {
            "step": step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "data": {**run.batches.state(), "position": step * run.cfg.grad_accum},
            "config": asdict(run.cfg),
        }
        checkpoint.save(state, run.ckpt_dir, step, keep=run.cfg.keep_checkpoints)


# fields that may differ between a run and its resumption
_RESUMABLE_CHANGES = {
    "steps",
    "stop_after",
    "out_dir",
    "log_every",
    "eval_every",
    "eval_batches",
    "probe_every",
    "ckpt_every",
    "keep_checkpoints",
    "discard_bad_checkpoints",
    "device",
    "compile",
    "compile_mode",
    "compile_scope",
    "attention_impl",  # the implementations agree to float rounding (tests/test_reference.py)
    "progress",
    "snapshot_every",  # snapshots only read the tables; their rows are fixed by embeddings/ids.json
    "snapshot_rows",
    "snapshot_mb",
    "tensorboard",
}


def check_resumable(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    now = asdict(cfg)
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{path} belongs to a run with a different configuration ({detail}); "
            "use a new out_dir, or the same settings to resume"
        )


def export_run(model: RTDModel, out_dir: Path, tok) -> None:
    """Tables for the analysis, plus HF-format discriminator (merged E_D) and generator."""
    save_file(
        {k: v.detach().float().cpu().clone() for k, v in model.exported_tables().items()},
        out_dir / "embeddings.safetensors",
    )
    disc_dir = save_pretrained(
        model.discriminator, out_dir / "export" / "discriminator", tok, state=model.discriminator_state_dict()
    )
    # the RTD head beside it, which continued pre-training reads back (lab.hf.read_heads)
    rtd = {f"rtd_head.{k}": v.detach().cpu().contiguous() for k, v in model.rtd_head.state_dict().items()}
    save_file(rtd, disc_dir / "rtd_head.safetensors")
    gen_dir = save_pretrained(model.generator, out_dir / "export" / "generator", tok)
    head = {f"mlm_head.{k}": v.detach().cpu().contiguous() for k, v in model.mlm_head.state_dict().items()}
    save_file(head, gen_dir / "mlm_head.safetensors")


def finish(run: Run, step: int, meter: Meter, guard: NonFiniteGuard | None = None) -> dict:
    """Final evaluation, export and summary.json (main process); returns the summary."""
    cfg, summary = run.cfg, {}
    if run.ddp.main:
        final_eval = (
            evaluate(run.model, run.eval_batches, run.tok, cfg, run.device, run.amp, run.micro)
            if run.eval_batches
            else {}
        )
        append_jsonl(run.metrics, {"split": "eval", "step": step, **final_eval})
        if cfg.tensorboard:
            tensorboard.mirror(run, close=True)
        wall = time.perf_counter() - meter.t_start
        train_s = wall - sum(meter.total_overhead.values())
        tokens_per_step = cfg.batch_size * cfg.seq_len
        summary = {
            "sharing": cfg.sharing,
            "preset": cfg.preset,
            "corpus": cfg.corpus,
            "rtd_weight": cfg.rtd_weight,
            "steps": step,
            "completed": step >= cfg.steps,
            "skipped_steps": None if guard is None else guard.skipped_total + int(guard.skipped),
            "tokens_seen": step * tokens_per_step,
            "wall_s_this_invocation": wall,
            # training alone: the warm-up (compilation) steps, evaluation, probe and checkpoints are
            # in overhead_s
            "tokens_per_s": meter.steady_steps_total * tokens_per_step / train_s
            if meter.steady_steps_total
            else None,
            "overhead_s": dict(meter.total_overhead),
            "compile_s": meter.compile_s if run.compiled else None,
            "world_size": run.ddp.world,
            "device": str(run.device),
            "dtype": str(run.amp or torch.float32),
            "compiled": run.compiled,
            "compile_mode": compile_mode(cfg, run.ddp.world) if run.compiled else None,
            "compile_scope": compile_scope(cfg.compile_scope, compile_mode(cfg, run.ddp.world))
            if run.compiled
            else None,
            "vocab_size": run.tok.vocab_size,
            "final_eval": final_eval,
            "corpus_info": run.corpus.describe(),
        }
        try:
            export_run(run.model, run.out_dir, run.tok)
            atomic_write_json(run.out_dir / "summary.json", summary)
        except OSError as err:
            newest = checkpoint.candidates(run.ckpt_dir)
            raise CheckpointError(
                f"could not write the export of {run.out_dir} ({type(err).__name__}: {err}); the checkpoint "
                f"{newest[0] if newest else '(none)'} is intact. Free disk space and rerun the same command: "
                "a finished run only re-evaluates and re-exports"
            ) from err
    if run.ddp.world > 1:
        dist.barrier()
    return summary


# ----------------------------------------------------------------------------------------------
# Logging


class NonFiniteGuard:
    """Steps whose loss or gradient is not finite, counted on the device (read at log and checkpoint
    steps only): `check` flags the step, which the optimizer then skips; `stop_if_stuck` raises once
    MAX_SKIPPED_IN_A_ROW steps in a row were skipped."""

    def __init__(self, device: torch.device):
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # in this log window
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)  # consecutive, up to now
        self.longest = torch.zeros((), dtype=torch.long, device=device)  # longest run since the last read
        self.skipped_total = 0  # read at log steps

    def check(self, grad_norm: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """True (a device bool) when the step must be skipped. Under torchrun the gradient norm is the
        same on every rank (DDP all-reduced the gradients, and a non-finite loss on any rank makes
        them non-finite everywhere), so every rank takes the same decision."""
        skip = ~(torch.isfinite(grad_norm) & torch.isfinite(losses["loss"]))
        self.skipped += skip
        self.in_a_row.mul_(skip).add_(skip)  # +1 when skipped, back to 0 when not
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        return skip

    def stop_if_stuck(self, run: Run, step: int) -> None:
        if int(self.longest) >= MAX_SKIPPED_IN_A_ROW:  # a device read: on log / checkpoint steps only
            newest = checkpoint.candidates(run.ckpt_dir)
            raise FloatingPointError(
                f"{int(self.longest)} steps in a row up to step {step} had a non-finite loss or gradient and "
                f"were skipped (the weights did not change); the last good checkpoint "
                f"{newest[0] if newest else '(none yet)'} is intact (checkpoints are checked to be finite "
                "before they are written). Lower lr, raise warmup_steps, or use dtype=fp32"
            )


def log_window(
    run: Run, meter: Meter, guard: NonFiniteGuard, step: int, end: int, progress: Progress
) -> None:
    """Sum the window's losses across processes (each holds its share of the global means), stop
    after too many non-finite steps in a row, write the train row (means over the applied steps)."""
    cfg, ddp = run.cfg, run.ddp
    guard.stop_if_stuck(run, step)
    if ddp.world > 1:
        for value in meter.sums.values():
            dist.all_reduce(value)
    skipped = int(guard.skipped)
    guard.skipped.zero_()
    guard.longest.copy_(guard.in_a_row)
    guard.skipped_total += skipped
    n = meter.steps - skipped
    losses = {k: v.item() / n if n else float("nan") for k, v in meter.sums.items()}
    first_compile = meter.compile_s is None
    timing = meter.window(time.perf_counter())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ms = timing["ms_per_step"]
    row = {
        "split": "train",
        "step": step,
        **losses,
        "lr": run.optimizer.param_groups[0]["lr"],
        "skipped_steps": skipped,  # non-finite loss or gradient: not applied, not in the mean losses
        "tokens": step * tokens_per_step,
        # training throughput alone; the window's evaluation / probe / checkpoint / warm-up time is
        # in overhead_s and its parts
        "tokens_per_s": None if ms is None else 1000 * tokens_per_step / ms,
        **timing,
    }
    meter.reset_sums()
    if not ddp.main:
        return
    append_jsonl(run.metrics, row)
    if cfg.tensorboard:
        tensorboard.mirror(run)
    if first_compile and meter.compile_s is not None and run.compiled:
        progress.message(
            f"compiled in {meter.compile_s:.1f} s (torch.compile mode {compile_mode(cfg, ddp.world)}, "
            f"{compile_scope(cfg.compile_scope, compile_mode(cfg, ddp.world))}: the extra time of "
            f"the first {meter.warmup} steps)"
        )
    done = step - meter.start
    spent = timing["elapsed_s"] - meter.total_overhead["warmup"]
    eta = (end - step) * spent / (done - meter.warmup) if done > meter.warmup else None
    progress.update(row, eta, n)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (and the eval/probe rows of the step it
    resumes at, which are logged again) so metrics.jsonl reads as one uninterrupted run. A line torn
    by a kill mid-write is dropped too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] < step or (row["step"] == step and row["split"] == "train"):
            keep.append(line + "\n")
    atomic_write_bytes(path, "".join(keep).encode())


# ----------------------------------------------------------------------------------------------
# Command line


def cli(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PretrainConfig, "python -m lab pretrain", "ELECTRA-style RTD pre-training of DeBERTa-v3."
    )
    try:
        cfg = parse_config(PretrainConfig, parser, sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        parser.error(str(err))
    try:
        train(cfg)
        code = 0
    except KeyboardInterrupt:
        code = 130
    except (ValueError, FloatingPointError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    if "RANK" in os.environ:
        # A torchrun worker leaves here, its files written and its process group destroyed, without
        # the interpreter's teardown: there, a C++ thread of torch.distributed that still touches a
        # Python object at finalisation aborts the finished process now and then ("terminate called
        # without an active exception", SIGABRT; about 1 run in 30 of tests/test_pretrain.py's
        # two-process run on a loaded 2-core machine, with destroy_process_group already called).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(cli())
