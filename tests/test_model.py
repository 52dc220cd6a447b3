"""Smallest pieces first: buckets, shapes, presets, config validation, torch.compile."""

import pytest
import torch
from test_reference import reference_index
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    build_relative_position,
    make_log_bucket_position,
)

from lab.model import (
    Encoder,
    ModelConfig,
    available_attention_impls,
    count_parameters,
    key_padding_bias,
    log_bucket,
    preset,
    relative_index,
)

# bucket(rel) for B=256, M=512 worked out by hand from the formula of `make_log_bucket_position`
# (DeBERTa/deberta/da_utils.py): ceil(ln(|rel|/128) / ln(511/128) * 127) + 128 beyond 128
SPOT = {0: 0, 1: 1, 127: 127, 128: 128, 129: 129, 200: 169, 256: 192, 300: 207, 400: 233, 500: 254, 511: 255}


@pytest.mark.parametrize("rel,bucket", sorted(SPOT.items()))
def test_log_bucket_matches_hand_values_both_signs(rel, bucket):
    got = log_bucket(torch.tensor([rel, -rel]), 256, 512)
    assert got.tolist() == [bucket, -bucket]


def test_bucket_keeps_growing_beyond_max_relative_positions():
    """Distances are not clamped (only the table index is): 600 -> ceil(ln(600/128)/ln(511/128)*127) + 128
    = 270, 5000 -> 465; the same values as transformers' make_log_bucket_position."""
    rel = torch.tensor([511, 512, 600, 5000, -5000])
    assert log_bucket(rel, 256, 512).tolist() == [255, 256, 270, 465, -465]
    assert make_log_bucket_position(rel, 256, 512).long().tolist() == [255, 256, 270, 465, -465]


def test_relative_index_slices_the_reachable_rows_rounded_up_to_aligned_shapes():
    # distances -6..6 reach rows 250..262 (13); R rounds up to 16 over real rows: 250..265
    lo, R, index = relative_index(7, 256, 512)
    assert (lo, R) == (256 - 6, 16)
    assert index[0, 0, 0] + lo == 256 and index[0, 6, 0] + lo == 262 and index[0, 0, 6] + lo == 250
    assert index[0].min() == 0 and index[0].max() == 12  # the 3 extra rows are never read
    # T = 512 reaches 511 rows (1 .. 511); R = 512 is the whole table (the window extends downwards)
    lo, R, index = relative_index(512, 256, 512)
    assert (lo, R) == (0, 512) and index[0].max() == R - 1 and index[0].min() == 1
    # T = 128 reaches 255 rows (129 .. 383): R = 256, rows 129 .. 384
    lo, R, index = relative_index(128, 256, 512)
    assert (lo, R) == (129, 256) and index[0].min() == 0 and index[0].max() == 254
    # past M the farthest buckets exceed B - 1 and the index saturates: every row 0 .. 2B-1 is reachable
    lo, R, index = relative_index(700, 256, 512)
    assert (lo, R) == (0, 512) and index[0].max() == 511 and index[0].min() == 0
    # a table of 2B = 36 rows (not a multiple of 8): R stops at the table's size
    lo, R, index = relative_index(100, 18, 100)  # reaches rows 1 .. 35
    assert (lo, R) == (0, 36)


@pytest.mark.parametrize(
    ("T", "B", "M"),
    [(1, 256, 512), (2, 256, 512), (7, 256, 512), (130, 256, 512), (300, 256, 512), (513, 256, 512),
     (700, 256, 512), (1024, 256, 512), (40, 8, 16), (40, 16, 100)],
)  # fmt: skip
def test_relative_index_equals_the_official_formula_and_transformers(T, B, M):
    lo, R, index = relative_index(T, B, M)
    assert index.shape == (2, T, T) and index.is_contiguous()
    # transformers: build_relative_position gives bucket(i - j) [1, T, T]; DebertaV2's c2p index is
    # clamp(bucket + B, 0, 2B - 1) (modeling_deberta_v2.DisentangledSelfAttention.disentangled_attention_bias)
    x = torch.zeros(1, T, 1)
    hf = (build_relative_position(x, x, bucket_size=B, max_position=M)[0] + B).clamp(0, 2 * B - 1)
    official = reference_index(T, B, M)  # the formula written out in Python, tests/test_reference.py
    assert torch.equal(hf, official)
    assert lo <= int(official.min()) and int(official.max()) <= lo + R - 1 <= 2 * B - 1
    assert R % 8 == 0 or R == 2 * B
    assert torch.equal(index[0] + lo, official)
    # p2c's flat index: entry [i, j] = j * R + idx(i, j) - lo, key j's score row at c2p's table row
    j = torch.arange(T)[None, :]
    assert torch.equal(index[1] - j * R + lo, official)


def test_relative_index_is_built_on_the_requested_device_and_cached_there():
    lo, R, index = relative_index(9, 256, 512, "meta")
    assert index.device.type == "meta" and index.shape == (2, 9, 9)
    assert relative_index(9, 256, 512, torch.device("meta"))[2] is index  # cached: no rebuild, no copy


def test_key_padding_bias_is_finite_and_masks_in_bf16():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    bias = key_padding_bias(mask, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 1, 3) and torch.isfinite(bias).all()
    scores = torch.randn(2, 1, 3, 3).bfloat16() * 30 + bias  # adding scores cannot overflow to -inf
    probs = scores.float().softmax(-1)
    assert torch.isfinite(probs).all()
    assert (probs[0, ..., 2] == 0).all()  # a padded key gets exactly zero probability
    torch.testing.assert_close(probs[1], torch.full_like(probs[1], 1 / 3), atol=0.02, rtol=0)  # all-pad row


def test_encoder_runs_in_bf16_autocast_with_a_bf16_bias():
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    model = Encoder(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[3].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask)
    hook.remove()
    assert seen == [torch.bfloat16]  # the [B, 1, 1, T] bias is built in the compute dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[mask.bool()], model(ids, mask)[mask.bool()], atol=0.1, rtol=0.05)


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
        (lambda: preset("tiny", attention_impl="flash"), "attention_impl"),
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


def test_every_attention_impl_offered_on_the_cpu_trains_there():
    """What available_attention_impls offers for a device must run forward and backward on it (a
    benchmark times each); flex, which has no CPU backward in torch 2.13, must be left out."""
    offered = available_attention_impls("cpu")
    assert "sdpa" in offered
    for impl in ("sdpa", "flex"):
        cfg = preset("tiny", num_layers=1, attention_impl=impl, attention_dropout=0.0)
        model = Encoder(cfg).train()
        ids = torch.randint(4, cfg.vocab_size, (2, 8))
        try:
            model(ids).sum().backward()
            trains = True
        except ValueError:
            trains = False
        assert trains == (impl in offered), (impl, offered)
