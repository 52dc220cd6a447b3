"""RTD pre-training: `train(cfg) -> summary`, callable from notebooks, the CLI and torchrun alike.

`train` reads top to bottom in nanoGPT order: setup, then per step lr -> eval -> forward / backward
(with the gradient-conflict probe when due) -> clip -> step -> log -> checkpoint, then the final
evaluation and export. Each phase is a function below it: `setup`, `train_step`, `evaluate` /
`gradient_probe`, `save_checkpoint`, `log_window`, `finish`.
The loop and its phases stay in this one file, past the usual ~600 lines, so that a run reads top to
bottom in one place as nanoGPT's train.py does; what the loop only calls lives elsewhere (the RTD step
in lab/rtd.py, the log in lab/meter.py, the checkpoint ring in lab/checkpoint.py).

A steady-state step never waits for the device: losses and the non-finite flag are summed on the
device (`Meter`) and read at log steps only; batches go to the GPU from pinned memory without
blocking. Evaluation, the probe and checkpoints read values back, so they are timed apart from
training: the log's ms/step and tokens/s are training alone, their cost is the row's `overhead_s`.

Randomness is a function of (seed, step): every step re-seeds dropout and draws its masking and
sampling noise for the whole global batch from a generator seeded by (seed, step, micro-step), and
each rank takes its rows. So a resumed run repeats an uninterrupted one exactly, and N processes
compute the same losses as one process with the same global batch (with dropout off).

Run directory (cfg.out_dir): config.json, metrics.jsonl, summary.json, checkpoints/ (a ring of
checksummed checkpoints, see lab/checkpoint.py), tokenizer/spm.model, token_counts.npy,
token_classes.json (synthetic corpus), embeddings.safetensors (generator / discriminator / delta
tables), embeddings/ (the same tables over training: lab/snapshots.py), export/discriminator and
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

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lab import checkpoint
from lab.analysis import gradient_cosine, similarity_pull
from lab.checkpoint import CheckpointError
from lab.data import BatchIterator, PreparedCorpus, prepare_corpus
from lab.hf import save_pretrained
from lab.meter import Meter, Progress
from lab.model import preset
from lab.rtd import MASK_STRATEGIES, SHARING_MODES, RTDModel, draw_noise
from lab.snapshots import Recorder
from lab.training import adamw, autocast, linear_schedule, set_lr
from lab.util import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    config_parser,
    parse_config,
    pick_device,
    to_device,
)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = "runs/pretrain"  # run directory; an existing checkpoint there is resumed
    # model
    preset: str = "mini"  # tiny | mini | xsmall | small | base | large (discriminator size)
    seq_len: int = 128  # tokens per example, [CLS] and [SEP] included (official: 512)
    dropout: float = 0.1  # hidden and attention dropout
    gen_depth_ratio: float = 0.5  # generator layers / discriminator layers
    gen_width_ratio: float = 1.0  # generator width / discriminator width (< 1 only with sharing=nes)
    emd: bool = False  # generator's enhanced mask decoder; off: HF's DebertaV2ForMaskedLM has none
    attention_impl: str = "sdpa"  # sdpa | flex (CUDA: FlexAttention, no [B,H,T,T] bias; CPU: forward only)
    # data
    corpus: str = "synthetic"  # synthetic[:SEED] | .txt/.jsonl/wiki.*.tokens file, folder or glob | hf:NAME
    tokenizer: str = ""  # spm.model path; empty: train one on the corpus
    vocab_size: int = 4000  # SentencePiece size when a tokenizer is trained
    heldout_fraction: float = 0.02  # share of packed examples kept for evaluation
    # RTD
    sharing: str = "gdes"  # es | nes | gdes
    mask_prob: float = 0.15
    mask_strategy: str = "mask"  # mask (all [MASK], as released) | bert (80/10/10)
    rtd_weight: float = 50.0  # lambda in L_MLM + lambda * L_RTD (ELECTRA 50; official DeBERTa code 10)
    temperature: float = 1.0  # generator sampling temperature
    optimization: str = "joint"  # joint (one backward; ES needs it) | decoupled (official two-optimizer loop)
    # optimisation
    steps: int = 2000
    batch_size: int = 32  # global examples per optimizer step (across processes and accumulation)
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01  # decoupled; none on biases and LayerNorm weights
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
    compile: str = "auto"  # auto (on for CUDA, off for CPU) | on | off: torch.compile the RTD model
    # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs.
    # "default" is provisional: the fastest mode measured on a GPU (lab gpucheck times them) replaces it.
    compile_mode: str = "default"  # torch.compile mode (default is provisional until timed on a GPU)
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 8
    probe_every: int = 50  # gradient-conflict probe (0 = off)
    ckpt_every: int = 200
    keep_checkpoints: int = 2  # checkpoints kept in checkpoints/ (the newest; a damaged one falls back)
    discard_bad_checkpoints: bool = (
        False  # if no checkpoint is usable: move them to checkpoints/bad/, start over
    )
    stop_after: int = 0  # end this invocation after this step (0 = run to `steps`); a rerun resumes
    progress: str = "line"  # line (a log line per interval) | bar (tqdm, for notebooks) | none
    # word-table snapshots in embeddings/ (lab/snapshots.py): step 0, every snapshot_every steps, the last
    snapshot_every: int = 0  # steps between snapshots (0 = at the probe steps)
    snapshot_rows: int = 1024  # at most this many token ids kept, the most frequent (chosen once per run)
    snapshot_mb: float = 8.0  # bound on embeddings/: fewer rows when the planned snapshots need it; 0 = off

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # config.json files written before compile took auto/on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        choices = {
            "sharing": SHARING_MODES,
            "mask_strategy": MASK_STRATEGIES,
            "optimization": ("joint", "decoupled"),
            "dtype": ("auto", "fp32", "bf16"),
            "compile": ("auto", "on", "off"),
            "compile_mode": COMPILE_MODES,
            "progress": ("line", "bar", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        preset(self.preset, attention_impl=self.attention_impl)  # raises on an unknown preset / impl
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"PretrainConfig.mask_prob={self.mask_prob} must be in (0, 1)")
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "ckpt_every")
        for name in (*positive, "keep_checkpoints", "snapshot_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("snapshot_every", "snapshot_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"PretrainConfig.seq_len={self.seq_len} is too short; use at least 8")
        if self.compile == "on" and self.optimization == "decoupled" and self.sharing == "es":
            raise ValueError(
                "PretrainConfig(compile='on', optimization='decoupled', sharing='es'): decoupled ES "
                "differentiates each step's graph twice, which a compiled backward refuses; use compile='off' "
                "(or 'auto', which keeps this combination eager)"
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
                    row = evaluate(model, run.eval_batches, run.tok, cfg, run.device, run.amp)
                    append_jsonl(run.metrics, {"split": "eval", "step": step, **row})
            if snapshots.due(step):  # the word tables before the step, as eval sees them
                with meter.overhead("probe"):
                    snapshots.write(step)
            # forward / backward over the micro-batches, the probe on the first when due
            probe = cfg.probe_every > 0 and step % cfg.probe_every == 0
            train_step(run, step, meter, probe)
            # clip, step
            clip(model, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.step_done(step)
            # log (the only place a steady-state step reads values from the device)
            if step % cfg.log_every == 0 or step == end:
                log_window(run, meter, step, end, progress)
            if step % cfg.ckpt_every == 0 or step == end:
                with meter.overhead("checkpoint"):
                    save_checkpoint(run, step, meter.nonfinite)
    except KeyboardInterrupt:
        save_checkpoint(run, step, meter.nonfinite)
        progress.message(f"interrupted at step {step}; checkpoint saved in {run.ckpt_dir}; rerun to resume")
        progress.close()
        raise
    if snapshots.due(step):  # the final tables (or those of a stop_after step that is due)
        snapshots.write(step)
    progress.close()
    return finish(run, step, meter)


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


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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
        self.rows = slice(self.ddp.rank * self.micro, (self.ddp.rank + 1) * self.micro)  # this rank's rows


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

    # -- data (rank 0 tokenises and caches first; the others then read the cache)
    if not ddp.main:
        dist.barrier()
    corpus = prepare_corpus(
        cfg.corpus,
        tokenizer=cfg.tokenizer or None,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        heldout_fraction=cfg.heldout_fraction,
    )
    if ddp.main and ddp.world > 1:
        dist.barrier()
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
    model = RTDModel(model_cfg, cfg.sharing, cfg.gen_depth_ratio, cfg.gen_width_ratio, cfg.emd).to(device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)

    # -- resume, or start the run directory
    found = resume_point(cfg, out_dir / "checkpoints", device, ddp)
    start, position = 0, 0
    if found is not None:
        check_resumable(found.state["config"], cfg, found.path)
        rows = found.state["model"]["generator.word_embeddings.weight"].shape[0]
        if rows != tok.vocab_size:
            raise ValueError(
                f"{found.path} has a vocabulary of {rows} rows but the tokenizer has {tok.vocab_size} ids; "
                "resume with the tokenizer the run started with (its tokenizer/spm.model), or use a new out_dir"
            )
        model.load_state_dict(found.state["model"])
        optimizer.load_state_dict(found.state["optimizer"])
        start, position = found.state["step"], found.state["data"]["position"]
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
        _truncate_metrics(out_dir / "metrics.jsonl", start)

    # -- the training forward: DDP wrapper, then torch.compile
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    compiled &= not (cfg.optimization == "decoupled" and cfg.sharing == "es")  # see __post_init__
    step_fn = torch.compile(net, mode=cfg.compile_mode) if compiled else net

    eval_set = [corpus.heldout[i] for i in range(min(len(corpus.heldout), cfg.eval_batches * micro))]
    return Run(
        cfg=cfg,
        device=device,
        ddp=ddp,
        amp=autocast_dtype(cfg, device),
        out_dir=out_dir,
        corpus=corpus,
        model=model,
        net=net,
        step_fn=step_fn,
        compiled=compiled,
        optimizer=optimizer,
        batches=BatchIterator(corpus.train, micro, cfg.seed, ddp.rank, ddp.world, position),
        eval_batches=[torch.stack(eval_set[i : i + micro]) for i in range(0, len(eval_set), micro)],
        micro=micro,
        start=start,
        resumed_from=None if found is None else found.path,
    )


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


def train_step(run: Run, step: int, meter: Meter, probe: bool) -> None:
    """Forward and backward of one optimizer step, over cfg.grad_accum micro-batches; gradients are
    left in .grad (all-reduced across processes on the last micro-batch)."""
    cfg, ddp = run.cfg, run.ddp
    run.model.train()
    for m in range(cfg.grad_accum):
        ids = to_device(next(run.batches), run.device)
        mask = torch.ones_like(ids)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 131 + m * 7 + ddp.rank)  # dropout
        run.noise_gen.manual_seed(cfg.seed * 1_000_003 + step * 131 + m)  # same on every rank
        noise = draw_noise(run.micro * ddp.world, cfg.seq_len, cfg.mask_prob, run.noise_gen, run.device)
        noise = noise.rows(run.rows)  # this rank's share of the global batch's noise
        synced = ddp.world > 1 and m == cfg.grad_accum - 1  # DDP all-reduces in this backward
        ctx = run.net.no_sync() if ddp.world > 1 and not synced else contextlib.nullcontext()
        # the probe differentiates the graph twice (retain_graph), which a compiled backward refuses
        # (its buffers are donated): a probe step's forward runs eagerly, on every rank alike
        fn = run.net if probe and m == 0 else run.step_fn
        with ctx:
            out = rtd_forward(fn, ids, mask, run.special, run.tok.mask_id, cfg, noise, run.amp)
        if probe and m == 0 and ddp.main:
            with meter.overhead("probe"):
                row = gradient_probe(run.model, out, cfg.rtd_weight)
                append_jsonl(run.metrics, {"split": "probe", "step": step, **row})
        with ctx:
            backward(run.model, out, cfg, cfg.grad_accum, all_reduce=synced)
        meter.add(out, cfg.grad_accum)


def backward(model: RTDModel, out, cfg: PretrainConfig, accum: int, all_reduce: bool = False) -> None:
    """Joint: one backward of L_MLM + lambda L_RTD. Decoupled (the official two-optimizer loop): under
    ES the shared table keeps only its MLM gradient — which is why decoupled ES is not ES.

    Decoupled ES takes the table's MLM gradient with autograd.grad (which leaves .grad and DDP's
    hooks alone), then runs the one joint backward for every other parameter and puts the MLM-only
    gradient back on the table; `all_reduce` (the micro-batch on which DDP synchronises) averages it
    across processes as DDP did the others. Calling backward twice instead breaks under DDP, whose
    reducer expects one backward per forward."""
    if cfg.optimization == "decoupled" and cfg.sharing == "es":
        table = model.generator_table
        (mlm_grad,) = torch.autograd.grad(out.mlm_loss / accum, table, retain_graph=True)
        if table.grad is not None:  # earlier micro-batches' MLM-only gradient (local)
            mlm_grad = mlm_grad + table.grad
        (out.loss / accum).backward()
        if all_reduce:
            dist.all_reduce(mlm_grad)
            mlm_grad /= dist.get_world_size()
        table.grad.copy_(mlm_grad)
    else:
        (out.loss / accum).backward()


def clip(model: RTDModel, cfg: PretrainConfig) -> None:
    """Global norm clip; the decoupled mode clips generator and discriminator sides separately."""
    if cfg.optimization == "joint":
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        return
    d_side = set(map(id, [*model.discriminator.parameters(), *model.rtd_head.parameters()]))
    if model.sharing == "gdes":
        d_side.add(id(model.embedding_delta))
    gen = [p for p in model.parameters() if id(p) not in d_side]
    disc = [p for p in model.parameters() if id(p) in d_side]
    for params in (gen, disc):
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)


def rtd_forward(fn, ids, mask, special, mask_id: int, cfg: PretrainConfig, noise, amp: torch.dtype | None):
    """One RTD forward of `fn` (the model, its DDP wrapper or its compiled form) under the run's autocast."""
    with autocast(ids.device, amp):
        return fn(
            ids,
            mask,
            special,
            mask_id,
            cfg.rtd_weight,
            cfg.mask_prob,
            cfg.mask_strategy,
            cfg.temperature,
            noise,
        )


