"""What the benchmark times (`python -m lab bench`, lab/bench/benchmark.py): each builder returns a zero-argument
callable that does the work once, on fixed random inputs of a given preset, length T, batch B and dtype.

  build_lab_step   one RTD training step of lab's `RTDModel` (forward, backward, AdamW), optionally
                   under torch.compile
  HFPeer           the ELECTRA-style pair as a `transformers` user builds it, and build_hf_step its step
  build_encoder    Encoder / DebertaV2Model forward + backward of a scalar loss
  build_attention  one disentangled attention layer forward + backward, lab's or transformers'
  build            any of these from a plain dict, so a subprocess can rebuild it (the memory probe)
  rtd_step_flops   the matmul FLOPs of lab's step, counted by hand
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lab.model import DisentangledSelfAttention, Encoder, available_attention_impls, preset, relative_index
from lab.rtd import RTD_WEIGHT, RTDModel, generator_config, masked_count
from lab.training import adamw, autocast, compile_model

SPECIAL_IDS = (0, 1, 2, 3)  # [PAD] [CLS] [SEP] [UNK]


def model_config(name: str, T: int, vocab: int | None = None, attention_impl: str | None = None):
    """The preset `name`, able to take T tokens."""
    # longer inputs raise max_seq_len only; the relative buckets (and so the attention) are unchanged
    overrides = {"max_seq_len": max(512, T)}
    if vocab is not None:
        overrides["vocab_size"] = vocab
    if attention_impl is not None:
        overrides["attention_impl"] = attention_impl
    return preset(name, **overrides)


def attention_impls(device: torch.device) -> list[str]:
    """lab's attention implementations usable on `device`."""
    return available_attention_impls(device)


def default_attention_impl() -> str:
    return preset("tiny").attention_impl


def _batch(cfg, B: int, T: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_IDS), cfg.vocab_size - 1, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    return ids.to(device), torch.ones(B, T, dtype=torch.long, device=device)


def _optimizer(model: nn.Module):
    # the loops' AdamW (fused: one pass over every parameter, CPU and CUDA)
    return adamw(model, lr=1e-4, weight_decay=0.01)


