"""The generator's word table E_G within one RTD step, with its gradient built from the rows the step read.

A step reads E_G three times: the generator's lookup E_G[masked ids], the MLM head's logits h · E_G^T
(lab/rtd.py, MLMHead) and, under ES, the discriminator's lookup E_G[corrupted ids]. Autograd's own
lookup backward (`embedding_dense_backward`) gives each lookup a dense [V, D] gradient, a zero-filled
128,100 x 384 tensor at `xsmall` (197 MB) with at most B·T rows set, which autograd then adds into the
head's dense [V, D] gradient: on the CPU, two [V, D] zero fills, two [V, D] additions and the page
faults of two fresh 197 MB allocations per step, about a tenth of the `xsmall` step.

`tie` reads E_G once through an autograd Function with three outputs: the generator's rows, a handle
for the head and a handle for the discriminator (`Tied.rows`). Its backward starts from the head's
dense gradient and adds each lookup's rows into it in place, per distinct id (`row_sums`), in the
order and with the partial sums autograd's dense path had: ((discriminator + head) + generator),
each lookup's rows summed in token order from zero and the padding id skipped. The gradient is the
same to the last bit (tests/test_tied.py checks every parameter's, under every sharing mode).

Where it applies: the CPU, in eager mode, with gradients on (`applies`). On CUDA the dense path is kept:
a [V, D] fill costs a fraction of a millisecond there, and an index_add over repeated ids is not
deterministic; under torch.compile the graph is left to the compiler. `disabled()` turns it off, to
compare the two paths (tests, `python -m lab.bench.profile`). A backward that builds a graph
(create_graph=True, for a second derivative) takes out-of-place, dense steps instead of the in-place
and sparse ones, so the second derivative is autograd's own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_enabled = True


@contextlib.contextmanager
def disabled():
    """Within this block `tie` returns plain lookups (autograd's dense lookup gradients)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def applies(table: torch.Tensor) -> bool:
    """Whether `tie` builds the compact gradient for `table`: decided from the device, the grad mode and
    the compile state, never from data."""
    return (
        _enabled
        and table.device.type == "cpu"
        and table.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def row_sums(ids: torch.Tensor, grad: torch.Tensor, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A lookup's gradient by distinct id: ids [...] and grad [..., D] -> (index [U], rows [U, D]), the
    sorted distinct ids other than pad_id and, per id, the sum of its tokens' gradients in token order
    starting from zero: row for row what `embedding_dense_backward` puts into its [V, D] zeros."""
    ids = ids.reshape(-1)
    grad = grad.reshape(ids.shape[0], -1)
    if pad_id is not None:
        keep = ids != pad_id
        ids, grad = ids[keep], grad[keep]
    index, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    rows = grad.new_zeros(index.shape[0], grad.shape[1]).index_add_(0, inverse, grad)  # in token order
    return index, rows


class _Tie(torch.autograd.Function):
    """(table[ids], table for the head, table for the discriminator) -> one dense gradient for table."""

    @staticmethod
    def forward(ctx, ids, table, pad_id):
        ctx.set_materialize_grads(False)  # an output the loss does not reach gets None, not zeros
        ctx.save_for_backward(ids)
        ctx.pad_id, ctx.table_shape = pad_id, table.shape
        return F.embedding(ids, table), table.view_as(table), table.view_as(table)

    @staticmethod
    def backward(ctx, grad_rows, grad_head, grad_reader):
        (ids,) = ctx.saved_tensors
        graph = torch.is_grad_enabled()  # create_graph=True: every step below must be differentiable
        if grad_head is None:  # a loss without the MLM head (the probe's RTD-only gradient)
            like = grad_rows if grad_rows is not None else grad_reader
            grad = torch.zeros(ctx.table_shape, dtype=like.dtype, device=like.device)
        else:
            # the head's matmul gradient, a fresh tensor nothing else holds (Tied.head is one
            # matmul's weight): the lookups' rows are added into it in place
            grad = grad_head
        if grad_reader is not None:  # the discriminator's rows (ES), summed per id by _Rows
            if graph:  # _Rows gave a dense gradient
                grad = grad + grad_reader
            else:
                grad.index_add_(0, grad_reader._indices()[0], grad_reader._values())
        if grad_rows is not None:  # the generator's own lookup, last, as autograd's dense path adds it
            index, rows = row_sums(ids, grad_rows, ctx.pad_id)
            grad = grad.index_add(0, index, rows) if graph else grad.index_add_(0, index, rows)
        return None, grad, None


class _Rows(torch.autograd.Function):
    """table[ids] whose gradient to table is the touched rows only: a sparse [V, D] tensor with one
    summed row per distinct id, which _Tie's backward adds into the dense gradient."""

    @staticmethod
    def forward(ctx, ids, table, pad_id):
        ctx.save_for_backward(ids)
        ctx.pad_id, ctx.table_shape = pad_id, table.shape
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        index, rows = row_sums(ids, grad, ctx.pad_id)
        if torch.is_grad_enabled():  # create_graph=True: a dense gradient, differentiable in `rows`
            return None, grad.new_zeros(ctx.table_shape).index_add(0, index, rows), None
        sparse = torch.sparse_coo_tensor(
            index[None], rows, ctx.table_shape, is_coalesced=True, check_invariants=False
        )  # built from torch.unique: sorted, distinct, in range
        return None, sparse, None


@dataclass
class Tied:
    """E_G as one step reads it: `generator_rows` (E_G[masked ids], [B, T, D]), `head` (E_G for the
    MLM head's one matmul) and `rows(ids)` (E_G[ids] for the discriminator under ES). Without the
    compact gradient (`applies` is False) these are the parameter itself and plain lookups."""

    table: torch.Tensor  # the parameter E_G
    generator_rows: torch.Tensor
    head: torch.Tensor
    reader: torch.Tensor | None  # the discriminator's handle; None: plain lookups of `table`
    pad_id: int | None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.reader is None:
            return F.embedding(ids, self.table, padding_idx=self.pad_id)
        return _Rows.apply(ids, self.reader, self.pad_id)


def tie(table: torch.Tensor, ids: torch.Tensor, pad_id: int | None) -> Tied:
    """Read E_G (`table`, [V, D]) for one step, starting with the generator's lookup of `ids` [B, T].
    pad_id is the lookup's padding_idx (its rows get no gradient), as in the generator's nn.Embedding."""
    if not applies(table):
        rows = F.embedding(ids, table, padding_idx=pad_id)
        return Tied(table, rows, table, None, pad_id)
    rows, head, reader = _Tie.apply(ids, table, pad_id)
    return Tied(table, rows, head, reader, pad_id)
