"""The gradient-conflict probe's measures: pure functions (tensors in, floats out) that the training loop
calls on its live tables and gradients, and the analysis calls on the tables a run saved.
Dimension legend: V rows of a table (vocabulary), D hidden size, n selected rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lab.rtd import RTDModel


def _rows(E: torch.Tensor, ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    E = E.detach().float()
    if E.dim() != 2:
        raise ValueError(f"expected a [V, D] embedding table, got shape {tuple(E.shape)}")
    if ids is None:
        return E
    ids = torch.as_tensor(ids, dtype=torch.long, device=E.device)
    return E[ids]  # [n, D]


def _mean_pairwise_cosine(rows: torch.Tensor) -> torch.Tensor:
    """Mean cosine over distinct pairs (i != j) of the non-zero rows [n, D], as a differentiable scalar
    (nan for fewer than two rows).

    With unit rows u_i, sum_{i,j} u_i.u_j = |sum_i u_i|^2 and the n diagonal terms are 1 each, so the
    off-diagonal mean is (|sum u_i|^2 - n) / (n (n - 1)): O(n D) memory instead of an n x n matrix,
    which matters for a 128k-row table. All-zero rows (never-updated padding) have no direction and
    are dropped.
    """
    norms = rows.norm(dim=1, keepdim=True)  # [n, 1]
    keep = norms.squeeze(1) > 0
    u = rows[keep] / norms[keep]  # [n, D]
    n = u.shape[0]
    if n < 2:
        return torch.tensor(float("nan"), dtype=rows.dtype)
    total = u.sum(dim=0)  # [D]
    return (total.dot(total) - n) / (n * (n - 1))


def average_pairwise_cosine(E: torch.Tensor, ids: Sequence[int] | torch.Tensor | None = None) -> float:
    """Mean cosine similarity over distinct pairs (i != j) of the rows of E (or of E[ids]): the
    embedding-similarity measure of the DeBERTaV3 paper (He et al. 2023, §3.3). All-zero rows are
    dropped."""
    return float(_mean_pairwise_cosine(_rows(E, ids).double()))


def gradient_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two gradients flattened to vectors; nan when either is all zero (no direction)."""
    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"gradients must have the same number of elements, got {a.numel()} and {b.numel()}")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a.dot(b) / (na * nb))


def similarity_pull(table: torch.Tensor, grad: torch.Tensor, skip: int = 4) -> float:
    """How a gradient step moves the table's average pairwise cosine: the first-order change of
    `average_pairwise_cosine(table[skip:])` per unit step along -grad (rows before `skip`, the special
    ids, are left out). > 0: the step pulls rows together; < 0: it pushes them apart. This measures the
    tug-of-war the DeBERTaV3 paper describes (He et al. 2023, §3.2): MLM pulls semantically similar
    tokens together, RTD pushes them apart."""
    E = table.detach().double()[skip:].requires_grad_(True)
    mean = _mean_pairwise_cosine(E)
    if not torch.isfinite(mean):
        return float("nan")
    (ds_dE,) = torch.autograd.grad(mean, E)
    return float(-(ds_dE * grad.detach().double()[skip:]).sum())


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
