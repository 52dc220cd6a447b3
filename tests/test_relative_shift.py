"""The relative shift (lab.model.skew) gives the gathers' numbers wherever the index is a diagonal.

For T <= position_buckets / 2 + 1 every distance i - j has its own bucket, so idx(i, j) - lo = (i - j) + c
and the attention reads c2p and p2c as skewed views of the [B, H, T, R] position scores instead of
gathering them through relative_index. In float64 the two paths must agree to rounding, forward and
gradients, with and without padding, at every such T and for distances of both signs; longer inputs
keep the gathers.
"""

import pytest
import torch

import lab.model
from lab.model import DisentangledSelfAttention, diagonal_offset, key_padding_bias, preset, relative_index
from lab.util import replace_strict

CFG = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
TOL = 1e-12  # float64: the paths differ by the order of a few additions at most


def attention_and_grads(attention, h, table, T, mask, gather: bool, monkeypatch):
    """The attention's output on h [B, T, D] and the gradients of a fixed projection of it with respect
    to h, the table rows and the Q/K/V weights; gather=True forces the gather path."""
    cfg = CFG
    lo, R, index = relative_index(T, cfg.position_buckets, cfg.max_relative_positions)
    with monkeypatch.context() as patch:
        if gather:
            patch.setattr(lab.model, "diagonal_offset", lambda *args: None)
        out = attention(h, table[lo : lo + R], index, key_padding_bias(mask, torch.float64))
    weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    if mask is not None:
        weight = weight * mask[..., None]  # pad query rows are meaningless (key_padding_bias)
        out = out * mask[..., None]
    inputs = [h, table, attention.query.weight, attention.key.weight, attention.value.weight]
    return out, torch.autograd.grad((out * weight).sum(), inputs)


