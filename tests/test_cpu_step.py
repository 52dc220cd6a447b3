"""The CPU step's shortcuts change the work, never the numbers: the generator's word lookup with a
sparse gradient (RTDModel.generator_word_embeds) gives every parameter the gradient of the plain dense
lookup, in every sharing mode, with padding, in float64."""

import pytest
import torch
import torch.nn.functional as F

from lab.model import preset
from lab.rtd import SHARING_MODES, RTDModel, draw_noise
from lab.util import replace_strict

CFG = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)


def dense_lookup(model):
    def lookup(ids):
        table = model.generator.word_embeddings
        return F.embedding(ids, table.weight, table.padding_idx)

    return lookup


@pytest.mark.parametrize("emd", [False, True])
@pytest.mark.parametrize("sharing", SHARING_MODES)
def test_sparse_generator_lookup_gives_the_dense_gradients(sharing, emd, monkeypatch):
    cfg = replace_strict(CFG, max_seq_len=40)
    torch.manual_seed(0)
    model = RTDModel(cfg, sharing, emd=emd).double()
    ids = torch.randint(4, cfg.vocab_size - 1, (3, 40))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[2, 30:], ids[2, 30:] = 0, 0  # padding: the [PAD] row gets no gradient from either lookup
    special = torch.tensor([0, 1, 2, 3])
    noise = draw_noise(3, 40, 0.15, torch.Generator().manual_seed(0), "cpu")
    params = dict(model.named_parameters())
    grads = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(model, "generator_word_embeds", dense_lookup(model))
        out = model(ids, mask, special, cfg.vocab_size - 1, noise=noise)
        grads.append(torch.autograd.grad(out.loss, list(params.values()), allow_unused=True))
    for name, sparse_grad, dense_grad in zip(params, *grads):
        assert (sparse_grad is None) == (dense_grad is None), name
        if dense_grad is not None:
            assert not sparse_grad.is_sparse, name  # what the optimizer and clipping receive
            torch.testing.assert_close(sparse_grad, dense_grad, rtol=0, atol=1e-12, msg=name)
    table = params["generator.word_embeddings.weight"]
    assert (
        table.requires_grad
        and grads[0][list(params).index("generator.word_embeddings.weight")].abs().sum() > 0
    )
