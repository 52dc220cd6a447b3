"""What every training loop here shares: the AdamW parameter groups, the learning-rate schedule, the
mixed-precision context and the `dtype` / `compile` choices. Pre-training (lab/pretrain/loop.py),
fine-tuning (lab/finetune/loop.py) and the benchmark (lab/bench/builders.py) all use these, so the
three cannot drift apart.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lab.model import Layer


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decoupled weight decay on matrices (Linear and Embedding weights,
    GDES's E_delta), none on biases and LayerNorm parameters (every parameter with fewer than two
    dimensions), as in the official DeBERTa optimiser."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over `decay_groups`, with the fused kernel (one pass over all parameters, CPU and CUDA;
    it also keeps the step count on the device, so `optimizer.step()` needs no host sync)."""
    return torch.optim.AdamW(
        decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
    )


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at `step` (0-based): linear warmup to 1 over `warmup` steps, then linear
    decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


DTYPE_NAMES = {"fp32": None, "bf16": torch.bfloat16}  # the command lines' dtype names
DTYPES = ("auto", *DTYPE_NAMES)  # a config's `dtype`: auto = bf16 autocast on CUDA, fp32 on the CPU
COMPILE = ("auto", "on", "off")  # a config's `compile`: auto = torch.compile on CUDA, eager on the CPU
# torch.compile's modes; reduce-overhead captures CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# what torch.compile covers: "layers" compiles the encoder Layer once (regional compilation: every layer
# of the generator and the discriminator runs the same compiled code, parameters as inputs), "model" the
# whole forward with its layers unrolled; "auto" = layers, except in the modes that capture CUDA graphs
# (reduce-overhead, max-autotune), where one graph of the whole step is what removes the launches.
# Measured on a CPU with a cold inductor cache (figures/bench/README.md, "Compile time"): layers took
# 5.0x (xsmall) and 4.5x (base) fewer CPU seconds to compile than model, and its step ran 3-10 % slower
# there, so it wins the short runs (fine-tuning compiles once per seed) and loses past 200-1,200 CPU steps.
COMPILE_SCOPES = ("auto", "layers", "model")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a config's `dtype` (one of DTYPES) means on `device`; None = fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return DTYPE_NAMES[dtype]


def compile_on(compile: str, device: torch.device) -> bool:
    """Whether a config's `compile` (one of COMPILE) means torch.compile on `device`."""
    return compile == "on" or (compile == "auto" and device.type == "cuda")


def compile_scope(scope: str, mode: str | None) -> str:
    """The scope (one of COMPILE_SCOPES) a run compiles with `mode`, "auto" resolved."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {', '.join(COMPILE_SCOPES)}")
    if scope != "auto":
        return scope
    return "model" if mode in ("reduce-overhead", "max-autotune") else "layers"


def compile_model(
    model: nn.Module, mode: str | None = None, backend: str = "inductor", scope: str = "auto"
) -> nn.Module:
    """torch.compile over `scope` (COMPILE_SCOPES); returns what to call instead of `model`. "model": a
    compiled wrapper around the whole forward. "layers": every encoder `Layer` inside `model` compiled in
    place (nn.Module.compile), one compiled code for all of them, since dynamo keys its cache on the
    code of Layer.forward and reads the parameters as inputs; `model` itself is returned, its state
    dict keys unchanged. `mode` None or "default" is torch.compile's default mode."""
    scope = compile_scope(scope, mode)
    mode = None if mode == "default" or backend != "inductor" else mode  # other backends take no mode
    if scope == "model":
        return torch.compile(model, mode=mode, backend=backend)
    layers = [m for m in model.modules() if isinstance(m, Layer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no encoder Layer to compile; use scope='model'")
    for layer in layers:
        layer.compile(mode=mode, backend=backend)
    return model


def autocast(device: torch.device | str, dtype: torch.dtype | str | None):
    """bf16 (or any low-precision) autocast on `device`, or nothing when `dtype` is None / fp32; `dtype`
    may be a torch dtype or a name of DTYPE_NAMES. Losses and softmaxes that must stay in fp32 are cast
    explicitly by the callers."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
    device_type = torch.device(device).type
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA; a no-op elsewhere): only where a loop reads values anyway (evaluation,
    the probe, checkpoints, warm-up steps) or a benchmark times a call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
