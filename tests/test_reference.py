"""Every optimised attention path equals a plain reference written literally from the model's definition.

DeBERTa (He et al., ICLR 2021, arXiv 2006.03654, §3.1) with DeBERTa-v3's settings (share_att_key,
log buckets), as the official code computes it (DeBERTa/deberta/disentangled_attention.py,
DeBERTa/deberta/da_utils.py): S_ij = (Qc_i·Kc_j + Qc_i·Kr[idx(i,j)] + Kc_j·Qr[idx(i,j)]) / sqrt(3 Dh)
with the same idx(i, j) in both position terms.

The reference builds the three score tensors (c2c, c2p, p2c) with explicit [T, T] indices, adds them,
applies the pair mask m_i·m_j and an explicit softmax, all in float64. The optimised code runs in
float32 and must agree within 1e-5 on the forward pass and on every gradient, with padding and at
T = 300, where distances beyond 128 fall into log buckets.
"""

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import lab.model
import lab.rtd
from lab.model import DisentangledSelfAttention, Encoder, key_padding_bias, preset, relative_index
from lab.util import replace_strict

CFG = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
TOL = 1e-5


def reference_bucket(rel: int, buckets: int = 256, max_rel: int = 512) -> int:
    """make_log_bucket_position of DeBERTa/deberta/da_utils.py, one distance at a time: exact up to B/2,
    log-spaced beyond, and no clamp of rel (past M - 1 the bucket keeps growing)."""
    mid = buckets // 2
    if abs(rel) <= mid:
        return rel
    sign = 1 if rel > 0 else -1
    return sign * (math.ceil(math.log(abs(rel) / mid) / math.log((max_rel - 1) / mid) * (mid - 1)) + mid)


@lru_cache
def reference_index(T: int, buckets: int = 256, max_rel: int = 512) -> torch.Tensor:
    """idx(i, j) = clamp(bucket(i - j) + B, 0, 2B - 1), a [T, T] LongTensor into the full table."""
    rows = [
        [min(2 * buckets - 1, max(0, reference_bucket(i - j, buckets, max_rel) + buckets)) for j in range(T)]
        for i in range(T)
    ]
    return torch.tensor(rows)


