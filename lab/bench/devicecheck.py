"""Correctness on the device, against float64 references: the RTD step's losses and their gradients
against the textbook formulas, and lab's Encoder (per attention implementation) against transformers'
DebertaV2Model, forward and every parameter's gradient, in fp32 and bf16 on a padded batch.

The CPU tests hold the model to these references already; these checks repeat them where the kernels
differ (CUDA, TF32, bf16, flex attention's compiled kernels). `python -m lab gpucheck` runs them in
its correctness part. Each check returns a dict of errors (`_errors`) and an overall "ok".
"""

from __future__ import annotations

import contextlib

import torch

from lab.training import autocast

Shape = tuple[str, int, int, int]  # preset, layers, T, batch (one row padded by a quarter)


def _padded_batch(vocab: int, B: int, T: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1 % B, T - T // 4 :] = 0  # one row a quarter padding
    lengths = mask.sum(1)
    ids[:, 0] = 1  # [CLS]
    ids[torch.arange(B), lengths - 1] = 2  # [SEP]
    ids[mask == 0] = 0  # [PAD]
    return ids.to(device), mask.to(device)


def _errors(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    """max |ours - ref|, that over max |ref|, and ||ours - ref|| / ||ref||, in float64."""
    diff = ours.double() - reference.double()
    scale = reference.double().abs().max().clamp(min=1e-30)
    return {
        "max_abs": diff.abs().max().item(),
        "max_rel": (diff.abs().max() / scale).item(),
        "norm_rel": (diff.norm() / reference.double().norm().clamp(min=1e-30)).item(),
        "finite": bool(torch.isfinite(ours).all()),
    }


# Tolerances of the checks. fp32 against float64: 1e-5 on the losses and the encoder's hidden
# states (what the CPU tests hold the reference path to), 1e-5 relative on the gradients' norm.
# bf16 operands keep ~3 significant digits, and errors grow through the layers: 3e-2.
TOLERANCE = {"fp32": {"forward": 1e-5, "grad": 1e-5}, "bf16": {"forward": 3e-2, "grad": 3e-2}}


def check_rtd_loss(device, shape: Shape, dtype: str) -> dict:
    """The RTD step's losses (and their gradients w.r.t. the logits) against the textbook formulas in
    float64 on the same logits: MLM = mean over real masked slots of logsumexp - target logit; RTD =
    mean over non-pad tokens of the binary cross-entropy with logits."""
    from lab.model import preset
    from lab.pretrain.loop import PretrainConfig
    from lab.rtd import RTDModel, draw_noise

    rtd_weight = PretrainConfig().rtd_weight  # the loop's default weight (50)
    name, layers, T, B = shape
    cfg = preset(
        name,
        vocab_size=1000,
        num_layers=layers,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        max_seq_len=max(512, T),
    )
    torch.manual_seed(0)
    model = RTDModel(cfg, "gdes").to(device)
    ids, mask = _padded_batch(cfg.vocab_size, B, T, device)
    special = torch.tensor([0, 1, 2, 3], device=device)
    noise = draw_noise(B, T, 0.15, torch.Generator(device=device).manual_seed(0), device)
    with autocast(device, dtype):
        out = model(ids, mask, special, cfg.vocab_size - 1, rtd_weight=rtd_weight, noise=noise)
    grads = torch.autograd.grad(out.loss, [out.mlm_logits, out.rtd_logits])

    logits = out.mlm_logits.detach().double().requires_grad_()
    rtd_logits = out.rtd_logits.detach().double().requires_grad_()
    targets = ids.gather(1, out.positions)  # [B, K]
    valid = out.valid.double()
    nll = logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)  # [B, K]
    mlm = (nll * valid).sum() / valid.sum()
    y, x, keep = out.labels.double(), rtd_logits, mask.double()
    bce = x.clamp(min=0) - x * y + torch.log1p(torch.exp(-x.abs()))  # [B, T]
    rtd = (bce * keep).sum() / keep.sum()
    total = mlm + rtd_weight * rtd
    ref_grads = torch.autograd.grad(total, [logits, rtd_logits])
    result = {
        "T": T,
        "masked": int(out.valid.sum()),
        "mlm_loss": _errors(out.mlm_loss.detach(), mlm.detach()),
        "rtd_loss": _errors(out.rtd_loss.detach(), rtd.detach()),
        "loss": _errors(out.loss.detach(), total.detach()),
        "grad_mlm_logits": _errors(grads[0], ref_grads[0]),
        "grad_rtd_logits": _errors(grads[1], ref_grads[1]),
    }
    # the formulas act on fp32 logits in both dtypes (the step casts them up), so fp32 tolerances hold
    tol = TOLERANCE["fp32"]
    result["ok"] = all(
        v["finite"] and v["max_rel"] < tol["forward" if "loss" in k else "grad"]
        for k, v in result.items()
        if isinstance(v, dict)
    )
    return result


def check_encoder(impl: str | None, dtype: str, device, shape: Shape) -> dict:
    """lab's Encoder with one attention implementation against transformers' DebertaV2Model in
    float64 with the same weights: hidden states on non-pad rows, and the gradient of every parameter
    of a loss over non-pad rows (pad-query rows differ between implementations by design and feed
    nothing else)."""
    from transformers import DebertaV2Config, DebertaV2Model

    from lab.hf import to_hf_config, to_hf_state_dict
    from lab.model import Encoder, preset

    name, layers, T, B = shape
    overrides = {"attention_impl": impl} if impl is not None else {}
    cfg = preset(name, vocab_size=1000, num_layers=layers, hidden_dropout=0.0, attention_dropout=0.0,
                 max_seq_len=max(512, T), **overrides)  # fmt: skip
    torch.manual_seed(0)
    ours = Encoder(cfg).eval()
    reference = DebertaV2Model(DebertaV2Config(**to_hf_config(cfg))).eval()
    weights = to_hf_state_dict(dict(ours.named_parameters()))
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    if unexpected or any(n in dict(reference.named_parameters()) for n in missing):
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    reference = reference.double().to(device)
    ours = ours.to(device)
    ids, mask = _padded_batch(cfg.vocab_size, B, T, device)
    projection = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    keep = mask.bool()

    def run(model, cast):
        with cast:
            h = (
                model(ids, mask)
                if isinstance(model, Encoder)
                else model(input_ids=ids, attention_mask=mask)[0]
            )
        loss = (h.double() * projection.double())[keep].sum()
        loss.backward()
        return h.detach()[keep]  # [non-pad tokens, D]

    hidden = run(ours, autocast(device, dtype))
    ref_hidden = run(reference, contextlib.nullcontext())
    ref_params = dict(reference.named_parameters())
    pairs = [(p.grad, ref_params[n].grad) for n, p in to_hf_state_dict(dict(ours.named_parameters())).items()]
    pairs = [(a, b) for a, b in pairs if b is not None]
    grads = torch.cat(
        [a.flatten().double() if a is not None else torch.zeros_like(b).flatten() for a, b in pairs]
    )
    ref_grads = torch.cat([b.flatten() for _, b in pairs])
    tol = TOLERANCE[dtype]
    result = {
        "impl": impl or "default",
        "dtype": dtype,
        "T": T,
        "forward": _errors(hidden, ref_hidden),
        "grad": _errors(grads, ref_grads),
        "parameters": len(pairs),
    }
    result["ok"] = (
        result["forward"]["finite"]
        and result["grad"]["finite"]
        and result["forward"]["max_abs" if dtype == "fp32" else "norm_rel"] < tol["forward"]
        and result["grad"]["norm_rel"] < tol["grad"]
    )
    return result


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls without TF32 while checking against float64 (a loop may have enabled TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def describe_check(v: dict) -> str:
    """One line per check for the log and the summary: its largest errors and ok / FAIL."""
    if "error" in v:
        return f"ERROR {v['error'][:80]}"
    if "forward" in v:
        return (
            f"fwd max {v['forward']['max_abs']:.1e} rel {v['forward']['norm_rel']:.1e}, "
            f"grad rel {v['grad']['norm_rel']:.1e} {'ok' if v['ok'] else 'FAIL'}"
        )
    return (
        f"loss {v['loss']['max_rel']:.1e}, grads {max(v['grad_mlm_logits']['max_rel'], v['grad_rtd_logits']['max_rel']):.1e} "
        f"{'ok' if v['ok'] else 'FAIL'}"
    )
