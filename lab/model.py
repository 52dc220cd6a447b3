"""The DeBERTa-v3 encoder, top to bottom: config, relative positions, attention, layer, encoder.

Dimension legend used in the shape comments:
    B batch, T tokens, H heads, Dh head size (64), D hidden (H * Dh), F feed-forward size,
    R relative-table rows a sequence of length T can reach (R <= 2 * position_buckets).

Parameter names differ from HuggingFace's `DebertaV2Model`; `lab/hf.py` maps between the two, and
tests/test_hf_parity.py checks that both produce the same hidden states.

Attention implementation: `ModelConfig.attention_impl` picks how the disentangled scores are
computed ("sdpa" or "flex", see DisentangledSelfAttention); `available_attention_impls(device)` lists
the ones that train on a device, e.g. to time each:
    for impl in available_attention_impls("cuda"):
        model = Encoder(preset("base", attention_impl=impl)).cuda()
The choice changes speed and memory, never the weights: checkpoints and config.json do not record it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from lab.util import replace_strict

NUM_SPECIAL_IDS = 4  # [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 come first in every DeBERTa-v3 vocabulary
ATTENTION_IMPLS = ("sdpa", "flex")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128100  # rows of the word table (SentencePiece pieces + [MASK], padded)
    hidden_size: int = 768  # D
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # H; head size is hidden_size // num_heads (64 in every official size)
    intermediate_size: int = 3072  # F, 4 * D in every official size
    max_seq_len: int = 512  # longest input the model is meant for (checked in forward)
    position_buckets: int = 256  # B_rel: relative distances beyond B_rel/2 share log-spaced buckets
    max_relative_positions: int = 512  # M: the distance that maps to the last bucket
    layer_norm_eps: float = 1e-7
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02  # std of the normal init of every Linear / Embedding weight
    pad_token_id: int = 0
    # how the scores are computed: "sdpa" (an additive [B, H, T, T] bias into scaled_dot_product_attention)
    # or "flex" (FlexAttention, no [B, H, T, T] bias; training needs CUDA). Same results, different
    # speed, so it is not written into checkpoints. "sdpa" stays the default until a GPU measurement
    # (`python -m lab bench`) shows another one faster; see available_attention_impls.
    attention_impl: str = "sdpa"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_seq_len",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose hidden_size = num_heads * head_size (64 in the official models)"
            )
        if self.vocab_size <= NUM_SPECIAL_IDS:
            raise ValueError(
                f"ModelConfig.vocab_size={self.vocab_size} leaves no room for the special ids "
                f"[PAD] [CLS] [SEP] [UNK] (0..3) plus words; use the tokenizer's vocab_size"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"ModelConfig.pad_token_id={self.pad_token_id} is outside the vocabulary")
        if self.position_buckets < 2 or self.position_buckets % 2:
            raise ValueError(f"ModelConfig.position_buckets={self.position_buckets} must be even and >= 2")
        if self.max_relative_positions <= self.position_buckets // 2:
            raise ValueError(
                f"ModelConfig.max_relative_positions={self.max_relative_positions} must exceed "
                f"position_buckets/2={self.position_buckets // 2}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r} is unknown; choose one of {ATTENTION_IMPLS}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


_BASE = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    # test size: seconds on a CPU
    "tiny": replace_strict(
        _BASE, vocab_size=1000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256
    ),
    # the CPU-trainable size used by `make demo` and the WikiText runs
    "mini": replace_strict(
        _BASE, vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024
    ),
    # the released sizes (config.json of microsoft/deberta-v3-{xsmall,small,base,large})
    "xsmall": replace_strict(_BASE, hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "small": replace_strict(_BASE, hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072),
    "base": _BASE,
    "large": replace_strict(_BASE, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named size, optionally with fields changed: `preset("xsmall", vocab_size=32000)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace_strict(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# Relative positions


def log_bucket(rel: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    """Map signed distances i - j to buckets: exact up to B/2, log-spaced beyond.

    bucket = rel                                                      if |rel| <= B/2
           = sign(rel) * (ceil(ln(|rel|/mid) / ln((M-1)/mid) * (mid-1)) + mid)   otherwise
    Distances are not clamped: past M - 1 the bucket keeps growing beyond B - 1 and only the table
    index saturates (at 0 and 2B - 1, in relative_index). This is `make_log_bucket_position` of the
    official code (DeBERTa/deberta/da_utils.py) and of transformers' DebertaV2.
    """
    mid = position_buckets // 2
    # |rel| below mid is replaced by mid - 1 only to keep the log finite; those entries are not used
    magnitude = torch.where(rel.abs() < mid, torch.full_like(rel, mid - 1), rel.abs()).to(torch.float64)
    log_scaled = torch.ceil(
        torch.log(magnitude / mid) / math.log((max_relative_positions - 1) / mid) * (mid - 1)
    )
    return torch.where(rel.abs() <= mid, rel, torch.sign(rel) * (log_scaled.to(rel.dtype) + mid))


def _bucket_of(distance: int, position_buckets: int, max_relative_positions: int) -> int:
    """log_bucket of one distance >= 0, in plain Python (static under torch.compile)."""
    mid = position_buckets // 2
    if distance <= mid:
        return distance
    return (
        math.ceil(math.log(distance / mid) / math.log((max_relative_positions - 1) / mid) * (mid - 1)) + mid
    )


ROW_MULTIPLE = 8  # the position matmuls' R: a multiple of 8 keeps bf16 rows 16-byte aligned (tensor cores)


def _row_window(T: int, position_buckets: int, max_relative_positions: int) -> tuple[int, int]:
    """(lo, R): the table rows lo .. lo+R-1 that a length-T sequence reaches, R rounded up to a multiple
    of ROW_MULTIPLE where the table allows (relative_index says why)."""
    # buckets grow with the distance, so the farthest pair (T - 1 apart) bounds the rows a sequence
    # reaches; the index saturates at the table's ends, 0 and 2B - 1
    rows = 2 * position_buckets
    farthest = _bucket_of(T - 1, position_buckets, max_relative_positions)
    lo = max(0, position_buckets - farthest)
    hi = min(rows - 1, position_buckets + farthest)
    # R rounded up to a multiple of ROW_MULTIPLE (2 * 255 + 1 = 511 rows at T = 512 would put the
    # position matmuls on misaligned, slow kernels): the window extends over real table rows that no
    # index points at (upwards, or downwards at the table's end), so nothing is padded and the table
    # keeps its 2B rows
    R = min(rows, -(-(hi - lo + 1) // ROW_MULTIPLE) * ROW_MULTIPLE)
    return min(lo, rows - R), R


def _relative_index(T: int, position_buckets: int, max_relative_positions: int, device) -> tuple:
    pos = torch.arange(T, device=device)
    bucket = log_bucket(pos[:, None] - pos[None, :], position_buckets, max_relative_positions)  # [T, T]
    lo, R = _row_window(T, position_buckets, max_relative_positions)
    c2p = (bucket + position_buckets).clamp(0, 2 * position_buckets - 1) - lo  # [T(i), T(j)], idx(i, j) - lo
    # p2c reads key j's row of position scores at idx(i, j): as a flat index into the [T(j) * R]
    # scores, entry [i, j] = j * R + idx(i, j) - lo, so p2c comes out in c2p's [i, j] layout
    p2c = c2p + pos[None, :] * R  # [T(i), T(j)]
    return lo, R, torch.stack([c2p, p2c]).contiguous()  # [2, T, T]


def diagonal_offset(T: int, position_buckets: int, max_relative_positions: int) -> int | None:
    """c such that relative_index's idx(i, j) - lo = (i - j) + c for every pair of a length-T sequence,
    or None where no such c exists. Every distance up to B/2 has its own bucket (bucket = i - j, and
    i - j + B never reaches the clamp), so for T <= B/2 + 1 the index is a plain diagonal, c = B - lo,
    and the position terms are a relative shift of the score rows (position_terms) instead of a
    gather. Decided from T alone: a shape, so no data-dependent branch (torch.compile guards on it)."""
    if T > position_buckets // 2 + 1:
        return None
    lo, _ = _row_window(T, position_buckets, max_relative_positions)
    return position_buckets - lo


def skew(scores: torch.Tensor, start: int) -> torch.Tensor:
    """The relative shift of Transformer-XL (Dai et al., ACL 2019, appendix B) as a view: scores
    [..., T, R], a matmul's fresh output -> [..., T, T] with out[..., r, s] = scores[..., r, start - r + s].

    Row r starts `start - r` entries into score row r, so consecutive rows start R - 1 apart in memory:
    one as_strided view with row stride R - 1, no index and no copy. Its backward is one zero-filled
    [..., T, R] gradient and one strided copy into it; no two entries of the view share an address
    (R >= 2T - 1 > T - 1), so nothing is accumulated and nothing needs a wider dtype. The caller keeps
    0 <= start - r + s < R."""
    *lead, T, R = scores.shape
    if not torch.compiler.is_compiling() and (scores.storage_offset() or not scores.is_contiguous()):
        # as_strided addresses the storage: the rows must start it, densely (a matmul's output does)
        raise ValueError("skew needs contiguous scores that start their storage; pass a matmul's output")
    return scores.as_strided((*lead, T, T), (*scores.stride()[:-2], R - 1, 1), start)  # [..., T, T]


_relative_index_cached = lru_cache(maxsize=32)(_relative_index)


def relative_index(
    T: int, position_buckets: int, max_relative_positions: int, device: torch.device | str = "cpu"
) -> tuple[int, int, torch.Tensor]:
    """Rows of the relative table that a length-T sequence uses, and the index into them.

    Returns (lo, R, index): table rows lo .. lo+R-1 hold every reachable row (R is their count rounded
    up to a multiple of ROW_MULTIPLE where the table allows; the extra rows are real rows no index
    points at), and index [2, T, T] holds index[0][i, j] = idx(i, j) - lo (the official
    idx(i, j) = clamp(bucket(i - j) + B, 0, 2B - 1)) for c2p, and index[1][i, j] = j * R + idx(i, j) - lo,
    the same row as a flat index into the [T * R] position scores of key j, for p2c.
    Slicing to R rows instead of all 2B saves most of the position projections for short inputs.
    The index is built on `device` and cached per (T, device) in eager mode, so an encoder forward
    copies nothing between host and device; under torch.compile it is traced (plain tensor ops).
    """
    if torch.compiler.is_compiling():
        return _relative_index(T, position_buckets, max_relative_positions, device)
    return _relative_index_cached(T, position_buckets, max_relative_positions, torch.device(device))


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    """Whether a batch needs the key-padding bias: decided by the caller, on the host, once per batch
    and without reading anything back: attention_mask=None means no padding (packed pre-training
    batches), a mask means padding. Reading a mask to find out would make the host wait on the device."""
    return attention_mask is not None


def key_padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, T] mask -> [B, 1, 1, T] additive bias in `dtype`: 0 for real keys, a large finite negative
    for padded ones; None for a batch without padding (has_padding), which then adds nothing to the
    [B, H, T, T] scores. Half the dtype's lowest value: exp() of it underflows to exactly 0, adding scores
    to it cannot overflow to -inf, and a row whose keys are all padding stays finite (uniform) instead
    of NaN. Padded query rows still attend to real keys; their outputs are meaningless and every
    consumer ignores them (transformers zeroes or uniformises them)."""
    if not has_padding(attention_mask):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * (torch.finfo(dtype).min / 2)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's device produce: the autocast dtype inside autocast, else x's own."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# ----------------------------------------------------------------------------------------------