# ----------------------------------------------------------------------------------------------
# Evaluation and the gradient-conflict probe


@torch.no_grad()
def evaluate(model: RTDModel, batches: list[torch.Tensor], tok, cfg: PretrainConfig, device, amp) -> dict:
    """Held-out MLM loss/accuracy, RTD loss/accuracy/AUC and replaced-token rate, with fixed noise.
    Sums stay on the device; they are read back once, at the end."""
    from sklearn.metrics import roc_auc_score

    was_training = model.training
    model.eval()
    special = torch.tensor(sorted(tok.special_ids), device=device)
    names = ("mlm_loss", "mlm_correct", "masked", "rtd_loss", "rtd_correct", "tokens")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    labels, scores = [], []
    gen = torch.Generator(device=device)
    for i, ids in enumerate(batches):
        ids = to_device(ids, device)
        mask = torch.ones_like(ids)
        gen.manual_seed(cfg.seed * 7919 + i)
        noise = draw_noise(ids.shape[0], ids.shape[1], cfg.mask_prob, gen, device)
        out = rtd_forward(model, ids, mask, special, tok.mask_id, cfg, noise, amp)
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
    g_rtd_own, g_rtd_gen = torch.autograd.grad(
        rtd_weight * out.rtd_loss, [own, gen_table], retain_graph=True, allow_unused=True
    )
    g_rtd_gen = torch.zeros_like(gen_table) if g_rtd_gen is None else g_rtd_gen
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


