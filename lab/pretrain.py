"""RTD pre-training: `train(cfg) -> summary`, callable from notebooks, the CLI and torchrun alike.

The loop, in nanoGPT order: lr -> eval / checkpoint -> forward / backward -> clip -> step -> log.

Randomness is a function of (seed, step): every step re-seeds dropout and draws its masking and
sampling noise for the whole global batch from a generator seeded by (seed, step, micro-step), and
each rank takes its rows. So a resumed run repeats an uninterrupted one exactly, and N processes
compute the same losses as one process with the same global batch (with dropout off).

Run directory (cfg.out_dir): config.json, metrics.jsonl, summary.json, checkpoints/last.pt,
tokenizer/spm.model, token_counts.npy, token_classes.json (synthetic corpus), embeddings.safetensors
(generator / discriminator / delta tables), export/discriminator and export/generator (HF format).
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

from lab.analysis import gradient_cosine, similarity_pull
from lab.data import BatchIterator, prepare_corpus
from lab.hf import save_pretrained
from lab.model import preset
from lab.rtd import MASK_STRATEGIES, SHARING_MODES, RTDModel, draw_noise
from lab.util import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    config_parser,
    parse_config,
    pick_device,
    read_jsonl,
)


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
    compile: bool = False  # torch.compile the RTD model
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 8
    probe_every: int = 50  # gradient-conflict probe (0 = off)
    ckpt_every: int = 200
    stop_after: int = 0  # end this invocation after this step (0 = run to `steps`); a rerun resumes
    progress: str = "line"  # line (a log line per interval) | bar (tqdm, for notebooks) | none

    def __post_init__(self) -> None:
        choices = {
            "sharing": SHARING_MODES,
            "mask_strategy": MASK_STRATEGIES,
            "optimization": ("joint", "decoupled"),
            "dtype": ("auto", "fp32", "bf16"),
            "progress": ("line", "bar", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        preset(self.preset)  # raises on an unknown preset
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"PretrainConfig.mask_prob={self.mask_prob} must be in (0, 1)")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"PretrainConfig.seq_len={self.seq_len} is too short; use at least 8")


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


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters, CPU and CUDA) and no weight decay
    on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to cfg.lr, then linear decay to zero at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------
# Evaluation and the gradient-conflict probe


def rtd_forward(fn, ids, mask, special, mask_id: int, cfg: PretrainConfig, noise, amp: torch.dtype | None):
    """One RTD forward of `fn` (the model, its DDP wrapper or its compiled form) under the run's autocast."""
    with torch.autocast(ids.device.type, dtype=amp or torch.float32, enabled=amp is not None):
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


@torch.no_grad()
def evaluate(model: RTDModel, batches: list[torch.Tensor], tok, cfg: PretrainConfig, device, amp) -> dict:
    """Held-out MLM loss/accuracy, RTD loss/accuracy/AUC and replaced-token rate, with fixed noise."""
    from sklearn.metrics import roc_auc_score

    was_training = model.training
    model.eval()
    special = torch.tensor(sorted(tok.special_ids), device=device)
    sums = {
        "mlm_loss": 0.0,
        "mlm_correct": 0.0,
        "masked": 0.0,
        "rtd_loss": 0.0,
        "rtd_correct": 0.0,
        "tokens": 0.0,
    }
    labels, scores = [], []
    gen = torch.Generator(device=device)
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        gen.manual_seed(cfg.seed * 7919 + i)
        noise = draw_noise(ids.shape[0], ids.shape[1], cfg.mask_prob, gen, device)
        out = rtd_forward(model, ids, mask, special, tok.mask_id, cfg, noise, amp)
        n_masked = out.valid.sum().item()
        targets = ids.gather(1, out.positions)
        sums["mlm_loss"] += out.mlm_loss.item() * n_masked
        sums["mlm_correct"] += ((out.mlm_logits.argmax(-1) == targets) & out.valid).sum().item()
        sums["masked"] += n_masked
        sums["rtd_loss"] += out.rtd_loss.item() * mask.sum().item()
        sums["rtd_correct"] += ((out.rtd_logits > 0).float() == out.labels).sum().item()
        sums["tokens"] += mask.sum().item()
        labels.append(out.labels.flatten().cpu())
        scores.append(out.rtd_logits.flatten().cpu())
    model.train(was_training)
    labels, scores = torch.cat(labels).numpy(), torch.cat(scores).numpy()
    replaced = float(labels.sum())
    return {
        "mlm_loss": sums["mlm_loss"] / max(sums["masked"], 1),
        "mlm_acc": sums["mlm_correct"] / max(sums["masked"], 1),
        "rtd_loss": sums["rtd_loss"] / max(sums["tokens"], 1),
        "rtd_acc": sums["rtd_correct"] / max(sums["tokens"], 1),
        "rtd_auc": float(roc_auc_score(labels, scores)) if 0 < replaced < len(labels) else float("nan"),
        "replaced_rate": replaced / max(sums["tokens"], 1),
        "replaced_of_masked": replaced / max(sums["masked"], 1),
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


def save_checkpoint(path: Path, model, optimizer, step: int, data_state: dict, cfg: PretrainConfig) -> None:
    atomic_torch_save(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data": data_state,
            "config": asdict(cfg),
        },
        path,
    )


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
    "device",
    "compile",
    "progress",
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


