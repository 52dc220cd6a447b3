"""One prepared run on a lent GPU: the benchmark rows, the CUDA correctness checks, a short pre-training
that counts host syncs, a one-process torchrun, and a GLUE fine-tune of the short run's discriminator.

    python -m lab gpucheck --prepare-data                          # here: $LAB_DATA_DIR -> .gpudata/
    PYTHONPATH=. python3 -m lab gpucheck --out $OUT --data .gpudata   # there (or `make gpu-check OUT=...`)
    python -m lab gpucheck --smoke --out runs/gpucheck-smoke --data DIR   # CPU, tiny sizes, ~a minute

The GPU machine has the system `python3` with CUDA torch, transformers, sentencepiece, safetensors,
scikit-learn, scipy and tqdm, and no network: nothing here (or in the lab modules it runs) imports
anything else at module level, and the run records which optional packages got imported at all. The
data does not travel by itself: `--prepare-data` copies WikiText-2's training file and the GLUE tasks
it uses into the git-ignored `.gpudata/`, which goes to the GPU machine together with the checkout.
Outputs: DIR/gpucheck.json (every part's result), DIR/gpucheck.csv (the benchmark's rows, lab.bench's
format), DIR/summary.txt (one screen, also printed) and DIR/gpucheck.log; they are rewritten after
every part, so an interrupted run still leaves what it measured. Commit them as
figures/bench/gpu_<device>.{json,csv,txt}. Scratch files (corpora, runs, caches) go to --work (default
a temporary folder), never into DIR.

Parts, in order, each with a time budget on the GPU (`PARTS`); a part is skipped with a note when its
budget no longer fits in the total (`--budget-s`, 480 s), is stopped if it overruns by half, and a
failing part records its error while the rest continue:
  env          device, versions, the matmul peak at 8192^3 (bf16, fp32), attention implementations
  correctness  on the device: the RTD losses against their formula in float64 (values and gradients of
               the logits), and every attention implementation inside the Encoder against
               transformers' DebertaV2Model in float64 (forward on non-pad rows and every parameter's
               gradient), fp32 and bf16, padded batch, T = 512
  step         `base`, T=512, bf16, batch 32 RTD step: lab-es, lab-gdes, the transformers peer; MFU
  attention    the attention alone at T = 512, 1024, 2048 per lab implementation, against HF's layer
               (and, when the `disentangled-flash` package is importable, the encoder at T = 512 with
               that package's attention as a peer)
  pretrain     `xsmall` pre-training tokens/s (T=128, batch 128, vocab 32k) through train() itself
  short_run    `xsmall` on WikiText-2 with torch.cuda.set_sync_debug_mode("warn"): host syncs counted
               per optimizer step, steady-state steps (not the first two, not log / eval / checkpoint
               steps) apart from the rest, with the lines that caused them
  torchrun     `torchrun --standalone --nproc_per_node 1 -m lab pretrain` on the device (NCCL)
  finetune     GLUE (SST-2, else CoLA) fine-tune of short_run's discriminator (pretrain's if short_run
               failed): dev metric, examples/s
  compile:*    the base step under torch.compile, one part per mode (default, reduce-overhead,
               max-autotune-no-cudagraphs): compile time and steady ms, to choose the loop's default
The smoke mode runs every part on the CPU at tiny sizes; there the sync counter wraps the Tensor
methods that synchronise on a GPU (item, tolist, cpu, __bool__, __float__, __int__, __index__), and
torchrun uses gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lab import bench
from lab.util import atomic_write_bytes, atomic_write_json, data_dir, pick_device, read_jsonl

OPTIONAL_MODULES = ("matplotlib", "seaborn", "papermill", "IPython", "ipywidgets", "jupyter", "datasets")
DATA_FILES = {  # what the device needs, relative to $LAB_DATA_DIR; glue tasks are optional one by one
    "wikitext-2/wiki.train.tokens": True,
    "glue/SST-2/train.tsv": False,
    "glue/SST-2/dev.tsv": False,
    "glue/CoLA/train.tsv": False,
    "glue/CoLA/dev.tsv": False,
}
GLUE_TASKS = (("sst2", "SST-2"), ("cola", "CoLA"))  # fine-tune the first one present


# ----------------------------------------------------------------------------------------------
# Sizes: the GPU run and the CPU smoke run differ only here


@dataclass(frozen=True)
class Sizes:
    peak_n: int  # matmul size of the peak measurement
    correctness: tuple[str, int, int, int]  # preset, layers, T, batch (one row padded by a quarter)
    step: tuple[str, int, int, str]  # preset, T, batch, dtype
    attention: tuple[str, tuple[int, ...], int, str]  # preset, T values, tokens per call, dtype
    pretrain: bench.PretrainBench
    short_run: bench.PretrainBench  # on WikiText-2
    torchrun: bench.PretrainBench
    finetune: bench.FinetuneBench
    compile_backend: str
    warmup: int
    repeats: int
    memory: bool  # peak memory of the steps (in-process on CUDA; subprocesses on CPU, off in smoke)


GPU = Sizes(
    peak_n=8192,
    correctness=("xsmall", 2, 512, 3),
    step=("base", 512, 32, "bf16"),
    attention=("base", (512, 1024, 2048), 16384, "bf16"),
    pretrain=bench.PretrainBench("xsmall", 32000, 128, 128, steps=30, log_every=10),
    short_run=bench.PretrainBench("xsmall", 32000, 128, 128, steps=30, log_every=10),
    torchrun=bench.PretrainBench("xsmall", 32000, 128, 32, steps=8, log_every=4),
    finetune=bench.FinetuneBench("xsmall", 32000, examples=1024, eval_examples=872, batch=32, seq_len=128),
    compile_backend="inductor",
    warmup=2,
    repeats=8,
    memory=True,
)
SMOKE = Sizes(
    peak_n=256,
    correctness=("tiny", 2, 260, 3),
    step=("tiny", 32, 2, "fp32"),
    attention=("tiny", (32, 64), 64, "fp32"),
    pretrain=bench.PretrainBench("tiny", 300, 32, 8, steps=4, log_every=2),
    short_run=bench.PretrainBench("tiny", 300, 32, 8, steps=6, log_every=3),
    torchrun=bench.PretrainBench("tiny", 300, 32, 8, steps=2, log_every=1),
    finetune=bench.FinetuneBench("tiny", 300, examples=32, eval_examples=16, batch=16, seq_len=32, epochs=2),
    compile_backend="eager",  # dynamo's tracing without code generation: the CPU has no time for more
    warmup=1,
    repeats=2,
    memory=False,
)


@dataclass
class Check:
    device: torch.device
    sizes: Sizes
    data: Path
    work: Path
    smoke: bool
    log: Callable[[str], None] = print
    peaks: dict[str, float] = field(default_factory=dict)  # dtype -> FLOP/s
    state: dict = field(default_factory=dict)  # what one part hands to a later one
    partial: dict = field(default_factory=dict)  # what the running part has so far (kept if it stops)


# ----------------------------------------------------------------------------------------------
# Host-sync counting


class SyncCounter:
    """Host-device synchronisations per optimizer step, with the Python line that caused each.

    CUDA: torch.cuda.set_sync_debug_mode("warn") makes every synchronising call warn; the warnings are
    recorded (their filename:lineno is the calling line). CPU stand-in: the Tensor methods that
    synchronise when the tensor is on a GPU are wrapped and counted the same way. A global optimizer
    step hook splits the record into buckets: bucket k holds what ran between the k-th and the
    (k+1)-th optimizer.step() returning — step k's logging / checkpoint, step k's evaluation, and the
    forward, backward and update of the next step.
    """

    CPU_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, device: torch.device):
        self.device = device
        self.buckets: list[list[str]] = [[]]
        self._stack = contextlib.ExitStack()
        self._caught: list = []
        self._seen = 0

    def __enter__(self) -> SyncCounter:
        handle = register_optimizer_step_post_hook(self._on_step)
        self._stack.callback(handle.remove)
        if self.device.type == "cuda":
            self._caught = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, 0)
        else:
            for name in self.CPU_METHODS:
                original = getattr(torch.Tensor, name)
                own = name in vars(torch.Tensor)  # else inherited from the C base class: delete to restore
                setattr(torch.Tensor, name, self._counting(name, original))
                if own:
                    self._stack.callback(setattr, torch.Tensor, name, original)
                else:
                    self._stack.callback(delattr, torch.Tensor, name)
        return self

    def __exit__(self, *exc) -> None:
        self._flush()
        self._stack.close()

    def _counting(self, name: str, original):
        buckets = self.buckets

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            buckets[-1].append(f"{_short(caller.f_code.co_filename)}:{caller.f_lineno} ({name})")
            return original(tensor, *args, **kwargs)

        return counted

    def _flush(self) -> None:
        if self.device.type == "cuda":
            new = self._caught[self._seen :]
            self._seen = len(self._caught)
            self.buckets[-1] += [
                f"{_short(w.filename)}:{w.lineno}" for w in new if "synchronizing" in str(w.message)
            ]

    def _on_step(self, optimizer, args, kwargs) -> None:
        self._flush()
        self.buckets.append([])

    def report(self, steps: int, log_every: int, eval_every: int, ckpt_every: int, warmup: int = 2) -> dict:
        """Totals over steady buckets (from `warmup` on, not multiples of the log / eval / checkpoint
        intervals, not the last) and over the rest, with the most frequent call sites of each."""
        steady = [
            k
            for k in range(warmup, min(steps, len(self.buckets)))
            if k % log_every and k % eval_every and k % ckpt_every
        ]
        steady_events = [e for k in steady for e in self.buckets[k]]
        other_events = [e for k, b in enumerate(self.buckets) if k not in steady for e in b]
        return {
            "method": "set_sync_debug_mode('warn')"
            if self.device.type == "cuda"
            else "CPU stand-in: " + ", ".join(self.CPU_METHODS),
            "optimizer_steps": len(self.buckets) - 1,
            "warmup_buckets": warmup,
            "steady_steps": len(steady),
            "syncs_in_steady_steps": len(steady_events),
            "syncs_per_steady_step": len(steady_events) / max(1, len(steady)),
            "steady_sites": Counter(steady_events).most_common(8),
            "syncs_elsewhere": len(other_events),
            "other_sites": Counter(other_events).most_common(8),
        }


def _short(filename: str) -> str:
    """lab/x.py, torch/y.py, ... instead of the absolute path."""
    parts = Path(filename).parts
    for anchor in ("lab", "torch", "transformers"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return Path(filename).name


# ----------------------------------------------------------------------------------------------
# Correctness on the device


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


def check_rtd_loss(device, sizes: Sizes, dtype: str) -> dict:
    """The RTD step's losses (and their gradients w.r.t. the logits) against the textbook formulas in
    float64 on the same logits: MLM = mean over real masked slots of logsumexp - target logit; RTD =
    mean over non-pad tokens of the binary cross-entropy with logits."""
    from lab.model import preset
    from lab.rtd import RTDModel, draw_noise

    name, layers, T, B = sizes.correctness
    cfg = preset(name, vocab_size=1000, num_layers=layers, hidden_dropout=0.0, attention_dropout=0.0,
                 max_seq_len=max(512, T))  # fmt: skip
    torch.manual_seed(0)
    model = RTDModel(cfg, "gdes").to(device)
    ids, mask = _padded_batch(cfg.vocab_size, B, T, device)
    special = torch.tensor([0, 1, 2, 3], device=device)
    noise = draw_noise(B, T, 0.15, torch.Generator(device=device).manual_seed(0), device)
    with bench._autocast(device, dtype):
        out = model(ids, mask, special, cfg.vocab_size - 1, rtd_weight=bench.RTD_WEIGHT, noise=noise)
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
    total = mlm + bench.RTD_WEIGHT * rtd
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


def check_encoder(impl: str | None, dtype: str, device, sizes: Sizes) -> dict:
    """lab's Encoder with one attention implementation against transformers' DebertaV2Model in
    float64 with the same weights: hidden states on non-pad rows, and the gradient of every parameter
    of a loss over non-pad rows (pad-query rows differ between implementations by design and feed
    nothing else). impl "disentangled-flash": transformers' model with that package's attention."""
    from transformers import DebertaV2Config, DebertaV2Model

    from lab.hf import to_hf_config, to_hf_state_dict
    from lab.model import Encoder, preset

    name, layers, T, B = sizes.correctness
    overrides = {"attention_impl": impl} if impl not in (None, "disentangled-flash") else {}
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
    if impl == "disentangled-flash":
        from disentangled_flash import optimize_deberta  # optional, CUDA only

        ours = DebertaV2Model(DebertaV2Config(**to_hf_config(cfg))).eval()
        ours.load_state_dict(weights, strict=False)
        optimize_deberta(ours, sequence_lengths=[T])
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

    hidden = run(ours, bench._autocast(device, dtype))
    ref_hidden = run(reference, contextlib.nullcontext())
    ref_params = dict(reference.named_parameters())
    if isinstance(ours, Encoder):
        pairs = [
            (p.grad, ref_params[n].grad) for n, p in to_hf_state_dict(dict(ours.named_parameters())).items()
        ]
    else:
        pairs = [(p.grad, ref_params[n].grad) for n, p in ours.named_parameters() if n in ref_params]
    pairs = [(a, b) for a, b in pairs if b is not None]
    grads = torch.cat(
        [a.flatten().double() if a is not None else torch.zeros_like(b).flatten() for a, b in pairs]
    )
    ref_grads = torch.cat([b.flatten() for _, b in pairs])
    tol = TOLERANCE[dtype]
    result = {"impl": impl or "default", "dtype": dtype, "T": T, "forward": _errors(hidden, ref_hidden),
              "grad": _errors(grads, ref_grads), "parameters": len(pairs)}  # fmt: skip
    result["ok"] = (
        result["forward"]["finite"]
        and result["grad"]["finite"]
        and result["forward"]["max_abs" if dtype == "fp32" else "norm_rel"] < tol["forward"]
        and result["grad"]["norm_rel"] < tol["grad"]
    )
    return result


@contextlib.contextmanager
def _exact_fp32():
    """fp32 matmuls without TF32 while checking against float64 (a loop may have enabled TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------------------------------
# The parts


def part_env(c: Check) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(c.device),
        "device_name": torch.cuda.get_device_name(c.device) if c.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }
    for module in ("transformers", "triton", "sentencepiece"):
        info[module] = _version(module)
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        info["capability"] = f"sm_{props.major}{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    with _exact_fp32():
        c.peaks = {dtype: bench.matmul_peak(dtype, c.device, c.sizes.peak_n) for dtype in ("bf16", "fp32")}
    info["matmul_peak_n"] = c.sizes.peak_n
    info["matmul_peak_tflops"] = {d: p / 1e12 for d, p in c.peaks.items()}
    info["attention_impls"] = [i or "default" for i in bench.attention_impls(c.device)]
    info["default_attention_impl"] = bench.default_attention_impl()
    info["disentangled_flash"] = _version("disentangled_flash")
    from lab.pretrain import PretrainConfig

    defaults = PretrainConfig()
    info["pretrain_compile_default"] = (
        f"{getattr(defaults, 'compile', '?')}/{getattr(defaults, 'compile_mode', '?')}"
    )
    c.log(f"{info['device_name']}: bf16 {_rate(c.peaks['bf16'])}, fp32 {_rate(c.peaks['fp32'])} at {c.sizes.peak_n}^3; "
          f"attention {info['attention_impls']}")  # fmt: skip
    return info


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def _version(module: str) -> str | None:
    from importlib import metadata
    from importlib.util import find_spec

    if find_spec(module) is None:
        return None
    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "installed"