def save_checkpoint(run: Run, step: int, nonfinite: torch.Tensor) -> None:
    """The main process writes the checkpoint of `step` into the ring (see lab/checkpoint.py)."""
    if bool(nonfinite):  # a device read: on checkpoint steps only
        return  # never save a diverged state over the good ones
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
    "attention_impl",  # the implementations agree to float rounding (tests/test_reference.py)
    "progress",
    "snapshot_every",  # snapshots only read the tables; their rows are fixed by embeddings/ids.json
    "snapshot_rows",
    "snapshot_mb",
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
    tables = {"generator": model.generator_table, "discriminator": model.discriminator_table()}
    if model.sharing == "gdes":
        tables["delta"] = model.embedding_delta
    save_file(
        {k: v.detach().float().cpu().clone() for k, v in tables.items()},
        out_dir / "embeddings.safetensors",
    )
    save_pretrained(
        model.discriminator, out_dir / "export" / "discriminator", tok, state=model.discriminator_state_dict()
    )
    gen_dir = save_pretrained(model.generator, out_dir / "export" / "generator", tok)
    head = {f"mlm_head.{k}": v.detach().cpu().contiguous() for k, v in model.mlm_head.state_dict().items()}
    save_file(head, gen_dir / "mlm_head.safetensors")


def finish(run: Run, step: int, meter: Meter) -> dict:
    """Final evaluation, export and summary.json (main process); returns the summary."""
    cfg, summary = run.cfg, {}
    if run.ddp.main:
        final_eval = (
            evaluate(run.model, run.eval_batches, run.tok, cfg, run.device, run.amp)
            if run.eval_batches
            else {}
        )
        append_jsonl(run.metrics, {"split": "eval", "step": step, **final_eval})
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
            "compile_mode": cfg.compile_mode if run.compiled else None,
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