def build_lab_step(
    name: str,
    T: int,
    B: int,
    dtype: str,
    device: torch.device,
    sharing: str,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    compile_scope: str = "auto",
):
    cfg = model_config(name, T)
    model = RTDModel(cfg, sharing=sharing).to(device).train()
    opt = _optimizer(model)
    ids, mask = _batch(cfg, B, T, device)
    special = torch.tensor(SPECIAL_IDS, device=device)
    mask_id = cfg.vocab_size - 1
    forward = model
    if compile_mode is not None:
        forward = compile_model(model, compile_mode, compile_backend, compile_scope)

    def step():
        with autocast(device, dtype):
            # the batch has no padding: attention_mask=None skips the key-padding bias
            loss = forward(ids, None, special, mask_id, rtd_weight=RTD_WEIGHT).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class HFPeer(nn.Module):
    """The ELECTRA-style pair as a transformers user builds it (ES: one word table)."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model

        from lab.hf import to_hf_config

        gen_cfg = generator_config(cfg, 0.5, 1.0)
        self.generator = DebertaV2ForMaskedLM(DebertaV2Config(**to_hf_config(gen_cfg)))
        self.discriminator = DebertaV2Model(DebertaV2Config(**to_hf_config(cfg)))
        self.rtd_head = nn.Linear(cfg.hidden_size, 1)
        self.discriminator.embeddings.word_embeddings = self.generator.deberta.embeddings.word_embeddings

    def forward(self, ids, mask, mask_id):
        vocab = self.generator.config.vocab_size
        # 15% of the tokens between [CLS] and [SEP] (the batch has no padding), all set to [MASK]
        B, T = ids.shape
        K = max(1, round(0.15 * (T - 2)))
        positions = 1 + torch.rand(B, T - 2, device=ids.device).topk(K, dim=1).indices  # [B, K]
        masked_ids = ids.scatter(1, positions, mask_id)
        targets = ids.gather(1, positions)
        labels = torch.full_like(ids, -100).scatter(1, positions, targets)
        out = self.generator(input_ids=masked_ids, attention_mask=mask, labels=labels)  # logits [B, T, V]
        with torch.no_grad():
            logits = out.logits.gather(1, positions[..., None].expand(-1, -1, vocab)).float()  # [B, K, V]
            sampled = torch.multinomial(torch.softmax(logits, -1).view(-1, vocab), 1).view_as(targets)
            corrupted = ids.scatter(1, positions, sampled)
            replaced = (corrupted != ids).float()
        hidden = self.discriminator(input_ids=corrupted, attention_mask=mask).last_hidden_state
        rtd_logits = self.rtd_head(hidden).squeeze(-1).float()
        return out.loss + RTD_WEIGHT * F.binary_cross_entropy_with_logits(rtd_logits, replaced)


def build_hf_step(name: str, T: int, B: int, dtype: str, device: torch.device):
    cfg = model_config(name, T)
    torch.manual_seed(0)
    model = HFPeer(cfg).to(device).train()
    opt = _optimizer(model)
    ids, mask = _batch(cfg, B, T, device)

    def step():
        with autocast(device, dtype):
            loss = model(ids, mask, cfg.vocab_size - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_encoder(impl: str, name: str, T: int, B: int, dtype: str, device: torch.device):
    cfg = model_config(name, T)
    if impl == "lab":
        model = Encoder(cfg)
    else:
        from transformers import DebertaV2Config, DebertaV2Model

        from lab.hf import to_hf_config

        model = DebertaV2Model(DebertaV2Config(**to_hf_config(cfg)))
        if impl == "disentangled-flash":
            from disentangled_flash import optimize_deberta  # optional, CUDA only

            optimize_deberta(model, sequence_lengths=[T])
    model = model.to(device).train()
    ids, mask = _batch(cfg, B, T, device)

    def step():
        with autocast(device, dtype):
            h = (
                model(ids, mask)
                if impl == "lab"
                else model(input_ids=ids, attention_mask=mask).last_hidden_state
            )
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def build_attention(impl: str, name: str, T: int, B: int, dtype: str, device: torch.device):
    """impl: "hf", "lab" (the model's default implementation) or "lab-<attention_impl>". Every
    candidate runs without attention dropout, since FlexAttention has none (like for like)."""
    attention_impl = impl.removeprefix("lab-") if impl.startswith("lab-") else None
    cfg = dataclasses.replace(model_config(name, T, attention_impl=attention_impl), attention_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, cfg.hidden_size, generator=g).to(device).requires_grad_()
    table = torch.randn(2 * cfg.position_buckets, cfg.hidden_size, generator=g).to(device).requires_grad_()
    if impl != "hf":
        attention = DisentangledSelfAttention(cfg).to(device).train()
        lo, R, index = relative_index(T, cfg.position_buckets, cfg.max_relative_positions, device)
        key_mask_bias = torch.zeros(B, 1, 1, T, device=device)

        def run():
            return attention(h, table[lo : lo + R], index, key_mask_bias)
    else:
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import (
            DisentangledSelfAttention as HFAttention,
        )
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        from lab.hf import to_hf_config

        attention = HFAttention(DebertaV2Config(**to_hf_config(cfg))).to(device).train()
        rel_pos = build_relative_position(
            h, h, bucket_size=cfg.position_buckets, max_position=cfg.max_relative_positions
        )
        pair_mask = torch.ones(B, 1, T, T, dtype=torch.bool, device=device)

        def run():
            return attention(h, pair_mask, relative_pos=rel_pos, rel_embeddings=table)[0]

    def step():
        with autocast(device, dtype):
            out = run()
        out.float().square().mean().backward()
        attention.zero_grad(set_to_none=True)
        h.grad = table.grad = None

    return step


def build(spec: dict, device: torch.device):
    """One candidate from a plain dict (so a subprocess can rebuild it for the memory probe)."""
    kind, impl, args = spec["kind"], spec["impl"], (spec["preset"], spec["T"], spec["batch"], spec["dtype"])
    if kind == "step":
        if impl == "hf":
            return build_hf_step(*args, device)
        return build_lab_step(*args, device, sharing=impl.removeprefix("lab-"))
    if kind == "encoder":
        return build_encoder(impl, *args, device)
    if kind == "attention":
        return build_attention(impl, *args, device)
    raise ValueError(f"unknown benchmark kind {kind!r}")


def rtd_step_flops(cfg, B: int, T: int, mask_prob: float = 0.15, gen_depth_ratio: float = 0.5) -> int:
    """Matmul FLOPs of one lab RTD training step, written out (what FlopCounterMode should count).

    Per encoder layer (forward): Q, K, V, output projections 4 * 2BTD^2; feed-forward 2 * 2BTDF;
    the position projections of the R reachable table rows 2 * 2RD^2; c2p and p2c scores against
    every row 2 * 2BHTR*Dh = 2 * 2BTRD; content scores and the weighted sum 2 * 2BT^2 D. Heads:
    the MLM head on the K masked positions (dense 2BKD^2, logits 2BKDV) and the RTD head on every
    token (dense 2BTD^2, classifier 2BTD). The backward pass computes two products per forward one
    (every operand requires grad), so the step is 3x the forward.
    """
    D, F_, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    _, R, _ = relative_index(T, cfg.position_buckets, cfg.max_relative_positions)
    per_layer = 4 * 2 * B * T * D * D + 2 * 2 * B * T * D * F_ + 2 * 2 * R * D * D
    per_layer += 2 * 2 * B * T * R * D + 2 * 2 * B * T * T * D
    layers = cfg.num_layers + max(1, round(cfg.num_layers * gen_depth_ratio))
    K = masked_count(T, mask_prob)
    heads = 2 * B * K * D * D + 2 * B * K * D * V + 2 * B * T * D * D + 2 * B * T * D
    return 3 * (layers * per_layer + heads)
