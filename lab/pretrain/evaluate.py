"""Held-out evaluation of a pre-training run: MLM and RTD numbers on fixed batches with fixed noise."""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score

from lab.pretrain.config import PretrainConfig
from lab.pretrain.step import EVAL_NOISE, rtd_forward, stream_seed
from lab.rtd import RTDModel, draw_noise
from lab.util import to_device


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
