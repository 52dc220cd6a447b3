"""ELECTRA-style replaced-token detection with DeBERTa-v3 encoders and three ways to share embeddings.

One `forward` is the whole RTD step (DeBERTaV3, He, Gao, Chen, ICLR 2023, arXiv 2111.09543, §2-3; the
official recipe is DeBERTa/apps/tasks/rtd_task.py of microsoft/DeBERTa):
    mask 15% -> generator -> MLM loss at masked rows -> sample (no grad) -> replace -> labels
    -> discriminator -> BCE over non-pad tokens -> L_MLM + rtd_weight * L_RTD

The word table E is shared between generator G and discriminator D as the model's sharing mode says
(lab/sharing.py: ES, NES and GDES, E_D = stopgrad(E_G) + E_delta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

import lab.sharing
import lab.tied
from lab.model import Encoder, Layer, ModelConfig, compute_dtype, init_weights, key_padding_bias
from lab.util import replace_strict

RTD_WEIGHT = 50.0  # lambda in L_MLM + lambda * L_RTD: ELECTRA's 50 (the official DeBERTa code uses 10)
# "mask": every selected token becomes [MASK], DeBERTa's RTD setting (rtd_task.py builds its
# NGramMaskGenerator with mask_prob=1, keep_prob=0); "bert": BERT's 80 % [MASK] / 10 % random / 10 %
# unchanged (ELECTRA too keeps some selected tokens unchanged)
MASK_STRATEGIES = ("mask", "bert")


def generator_config(cfg: ModelConfig, depth_ratio: float, width_ratio: float) -> ModelConfig:
    """Generator = discriminator with a fraction of its layers (and optionally of its width)."""
    if not 0 < depth_ratio <= 1:
        raise ValueError(f"gen_depth_ratio={depth_ratio} must be in (0, 1]")
    if not 0 < width_ratio <= 1:
        raise ValueError(f"gen_width_ratio={width_ratio} must be in (0, 1]")
    heads = max(1, round(cfg.num_heads * width_ratio))
    return replace_strict(
        cfg,
        num_layers=max(1, round(cfg.num_layers * depth_ratio)),
        num_heads=heads,
        hidden_size=heads * cfg.head_size,
        intermediate_size=round(cfg.intermediate_size * heads / cfg.num_heads),
    )


@dataclass
class Noise:
    """The uniform draws of one step, for a whole (global) batch: masking keys, BERT-mix choices and
    sampling quantiles. Drawn up front so a rank can take its rows (`rows`) and get exactly what a
    single process would have used for those examples."""

    keys: torch.Tensor  # [B, T] random key per token; the smallest eligible ones are masked
    mix: torch.Tensor  # [B, K] BERT strategy: < 0.8 [MASK], < 0.9 random token, else unchanged
    pick: torch.Tensor  # [B, K] BERT strategy: which random token
    quantile: torch.Tensor  # [B, K] inverse-CDF sampling of the generator's distribution

    def rows(self, index: slice) -> Noise:
        return Noise(self.keys[index], self.mix[index], self.pick[index], self.quantile[index])


def masked_count(T: int, mask_prob: float) -> int:
    """K: the fixed number of masking slots per row (a static shape: no host sync, compile-friendly).
    It bounds `mask_counts` for every row of T tokens: round(p * L) <= ceil(p * T) for L <= T."""
    return max(1, math.ceil(mask_prob * T))


def draw_noise(B: int, T: int, mask_prob: float, generator: torch.Generator | None, device) -> Noise:
    K = masked_count(T, mask_prob)
    u = torch.rand(B, T + 3 * K, generator=generator, device=device)
    return Noise(u[:, :T], u[:, T : T + K], u[:, T + K : T + 2 * K], u[:, T + 2 * K :])


def mask_window(mask_prob: float) -> int:
    """The official generator's window: one token is masked per int(1 / mask_prob) eligible tokens."""
    return max(1, int(1 / mask_prob))