def batch(T: int, padded: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, T, CFG.hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2 * CFG.position_buckets, CFG.hidden_size, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, T - T // 3 :] = 0  # a third of the second row is padding (none at T < 3)
    return h, table.requires_grad_(), mask


@pytest.mark.parametrize("padded", [False, True])
def test_shift_equals_gathers_forward_and_gradients_for_every_short_length(padded, monkeypatch):
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(CFG).double().eval()
    names = ["output", "grad h", "grad table", "grad Wq", "grad Wk", "grad Wv"]
    worst = dict.fromkeys(names, 0.0)
    for T in range(1, CFG.position_buckets // 2 + 2):  # 1 .. 129: every T whose index is a diagonal
        assert diagonal_offset(T, CFG.position_buckets, CFG.max_relative_positions) is not None, T
        h, table, mask = batch(T, padded, seed=T)
        shifted, shifted_grads = attention_and_grads(attention, h, table, T, mask, False, monkeypatch)
        gathered, gathered_grads = attention_and_grads(attention, h, table, T, mask, True, monkeypatch)
        pairs = zip(names, [shifted, *shifted_grads], [gathered, *gathered_grads])
        for name, ours, theirs in pairs:
            assert theirs.abs().max() > 0 or T == 1, (name, T)  # nothing vacuous (one key: no score gradient)
            worst[name] = max(worst[name], (ours - theirs).abs().max().item())
    print({name: f"{err:.1e}" for name, err in worst.items()})  # shown with pytest -s
    for name, err in worst.items():
        assert err < TOL, f"{name}: shift and gathers differ by {err:.2e} (padded={padded})"


@pytest.mark.parametrize(("buckets", "max_rel"), [(256, 512), (8, 16), (10, 20)])
def test_shifted_terms_read_the_index_at_every_pair_both_signs(buckets, max_rel):
    """Each shifted term, entry by entry, against the index written out by relative_index and read with
    plain indexing: c2p[i, j] = (Qc Kr^T)[i, idx(i, j)], p2c[i, j] = (Kc Qr^T)[j, idx(i, j)], for
    i > j, i = j and i < j alike. Small tables (B = 8, 18) put the row window at the table's end
    (offset > T - 1) and stretch R beyond 2T - 1 by the rounding to ROW_MULTIPLE rows."""
    cfg = replace_strict(CFG, position_buckets=buckets, max_relative_positions=max_rel)
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(cfg).double()
    offsets = set()
    for T in range(1, buckets // 2 + 2):
        offset = diagonal_offset(T, buckets, max_rel)
        offsets.add(offset - (T - 1))
        lo, R, index = relative_index(T, buckets, max_rel)
        q, k = torch.randn(2, 2, cfg.num_heads, T, cfg.head_size, dtype=torch.float64)  # [B, H, T, Dh]
        rel = torch.randn(R, cfg.hidden_size, dtype=torch.float64)
        c2p, p2c = attention.shifted_position_terms(q, k, rel, offset)
        c2p_scores, p2c_scores = attention.position_scores(q, k, rel)  # [B, H, T, R]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        assert torch.equal(index[0], i - j + offset)  # the diagonal the shift relies on
        torch.testing.assert_close(c2p, c2p_scores[:, :, i, index[0]], rtol=0, atol=TOL)
        torch.testing.assert_close(p2c, p2c_scores[:, :, j, index[0]], rtol=0, atol=TOL)
    assert buckets == 256 or max(offsets) > 0  # the small tables did move the window


@pytest.mark.parametrize("T", [130, 200, 300])
def test_longer_inputs_keep_the_gathers(T, monkeypatch):
    """Past B/2 + 1 distances share log buckets: no diagonal, and the gathers run (the float64
    reference of tests/test_reference.py checks them at T = 300)."""
    assert diagonal_offset(T, CFG.position_buckets, CFG.max_relative_positions) is None
    calls = []
    attention = DisentangledSelfAttention(CFG).double().eval()
    monkeypatch.setattr(attention, "shifted_position_terms", lambda *a: calls.append("shift"))
    h, table, mask = batch(T, True, seed=0)
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions)
    attention(h, table[lo : lo + R], index, key_padding_bias(mask, torch.float64))
    assert calls == []


def test_shift_keeps_the_compute_dtype_and_compiles_without_a_graph_break():
    """Under bf16 the shifted terms stay bf16 (no upcast: no two gradient entries meet), and the path
    traces whole under torch.compile (fullgraph) with the same numbers as eager."""
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(CFG).eval()
    T = 64
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions)
    h = torch.randn(2, T, CFG.hidden_size)
    rel = torch.randn(R, CFG.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = attention.split_heads(attention.query(h))
        k = attention.split_heads(attention.key(h))
        bias = attention.position_bias(q, k, rel, index)
    assert bias.dtype == torch.bfloat16 and bias.is_contiguous()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, rel, index, None), attention(h, rel, index, None))


def test_profile_script_times_every_layout_and_both_steps(tmp_path):
    """`python -m lab.bench.profile` at a tiny size: the three layouts (which must agree, or it raises),
    lab's step (with and without lab.tied) against the peer, each with a wall and a CPU figure, and the
    step's groups with the ceiling they set; the tables land in --out."""
    from lab.bench.measure import allocator_text
    from lab.bench.profile import cli

    out = tmp_path / "profile.txt"
    args = ["--what", "layouts,steps,ceiling", "--preset", "tiny", "--seq-len", "16", "--batch", "2"]
    assert cli([*args, "--warmup", "1", "--repeats", "2", "--steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"allocator: {allocator_text()}\n")
    rows = ("| gather |", "| as_strided |", "| reshape |", "| lab-es |", "| lab-es-dense-lookups |", "| hf |")
    for row in (*rows, "| matmuls |", "| AdamW (fused) |", "| dropout masks |", "| everything else |"):
        assert row in text, row
    assert "by CPU time" in text and "what lab.tied saves" in text and "at most" in text
    figures = dict(line.split(",") for line in out.with_suffix(".csv").read_text().splitlines()[1:])
    groups = [float(figures[f"ceiling {name} ms"]) for name in ("matmuls", "AdamW (fused)", "dropout masks")]
    ceiling = float(figures["ceiling hf wall ms"]) / sum(groups)  # the table's bound, from its own figures
    assert abs(ceiling - float(figures["ceiling at most"])) <= 0.02 * ceiling + 0.01
    assert f"at most {figures['ceiling at most']}" in text
    assert cli(["--what", "nothing"]) == 2  # a user's error: one message, exit code 2