# Attention


class DisentangledSelfAttention(nn.Module):
    """Content-to-content + content-to-position + position-to-content attention (share_att_key).

    S_ij = (Qc_i·Kc_j + Qc_i·Kr[idx(i,j)] + Kc_j·Qr[idx(i,j)]) / sqrt(3 * Dh)
    The 1/sqrt(3 * Dh) goes into the attention's own scale (c2c) and into the [H, R, Dh] position
    projections (c2p, p2c), never onto a [B, H, T, T] tensor.
    Two interchangeable implementations (ModelConfig.attention_impl), equal to the float64 reference
    in tests/test_reference.py; neither uses custom autograd, so torch.compile and export work:
      sdpa  the position terms as one additive [B, H, T, T] bias into scaled_dot_product_attention,
            read from the [B, H, T, R] position scores by a relative shift (skew) up to
            T = position_buckets / 2 + 1, where the index is a diagonal, and by gathers beyond
      flex  FlexAttention with a score_mod that looks the position terms up in the [B, H, T, R]
            position scores, so no [B, H, T, T] tensor is materialised (compiled kernels on CUDA;
            on the CPU, torch 2.13 runs it forward only)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_size = cfg.num_heads, cfg.head_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        self.impl = cfg.attention_impl
        self.scale = 1.0 / math.sqrt(3 * self.head_size)  # one shared scale for all three terms
        self.position_buckets, self.max_relative_positions = cfg.position_buckets, cfg.max_relative_positions

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        *lead, T, _ = x.shape
        return x.view(*lead, T, self.num_heads, self.head_size).transpose(-2, -3)  # [..., H, T, Dh]

    def position_projections(self, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qr, Kr: the table rows rel [R, D] through the content Q/K layers, biases included
        (share_att_key), already divided by sqrt(3 * Dh): [H, R, Dh] each."""
        q_rel = self.split_heads(self.query(rel)) * self.scale  # [H, R, Dh]
        k_rel = self.split_heads(self.key(rel)) * self.scale  # [H, R, Dh]
        return q_rel, k_rel

    def position_scores(self, q, k, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query and every key scored against every table row, already divided by sqrt(3 * Dh):
        ([B, H, T, R], same). The scale goes on the [H, R, Dh] projections, not on [B, H, T, T] scores."""
        q_rel, k_rel = self.position_projections(rel)  # [H, R, Dh] each
        return q @ k_rel.transpose(-1, -2), k @ q_rel.transpose(-1, -2)  # Qc·Kr^T, Kc·Qr^T [B, H, T, R]

    def position_terms(self, q, k, rel, index) -> tuple[torch.Tensor, torch.Tensor]:
        """c2p and p2c, each [B, H, T(i), T(j)] and divided by sqrt(3 * Dh): a relative shift of the
        score rows where the index is a diagonal (T <= B/2 + 1, diagonal_offset), else gathers."""
        offset = diagonal_offset(index.shape[-1], self.position_buckets, self.max_relative_positions)
        if offset is None:
            return self.gathered_position_terms(q, k, rel, index)
        return self.shifted_position_terms(q, k, rel, offset)

    def shifted_position_terms(self, q, k, rel, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_terms where idx(i, j) - lo = (i - j) + offset: views into the [B, H, T, R] scores
        (skew), in their own dtype (each gradient entry has its own address: nothing to upcast)."""
        q_rel, k_rel = self.position_projections(rel)  # [H, R, Dh] each
        R = rel.shape[0]
        # c2p[i, j] = Qc_i · Kr[(i - j) + offset]: along j, query i's row is read backwards. Scoring
        # the queries against the rows in reverse order (column m = table row R - 1 - m) turns that into
        # column (R - 1 - offset) - i + j, read forwards: a skew starting at R - 1 - offset
        c2p_scores = q @ k_rel.flip(-2).transpose(-1, -2)  # [B, H, T, R(reversed)]
        c2p = skew(c2p_scores, R - 1 - offset)  # [B, H, T(i), T(j)]
        # p2c[i, j] = Kc_j · Qr[(i - j) + offset]: the SAME index as c2p (not idx(j, i)), read from key
        # j's row at column offset - j + i, forwards along i: a skew of the key rows gives [j, i],
        # transposed to c2p's [i, j]
        p2c_scores = k @ q_rel.transpose(-1, -2)  # [B, H, T, R]
        p2c = skew(p2c_scores, offset).transpose(-1, -2)  # [B, H, T(i), T(j)]
        return c2p, p2c

    def gathered_position_terms(self, q, k, rel, index) -> tuple[torch.Tensor, torch.Tensor]:
        """position_terms through the index, for every T.

        Under bf16 / fp16 the gathers run on fp32 scores: their backward sums every pair's gradient
        into the R rows it read, and at T >= 1024 about half of all pairs saturate at rows 0 and R - 1,
        so ~T terms meet on one address; fp32 keeps that sum exact to fp32 rounding."""
        c2p_scores, p2c_scores = self.position_scores(q, k, rel)  # [B, H, T, R] each
        if c2p_scores.dtype in (torch.float16, torch.bfloat16):
            c2p_scores, p2c_scores = c2p_scores.float(), p2c_scores.float()
        B, H, T, R = c2p_scores.shape
        # c2p[i, j] = Qc_i · Kr[idx(i, j)]: query i's row of scores, picked at the row of distance i - j
        c2p = torch.gather(c2p_scores, -1, index[0].expand(B, H, T, T))  # [B, H, T(i), T(j)]
        # p2c[i, j] = Kc_j · Qr[idx(i, j)]: the SAME index as c2p (not idx(j, i)), read from key j's row;
        # index[1][i, j] = j * R + idx(i, j) addresses it in the flattened scores, so p2c is built in
        # c2p's layout (no transposed, strided operand in the sum or in the backward's scatter)
        p2c = torch.gather(p2c_scores.flatten(-2), -1, index[1].view(1, 1, T * T).expand(B, H, T * T))
        return c2p, p2c.view(B, H, T, T)  # [B, H, T(i), T(j)] each

    def position_bias(self, q, k, rel: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """c2p + p2c as one [B, H, T, T] tensor in q's dtype, already divided by sqrt(3 * Dh)."""
        offset = diagonal_offset(index.shape[-1], self.position_buckets, self.max_relative_positions)
        if offset is None:
            c2p, p2c = self.gathered_position_terms(q, k, rel, index)
            # in place: a gather's backward needs its index, never its output
            return c2p.add_(p2c).to(q.dtype)  # [B, H, T, T]
        c2p, p2c = self.shifted_position_terms(q, k, rel, offset)
        return c2p + p2c  # views into the scores, summed into a fresh [B, H, T, T] tensor in q's dtype

    def forward(self, h, rel, index, key_mask_bias, query=None) -> torch.Tensor:
        """h [B, T, D] keys/values (and queries unless `query` [B, T, D] is given, as in the generator's
        enhanced mask decoder); rel [R, D] normalised table rows; index [2, T, T] from relative_index;
        key_mask_bias [B, 1, 1, T] from key_padding_bias, or None when the batch has no padding."""
        q = self.split_heads(self.query(h if query is None else query))  # [B, H, T, Dh]
        k, v = self.split_heads(self.key(h)), self.split_heads(self.value(h))  # [B, H, T, Dh]
        if self.impl == "flex":
            context = self.flex_context(q, k, v, rel, index, key_mask_bias)
        else:
            bias = self.position_bias(q, k, rel, index)  # [B, H, T, T]
            if key_mask_bias is not None:
                bias = bias.add_(key_mask_bias)  # a fresh tensor: add in place
            context = self.attend(q, k, v, bias)  # [B, H, T, Dh]
        B, H, T, Dh = context.shape
        return context.transpose(1, 2).reshape(B, T, H * Dh)  # [B, T, D]

    def attend(self, q, k, v, bias) -> torch.Tensor:
        """softmax(q·k^T / sqrt(3 * Dh) + bias) · v with attention dropout: [B, H, T, Dh].

        scaled_dot_product_attention, except where it would fall back to its unfused math path anyway
        (dropout on the CPU, eager): there the scores are written out so that the bias is the matmul's
        accumulator (one [B, H, T, T] pass fewer) and the math path's full-row -inf checks are skipped.
        Same formula, same dropout."""
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            B, H, T, Dh = q.shape
            scores = torch.baddbmm(  # out of place: FlopCounterMode counts baddbmm, not baddbmm_
                bias.view(B * H, T, T),
                q.reshape(B * H, T, Dh),
                k.reshape(B * H, T, Dh).transpose(1, 2),
                alpha=self.scale,
            )  # [B * H, T(i), T(j)]
            probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)  # [B * H, T, T]
            return torch.bmm(probs, v.reshape(B * H, T, Dh)).view(B, H, T, Dh)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale
        )  # [B, H, T, Dh]

    def flex_context(self, q, k, v, rel, index, key_mask_bias) -> torch.Tensor:
        """The same attention through FlexAttention: score_mod adds the position terms entry by entry."""
        if self.training and self.dropout_p > 0:
            raise ValueError(
                f"attention_impl='flex' has no attention dropout (attention_dropout={self.dropout_p}); "
                "train with attention_dropout=0.0 or attention_impl='sdpa'"
            )
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError(
                f"attention_impl='flex' has no backward pass on the CPU in torch {torch.__version__}; "
                "train on the CPU with attention_impl='sdpa' (flex runs CPU forward passes under no_grad)"
            )
        c2p_scores, p2c_scores = self.position_scores(q, k, rel)  # [B, H, T, R] each
        c2p_index = index[0]  # [T, T], idx(i, j) - lo
        scale = self.scale

        if key_mask_bias is None:

            def score_mod(score, b, h, i, j):
                # score is Qc_i·Kc_j already scaled, and so are the position scores; both terms read
                # the same idx(i, j)
                row = c2p_index[i, j]
                return score + c2p_scores[b, h, i, row] + p2c_scores[b, h, j, row]
        else:
            key_bias = key_mask_bias[:, 0, 0, :]  # [B, T]

            def score_mod(score, b, h, i, j):
                row = c2p_index[i, j]
                return score + c2p_scores[b, h, i, row] + p2c_scores[b, h, j, row] + key_bias[b, j]

        if torch.compiler.is_compiling() or q.device.type != "cpu":
            return _flex_attention(q.device)(q, k, v, score_mod=score_mod, scale=scale)  # [B, H, T, Dh]
        with warnings.catch_warnings():  # the CPU runs the unfused reference on purpose (see _flex_attention)
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return _flex_attention(q.device)(q, k, v, score_mod=score_mod, scale=scale)  # [B, H, T, Dh]