def part_correctness(c: Check) -> dict:
    checks = c.partial.setdefault("checks", {})
    dtypes = ("fp32", "bf16") if c.device.type == "cuda" else ("fp32",)
    with _exact_fp32():
        for dtype in dtypes:
            checks[f"rtd_loss/{dtype}"] = check_rtd_loss(c.device, c.sizes, dtype)
        impls = bench.attention_impls(c.device)
        if c.device.type == "cuda" and _version("disentangled_flash"):
            impls.append("disentangled-flash")
        for impl in impls:
            for dtype in dtypes if impl != "disentangled-flash" else ("bf16",):
                key = f"encoder[{impl or 'default'}]/{dtype}"
                try:
                    checks[key] = check_encoder(impl, dtype, c.device, c.sizes)
                except Exception as err:  # one implementation failing must not hide the others
                    checks[key] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    for key, value in checks.items():
        c.log(f"  {key:<32} {_describe_check(value)}")
    return {"checks": checks, "ok": all(v["ok"] for v in checks.values())}


def _describe_check(v: dict) -> str:
    if "error" in v:
        return f"ERROR {v['error'][:80]}"
    if "forward" in v:
        return (f"fwd max {v['forward']['max_abs']:.1e} rel {v['forward']['norm_rel']:.1e}, "
                f"grad rel {v['grad']['norm_rel']:.1e} {'ok' if v['ok'] else 'FAIL'}")  # fmt: skip
    return (f"loss {v['loss']['max_rel']:.1e}, grads {max(v['grad_mlm_logits']['max_rel'], v['grad_rtd_logits']['max_rel']):.1e} "
            f"{'ok' if v['ok'] else 'FAIL'}")  # fmt: skip