def _round_half_even(numerator: torch.Tensor, denominator: int) -> torch.Tensor:
    """round(numerator / denominator) in integers, ties to even (Python's round on the exact value)."""
    q, r = numerator // denominator, numerator % denominator
    return q + ((2 * r > denominator) | ((2 * r == denominator) & (q % 2 == 1))).long()


def mask_counts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor, mask_prob: float
) -> torch.Tensor:
    """How many tokens `mask_tokens` masks in each row [B] -> LongTensor [B], in integer arithmetic.

    The rule of microsoft/DeBERTa's NGramMaskGenerator with max_gram=1 (DeBERTa/apps/tasks/mlm_task.py,
    commit 8d492e9, class NGramMaskGenerator from line 41: `mask_window` line 57, `num_to_predict` line 74,
    the window loop lines 78-85, the stop lines 89-96), which rtd_task.py builds for RTD:

        num_to_predict = min(max_preds_per_seq, max(1, int(round(len(tokens) * mask_lm_prob))))

    where len(tokens) counts the whole row with [CLS] and [SEP] (L = non-pad tokens here), then one token
    per window of int(1 / mask_prob) eligible tokens, stopping after num_to_predict: a row of U eligible
    tokens masks min(num_to_predict, ceil(U / window)) (0 when U = 0). mask_prob is taken as the nearest
    fraction a/b with b <= 10**6 (0.15 = 3/20) and round(L * a / b) is computed exactly with ties to
    even, which equals the official float64 `round(L * 0.15)` for every L up to 8192 (tests/test_rtd.py
    checks it). max_preds_per_seq is our slot count K = ceil(mask_prob * T), which never binds."""
    fraction = Fraction(mask_prob).limit_denominator(10**6)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special_ids)  # [B, T]
    n_eligible = eligible.sum(1)  # U [B]
    length = attention_mask.long().sum(1)  # L [B]
    to_predict = _round_half_even(length * fraction.numerator, fraction.denominator).clamp(min=1)
    windows = (n_eligible + mask_window(mask_prob) - 1) // mask_window(mask_prob)  # ceil(U / window)
    return to_predict.minimum(windows)  # [B]


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: torch.Tensor,
    mask_id: int,
    noise: Noise,
    mask_prob: float = 0.15,
    strategy: str = "mask",
    vocab_size: int | None = None,
):
    """Mask `mask_counts` tokens of each row the way microsoft/DeBERTa's NGramMaskGenerator does with
    max_gram=1 (DeBERTa/apps/tasks/mlm_task.py, see `mask_counts`): the row's eligible tokens (neither
    special nor padding) are cut into consecutive windows of int(1 / mask_prob) (6 at 0.15; the last
    may be shorter), one token is drawn uniformly in each window, and the first `mask_counts` windows'
    tokens are masked. Rows without an eligible token keep none.

    Returns (masked_ids [B, T], positions [B, K], valid [B, K]): K = ceil(mask_prob * T) slots per
    row; `valid` is False for the unused slots. The "bert" strategy's random tokens are drawn
    uniformly from the ids in [0, vocab_size) that are not in `special_ids` (vocab_size defaults to
    mask_id + 1); the official generator draws them from its whole vocabulary.
    """
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special_ids)  # [B, T]
    n_chosen = mask_counts(input_ids, attention_mask, special_ids, mask_prob)  # [B]
    B, T = input_ids.shape
    K = noise.mix.shape[1]
    # window of each eligible token: its rank among the row's eligible tokens // window
    window = (eligible.long().cumsum(1) - 1).clamp(min=0) // mask_window(mask_prob)  # [B, T]
    keys = torch.where(eligible, noise.keys, 2.0)  # [B, T], ineligible above every eligible key
    # the smallest key of each window is a uniform draw inside it
    smallest = torch.full((B, T), 2.0, device=keys.device, dtype=keys.dtype)
    smallest = smallest.scatter_reduce(1, window, keys, "amin")  # [B, T]: per window (first columns)
    picked = eligible & (keys == smallest.gather(1, window)) & (window < n_chosen[:, None])  # [B, T]
    # the picked tokens sort first (keys below 1); the other slots are unused
    positions = (keys + (~picked) * 2.0).topk(K, dim=1, largest=False).indices  # [B, K]
    valid = torch.arange(K, device=input_ids.device)[None, :] < n_chosen[:, None]  # [B, K]
    original = input_ids.gather(1, positions)  # [B, K]
    replacement = torch.full_like(original, mask_id)
    if strategy == "bert":  # 80% [MASK], 10% a random non-special token, 10% unchanged
        random_tokens = _random_words(
            special_ids, mask_id + 1 if vocab_size is None else vocab_size, noise.pick
        )
        replacement = torch.where(
            noise.mix < 0.8, replacement, torch.where(noise.mix < 0.9, random_tokens, original)
        )
    elif strategy != "mask":
        raise ValueError(f"mask_strategy={strategy!r}; choose one of {MASK_STRATEGIES}")
    masked_ids = input_ids.scatter(1, positions, torch.where(valid, replacement, original))
    return masked_ids, positions, valid