def reference_attention(h, P, p: dict, num_heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """h [B, T, D], P [2B_rel, D] the normalised relative table, p the q/k/v weights, key_mask [B, T]."""
    B, T, D = h.shape
    Dh = D // num_heads

    def heads(x):  # [..., N, D] -> [..., H, N, Dh]
        return x.unflatten(-1, (num_heads, Dh)).transpose(-2, -3)

    Qc, Kc, V = (
        heads(h @ p[n + ".weight"].T + p[n + ".bias"]) for n in ("query", "key", "value")
    )  # [B, H, T, Dh]
    Qr, Kr = (heads(P @ p[n + ".weight"].T + p[n + ".bias"]) for n in ("query", "key"))  # [H, 2B_rel, Dh]
    idx = reference_index(T)  # [T, T]
    c2c = torch.einsum("bhid,bhjd->bhij", Qc, Kc)
    c2p = torch.einsum("bhid,hijd->bhij", Qc, Kr[:, idx])  # Qc_i · Kr[idx(i, j)]
    p2c = torch.einsum("bhjd,hijd->bhij", Kc, Qr[:, idx])  # Kc_j · Qr[idx(i, j)]: the same idx(i, j)
    S = (c2c + c2p + p2c) / math.sqrt(3 * Dh)
    pair = (key_mask[:, None, :, None] * key_mask[:, None, None, :]).bool()  # m_i · m_j  [B, 1, T, T]
    S = S.masked_fill(~pair, -1e30)
    probs = torch.exp(S - S.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True) * pair  # masked entries get zero probability
    return (probs @ V).transpose(1, 2).reshape(B, T, D)  # [B, T, D]


def reference_encoder(ids, mask, p: dict, cfg) -> torch.Tensor:
    """The whole DeBERTa-v3 backbone (post-LN layers, normalised relative table) with
    reference_attention, from a parameter dict."""

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], cfg.layer_norm_eps)

    def linear(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    h = ln(p["word_embeddings.weight"][ids], "embedding_norm") * mask[..., None]
    P = ln(p["rel_embeddings.weight"], "rel_norm")  # all 2B rows, normalised once
    for i in range(cfg.num_layers):
        att = {
            k.removeprefix(f"layers.{i}.attention."): v for k, v in p.items() if f"layers.{i}.attention." in k
        }
        a = ln(
            linear(reference_attention(h, P, att, cfg.num_heads, mask), f"layers.{i}.attention_out") + h,
            f"layers.{i}.attention_norm",
        )
        ffn = linear(F.gelu(linear(a, f"layers.{i}.ffn_in")), f"layers.{i}.ffn_out")
        h = ln(ffn + a, f"layers.{i}.ffn_norm")
    return h


def padded_batch(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CFG.vocab_size, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, T - T // 3 :] = 0  # one row a third padding
    mask[2, T // 2 :] = 0  # one row half padding
    ids[mask == 0] = 0
    return ids, mask


def assert_close(name, ours, ref):
    """Within TOL absolute, or TOL relative to the largest entry where that exceeds 1 (summed gradients
    of a float32 model grow with the number of terms, and so does their rounding)."""
    err = (ours.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    print(f"{name}: max abs difference {err:.2e} (scale {scale:.1f})")  # shown with pytest -s
    assert err < TOL * scale, f"{name}: max abs difference {err:.2e} >= {TOL} * {scale:.1f}"


def test_bucket_spot_values_from_the_paper():
    spots = {128: 128, 129: 129, 200: 169, 256: 192, 300: 207, 400: 233, 500: 254, 511: 255}
    for rel, bucket in spots.items():
        assert reference_bucket(rel) == bucket and reference_bucket(-rel) == -bucket
    for T in (7, 300):
        lo, R, index = relative_index(T, 256, 512)
        assert torch.equal(index[0] + lo, reference_index(T)), (
            f"relative_index differs from idx(i, j) at T={T}"
        )


CUDA = torch.cuda.is_available()
ON_CUDA = pytest.mark.skipif(not CUDA, reason="needs CUDA (FlexAttention has no CPU backward in torch 2.13)")


def wrap(module, compiled: bool):
    # aot_eager traces exactly what inductor would compile (fullgraph: no graph break allowed) in a
    # fraction of its compile time; flex_attention needs the real inductor kernels
    if not compiled:
        return module
    backend = "inductor" if module.impl == "flex" else "aot_eager"
    return torch.compile(module, backend=backend, fullgraph=True)


# compiling takes seconds, so each compiled path runs once, at a length that exercises the log buckets;
# FlexAttention has no CPU backward, so on the CPU it is checked forward only (grads=False)
@pytest.mark.parametrize(
    ("impl", "compiled", "T", "device", "grads"),
    [
        ("sdpa", False, 7, "cpu", True),
        ("sdpa", False, 300, "cpu", True),
        ("sdpa", True, 300, "cpu", True),
        ("flex", False, 300, "cpu", False),
        pytest.param("sdpa", False, 300, "cuda", True, marks=ON_CUDA),
        pytest.param("flex", True, 300, "cuda", True, marks=ON_CUDA),
        pytest.param("flex", False, 300, "cuda", True, marks=ON_CUDA),
    ],
)
def test_attention_equals_reference_forward_and_gradients(impl, compiled, T, device, grads):
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(replace_strict(CFG, attention_impl=impl)).eval().to(device)
    call = wrap(attention, compiled)
    _, mask = padded_batch(T)
    h = torch.randn(3, T, CFG.hidden_size, requires_grad=grads)
    P = torch.nn.functional.layer_norm(torch.randn(512, CFG.hidden_size), (CFG.hidden_size,)).requires_grad_(
        grads
    )
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions, device)
    key_mask_bias = key_padding_bias(mask.to(device), torch.float32)
    weight = torch.randn(3, T, CFG.hidden_size) * mask[..., None]  # the loss reads non-pad query rows only

    params = dict(attention.named_parameters())
    with torch.set_grad_enabled(grads):
        out = call(h.to(device), P.to(device)[lo : lo + R], index, key_mask_bias).cpu()

    ref_inputs = {k: v.detach().double().cpu().requires_grad_() for k, v in params.items()}
    h64, P64 = h.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    ref = reference_attention(h64, P64, ref_inputs, CFG.num_heads, mask.double())
    keep = mask.bool()
    assert_close(f"{impl} output", out[keep], ref[keep])
    if grads:
        grads = torch.autograd.grad((out * weight).sum(), [h, P, *params.values()])
        ref_grads = torch.autograd.grad((ref * weight.double()).sum(), [h64, P64, *ref_inputs.values()])
        for name, g, rg in zip(["h", "rel table", *params], grads, ref_grads):
            assert_close(f"{impl} grad {name}", g.cpu(), rg)


def test_flex_encoder_equals_reference_forward_on_the_cpu():
    """The whole encoder with attention_impl="flex" (CPU: forward only), padded rows, T > 256."""
    torch.manual_seed(1)
    cfg = replace_strict(CFG, num_layers=1, attention_impl="flex")
    encoder = Encoder(cfg).eval()
    ids, mask = padded_batch(300, seed=1)
    with torch.no_grad():
        out = encoder(ids, mask)
    params = {k: v.detach().double() for k, v in encoder.named_parameters()}
    ref = reference_encoder(ids, mask.double(), params, cfg)
    assert_close("flex encoder last hidden state", out[mask.bool()], ref[mask.bool()])


def test_flex_refuses_to_train_where_it_cannot():
    attention = DisentangledSelfAttention(replace_strict(CFG, attention_impl="flex", attention_dropout=0.1))
    lo, R, index = relative_index(5, CFG.position_buckets, CFG.max_relative_positions)
    args = (
        torch.randn(1, 5, CFG.hidden_size),
        torch.randn(R, CFG.hidden_size),
        index,
        torch.zeros(1, 1, 1, 5),
    )
    with pytest.raises(ValueError, match="attention_dropout"):
        attention.train()(*args)
    if not CUDA:
        with pytest.raises(ValueError, match="backward"):
            attention.eval()(*args)


@pytest.mark.parametrize(("T", "num_layers", "padded"), [(7, 2, True), (300, 1, True), (300, 1, False)])
def test_encoder_equals_reference_forward_and_gradients(T, num_layers, padded):
    """Padded batches take the key-padding bias; an unpadded one skips it (has_padding) and must not
    change. T = 7 and 300 use R = 16 and 416 position rows, rounded up from the 13 and 415 reached."""
    torch.manual_seed(1)
    cfg = replace_strict(CFG, num_layers=num_layers)
    encoder = Encoder(cfg).eval()
    ids, mask = padded_batch(T, seed=1)
    if not padded:  # the same ids, no [PAD] among them (its table row gets no gradient)
        mask, ids = torch.ones_like(mask), ids.clamp(min=4)
    weight = torch.randn(3, T, CFG.hidden_size) * mask[..., None]
    params = dict(encoder.named_parameters())
    out = encoder(ids, mask if padded else None)  # None: no padding, no key-padding bias
    grads = torch.autograd.grad((out * weight).sum(), list(params.values()), allow_unused=True)

    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ref = reference_encoder(ids, mask.double(), ref_inputs, cfg)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), list(ref_inputs.values()))

    keep = mask.bool()
    assert_close("last hidden state", out[keep], ref[keep])
    for name, g, rg in zip(params, grads, ref_grads):
        assert_close(f"grad {name}", torch.zeros_like(rg) if g is None else g, rg)


def test_training_attention_on_the_cpu_equals_reference_with_dropout_as_identity(monkeypatch):
    """Attention dropout active on the CPU takes the written-out path (bias as the matmul's
    accumulator); with the dropout draw replaced by the identity it must equal the reference, padded
    keys included, forward and gradients, at T > 256."""
    calls = []

    def identity_dropout(x, p=0.5, training=True, inplace=False):
        calls.append(p)
        return x

    monkeypatch.setattr(lab.model.F, "dropout", identity_dropout)
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(replace_strict(CFG, attention_dropout=0.1)).train()
    T = 300
    _, mask = padded_batch(T)
    h = torch.randn(3, T, CFG.hidden_size, requires_grad=True)
    P = F.layer_norm(torch.randn(512, CFG.hidden_size), (CFG.hidden_size,)).requires_grad_()
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions)
    out = attention(h, P[lo : lo + R], index, key_padding_bias(mask, torch.float32))
    assert calls == [0.1]  # the written-out path ran, with its dropout
    params = dict(attention.named_parameters())
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    h64, P64 = h.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    ref = reference_attention(h64, P64, ref_inputs, CFG.num_heads, mask.double())
    keep = mask.bool()
    assert_close("train-mode output", out[keep], ref[keep])
    weight = torch.randn(3, T, CFG.hidden_size) * mask[..., None]
    grads = torch.autograd.grad((out * weight).sum(), [h, P, *params.values()])
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), [h64, P64, *ref_inputs.values()])
    for name, g, rg in zip(["h", "rel table", *params], grads, ref_grads):
        assert_close(f"train-mode grad {name}", g, rg)


