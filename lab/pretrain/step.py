"""One optimizer step of RTD pre-training, the part of the loop between the learning rate and the log:
forward / backward over the micro-batches (`train_step`, with the gradient-conflict probe when due),
the backward of each optimization (`backward`), the clip (`clip`) and the check that skips a
non-finite step (`NonFiniteGuard`). Every random stream a step draws is seeded by `stream_seed`.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from lab.pretrain import checkpoint
from lab.pretrain.config import PretrainConfig
from lab.pretrain.meter import Meter
from lab.pretrain.probe import gradient_probe
from lab.pretrain.setup import Dist, Run
from lab.rtd import RTDModel, draw_noise, mask_counts
from lab.training import autocast
from lab.util import append_jsonl, to_device

# consecutive skipped (non-finite) steps after which a run stops: one bad batch is survivable, a run
# whose every step overflows is not going to recover by itself
MAX_SKIPPED_IN_A_ROW = 3
# the purposes of the random streams a step draws (see stream_seed); FIXED_CORRUPTION is the held-out
# fixed corruption set's (lab/pretrain/evaluate.py), seeded by a constant instead of cfg.seed
NOISE, DROPOUT, EVAL_NOISE, FIXED_CORRUPTION = 0, 1, 2, 3


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
