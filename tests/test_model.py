"""Smallest pieces first: buckets, shapes, presets, config validation, torch.compile."""

import pytest
import torch

from lab.model import Encoder, ModelConfig, count_parameters, log_bucket, preset, relative_index

# PAPER.md §2 spot values for B=256, M=512
SPOT = {0: 0, 1: 1, 127: 127, 128: 128, 129: 129, 200: 169, 256: 192, 300: 207, 400: 233, 500: 254, 511: 255}


@pytest.mark.parametrize("rel,bucket", sorted(SPOT.items()))
def test_log_bucket_matches_hand_values_both_signs(rel, bucket):
    got = log_bucket(torch.tensor([rel, -rel]), 256, 512)
    assert got.tolist() == [bucket, -bucket]


def test_bucket_saturates_beyond_max_relative_positions():
    assert log_bucket(torch.tensor([511, 600, 5000, -5000]), 256, 512).tolist() == [255, 255, 255, -255]


def test_relative_index_slices_the_reachable_rows():
    lo, R, index = relative_index(7, 256, 512)
    assert (lo, R) == (256 - 6, 13)  # distances -6..6
    assert index[0, 0] + lo == 256 and index[6, 0] + lo == 262 and index[0, 6] + lo == 250
    lo, R, index = relative_index(512, 256, 512)
    assert (lo, R) == (1, 511) and index.max() == R - 1 and index.min() == 0


def test_encoder_shapes_and_padding_rows_do_not_leak():
    cfg = preset("tiny")
    model = Encoder(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, mask)
    assert out.shape == (2, 10, cfg.hidden_size)
    # changing a padded token must not change the real rows
    ids2 = ids.clone()
    ids2[1, 8] = 5
    torch.testing.assert_close(model(ids2, mask)[1, :6], out[1, :6])
    assert len(model(ids, mask, return_all=True)) == cfg.num_layers


@pytest.mark.parametrize(
    "name,backbone_m,embedding_m",
    [("xsmall", 22, 49), ("small", 44, 98), ("base", 86, 98), ("large", 304, 131)],
)
def test_preset_parameter_counts_match_the_official_table(name, backbone_m, embedding_m):
    counts = count_parameters(preset(name))
    assert abs(counts["backbone_with_pooler"] / 1e6 - backbone_m) / backbone_m < 0.02
    assert abs(counts["embedding"] / 1e6 - embedding_m) / embedding_m < 0.02
    # the closed form agrees with the module itself
    if name == "xsmall":
        model = Encoder(preset(name, vocab_size=1000))
        n = sum(p.numel() for p in model.parameters())
        assert n == count_parameters(preset(name, vocab_size=1000))["total"]


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: ModelConfig(hidden_size=100, num_heads=12), "hidden_size"),
        (lambda: preset("huge"), "preset"),
        (lambda: preset("tiny", hidden=3), "hidden"),
        (lambda: ModelConfig(vocab_size=3), "vocab_size"),
        (lambda: ModelConfig(hidden_dropout=1.5), "hidden_dropout"),
    ],
)
def test_bad_config_raises_one_clear_value_error(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_input_longer_than_max_seq_len_is_a_clear_error():
    model = Encoder(preset("tiny", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_torch_compile_forward_backward_matches_eager():
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    model = Encoder(cfg)
    ids = torch.randint(4, cfg.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    eager_out = model(ids, mask)
    eager_out[mask.bool()].square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(ids, mask)
    out[mask.bool()].square().mean().backward()
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("T", [1, 2, 7, 128, 129, 130, 300, 512, 513, 1024])
def test_relative_index_equals_the_full_bucket_table(T):
    lo, R, index = relative_index.__wrapped__(T, 256, 512)
    pos = torch.arange(T)
    full = (log_bucket(pos[:, None] - pos[None, :], 256, 512) + 256).clamp(0, 511)
    assert (lo, lo + R - 1) == (full.min().item(), full.max().item())
    assert torch.equal(index + lo, full)
