"""E_G read through lab.tied: the same gradients to the last bit as autograd's dense lookups, without them."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import lab.tied
from lab.model import preset
from lab.pretrain.probe import gradient_probe
from lab.pretrain.step import backward
from lab.rtd import RTDModel, draw_noise

SPECIAL = torch.tensor([0, 1, 2, 3])
V = 300


def batch(padded: bool):
    ids = torch.randint(4, V - 1, (4, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2
    ids[:, 5:9] = 17  # one id many times: its rows are summed before they meet the head's gradient
    mask = torch.ones_like(ids)
    if padded:
        ids[0, 29], ids[0, 30:], mask[0, 30:] = 2, 0, 0
    return ids, mask if padded else None


def both_paths(sharing: str, padded: bool, emd: bool = False):
    """The same seeded model and RTD forward (dropout on) twice: through the tie, then with autograd's
    dense lookups (lab.tied.disabled). Yields (model, output) with the path's setting still in force, so
    the caller's backward takes the same path."""
    for dense in (False, True):
        torch.manual_seed(0)
        model = RTDModel(preset("tiny", vocab_size=V), sharing=sharing, emd=emd).train()
        ids, mask = batch(padded)
        noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(3), "cpu")
        torch.manual_seed(1)
        with lab.tied.disabled() if dense else contextlib.nullcontext():
            yield model, model(ids, mask, SPECIAL, V - 1, noise=noise)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def step_gradients(sharing: str, padded: bool, emd: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every parameter's gradient after one RTD forward + backward: [through the tie, dense lookups]."""
    results = []
    for model, out in both_paths(sharing, padded, emd):
        out.loss.backward()
        results.append(gradients(model))
    return results


def test_row_sums_are_the_dense_lookup_gradient_row_for_row():
    ids = torch.tensor([[5, 0, 5, 9], [9, 9, 0, 2]])
    grad = torch.randn(2, 4, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    index, rows = lab.tied.row_sums(ids, grad, pad_id=0)
    dense = torch.ops.aten.embedding_dense_backward(grad, ids, 12, 0, False)
    assert index.tolist() == [2, 5, 9]  # sorted, distinct, the padding id left out
    assert torch.equal(rows, dense[index])
    assert dense[[i for i in range(12) if i not in (2, 5, 9)]].eq(0).all()


@pytest.mark.parametrize("sharing", ["es", "nes", "gdes"])
@pytest.mark.parametrize("padded", [False, True])
def test_every_gradient_is_bitwise_the_dense_lookups_one(sharing, padded):
    tied, dense = step_gradients(sharing, padded)
    assert tied.keys() == dense.keys()
    different = [name for name in dense if not torch.equal(tied[name], dense[name])]
    assert different == []


def test_the_enhanced_mask_decoder_reads_the_tied_rows_too():
    tied, dense = step_gradients("es", True, emd=True)
    assert all(torch.equal(tied[name], dense[name]) for name in dense)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_es_reads_the_shared_table_without_a_dense_lookup_gradient():
    """Under ES all three reads of E_G go through lab.tied, so no lookup in the step has autograd's
    dense [V, D] backward; with the tie disabled there are two."""
    torch.manual_seed(0)
    model = RTDModel(preset("tiny", vocab_size=V), sharing="es").train()
    ids, mask = batch(False)
    nodes = graph_nodes(model(ids, mask, SPECIAL, V - 1).loss)
    assert "EmbeddingBackward0" not in nodes and "_TieBackward" in nodes and "_RowsBackward" in nodes
    with lab.tied.disabled():
        assert "EmbeddingBackward0" in graph_nodes(model(ids, mask, SPECIAL, V - 1).loss)


@pytest.mark.parametrize("sharing", ["es", "gdes"])
def test_the_probes_one_loss_gradients_match_the_dense_path(sharing):
    """The gradient-conflict probe differentiates the MLM and the RTD loss apart (retain_graph): the tie
    then sees only the head and the generator's rows, or only the discriminator's rows."""
    rows = [gradient_probe(model, out, 50.0) for model, out in both_paths(sharing, True)]
    assert rows[0] == rows[1]


def test_decoupled_es_keeps_the_mlm_gradient_on_the_table_as_before():
    cfg = SimpleNamespace(optimization="decoupled")
    grads = []
    for model, out in both_paths("es", False):
        backward(model, out, cfg)
        grads.append(gradients(model))
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[1])


def test_the_tie_stays_out_where_it_does_not_apply():
    table = torch.nn.Parameter(torch.randn(10, 4))
    ids = torch.tensor([[1, 2, 2]])
    with torch.no_grad():
        assert lab.tied.tie(table, ids, 0).head is table  # no gradient: plain lookups
    assert not lab.tied.applies(torch.randn(10, 4))  # a table that takes no gradient
    assert not lab.tied.applies(table.to("meta"))  # another device keeps autograd's lookups
    with lab.tied.disabled():
        assert not lab.tied.applies(table)
    assert lab.tied.applies(table)


@pytest.mark.parametrize("sharing", ["es", "gdes"])
def test_a_second_derivative_through_the_tie_is_autograds_own(sharing):
    """create_graph=True, then the gradient of |dL/dE_G|^2: the tie's backward builds its graph from
    out-of-place, dense steps, so the second derivative matches the dense lookups' (under ES the
    discriminator's rows included)."""
    results = []
    for model, out in both_paths(sharing, True):
        (grad,) = torch.autograd.grad(out.loss, model.generator_table, create_graph=True)
        targets = [model.generator_table, model.mlm_head.dense.weight]
        results.append(torch.autograd.grad(grad.square().sum(), targets))
    for tied, dense in zip(*results):
        torch.testing.assert_close(tied, dense, rtol=1e-5, atol=1e-7)