def _flex_attention(device: torch.device):
    """flex_attention itself under torch.compile (the model is being compiled and fuses it); in eager
    mode a compiled copy on CUDA (the uncompiled one materialises every score) and the plain one on
    the CPU, whose compile takes longer than the forward passes it serves."""
    from torch.nn.attention.flex_attention import flex_attention  # only when asked for: sdpa runs without it

    if torch.compiler.is_compiling() or device.type == "cpu":
        return flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        # default dynamic: a second sequence length recompiles once with a symbolic length instead of
        # once per length (bucketed fine-tuning batches would otherwise hit the recompile limit)
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


_compiled_flex = None


def available_attention_impls(device: torch.device | str) -> list[str]:
    """The attention_impl values that run forward and backward on `device` with the installed torch:
    what a benchmark should time. Select one with `preset(..., attention_impl=NAME)` (or
    `ModelConfig(attention_impl=NAME)`, `lab.from_pretrained(path, attention_impl=NAME)`); the
    weights and results do not depend on it."""
    impls = ["sdpa"]
    if torch.device(device).type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            pass
        else:
            impls.append("flex")
    return impls


# ----------------------------------------------------------------------------------------------
# Layer and encoder


class Layer(nn.Module):
    """Post-LN block: a = LN(drop(W_o·attn(h)) + h); out = LN(drop(W_2·gelu(W_1·a)) + a)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = DisentangledSelfAttention(cfg)
        self.attention_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h, rel, index, key_mask_bias, query=None):
        residual = h if query is None else query
        attended = self.attention(h, rel, index, key_mask_bias, query)
        a = self.attention_norm(self.dropout(self.attention_out(attended)) + residual)
        return self.ffn_norm(self.dropout(self.ffn_out(F.gelu(self.ffn_in(a)))) + a)  # exact erf GELU


class Encoder(nn.Module):
    """DeBERTa-v3 backbone: LN(E[ids]) -> layers with a shared, layer-normed relative table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.embedding_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.rel_embeddings = nn.Embedding(2 * cfg.position_buckets, cfg.hidden_size)
        self.rel_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def embed(self, input_ids, attention_mask, word_embeds=None) -> torch.Tensor:
        """LN(word vectors), pad rows zeroed, dropout. `word_embeds` lets a caller supply E[ids]
        from another table (ES / GDES sharing in lab/rtd.py)."""
        x = self.embedding_norm(self.word_embeddings(input_ids) if word_embeds is None else word_embeds)
        if attention_mask is not None:  # None: no padding (has_padding)
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)  # [B, T, D]
        return self.dropout(x)

    def relative_positions(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer-normed relative-table rows a length-T input reaches [R, D] and the index into
        them [2, T, T] (relative_index, already on `device`); shared by every layer (and the
        generator's enhanced mask decoder)."""
        lo, R, index = relative_index(T, self.cfg.position_buckets, self.cfg.max_relative_positions, device)
        return self.rel_norm(self.rel_embeddings.weight[lo : lo + R]), index

    def forward(self, input_ids, attention_mask=None, word_embeds=None, return_all: bool = False):
        """input_ids [B, T] -> last hidden state [B, T, D] (or every layer's output with return_all)."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"input length {T} exceeds ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        hidden = self.encode(self.embed(input_ids, attention_mask, word_embeds), attention_mask)
        return hidden if return_all else hidden[-1]

    def encode(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The layers on an embedded input h [B, T, D]: every layer's output, [B, T, D] each.
        attention_mask [B, T], or None for a batch without padding."""
        rel, index = self.relative_positions(h.shape[1], h.device)
        # built once per forward (None without padding), in the dtype the attention scores have
        key_mask_bias = key_padding_bias(attention_mask, compute_dtype(h))
        hidden = []
        for layer in self.layers:
            h = layer(h, rel, index, key_mask_bias)
            hidden.append(h)
        return hidden


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for Linear / Embedding weights, zero biases, LayerNorm (1, 0); pad row zero."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, from the config alone.

    `backbone` is the encoder without the word table. The official model cards count the backbone
    with the classification pooler (one D x D dense layer) included: `backbone_with_pooler`, which
    is what reproduces their 22M / 44M / 86M / 304M.
    """
    D, F_, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = 4 * (D * D + D) + (D * F_ + F_) + (F_ * D + D) + 2 * 2 * D
    backbone = L * per_layer + 2 * cfg.position_buckets * D + 2 * 2 * D  # + rel table + 2 LayerNorms
    embedding = cfg.vocab_size * D
    return {
        "backbone": backbone,
        "backbone_with_pooler": backbone + D * D + D,
        "embedding": embedding,
        "total": backbone + embedding,
    }