def _random_words(special_ids: torch.Tensor, vocab_size: int, pick: torch.Tensor) -> torch.Tensor:
    """Uniform draws from the ids in [0, vocab_size) outside special_ids, by rank: the draw is the
    (floor(pick * W) + 1)-th non-special id, W their count. Fixed shapes and no host sync, wherever
    the special ids sit in the vocabulary."""
    is_word = ~torch.isin(torch.arange(vocab_size, device=pick.device), special_ids)  # [V]
    words_up_to = is_word.cumsum(0)  # [V], the number of non-special ids <= each id
    W = words_up_to[-1]
    rank = (pick * W).long().minimum(W - 1)  # [B, K], 0-based rank among the non-special ids
    return torch.searchsorted(words_up_to, rank + 1)  # [B, K], the first id with rank + 1 words up to it


SAMPLE_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF in `sample`


def sample(logits: torch.Tensor, quantile: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One draw per row of softmax(logits / temperature) by inverse CDF: logits [N..., V] in their own
    (compute) dtype, quantile [N...] uniform in [0, 1) -> ids [N...].

    The draw is the first id whose cumulative probability exceeds quantile * total, found in two
    levels so that no [.., V] CDF is built: the weights exp((logits - max) / temperature) are summed in
    fp32 per block of SAMPLE_BLOCK ids, the block is found on the cumulative block sums, and the id on
    the fp32 cumulative sum of that one block. One uniform per row, and each row's draw depends on that
    row alone, so N processes holding slices of a batch draw what one process draws for all of it.
    Passes over [.., V]: the max, the weights (the only [.., V] temporary, in the logits' dtype) and
    the block sums; no softmax copy, no fp32 cumsum over V, no division at temperature 1."""
    *lead, V = logits.shape
    logits, quantile = logits.reshape(-1, V), quantile.reshape(-1)  # [N, V], [N]
    weights = torch.sub(logits, logits.amax(-1, keepdim=True))  # [N, V], <= 0
    if temperature != 1.0:
        weights.mul_(1.0 / temperature)
    weights.exp_()  # unnormalised probabilities, the row's most likely id at 1
    S = SAMPLE_BLOCK
    full = V // S
    block_sums = weights[:, : full * S].view(len(weights), full, S).sum(-1, dtype=torch.float32)  # [N, full]
    if V > full * S:  # the last, shorter block
        tail = weights[:, full * S :].sum(-1, keepdim=True, dtype=torch.float32)  # [N, 1]
        block_sums = torch.cat([block_sums, tail], dim=-1)  # [N, blocks]
    block_cdf = block_sums.cumsum(-1)  # [N, blocks]
    target = (quantile.float() * block_cdf[:, -1]).unsqueeze(-1)  # [N, 1], in [0, total)
    # side="right": the first block whose cumulative sum exceeds the target (never a zero-weight one)
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[-1] - 1)  # [N, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # [N, 1]
    ids = block * S + torch.arange(S, device=logits.device)  # [N, S], the block's ids
    in_vocab = ids < V
    inside = weights.gather(-1, ids.clamp(max=V - 1)).float() * in_vocab  # [N, S]
    inside_cdf = inside.cumsum(-1)  # [N, S]
    # rounding can put the remainder at or past this block's own total: stay on its last positive entry
    rest = torch.minimum(target - before, inside_cdf[:, -1:] * (1 - 2**-20))  # [N, 1]
    offset = torch.searchsorted(inside_cdf, rest, right=True).clamp(max=S - 1)  # [N, 1]
    return (block * S + offset).clamp(max=V - 1).view(lead)  # [N...]


class MLMHead(nn.Module):
    """logits = LN(gelu(Dense(h))) · E_G^T + bias, tied to the generator's word table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), table, self.bias)  # [..., V], bias in the product


class RTDHead(nn.Module):
    """logit_i = w · gelu(W · LN(h_i + h_CLS) + b) + c: every token sees the sentence summary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.gelu(self.dense(self.norm(h + h[:, :1])))).squeeze(-1)  # [B, T]


class EnhancedMaskDecoder(nn.Module):
    """DeBERTa's EMD for the generator: the last layer applied twice more, with query H_{n-1} + P_abs
    and keys/values H_{n-1} (H_0 is the embedding output, so a one-layer generator decodes from it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        init_weights(self.position_embeddings, cfg.initializer_range)

    def forward(self, encoder: Encoder, hidden: list[torch.Tensor], attention_mask) -> torch.Tensor:
        """hidden = [H_0 (embedding output), H_1, ..., H_n], each [B, T, D] -> the decoded [B, T, D]."""
        if len(hidden) != len(encoder.layers) + 1:
            raise ValueError(
                f"the enhanced mask decoder needs the embedding output and every layer's output "
                f"({len(encoder.layers) + 1} tensors), got {len(hidden)}"
            )
        last: Layer = encoder.layers[-1]
        context = hidden[-2]  # keys/values: H_{n-1}
        T = context.shape[1]
        rel, index = encoder.relative_positions(T, context.device)
        key_mask_bias = key_padding_bias(attention_mask, compute_dtype(context))
        query = context + self.position_embeddings.weight[:T]  # [B, T, D]
        for _ in range(2):
            query = last(context, rel, index, key_mask_bias, query=query)
        return query


@dataclass
class RTDOutput:
    loss: torch.Tensor  # L_MLM + rtd_weight * L_RTD
    mlm_loss: torch.Tensor
    rtd_loss: torch.Tensor
    # [B, K, V] at the masked positions, in the compute dtype (bf16 under bf16 autocast): the head's
    # product itself, which the cross-entropy's backward keeps anyway; no fp32 copy is made
    mlm_logits: torch.Tensor
    positions: torch.Tensor  # [B, K] masked positions
    valid: torch.Tensor  # [B, K] which of them are real
    corrupted_ids: torch.Tensor  # [B, T] the discriminator's input
    labels: torch.Tensor  # [B, T] 1 = replaced
    rtd_logits: torch.Tensor  # [B, T]


class RTDModel(nn.Module):
    """Generator + discriminator + heads + the word tables of one sharing mode, in one module
    (so one optimizer and one DDP wrapper cover everything)."""

    def __init__(
        self,
        cfg: ModelConfig,
        sharing: str = "gdes",
        gen_depth_ratio: float = 0.5,
        gen_width_ratio: float = 1.0,
        emd: bool = False,
    ):
        super().__init__()
        mode = lab.sharing.get(sharing)  # raises on an unknown name, listing the known ones
        gen_cfg = generator_config(cfg, gen_depth_ratio, gen_width_ratio)
        if mode.same_width and gen_cfg.hidden_size != cfg.hidden_size:
            raise ValueError(
                f"sharing={sharing!r} needs a generator as wide as the discriminator; set gen_width_ratio=1.0 "
                f"or sharing={lab.sharing.NES.name!r}"
            )
        self.sharing = mode
        self.generator = Encoder(gen_cfg)
        self.discriminator = Encoder(cfg)
        self.mlm_head = MLMHead(gen_cfg)
        self.rtd_head = RTDHead(cfg)
        self.emd = EnhancedMaskDecoder(gen_cfg) if emd else None
        for head in (self.mlm_head, self.rtd_head):
            head.apply(lambda m: init_weights(m, cfg.initializer_range))
        mode.attach(self)  # the word tables of the mode (lab/sharing.py)

    # -- the tables (the sharing mode forms them) -------------------------------------------------

    @property
    def generator_table(self) -> torch.Tensor:
        return self.generator.word_embeddings.weight  # E_G [V, D]

    def discriminator_table(self) -> torch.Tensor:
        """E_D as D uses it (merged for GDES): what gets exported and fine-tuned."""
        return self.sharing.discriminator_table(self)

    def discriminator_own_table(self) -> torch.Tensor | None:
        """The parameter the RTD loss trains on D's side: E_G (es), E_D (nes) or E_delta (gdes)."""
        return self.sharing.rtd_table(self)

    def discriminator_word_embeds(self, ids: torch.Tensor, tied: lab.tied.Tied | None = None) -> torch.Tensor:
        """E_D[ids] [B, T, D]; `tied` is E_G as the current step reads it (forward passes it)."""
        return self.sharing.discriminator_embeds(self, ids, tied)

    def exported_tables(self) -> dict[str, torch.Tensor]:
        """The tables a run snapshots and exports: E_G, E_D as D reads it, and the mode's own extras."""
        tables = {"generator": self.generator_table, "discriminator": self.discriminator_table()}
        return {**tables, **self.sharing.extra_tables(self)}

    def discriminator_state_dict(self) -> dict[str, torch.Tensor]:
        """D's Encoder state dict with the merged table under the normal name (GDES: E_G + E_delta)."""
        state = {
            k: v for k, v in self.discriminator.state_dict().items() if not k.startswith("word_embeddings")
        }
        state["word_embeddings.weight"] = self.discriminator_table().detach().clone()
        return state

    def discriminate(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None, tied: lab.tied.Tied | None = None
    ) -> torch.Tensor:
        """D's RTD logits [B, T] (fp32) on ids [B, T]: the discriminator half of `forward`, alone (the
        held-out fixed corruption set of lab/pretrain/evaluate.py scores D on ids no generator made)."""
        embeds = self.discriminator_word_embeds(ids, tied)  # [B, T, D]
        hidden = self.discriminator(ids, attention_mask, embeds)  # [B, T, D]
        return self.rtd_head(hidden).float()  # [B, T]

    # -- the step --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        special_ids: torch.Tensor,
        mask_id: int,
        rtd_weight: float = RTD_WEIGHT,
        mask_prob: float = 0.15,
        mask_strategy: str = "mask",
        temperature: float = 1.0,
        noise: Noise | None = None,
        totals: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RTDOutput:
        """input_ids [B, T] with [CLS]/[SEP] in place; attention_mask [B, T], or None for a batch
        without padding (the encoders then add no key-padding bias); `noise` from draw_noise (drawn
        here if None). `totals` = (masked tokens, non-pad tokens) of the global batch this one is part
        of: the losses are then this part's sums over those counts (summed over the parts, the global
        means); None: the means over this batch.

        Fixed shapes throughout and no value read back to the host (no .item(), no data-dependent
        branch), so a training step never waits on the device and torch.compile / CUDA graphs apply.
        """
        if noise is None:
            noise = draw_noise(*input_ids.shape, mask_prob, None, input_ids.device)
        encoder_mask = attention_mask  # what the encoders see: None skips the key-padding bias
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1. mask
        masked_ids, positions, valid = mask_tokens(
            input_ids,
            attention_mask,
            special_ids,
            mask_id,
            noise,
            mask_prob,
            mask_strategy,
            vocab_size=self.generator.cfg.vocab_size,
        )
        # 2. generator, MLM loss only at the masked positions (no [B, T, V] logits). E_G is read through
        # `tie`: its lookups' gradients are added into the head's dense one by row (lab/tied.py)
        tied = lab.tied.tie(self.generator_table, masked_ids, self.generator.word_embeddings.padding_idx)
        if self.emd is None:
            gen_hidden = self.generator(masked_ids, encoder_mask, tied.generator_rows)  # [B, T, D]
        else:
            embedded = self.generator.embed(masked_ids, encoder_mask, tied.generator_rows)  # H_0 [B, T, D]
            hidden = [embedded, *self.generator.encode(embedded, encoder_mask)]  # H_0 .. H_n
            gen_hidden = self.emd(self.generator, hidden, encoder_mask)
        masked_hidden = gen_hidden.gather(
            1, positions[..., None].expand(-1, -1, gen_hidden.shape[-1])
        )  # [B, K, D]
        mlm_logits = self.mlm_head(masked_hidden, tied.head)  # [B, K, V], compute dtype
        targets = input_ids.gather(1, positions)  # [B, K]
        # the loss in fp32: under torch.compile the upcast fuses into the cross-entropy's kernels
        mlm_loss = masked_lm_loss(mlm_logits.float(), targets, valid, None if totals is None else totals[0])
        # 3. sample replacements, no gradient through the sample
        with torch.no_grad():
            sampled = sample(mlm_logits, noise.quantile, temperature)  # [B, K]
            corrupted = input_ids.scatter(1, positions, torch.where(valid, sampled, targets))  # [B, T]
            # replaced iff masked AND the sample differs: a sample equal to the original is "original"
            labels = (corrupted != input_ids).float()  # [B, T]
        # 4. discriminator, BCE over every non-pad token ([CLS]/[SEP] included)
        rtd_logits = self.discriminate(corrupted, encoder_mask, tied)  # [B, T]
        rtd_loss = _reduce(
            F.binary_cross_entropy_with_logits(rtd_logits, labels, reduction="none"),
            attention_mask,
            None if totals is None else totals[1],
        )
        return RTDOutput(
            loss=mlm_loss + rtd_weight * rtd_loss,
            mlm_loss=mlm_loss,
            rtd_loss=rtd_loss,
            mlm_logits=mlm_logits,
            positions=positions,
            valid=valid,
            corrupted_ids=corrupted,
            labels=labels,
            rtd_logits=rtd_logits,
        )


def masked_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, total: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of logits [B, K, V] against targets [B, K], summed over the valid [B, K] slots and
    divided by `total` (default: their number, i.e. the mean). The training loop passes the masked
    count of the whole global batch, so micro-batches and processes add up to one global mean.

    The cross-entropy sees a flat [B * K, V] input, so its softmax runs along the last, contiguous
    dimension; the [B, V, K] layout F.cross_entropy wants for 3-d input puts it on a strided middle
    one, which made it half of a GPU step's time."""
    per_slot = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # [B * K]
    return _reduce(per_slot.view_as(targets), valid, total)


def _reduce(values: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
    """The masked mean, or the masked sum over `total` (a count of the global batch)."""
    if total is None:
        return _masked_mean(values, mask)
    return (values * mask.to(values.dtype)).sum() / total.to(values.dtype).clamp(min=1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