def _bench_config(c: Check, **kw) -> bench.BenchConfig:
    return bench.BenchConfig(warmup=c.sizes.warmup, repeats=c.sizes.repeats, memory=c.sizes.memory, **kw)


def part_step(c: Check) -> dict:
    name, T, B, dtype = c.sizes.step
    bc = _bench_config(c, presets=(name,), dtypes=(dtype,), step_seq_lens=(T,), tokens_per_step=B * T,
                       kinds=("step",))  # fmt: skip
    c.log(bench.HEADER)
    rows = bench.compare("step", name, dtype, T, bc, c.device, c.peaks[dtype], c.log)
    c.state["step_rows"] = rows
    return {"rows": rows}


def part_attention(c: Check) -> dict:
    name, lengths, tokens, dtype = c.sizes.attention
    bc = _bench_config(c, presets=(name,), dtypes=(dtype,), tokens_per_step=tokens, kinds=("attention",))
    c.log(bench.HEADER)
    rows = c.partial.setdefault("rows", [])
    for T in lengths:
        rows += bench.compare("attention", name, dtype, T, bc, c.device, c.peaks[dtype], c.log)
    if c.device.type == "cuda" and _version("disentangled_flash"):
        # the package patches transformers' model, so its peer row is the whole encoder (T <= 512)
        rows += bench.compare("encoder", name, dtype, lengths[0], bc, c.device, c.peaks[dtype], c.log)
    return {"rows": rows}


