"""Held-out evaluation of a pre-training run: MLM and RTD numbers on fixed batches with fixed noise, and
the discriminator's AUC on a fixed corruption set that no generator made (`fixed_corruption`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lab.pretrain.config import PretrainConfig
from lab.pretrain.step import EVAL_NOISE, FIXED_CORRUPTION, rtd_forward, stream_seed
from lab.rtd import RTDModel, draw_noise, mask_tokens
from lab.training import autocast
from lab.util import to_device

# The seed of the fixed corruption set: a constant, not cfg.seed and not the sharing mode, so that every
# run on one corpus split is scored on the same corrupted sequences (the paper's arXiv number).
FIXED_CORRUPTION_SEED = 2111_09543


def unigram_cdf(token_counts: np.ndarray, special_ids) -> torch.Tensor:
    """Cumulative token counts [V] (float64, CPU) of the train split, the special ids' counts removed:
    the unigram distribution the fixed corruption set draws its replacements from."""
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64).clone()
    counts[[i for i in special_ids if i < len(counts)]] = 0.0
    return counts.cumsum(0)


def fixed_corruption(
    ids: torch.Tensor, index: int, cdf: torch.Tensor, special: torch.Tensor, mask_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out batch `index` (ids [B, T], CPU) corrupted without a generator -> (corrupted [B, T],
    labels [B, T] float, 1 = replaced). The positions are those `mask_tokens` picks at `mask_prob`
    among the non-special tokens; each is replaced by a draw from the unigram distribution `cdf`
    (`unigram_cdf`); a draw equal to the original token is not a replacement (label 0).

    Every draw comes from a CPU generator seeded by (FIXED_CORRUPTION_SEED, batch index) alone: the same
    held-out rows get the same corruption in every sharing mode, under every cfg.seed and on every device,
    at every evaluation of a run. The held-out rows themselves are the last examples of the run's corpus
    split (lab/pretrain/data.py, which cfg.seed does not touch), so runs on one corpus, tokenizer, seq_len
    and eval size see identical corrupted sequences; the unigram counts are those of the train split."""
    special = special.cpu()
    gen = torch.Generator().manual_seed(stream_seed(FIXED_CORRUPTION_SEED, FIXED_CORRUPTION, index))
    noise = draw_noise(ids.shape[0], ids.shape[1], mask_prob, gen, "cpu")
    _, positions, valid = mask_tokens(ids, torch.ones_like(ids), special, 0, noise, mask_prob)  # [B, K]
    draws = torch.searchsorted(cdf, noise.quantile.double() * cdf[-1], right=True)  # [B, K] unigram ids
    original = ids.gather(1, positions)  # [B, K]
    corrupted = ids.scatter(1, positions, torch.where(valid, draws, original))  # [B, T]
    return corrupted, (corrupted != ids).float()


@torch.no_grad()
def evaluate(
    model: RTDModel,
    batches: list[torch.Tensor],
    tok,
    cfg: PretrainConfig,
    device,
    amp,
    chunk: int | None = None,
    token_counts: np.ndarray | None = None,
) -> dict:
    """Held-out MLM loss/accuracy, RTD loss/accuracy/AUC and replaced-token rate, with fixed noise.
    Each batch's noise is drawn whole and the forward runs `chunk` rows at a time (the training
    micro-batch), so the numbers do not depend on how training splits its batch.
    Sums stay on the device; they are read back once, at the end.

    rtd_auc scores D on its own generator's replacements, which get harder as the generator improves,
    so it does not compare discriminators across sharing modes. With the corpus's `token_counts`, D is
    also scored on the fixed corruption set (`fixed_corruption`, unigram replacements, the same for every
    run of the corpus split) by a discriminator-only forward: fixed_auc and fixed_rtd_loss (BCE per token)."""
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
    fixed = (
        {}
        if token_counts is None
        else _fixed_scores(model, batches, tok, cfg, device, amp, chunk, token_counts)
    )
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
        **fixed,
    }


def _fixed_scores(
    model: RTDModel, batches, tok, cfg: PretrainConfig, device, amp, chunk, token_counts
) -> dict:
    """fixed_auc and fixed_rtd_loss: D's RTD logits on the fixed corruption set, `chunk` rows at a time."""
    special = torch.tensor(sorted(tok.special_ids))
    cdf = unigram_cdf(token_counts, tok.special_ids)
    loss, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    labels, scores = [], []
    for i, batch in enumerate(batches):
        corrupted, target = fixed_corruption(batch, i, cdf, special, cfg.mask_prob)
        rows = chunk or batch.shape[0]
        for j in range(0, len(batch), rows):
            ids, y = to_device(corrupted[j : j + rows], device), to_device(target[j : j + rows], device)
            with autocast(ids.device, amp):
                logits = model.discriminate(ids, None)  # [B, T] fp32; packed rows have no padding
            loss += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").double()
            tokens += y.numel()
            labels.append(y.flatten())
            scores.append(logits.flatten())
    labels, scores = torch.cat(labels).cpu().numpy(), torch.cat(scores).cpu().numpy()
    replaced = labels.sum()
    return {
        "fixed_auc": float(roc_auc_score(labels, scores)) if 0 < replaced < len(labels) else float("nan"),
        "fixed_rtd_loss": float(loss) / max(tokens, 1),
    }


def evaluate_run(run) -> dict:
    """`evaluate` for a training run (lab.pretrain.setup.Run): its model on its fixed held-out batches,
    a micro-batch at a time, the fixed corruption set drawn from its corpus's token counts."""
    return evaluate(run.model, run.eval_batches, run.tok, run.cfg, run.device, run.amp, run.micro,
                    run.corpus.token_counts)  # fmt: skip
