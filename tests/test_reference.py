"""Every optimised attention path equals a plain reference written literally from PAPER.md §2.

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

from lab.model import DisentangledSelfAttention, Encoder, preset, relative_index
from lab.util import replace_strict

CFG = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
TOL = 1e-5


def reference_bucket(rel: int, buckets: int = 256, max_rel: int = 512) -> int:
    """PAPER.md §2: exact up to B/2, log-spaced to M (distances clamped to ±(M-1) as in the code)."""
    mid = buckets // 2
    rel = max(-(max_rel - 1), min(max_rel - 1, rel))
    if abs(rel) <= mid:
        return rel
    sign = 1 if rel > 0 else -1
    return sign * (math.ceil(math.log(abs(rel) / mid) / math.log((max_rel - 1) / mid) * (mid - 1)) + mid)


@lru_cache
def reference_index(T: int, buckets: int = 256, max_rel: int = 512) -> torch.Tensor:
    """idx(i, j) = clamp(bucket(i - j) + B, 0, 2B - 1), a [T, T] LongTensor into the full table."""
    rows = [
        [min(2 * buckets - 1, max(0, reference_bucket(i - j) + buckets)) for j in range(T)] for i in range(T)
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
    """The whole backbone of PAPER.md §2 with reference_attention, from a parameter dict."""

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
    assert err < TOL * scale, f"{name}: max abs difference {err:.2e} >= {TOL} * {scale:.1f}"


def test_bucket_spot_values_from_the_paper():
    spots = {128: 128, 129: 129, 200: 169, 256: 192, 300: 207, 400: 233, 500: 254, 511: 255}
    for rel, bucket in spots.items():
        assert reference_bucket(rel) == bucket and reference_bucket(-rel) == -bucket
    for T in (7, 300):
        lo, R, index = relative_index(T, 256, 512)
        assert torch.equal(index + lo, reference_index(T)), f"relative_index differs from idx(i, j) at T={T}"


def attention_paths():
    """(name, wrap) for each way the model can run attention; wrap(module) -> callable."""
    yield "eager", lambda module: module
    yield "compiled", lambda module: torch.compile(module, backend="aot_eager", fullgraph=True)


# compiling takes seconds, so the compiled path runs once, at the length that exercises the log buckets
@pytest.mark.parametrize(("path", "T"), [("eager", 7), ("eager", 300), ("compiled", 300)])
def test_attention_equals_reference_forward_and_gradients(path, T):
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(CFG).eval()
    call = dict(attention_paths())[path](attention)
    _, mask = padded_batch(T)
    h = torch.randn(3, T, CFG.hidden_size, requires_grad=True)
    P = torch.nn.functional.layer_norm(torch.randn(512, CFG.hidden_size), (CFG.hidden_size,)).requires_grad_()
    lo, R, index = relative_index(T, CFG.position_buckets, CFG.max_relative_positions)
    key_mask_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    weight = torch.randn(3, T, CFG.hidden_size) * mask[..., None]  # the loss reads non-pad query rows only

    params = dict(attention.named_parameters())
    out = call(h, P[lo : lo + R], index, key_mask_bias)
    grads = torch.autograd.grad((out * weight).sum(), [h, P, *params.values()])

    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    h64, P64 = h.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    ref = reference_attention(h64, P64, ref_inputs, CFG.num_heads, mask.double())
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), [h64, P64, *ref_inputs.values()])

    keep = mask.bool()
    assert_close("output", out[keep], ref[keep])
    for name, g, rg in zip(["h", "rel table", *params], grads, ref_grads):
        assert_close(f"grad {name}", g, rg)


@pytest.mark.parametrize(("T", "num_layers"), [(7, 2), (300, 1)])
def test_encoder_equals_reference_forward_and_gradients(T, num_layers):
    torch.manual_seed(1)
    cfg = replace_strict(CFG, num_layers=num_layers)
    encoder = Encoder(cfg).eval()
    ids, mask = padded_batch(T, seed=1)
    weight = torch.randn(3, T, CFG.hidden_size) * mask[..., None]
    params = dict(encoder.named_parameters())
    out = encoder(ids, mask)
    grads = torch.autograd.grad((out * weight).sum(), list(params.values()), allow_unused=True)

    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ref = reference_encoder(ids, mask.double(), ref_inputs, cfg)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), list(ref_inputs.values()))

    keep = mask.bool()
    assert_close("last hidden state", out[keep], ref[keep])
    for name, g, rg in zip(params, grads, ref_grads):
        assert_close(f"grad {name}", torch.zeros_like(rg) if g is None else g, rg)
