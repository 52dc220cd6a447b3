"""What a pre-training run needs before its first step (`setup` -> `Run`): the device and the processes
(torchrun), the corpus, the model and its optimizer, and the checkpoint it resumes from, checked against
the config (`check_resumable`, which reads the fields marked `may_change_on_resume`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lab.cli import may_change_on_resume
from lab.model import preset
from lab.pretrain import checkpoint
from lab.pretrain import init as continued
from lab.pretrain.checkpoint import CheckpointError
from lab.pretrain.config import PretrainConfig, compile_mode
from lab.pretrain.data import BatchIterator, PreparedCorpus, prepare_corpus
from lab.rtd import RTDModel
from lab.training import adamw, autocast_dtype, compile_model, compile_on
from lab.util import atomic_write_bytes, atomic_write_json, pick_device


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
    # decoupled ES stays eager (see PretrainConfig.__post_init__)
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
        truncate_metrics(out_dir / "metrics.jsonl", 0 if found is None else found.state["step"])
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


def check_resumable(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint saved under other settings than those marked `may_change_on_resume`."""
    now = asdict(cfg)
    free = may_change_on_resume(cfg)
    # a field the saved run predates ran at its default: fields are added with the old behaviour as default
    saved = {**{f.name: f.default for f in fields(cfg)}, **saved}
    changed = sorted(k for k in now if k not in free and saved[k] != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{path} belongs to a run with a different configuration ({detail}); "
            "use a new out_dir, or the same settings to resume"
        )


def truncate_metrics(path: Path, step: int) -> None:
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