def part_pretrain(c: Check) -> dict:
    row = bench.pretrain_row(c.sizes.pretrain, c.device, c.work / "pretrain", peaks=c.peaks, log=c.log)
    c.state["pretrain_run"] = c.work / "pretrain" / "run"  # the fine-tune's fallback discriminator
    c.log(bench.format_row(row))
    return {"rows": [row]}


def wikitext(c: Check) -> Path:
    path = c.data / "wikitext-2" / "wiki.train.tokens"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; run `python -m lab gpucheck --prepare-data --data {c.data}` where "
            "$LAB_DATA_DIR holds wikitext-2/, and copy that folder to the GPU machine with the checkout"
        )
    return path


def part_short_run(c: Check) -> dict:
    from lab.pretrain import train

    size = c.sizes.short_run
    out_dir = c.work / "short-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    eval_every = ckpt_every = size.steps  # evaluation at step 0 only, one checkpoint at the end
    cfg, missing = bench.pretrain_config(
        out_dir=str(out_dir), preset=size.preset, corpus=str(wikitext(c)), vocab_size=size.vocab,
        seq_len=size.seq_len, batch_size=size.batch, steps=size.steps, log_every=size.log_every,
        eval_every=eval_every, eval_batches=4, probe_every=0, ckpt_every=ckpt_every, progress="line",
        device=str(c.device),
    )  # fmt: skip
    with SyncCounter(c.device) as counter:
        summary = train(cfg)
    # the loop's warm-up steps (3 when compiled, else 1) synchronise on purpose to time themselves;
    # bucket k holds step k's end, so steady buckets start after the last warm-up step
    warmup = (3 if summary.get("compiled") else 1) + 1
    syncs = counter.report(size.steps, size.log_every, eval_every, ckpt_every, warmup=warmup)
    c.state["short_run"] = out_dir
    windows = bench.train_windows(out_dir)
    ms = bench.steady_ms_per_step(windows)
    row = bench.Row("pretrain", size.preset, "bf16" if "bfloat16" in summary["dtype"] else "fp32", size.seq_len,
                    size.batch, f"lab-{cfg.sharing}", ms, size.batch * size.seq_len / (ms / 1e3),
                    vocab=summary["vocab_size"], note=f"WikiText-2, under sync counting; compile={getattr(cfg, 'compile', None)}")  # fmt: skip
    c.log(f"  syncs per steady-state step: {syncs['syncs_per_steady_step']:.2f} over {syncs['steady_steps']} steps "
          f"({syncs['method']}); elsewhere {syncs['syncs_elsewhere']}")  # fmt: skip
    for site, n in syncs["steady_sites"]:
        c.log(f"    {n:>4}  {site}")
    final = summary.get("final_eval", {})
    return {
        "syncs": syncs,
        "rows": [row],
        "final_eval": {k: final.get(k) for k in ("mlm_loss", "mlm_acc", "rtd_acc", "rtd_auc")},
        "final_train_loss": windows[-1]["loss"] if windows else None,
        "config_fields_missing": missing,
        "corpus": summary.get("corpus_info"),
    }