def test_position_gathers_sum_their_gradient_in_fp32_under_bf16(monkeypatch):
    """At T = 1024 hundreds of pairs saturate at the table's first and last rows; their gradients
    meet on one address. Summed in bf16 (CUDA's atomic adds) a count of ones sticks at 256; the fp32
    gathers keep it exact (to bf16's spacing of 2 when the sum is stored back). The CPU's scatter_add
    happens to accumulate bf16 in fp32, so the test also checks that the backward's scatter runs on
    fp32 tensors, which is what holds on every device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScatterDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scatter" in func.__name__ or "index_put" in func.__name__:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    T = 1024
    attention = DisentangledSelfAttention(CFG)
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions)
    scores = [torch.zeros(1, 1, T, R, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    monkeypatch.setattr(attention, "position_scores", lambda q, k, rel: tuple(scores))
    c2p, p2c = attention.position_terms(None, None, None, index)
    with ScatterDtypes() as scatters:
        (c2p.sum() + p2c.sum()).backward()
    assert scatters.seen and set(scatters.seen) == {torch.float32}, scatters.seen
    pairs = torch.zeros(T, R).scatter_add_(1, index[0], torch.ones(T, T))  # [T(i), R] pairs per row
    key_pairs = torch.zeros(T * R).scatter_add_(0, index[1].flatten(), torch.ones(T * T)).view(T, R)
    assert pairs.max() > 400 and key_pairs.max() > 400  # saturated rows: far beyond bf16's 256
    for name, grad, exact in (("c2p", scores[0].grad[0, 0], pairs), ("p2c", scores[1].grad[0, 0], key_pairs)):
        err = (grad.float() - exact).abs().max().item()
        assert err <= 2.0, f"{name} gradient off by {err} from the exact pair counts"


# -- sampling ------------------------------------------------------------------------------------


def reference_sample(logits: torch.Tensor, quantile: torch.Tensor) -> torch.Tensor:
    """The definition in float64: the first id whose cumulative probability exceeds quantile."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    return (
        torch.searchsorted(cdf, quantile.double()[..., None], right=True)
        .squeeze(-1)
        .clamp(max=logits.shape[-1] - 1)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_follows_the_distribution_chi_square(dtype):
    """20,000 draws from one distribution over V = 700 ids (three blocks of 256, the last one short,
    with mass in each), binned by id, against the expected counts: a chi-square goodness of fit
    (scipy.stats) on the bins with expected count >= 5, at significance 0.001. The unit of
    replication is one draw (independent uniforms)."""
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    V, N = 700, 20000
    logits = (torch.randn(V, generator=g) * 1.5).to(dtype)
    p = torch.softmax(logits.double(), -1)
    quantile = torch.rand(N, generator=g)
    draws = lab.rtd.sample(logits.expand(N, V), quantile)
    counts = torch.bincount(draws, minlength=V).double()
    expected = p * N
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    result = stats.chisquare(observed.numpy(), wanted.numpy())
    assert result.pvalue > 1e-3, result
    # and draw by draw: the definition picks the same id for (nearly) every quantile in fp32; bf16's
    # weights carry its 2^-8 rounding, which moves the interval ends (95 % agree) but not the law
    agree = (draws == reference_sample(logits.expand(N, V), quantile)).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.9), agree