# ----------------------------------------------------------------------------------------------
# The loop


class Progress:
    def __init__(self, cfg: PretrainConfig, start: int, enabled: bool):
        self.cfg, self.enabled = cfg, enabled and cfg.progress != "none"
        self.bar = None
        if self.enabled and cfg.progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.steps, initial=start, desc=f"pretrain {cfg.sharing}", dynamic_ncols=True
            )

    def update(self, row: dict, eta_s: float, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                mlm=f"{row['mlm_loss']:.3f}",
                rtd=f"{row['rtd_loss']:.4f}",
                tok_s=f"{row['tokens_per_s']:.0f}",
            )
            return
        print(
            f"step {row['step']:>6}/{self.cfg.steps} | loss {row['loss']:.4f} | mlm {row['mlm_loss']:.4f} "
            f"| rtd {row['rtd_loss']:.4f} | lr {row['lr']:.2e} | {row['ms_per_step']:.0f} ms/step "
            f"| {row['tokens_per_s']:,.0f} tok/s | ETA {_duration(eta_s)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def train(cfg: PretrainConfig) -> dict:
    """Pre-train a generator + discriminator with the chosen sharing mode; returns summary.json."""
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
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    amp = autocast_dtype(cfg, device)

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

    # -- model
    model_cfg = preset(
        cfg.preset,
        vocab_size=tok.vocab_size,
        max_seq_len=max(cfg.seq_len, 512),
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
    )
    torch.manual_seed(cfg.seed)
    model = RTDModel(model_cfg, cfg.sharing, cfg.gen_depth_ratio, cfg.gen_width_ratio, cfg.emd).to(device)
    optimizer = make_optimizer(model, cfg)
    start, position = 0, 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        check_resumable(state["config"], cfg, ckpt_path)
        rows = state["model"]["generator.word_embeddings.weight"].shape[0]
        if rows != tok.vocab_size:
            raise ValueError(
                f"{ckpt_path} has a vocabulary of {rows} rows but the tokenizer has {tok.vocab_size} ids; "
                "resume with the tokenizer the run started with (its tokenizer/spm.model), or use a new out_dir"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, position = state["step"], state["data"]["position"]
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
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    step_fn = torch.compile(net) if cfg.compile else net

    batches = BatchIterator(corpus.train, micro, cfg.seed, ddp.rank, ddp.world, position)
    eval_set = [corpus.heldout[i] for i in range(min(len(corpus.heldout), cfg.eval_batches * micro))]
    eval_batches = [torch.stack(eval_set[i : i + micro]) for i in range(0, len(eval_set), micro)]
    special = torch.tensor(sorted(tok.special_ids), device=device)
    noise_gen = torch.Generator(device=device)
    rows = slice(ddp.rank * micro, (ddp.rank + 1) * micro)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    progress = Progress(cfg, start, ddp.main)
    if ddp.main and start:
        progress.message(f"resuming {out_dir} at step {start}")
    metrics = out_dir / "metrics.jsonl"
    window = {
        "loss": torch.zeros((), device=device),
        "mlm_loss": torch.zeros((), device=device),
        "rtd_loss": torch.zeros((), device=device),
    }
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t_start = t_log = time.perf_counter()
    n_window, step = 0, start

    def checkpoint(at: int) -> None:
        if bool(nonfinite):
            return  # never overwrite the last good checkpoint with a diverged state
        if ddp.main:
            # the data position of the completed steps (an interrupted step may have drawn a batch already)
            save_checkpoint(
                ckpt_path, model, optimizer, at, {**batches.state(), "position": at * cfg.grad_accum}, cfg
            )

    try:
        while step < end:
            # lr
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            # eval (before the step, so step 0 records the untrained model)
            if ddp.main and (step % cfg.eval_every == 0) and eval_batches:
                append_jsonl(
                    metrics,
                    {"split": "eval", "step": step, **evaluate(model, eval_batches, tok, cfg, device, amp)},
                )
            # forward / backward, with gradient accumulation
            model.train()
            for m in range(cfg.grad_accum):
                ids = next(batches).to(device, non_blocking=True)
                mask = torch.ones_like(ids)
                torch.manual_seed(cfg.seed * 1_000_003 + step * 131 + m * 7 + ddp.rank)  # dropout
                noise_gen.manual_seed(cfg.seed * 1_000_003 + step * 131 + m)  # same on every rank
                noise = draw_noise(micro * ddp.world, cfg.seq_len, cfg.mask_prob, noise_gen, device).rows(
                    rows
                )
                sync = m == cfg.grad_accum - 1 or ddp.world == 1
                ctx = net.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    out = rtd_forward(step_fn, ids, mask, special, tok.mask_id, cfg, noise, amp)
                if ddp.main and m == 0 and cfg.probe_every and step % cfg.probe_every == 0:
                    append_jsonl(
                        metrics,
                        {"split": "probe", "step": step, **gradient_probe(model, out, cfg.rtd_weight)},
                    )
                with ctx:
                    backward(model, out, cfg, cfg.grad_accum)
                nonfinite |= ~torch.isfinite(out.loss.detach())
                for key in window:
                    window[key] += getattr(out, key).detach() / cfg.grad_accum
            # clip, step
            clip(model, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_window += 1
            # log
            if step % cfg.log_every == 0 or step == end:
                if ddp.world > 1:
                    for value in window.values():
                        dist.all_reduce(value)
                        value /= ddp.world
                    dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
                if bool(nonfinite):
                    raise FloatingPointError(
                        f"non-finite loss by step {step}; the last good checkpoint {ckpt_path} is intact. "
                        "Lower lr, raise warmup_steps, or use dtype=fp32"
                    )
                now = time.perf_counter()
                row = {
                    "split": "train",
                    "step": step,
                    **{k: v.item() / n_window for k, v in window.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": n_window * tokens_per_step / (now - t_log),
                    "elapsed_s": now - t_start,
                    "ms_per_step": 1000 * (now - t_log) / n_window,
                }
                if ddp.main:
                    append_jsonl(metrics, row)
                    progress.update(row, (end - step) * (now - t_start) / max(1, step - start), n_window)
                for value in window.values():
                    value.zero_()
                t_log, n_window = now, 0
            if step % cfg.ckpt_every == 0 or step == end:
                checkpoint(step)
    except KeyboardInterrupt:
        checkpoint(step)
        progress.message(f"interrupted at step {step}; checkpoint saved to {ckpt_path}; rerun to resume")
        progress.close()
        raise
    progress.close()

    summary = {}
    if ddp.main:
        final_eval = evaluate(model, eval_batches, tok, cfg, device, amp) if eval_batches else {}
        append_jsonl(metrics, {"split": "eval", "step": step, **final_eval})
        export_run(model, out_dir, tok)
        wall = time.perf_counter() - t_start
        summary = {
            "sharing": cfg.sharing,
            "preset": cfg.preset,
            "corpus": cfg.corpus,
            "rtd_weight": cfg.rtd_weight,
            "steps": step,
            "completed": step >= cfg.steps,
            "tokens_seen": step * tokens_per_step,
            "wall_s_this_invocation": wall,
            "tokens_per_s": (step - start) * tokens_per_step / max(wall, 1e-9),
            "world_size": ddp.world,
            "device": str(device),
            "dtype": str(amp or torch.float32),
            "vocab_size": tok.vocab_size,
            "final_eval": final_eval,
            "corpus_info": corpus.describe(),
        }
        atomic_write_json(out_dir / "summary.json", summary)
        progress.message(f"done: {out_dir} (summary.json, metrics.jsonl, export/)")
    if ddp.world > 1:
        dist.barrier()
    return summary


def backward(model: RTDModel, out, cfg: PretrainConfig, accum: int) -> None:
    """Joint: one backward of L_MLM + lambda L_RTD. Decoupled (official loop): under ES the shared
    table keeps only its MLM gradient — which is why decoupled ES is not ES."""
    if cfg.optimization == "decoupled" and cfg.sharing == "es":
        (out.mlm_loss / accum).backward(retain_graph=True)
        table = model.generator_table
        mlm_grad = table.grad.clone()
        (cfg.rtd_weight * out.rtd_loss / accum).backward()
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


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (and the eval/probe rows of the step it
    resumes at, which are logged again) so metrics.jsonl reads as one uninterrupted run."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    keep = [r for r in rows if r["step"] < step or (r["step"] == step and r["split"] == "train")]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


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
    except KeyboardInterrupt:
        return 130
    except (ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