def log_window(run: Run, meter: Meter, step: int, end: int, progress: Progress) -> None:
    """Average the window's losses across processes, stop on a non-finite loss, write the train row."""
    cfg, ddp = run.cfg, run.ddp
    if ddp.world > 1:
        for value in meter.sums.values():
            dist.all_reduce(value)
            value /= ddp.world
        dist.all_reduce(meter.nonfinite, op=dist.ReduceOp.MAX)
    if bool(meter.nonfinite):
        newest = checkpoint.candidates(run.ckpt_dir)
        raise FloatingPointError(
            f"non-finite loss by step {step}; the last good checkpoint "
            f"{newest[0] if newest else '(none yet)'} is intact. Lower lr, raise warmup_steps, or use dtype=fp32"
        )
    n = meter.steps
    losses = {k: v.item() / n for k, v in meter.sums.items()}
    first_compile = meter.compile_s is None
    timing = meter.window(time.perf_counter())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ms = timing["ms_per_step"]
    row = {
        "split": "train",
        "step": step,
        **losses,
        "lr": run.optimizer.param_groups[0]["lr"],
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
    if first_compile and meter.compile_s is not None and run.compiled:
        progress.message(
            f"compiled in {meter.compile_s:.1f} s (torch.compile mode {cfg.compile_mode}: the extra time of "
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