def part_torchrun(c: Check) -> dict:
    from lab.pretrain import PretrainConfig

    size = c.sizes.torchrun
    out_dir = c.work / "torchrun"
    shutil.rmtree(out_dir, ignore_errors=True)
    flags = {
        "out-dir": out_dir, "preset": size.preset, "corpus": wikitext(c), "vocab-size": size.vocab,
        "seq-len": size.seq_len, "batch-size": size.batch, "steps": size.steps, "log-every": size.log_every,
        "eval-every": size.steps, "eval-batches": 1, "probe-every": 0, "ckpt-every": size.steps,
        "progress": "line", "device": c.device.type,
    }  # fmt: skip
    argv = [f"--{k}={v}" for k, v in flags.items()]
    # the loop's compile switch is a bool or auto/on/off depending on its version; this part is about
    # the process group, so it runs eagerly
    compile_default = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}.get("compile")
    if isinstance(compile_default, bool):
        argv.append("--no-compile")
    elif compile_default is not None:
        argv.append("--compile=off")
    repo = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    if c.device.type == "cuda":
        env["NCCL_DEBUG"] = "INFO"  # evidence in the log that a NCCL communicator was created
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "lab", "pretrain", *argv]  # fmt: skip
    c.log("  " + " ".join(command[1:]))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_remaining_s())
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    result = {
        "returncode": proc.returncode,
        "wall_s": wall,
        "backend": "nccl" if c.device.type == "cuda" else "gloo",
        "nccl_log_lines": sum("NCCL INFO" in line for line in output.splitlines()),
        "command": " ".join(command[1:]),
    }
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{output[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    losses = [r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if r["split"] == "train"]
    result.update(
        world_size=summary["world_size"], device_used=summary["device"], steps=summary["steps"],
        tokens_per_s=summary["tokens_per_s"], train_losses=losses,
        ok=summary["steps"] == size.steps and bool(losses) and all(math.isfinite(x) for x in losses),
    )  # fmt: skip
    c.log(f"  torchrun: exit 0, {summary['steps']} steps on {summary['device']}, world {summary['world_size']}, "
          f"losses {', '.join(f'{x:.3f}' for x in losses)}; {result['nccl_log_lines']} NCCL INFO lines")  # fmt: skip
    return result


def part_finetune(c: Check) -> dict:
    # the short run's discriminator; if that part failed, the pretrain part's (random-word corpus)
    # still tests the pipeline, and the result says which
    runs = [c.state.get("short_run"), c.state.get("pretrain_run")]
    run_dir = next(
        (r for r in runs if r is not None and (Path(r) / "export" / "discriminator").is_dir()), None
    )
    if run_dir is None:
        raise RuntimeError("needs an exported discriminator from short_run or pretrain; neither finished")
    task = next(
        ((t, folder) for t, folder in GLUE_TASKS if (c.data / "glue" / folder / "train.tsv").is_file()), None
    )
    if task is None:
        raise FileNotFoundError(f"no GLUE task under {c.data / 'glue'}; run --prepare-data (SST-2 or CoLA)")
    row = bench.finetune_row(c.sizes.finetune, c.device, c.work / "finetune", init=str(run_dir),
                             glue_dir=str(c.data / "glue"), task=task[0], log=c.log)  # fmt: skip
    results = json.loads((c.work / "finetune" / "run" / "results.json").read_text())
    c.log(bench.format_row(row) + f"  ({row.note})")
    return {"rows": [row], "task": task[0], "dev": results["metrics_per_seed"][0], "init": str(run_dir)}


def part_compile(mode: str) -> Callable[[Check], dict]:
    def run(c: Check) -> dict:
        name, T, B, dtype = c.sizes.step
        step_rows = c.state.get("step_rows", [])
        eager = next((r for r in step_rows if r.impl == "lab-es"), None)
        hf = next((r for r in step_rows if r.impl == "hf"), None)
        rows = bench.compiled_step_rows(
            name, T, B, dtype, c.device, (mode,), c.sizes.compile_backend, c.sizes.warmup, c.sizes.repeats,
            c.peaks[dtype], gflop=eager and eager.gflop, hf=hf, memory=c.sizes.memory, log=c.log,
        )  # fmt: skip
        result = {"rows": rows, "mode": mode}
        if eager is not None:
            result["speedup_vs_eager"] = eager.ms / rows[0].ms
        return result

    return run


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # expected seconds on an H100 / H200, generous; the part is skipped if it does not fit
    run: Callable[[Check], dict]
    cleanup_compile: bool = False  # drop compiled code afterwards (frees CUDA graphs' memory pools)
    smoke: bool = True  # run in the smoke mode too (the other compile modes add no new code path)


PARTS = (
    Part("env", 20, part_env),
    Part("correctness", 90, part_correctness),  # flex attention compiles its kernels here
    Part("step", 60, part_step),
    Part("attention", 90, part_attention),
    Part("pretrain", 100, part_pretrain, cleanup_compile=True),
    Part("short_run", 80, part_short_run, cleanup_compile=True),
    Part("torchrun", 60, part_torchrun),
    Part("finetune", 45, part_finetune),
    Part("compile:default", 90, part_compile("default"), cleanup_compile=True),
    Part("compile:reduce-overhead", 90, part_compile("reduce-overhead"), cleanup_compile=True, smoke=False),
    Part("compile:max-autotune-no-cudagraphs", 150, part_compile("max-autotune-no-cudagraphs"), cleanup_compile=True,
         smoke=False),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Running the parts within the budget


class PartTimeout(Exception):
    pass


_DEADLINE = [math.inf]  # perf_counter time at which the whole run must end


def _remaining_s() -> float:
    return max(1.0, _DEADLINE[0] - time.perf_counter())


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`: Python regains control between
    kernel launches and inside compilation, which is where an overrunning part spends its time."""

    def expire(signum, frame):
        raise PartTimeout(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_parts(c: Check, parts, budget_s: float, write: Callable[[dict], None]) -> dict:
    """Run `parts` in order within `budget_s`; returns {name: record} and calls write() after each."""
    start = time.perf_counter()
    _DEADLINE[0] = start + budget_s
    records: dict[str, dict] = {}
    for part in parts:
        elapsed = time.perf_counter() - start
        left = budget_s - elapsed
        # on the CPU smoke run the GPU budgets mean nothing; there every part runs until the total is spent
        need = part.budget_s if not c.smoke else 1.0
        record = {"budget_s": part.budget_s, "started_at_s": round(elapsed, 1)}
        if c.smoke and not part.smoke:
            record.update(
                status="skipped", note="not in the smoke run: the same code path as compile:default"
            )
            c.log(f"== {part.name}: skipped ({record['note']})")
        elif need > left:
            record.update(
                status="skipped", note=f"needs ~{part.budget_s:.0f} s, {left:.0f} s left of {budget_s:.0f} s"
            )
            c.log(f"== {part.name}: skipped ({record['note']})")
        else:
            c.log(f"== {part.name} (budget {part.budget_s:.0f} s, {left:.0f} s left)")
            t0 = time.perf_counter()
            c.partial = {}
            try:
                with _time_limit(min(1.5 * part.budget_s if not c.smoke else left, left)):
                    result = part.run(c)
                record.update(status="ok", result=result)
                if isinstance(result, dict) and result.get("ok") is False:
                    record["status"] = "failed-check"
            except PartTimeout as err:
                record.update(status="timeout", error=str(err), result=c.partial or None)
            except Exception as err:
                record.update(
                    status="error",
                    error=f"{type(err).__name__}: {err}",
                    traceback=traceback.format_exc()[-4000:],
                    result=c.partial or None,
                )
            finally:
                record["seconds"] = round(time.perf_counter() - t0, 1)
                _cleanup(c, part)
            c.log(f"== {part.name}: {record['status']} in {record['seconds']:.0f} s"
                  + (f" — {record['error'].splitlines()[0][:200]}" if "error" in record else ""))  # fmt: skip
        records[part.name] = record
        write(records)
    return records


def _cleanup(c: Check, part: Part) -> None:
    if c.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    if part.cleanup_compile:
        torch._dynamo.reset()
    gc.collect()
    if c.device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Results: JSON, CSV (lab.bench's rows), one-screen summary


def _rows(records: dict) -> list[dict]:
    rows = []
    for record in records.values():
        for row in (record.get("result") or {}).get("rows", []):
            rows.append(dataclasses.asdict(row) if isinstance(row, bench.Row) else row)
    return rows


def _jsonable(records: dict) -> dict:
    def convert(value):
        if isinstance(value, bench.Row):
            return dataclasses.asdict(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    return convert(records)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'; other names lower-cased with non-alphanumerics as '-'."""
    match = re.search(r"\b([HABL]\d{2,3})\b", name.upper())
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def targets(records: dict, device_name: str) -> list[dict]:
    """The GPU targets, each with the value measured here (None where its part did not run)."""

    def rows(part: str) -> list[dict]:
        return _rows({part: records[part]}) if part in records else []

    def target(text, value, minimum, unit):
        return {"target": text, "value": value, "min": minimum, "unit": unit,
                "met": None if value is None else value >= minimum}  # fmt: skip

    out = []
    steps = rows("step") + [r for n in records if n.startswith("compile:") for r in rows(n)]
    eager = next((r for r in steps if r["impl"] == "lab-es"), None)
    fastest = max(
        (r for r in steps if r["impl"].startswith("lab")), key=lambda r: r["tokens_per_s"], default=None
    )
    for row in [eager] + ([fastest] if fastest is not eager else []):
        label = "eager lab-es" if row is eager else f"fastest: {row['impl']}"
        out.append(target(f"RTD step vs transformers peer ({label})", row and row["speedup_vs_hf"], 2.0, "x"))
        out.append(target(f"RTD step MFU ({label})", row and row["mfu"], 0.35, "%"))
    pre = next(iter(rows("pretrain")), None)
    need = 1_000_000 if "H200" in device_name.upper() else 700_000  # H100 and others: the H100 target
    out.append(
        target(
            "xsmall pre-training tokens/s (train(), vocab 32k)", pre and pre["tokens_per_s"], need, "tok/s"
        )
    )
    ft = next(iter(rows("finetune")), None)
    out.append(target("GLUE fine-tuning training examples/s", ft and ft["examples_per_s"], 5000, "ex/s"))
    for r in rows("attention"):
        if r["impl"] != "hf":
            out.append(target(f"attention {r['impl']} vs HF layer, T={r['T']}", r["speedup_vs_hf"], 1.5, "x"))
    return out  # fmt: skip


def summary_text(result: dict) -> str:
    env = (result["parts"].get("env") or {}).get("result") or {}
    parts = result["parts"]
    lines = [
        f"gpucheck{' --smoke' if result['smoke'] else ''} on {env.get('device_name', '?')} "
        f"({env.get('capability', env.get('device', '?'))}), torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}: {result['elapsed_s']:.0f} s of {result['budget_s']:.0f} s",
    ]
    if env.get("matmul_peak_tflops"):
        peaks = env["matmul_peak_tflops"]
        lines.append(f"matmul peak at {env['matmul_peak_n']}^3: bf16 {_rate(1e12 * peaks['bf16'])}, fp32 {_rate(1e12 * peaks['fp32'])}; "
                     f"attention impls {env.get('attention_impls')}, disentangled-flash {env.get('disentangled_flash') or 'absent'}")  # fmt: skip
    lines.append("parts: " + ", ".join(f"{n} {r['status']}" + (f" {r['seconds']:.0f}s" if "seconds" in r else "") for n, r in parts.items()))  # fmt: skip
    lines.append("targets:")
    for t in result["targets"]:
        value = (
            "not measured"
            if t["value"] is None
            else (
                f"{100 * t['value']:.1f} %"
                if t["unit"] == "%"
                else f"{t['value']:,.2f} {t['unit']}"
                if t["unit"] == "x"
                else f"{t['value']:,.0f} {t['unit']}"
            )
        )
        goal = f"{100 * t['min']:.0f} %" if t["unit"] == "%" else f"{t['min']:,} {t['unit']}"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['target']:<58} {value:>16}  (>= {goal}) {verdict}")  # fmt: skip
    corr = (parts.get("correctness") or {}).get("result")
    if corr:
        lines.append("correctness on the device (vs float64 reference):")
        for key, value in corr["checks"].items():
            lines.append(f"  {key:<32} {_describe_check(value)}")
    short = (parts.get("short_run") or {}).get("result")
    if short:
        s = short["syncs"]
        sites = "; ".join(f"{n}x {site}" for site, n in s["steady_sites"][:3]) or "none"
        lines.append(f"host syncs per steady-state step: {s['syncs_per_steady_step']:.2f} ({s['steady_steps']} steps; {sites}); "
                     f"{s['syncs_elsewhere']} at log/eval/ckpt/warm-up steps. Final eval {short['final_eval']}")  # fmt: skip
    tr = (parts.get("torchrun") or {}).get("result")
    if tr:
        lines.append(f"torchrun 1 process ({tr['backend']}): {tr['steps']} steps on {tr['device_used']}, world {tr['world_size']}, "
                     f"{tr['tokens_per_s']:,.0f} tok/s, {tr['nccl_log_lines']} NCCL INFO lines")  # fmt: skip
    ft = (parts.get("finetune") or {}).get("result")
    if ft:
        dev = {k: round(v, 4) for k, v in ft["dev"].items() if isinstance(v, float)}
        source = "the short run" if Path(ft.get("init", "")).name == "short-run" else ft.get("init")
        lines.append(f"fine-tune {ft['task']} from {source}: dev {dev}")
    compiled = [(n, r["result"]) for n, r in parts.items() if n.startswith("compile:") and r.get("result")]
    if compiled:
        cells = [
            f"{res['mode']} {res['rows'][0]['ms']:.1f} ms (compile {res['rows'][0]['compile_s']:.0f} s)"
            for _, res in compiled
        ]
        best = min(compiled, key=lambda item: item[1]["rows"][0]["ms"])[1]["mode"]
        lines.append("compile sweep (step part's shape; later modes reuse earlier compilation where they can): "
                     + "; ".join(cells) + f"; fastest: {best} (pre-training default compile/mode: "
                     f"{env.get('pretrain_compile_default')})")  # fmt: skip
    for name, record in parts.items():
        if record["status"] in ("error", "timeout", "skipped"):
            lines.append(
                f"{record['status']}: {name}: {(record.get('error') or record.get('note', '')).splitlines()[0][:150]}"
            )
    offenders = result["optional_modules_imported"]
    lines.append("optional packages imported: " + (", ".join(offenders) if offenders else "none"))
    slug = result["device_slug"]
    lines.append(
        f"to commit: cp DIR/gpucheck.json figures/bench/gpu_{slug}.json; gpucheck.csv -> gpu_{slug}.csv; summary.txt -> gpu_{slug}.txt"
    )
    return "\n".join(lines) + "\n"  # fmt: skip


def write_outputs(out: Path, records: dict, meta: dict, start: float) -> dict:
    env = (records.get("env") or {}).get("result") or {}
    name = env.get("device_name") or "cpu"
    result = {
        **meta,
        "elapsed_s": time.perf_counter() - start,
        "device_slug": device_slug(name) if not meta["smoke"] else "smoke",
        "part_order": list(records),  # the JSON's keys are sorted; this is the order they ran in
        "parts": _jsonable(records),
        "rows": _rows(records),
        "targets": targets(records, name),
        "optional_modules_imported": sorted(m for m in OPTIONAL_MODULES if m in sys.modules),
    }
    atomic_write_json(out / "gpucheck.json", result)
    bench.write_csv(out / "gpucheck.csv", result["rows"])
    atomic_write_bytes(out / "summary.txt", summary_text(result).encode())
    return result


# ----------------------------------------------------------------------------------------------
# Data for the device


def prepare_data(source: Path, dest: Path, log=print) -> list[Path]:
    """Copy the files the GPU check reads from `source` ($LAB_DATA_DIR) into `dest` (e.g. .gpudata/)."""
    source, dest = Path(source), Path(dest)
    copied = []
    for rel, required in DATA_FILES.items():
        src = source / rel
        if not src.is_file():
            if required:
                raise FileNotFoundError(
                    f"{src} is missing; set LAB_DATA_DIR to the folder holding wikitext-2/ (and glue/)"
                )
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        copied.append(target)
    if not any("glue" in str(p) for p in copied):
        log(f"note: no GLUE task (SST-2 / CoLA) under {source / 'glue'}; the finetune part will fail")
    size = sum(p.stat().st_size for p in copied) / 2**20
    log(f"copied {len(copied)} files ({size:.1f} MiB) from {source} to {dest}")
    return copied


# ----------------------------------------------------------------------------------------------
# Command line


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for gpucheck.json / .csv / summary.txt / gpucheck.log")
    parser.add_argument(
        "--data", default=".gpudata", help="data folder (wikitext-2/, glue/); default .gpudata"
    )
    parser.add_argument(
        "--work", help="scratch folder for corpora, runs and caches (default: a temporary one)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny sizes: every part's code path in about a minute"
    )
    parser.add_argument("--budget-s", type=float, help="total seconds for all parts (default 480; smoke 900)")
    parser.add_argument("--only", help="comma-separated part names to run (default: all)")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if present) | cuda | cpu; --smoke means cpu"
    )
    parser.add_argument(
        "--prepare-data", action="store_true", help="copy $LAB_DATA_DIR's files into --data and exit"
    )
    args = parser.parse_args(argv)  # fmt: skip

    if args.prepare_data:
        try:
            prepare_data(data_dir(), Path(args.data))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if not args.out:
        parser.error("--out DIR is required (or --prepare-data)")
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: this check is for a GPU machine; use --smoke for the CPU code paths")
    parts = PARTS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {p.name for p in PARTS})
        if unknown:
            parser.error(
                f"--only has unknown parts {unknown}; choose from {', '.join(p.name for p in PARTS)}"
            )
        parts = tuple(p for p in PARTS if p.name in names or p.name == "env")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lab-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    # tokenisers, token caches and compiled kernels of this run stay in its scratch folder
    os.environ["LAB_CACHE_DIR"] = str(work / "cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    budget = args.budget_s or (900.0 if args.smoke else 480.0)
    log_file = open(out / "gpucheck.log", "w")  # noqa: SIM115 (open for the whole run)
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, log_file)
    try:
        c = Check(device, SMOKE if args.smoke else GPU, Path(args.data), work, args.smoke)
        meta = {"smoke": args.smoke, "budget_s": budget, "data": str(args.data), "argv": argv or sys.argv[1:]}
        start = time.perf_counter()

        def write(records):
            return write_outputs(out, records, meta, start)

        records = run_parts(c, parts, budget, write)
        result = write(records)
        print(summary_text(result), end="")
    finally:
        sys.stdout = stdout
        log_file.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