def test_sampling_is_the_same_for_any_split_of_the_batch_and_respects_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, 1000, generator=g) * 4
    quantile = torch.rand(6, 5, generator=g)
    whole = lab.rtd.sample(logits, quantile)
    assert whole.shape == (6, 5)
    parts = torch.cat([lab.rtd.sample(logits[a:b], quantile[a:b]) for a, b in ((0, 1), (1, 4), (4, 6))])
    assert torch.equal(whole, parts)  # N processes holding slices draw what one process draws
    assert torch.equal(whole, reference_sample(logits, quantile))
    hot = lab.rtd.sample(logits, quantile, temperature=2.0)
    assert torch.equal(hot, reference_sample(logits / 2.0, quantile))
    # a zero-probability id is never drawn, even at quantile 0
    spiky = torch.full((1, 1000), -1e4)
    spiky[0, 700] = 0.0
    assert lab.rtd.sample(spiky, torch.zeros(1)).item() == 700


@pytest.mark.parametrize("emd", [False, True])
def test_rtd_step_without_a_mask_equals_the_step_with_a_mask_of_ones(emd):
    """attention_mask=None (no padding: no key-padding bias, no pad-row zeroing) changes nothing but
    the work: same losses, same gradients as a mask of ones."""
    cfg = replace_strict(CFG, max_seq_len=300)
    torch.manual_seed(0)
    model = lab.rtd.RTDModel(cfg, "gdes", emd=emd)
    ids = torch.randint(4, cfg.vocab_size - 1, (2, 300))
    ids[:, 0], ids[:, -1] = 1, 2
    special = torch.tensor([0, 1, 2, 3])
    noise = lab.rtd.draw_noise(2, 300, 0.15, torch.Generator().manual_seed(0), "cpu")
    results = []
    for mask in (torch.ones_like(ids), None):
        out = model(ids, mask, special, cfg.vocab_size - 1, noise=noise)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(b.corrupted_ids, a.corrupted_ids)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
