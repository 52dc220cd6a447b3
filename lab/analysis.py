"""The tug-of-war analysis: embedding geometry, gradient conflict, and figures drawn from run directories.

The measurement functions at the top are pure (tensors in, floats out) so the training loop can call
them on live tables; the figure functions below read only the files a run writes (metrics.jsonl,
summary.json, embeddings.safetensors, token_counts.npy, token_classes.json), never a live model.
Dimension legend: V rows of a table (vocabulary), D hidden size, n selected rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _rows(E: torch.Tensor, ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    E = E.detach().float()
    if E.dim() != 2:
        raise ValueError(f"expected a [V, D] embedding table, got shape {tuple(E.shape)}")
    if ids is None:
        return E
    ids = torch.as_tensor(ids, dtype=torch.long, device=E.device)
    return E[ids]  # [n, D]


def average_pairwise_cosine(E: torch.Tensor, ids: Sequence[int] | torch.Tensor | None = None) -> float:
    """Mean cosine similarity over distinct pairs (i != j) of the rows of E (or of E[ids]).

    With unit rows u_i, sum_{i,j} u_i.u_j = |sum_i u_i|^2 and the n diagonal terms are 1 each, so the
    off-diagonal mean is (|sum u_i|^2 - n) / (n (n - 1)): O(n D) memory instead of an n x n matrix,
    which matters for a 128k-row table. All-zero rows (never-updated padding) are dropped.
    """
    rows = _rows(E, ids)
    norms = rows.norm(dim=1)
    rows = rows[norms > 0]
    n = rows.shape[0]
    if n < 2:
        return float("nan")
    u = rows / rows.norm(dim=1, keepdim=True)  # [n, D]
    total = u.double().sum(dim=0)  # [D]
    return float((total.dot(total) - n) / (n * (n - 1)))


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


def class_separation(E: torch.Tensor, token_classes: dict[int, str]) -> dict[str, float]:
    """Within-class vs between-class average cosine of the rows listed in token_classes.

    within: mean over classes (with >= 2 rows) of the class's average pairwise cosine, weighted by the
    number of pairs, i.e. the mean cosine over all same-class pairs. between: mean cosine over all
    pairs from different classes. gap = within - between: positive when the table groups tokens by
    their ground-truth class.
    """
    if not token_classes:
        raise ValueError("token_classes is empty; pass {token_id: class_name} for at least two classes")
    E = E.detach().float()
    by_class: dict[str, list[int]] = {}
    for token_id, name in token_classes.items():
        if 0 <= int(token_id) < E.shape[0]:
            by_class.setdefault(name, []).append(int(token_id))
    if len(by_class) < 2:
        raise ValueError(
            f"class_separation needs at least two classes inside the table, got {sorted(by_class)}"
        )
    u = F.normalize(E, dim=1).double()
    sums, counts = {}, {}
    for name, ids in by_class.items():
        sums[name] = u[ids].sum(dim=0)  # [D]
        counts[name] = len(ids)
    within_sum, within_pairs = 0.0, 0
    for name in by_class:
        n = counts[name]
        within_sum += float(sums[name].dot(sums[name])) - n
        within_pairs += n * (n - 1)
    total = sum(sums.values())
    n_all = sum(counts.values())
    # All ordered pairs i != j, minus the same-class ones, leaves the between-class pairs.
    all_sum = float(total.dot(total)) - n_all
    between_pairs = n_all * (n_all - 1) - within_pairs
    within = within_sum / within_pairs if within_pairs else float("nan")
    between = (all_sum - within_sum) / between_pairs if between_pairs else float("nan")
    return {"within": within, "between": between, "gap": within - between}


def nearest_neighbours(E: torch.Tensor, ids: Sequence[int], k: int, tokenizer=None, exclude=()) -> list[dict]:
    """The k rows most cosine-similar to each query row (the query itself and `exclude` ids left out).

    Returns one dict per query: {"id", "token", "neighbours": [(id, token, cosine), ...]}. token is the
    SentencePiece piece when a tokenizer is given, else str(id).
    """
    E = E.detach().float()
    u = F.normalize(E, dim=1)  # [V, D]
    skip = torch.zeros(E.shape[0], dtype=torch.bool)
    for i in exclude:
        if 0 <= int(i) < E.shape[0]:
            skip[int(i)] = True
    skip |= E.norm(dim=1) == 0

    def name(i: int) -> str:
        return tokenizer.id_to_piece(i) if tokenizer is not None else str(i)

    out = []
    for i in ids:
        sims = u @ u[int(i)]  # [V]
        sims[skip] = -math.inf
        sims[int(i)] = -math.inf
        top = torch.topk(sims, min(k, int((~torch.isinf(sims)).sum())))
        neighbours = [(int(j), name(int(j)), round(float(s), 4)) for s, j in zip(top.values, top.indices)]
        out.append({"id": int(i), "token": name(int(i)), "neighbours": neighbours})
    return out
