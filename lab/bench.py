"""Performance benchmark: lab's RTD step, encoder and attention against a `transformers` peer, plus the
throughput of the real pre-training and fine-tuning loops.

    python -m lab.bench                      # CPU: mini + xsmall, fp32 + bf16 (several minutes)
    python -m lab.bench --device cuda        # GPU: every kind below
    python -m lab.bench --quick              # seconds: tiny sizes, every kind, smoke test
    python -m lab.bench --json runs/bench/bench.json --csv runs/bench/bench.csv

What is measured, all in one process (CPU memory aside, see below):
  step       one RTD training step: generator + discriminator forward, backward, AdamW step.
             lab: `RTDModel` with sharing "es" (like for like with the peer) and "gdes" (our default).
             hf:  the peer as users build it from transformers: `DebertaV2ForMaskedLM` generator (half
             depth, same width, logits at every position), `DebertaV2Model` + a linear RTD head as
             discriminator, the discriminator's word_embeddings set to the generator's (ES), same
             config (lab.hf.to_hf_config), batch, length, dtype, 15% masking, multinomial sampling.
  compile    the lab-es step with the model under torch.compile, one candidate per mode
             (`compile_modes`); `compile_s` is the wall time of its warm-up calls (compilation and
             CUDA-graph recording included), reported apart from the steady-state `ms`.
  encoder    Encoder / DebertaV2Model forward + backward of a scalar loss (and `disentangled-flash`,
             transformers' model with that package's fused attention, when it is importable).
  attention  one DisentangledSelfAttention forward + backward, once per lab attention implementation
             (`lab` is the default one, `lab-<name>` the others), against transformers' layer; all
             without attention dropout (FlexAttention has none).
  pretrain   tokens/s of `lab.pretrain.train()` itself (data loading, masking, the whole loop with its
             defaults, compilation included where the default compiles) on a random-word corpus with a
             SentencePiece vocabulary of `pretrain.vocab` pieces: the median ms/step of the logged
             windows after the first (which holds the warm-up and any compilation).
  finetune   training examples/s of `lab.finetune.train()` on an SST-2-shaped task of random words
             from a random-init encoder: epochs 2.. over their wall time (epoch 1 is warm-up).
By default the CPU runs step, encoder and attention (the others take minutes there); CUDA runs all.
Candidates of one comparison are timed alternately (A B A B ...), after warm-up; each figure is the
median over the repeats, and the table also shows the ratio lab / hf of tokens per second.

Memory (`peak_mb`, `step_mb`): on CUDA, torch.cuda.max_memory_allocated in-process. On CPU, torch's
allocations are invisible to tracemalloc, so every measurement runs in a fresh subprocess that builds
the model, records its resident set (VmRSS), resets the kernel's high-water mark (/proc/self/clear_refs
"5"), runs two steps (the first allocates the optimizer state) and reads VmHWM: `peak_mb` is the
process's peak resident memory, `step_mb` the part added by the steps (activations, gradients,
optimizer state). Both include allocator caching.

FLOPs (`gflop`, `mfu`): matmul and attention FLOPs (forward and backward), not element-wise work. For
lab's step, `rtd_step_flops`, the count written out by hand, which FlopCounterMode reproduces where it
sees every product (the tests check this) but undercounts behind fused attention kernels it has no
formula for; for the peer, FlopCounterMode over one step. `mfu` divides the achieved FLOP/s by the machine's
matmul peak, measured in the same run with square matmuls in that dtype where the device saturates:
8192^3 on CUDA (smaller products leave a large GPU partly idle and understate its peak), 2048^3 on
the CPU; `matmul_peak_n` in the results says which. bf16 means torch.autocast(dtype=bfloat16) with
fp32 parameters and fp32 AdamW.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lab.model import DisentangledSelfAttention, Encoder, preset, relative_index
from lab.rtd import RTDModel, generator_config, masked_count
from lab.training import adamw, autocast
from lab.util import atomic_write_json, read_jsonl

SPECIAL_IDS = (0, 1, 2, 3)  # [PAD] [CLS] [SEP] [UNK]
RTD_WEIGHT = 50.0
CLASSIC_KINDS = ("step", "encoder", "attention")
ALL_KINDS = (*CLASSIC_KINDS, "compile", "pretrain", "finetune")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def default_kinds(device: torch.device) -> tuple[str, ...]:
    """What `python -m lab bench` runs when --kinds is not given: everything on CUDA; on a CPU the
    three comparisons (the pre-training and fine-tuning loops at xsmall take many minutes there)."""
    return ALL_KINDS if device.type == "cuda" else CLASSIC_KINDS


def peak_size(device: torch.device) -> int:
    """n of the n x n x n matmuls that measure the peak: 8192 on CUDA, where 2048 leaves an H100/H200
    at about half its rate, and 2048 on a CPU, which it already saturates."""
    return 8192 if device.type == "cuda" else 2048


@dataclass(frozen=True)
class PretrainBench:
    preset: str = "xsmall"
    vocab: int = 32000  # SentencePiece pieces (+ [MASK]) trained on the random-word corpus
    seq_len: int = 128
    batch: int = 128
    steps: int = 30  # timed through train(); the first log window (warm-up, compilation) is dropped
    log_every: int = 10


@dataclass(frozen=True)
class FinetuneBench:
    preset: str = "xsmall"
    vocab: int = 32000
    examples: int = 2048  # training examples (SST-2-shaped, 5-40 random words each)
    eval_examples: int = 128  # dev examples evaluated after every epoch
    batch: int = 32
    seq_len: int = 128
    epochs: int = 3  # examples/s is taken over epochs 2..epochs


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...] = ("mini", "xsmall")  # model sizes (lab.model presets, their vocab sizes)
    dtypes: tuple[str, ...] = ("fp32", "bf16")  # bf16 = autocast, fp32 master weights
    step_seq_lens: tuple[int, ...] = (128, 512)  # T for the RTD step
    layer_seq_lens: tuple[int, ...] = (128, 512, 1024)  # T for encoder / attention; hf encoder only to 512
    tokens_per_step: int = 512  # batch size = tokens_per_step // T (at least 1)
    warmup: int = 1  # untimed calls per candidate before timing
    repeats: int = 3  # timed calls per candidate, alternating between candidates
    kinds: tuple[str, ...] = ()  # which comparisons to run; () = default_kinds(device)
    memory: bool = True  # measure peak memory of every RTD step (a subprocess each on CPU)
    peer: bool = True  # run the transformers peer (needs `transformers`)
    attention_impls: tuple[str, ...] = ()  # lab attention implementations; () = every available one
    compile_modes: tuple[str, ...] = ("default",)  # torch.compile modes of the "compile" candidates
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" skips code generation)
    peak_n: int = 0  # matmul size of the peak measurement; 0 = peak_size(device)
    pretrain: PretrainBench = field(default_factory=PretrainBench)
    finetune: FinetuneBench = field(default_factory=FinetuneBench)
    work_dir: str = ""  # corpora and runs of the pretrain / finetune kinds; "" = a temporary folder

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("BenchConfig.repeats must be >= 1 and warmup >= 0")
        unknown = set(self.dtypes) - {"fp32", "bf16"}
        if unknown:
            raise ValueError(f"BenchConfig.dtypes has {sorted(unknown)}; choose fp32 and/or bf16")
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"BenchConfig.kinds has {sorted(unknown)}; choose from {', '.join(ALL_KINDS)}")
        unknown = set(self.compile_modes) - set(COMPILE_MODES)
        if unknown:
            raise ValueError(
                f"BenchConfig.compile_modes has {sorted(unknown)}; choose from {', '.join(COMPILE_MODES)}"
            )
        for name, cls in (("pretrain", PretrainBench), ("finetune", FinetuneBench)):
            if isinstance(getattr(self, name), dict):  # rebuilt from asdict() / JSON
                object.__setattr__(self, name, cls(**getattr(self, name)))


QUICK = BenchConfig(
    presets=("tiny",),
    dtypes=("fp32", "bf16"),
    step_seq_lens=(32,),
    layer_seq_lens=(32, 64),
    tokens_per_step=64,
    warmup=1,
    repeats=2,
    kinds=ALL_KINDS,
    compile_backend="eager",  # dynamo's tracing without code generation: seconds, not minutes, on a CPU
    pretrain=PretrainBench(preset="tiny", vocab=400, seq_len=32, batch=8, steps=4, log_every=2),
    finetune=FinetuneBench(
        preset="tiny", vocab=400, examples=48, eval_examples=16, batch=16, seq_len=32, epochs=2
    ),
)
HF_MAX_T = 512  # the peer's step and encoder are benchmarked up to the released models' length


# ----------------------------------------------------------------------------------------------
# What gets timed: each builder returns a zero-argument callable that does the work once


def _autocast(device: torch.device, dtype: str):
    return autocast(device, torch.bfloat16 if dtype == "bf16" else None)  # the loops' own context


def _config(name: str, T: int, vocab: int | None = None, attention_impl: str | None = None):
    # longer inputs raise max_seq_len only; the relative buckets (and so the attention) are unchanged
    overrides = {"max_seq_len": max(512, T)}
    if vocab is not None:
        overrides["vocab_size"] = vocab
    if attention_impl is not None:
        overrides["attention_impl"] = attention_impl
    return preset(name, **overrides)


def attention_impls(device: torch.device) -> list[str | None]:
    """lab's attention implementations usable on `device`; [None] where the model has only one."""
    import lab.model

    available = getattr(lab.model, "available_attention_impls", None)
    return list(available(device)) if available is not None else [None]


def default_attention_impl() -> str | None:
    cfg = preset("tiny")
    return getattr(cfg, "attention_impl", None)


def _batch(cfg, B: int, T: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_IDS), cfg.vocab_size - 1, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    return ids.to(device), torch.ones(B, T, dtype=torch.long, device=device)


def _optimizer(model: nn.Module, device: torch.device):
    # the loops' AdamW (fused: one pass over every parameter, CPU and CUDA)
    return adamw(model, lr=1e-4, weight_decay=0.01)


def build_lab_step(
    name: str,
    T: int,
    B: int,
    dtype: str,
    device: torch.device,
    sharing: str,
    vocab: int | None = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
):
    cfg = _config(name, T, vocab)
    model = RTDModel(cfg, sharing=sharing).to(device).train()
    opt = _optimizer(model, device)
    ids, mask = _batch(cfg, B, T, device)
    special = torch.tensor(SPECIAL_IDS, device=device)
    mask_id = cfg.vocab_size - 1
    forward = model
    if compile_mode is not None:
        # "default" is torch.compile's own default; other backends take no mode
        mode = None if compile_mode == "default" or compile_backend != "inductor" else compile_mode
        forward = torch.compile(model, mode=mode, backend=compile_backend)

    def step():
        with _autocast(device, dtype):
            loss = forward(ids, mask, special, mask_id, rtd_weight=RTD_WEIGHT).loss
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
        valid = torch.ones_like(positions, dtype=torch.bool)
        masked_ids = ids.scatter(1, positions, mask_id)
        targets = ids.gather(1, positions)
        labels = torch.full_like(ids, -100).scatter(1, positions, torch.where(valid, targets, -100))
        out = self.generator(input_ids=masked_ids, attention_mask=mask, labels=labels)  # logits [B, T, V]
        with torch.no_grad():
            logits = out.logits.gather(1, positions[..., None].expand(-1, -1, vocab)).float()  # [B, K, V]
            sampled = torch.multinomial(torch.softmax(logits, -1).view(-1, vocab), 1).view_as(targets)
            corrupted = ids.scatter(1, positions, torch.where(valid, sampled, targets))
            replaced = (corrupted != ids).float()
        hidden = self.discriminator(input_ids=corrupted, attention_mask=mask).last_hidden_state
        rtd_logits = self.rtd_head(hidden).squeeze(-1).float()
        return out.loss + RTD_WEIGHT * F.binary_cross_entropy_with_logits(rtd_logits, replaced)


def build_hf_step(name: str, T: int, B: int, dtype: str, device: torch.device):
    cfg = _config(name, T)
    torch.manual_seed(0)
    model = HFPeer(cfg).to(device).train()
    opt = _optimizer(model, device)
    ids, mask = _batch(cfg, B, T, device)

    def step():
        with _autocast(device, dtype):
            loss = model(ids, mask, cfg.vocab_size - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_encoder(impl: str, name: str, T: int, B: int, dtype: str, device: torch.device):
    cfg = _config(name, T)
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
        with _autocast(device, dtype):
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
    cfg = dataclasses.replace(_config(name, T, attention_impl=attention_impl), attention_dropout=0.0)
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
        with _autocast(device, dtype):
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


# ----------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, callable], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Seconds per call for each candidate; candidates alternate within every repeat, and the order
    rotates between repeats so none always runs right after the same neighbour."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: str, device: torch.device, n: int = 0, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n x n matmuls on random data (n = 0: peak_size(device)): the
    practical ceiling of this machine. Each timing covers several back-to-back products."""
    n = n or peak_size(device)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, torch_dtype)
    b = torch.randn(n, n, generator=g).to(device, torch_dtype)
    calls = 10 if device.type == "cuda" else 1
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best


def _read_status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def memory_probe(spec: dict, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Peak memory of `steps` calls of one candidate (run this in a fresh process on CPU)."""
    fn = build(spec, device)
    if device.type == "cuda":
        return cuda_memory(fn, device, steps)
    base_kb = _read_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        fn()
    peak_kb = _read_status_kb("VmHWM")
    return {"peak_mb": peak_kb / 1024, "step_mb": (peak_kb - base_kb) / 1024}


def cuda_memory(fn, device: torch.device, steps: int = 2) -> dict[str, float]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20}


def measure_memory(spec: dict, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return memory_probe(spec, device)
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_mb": float("nan"), "step_mb": float("nan")}  # not Linux: no per-process high-water
    result = subprocess.run(
        [sys.executable, "-m", "lab.bench", "--memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Row:
    kind: str  # step | encoder | attention | pretrain | finetune
    preset: str
    dtype: str  # fp32 | bf16 (autocast)
    T: int  # tokens per example (finetune: the longest allowed)
    batch: int
    impl: str  # lab-es | lab-gdes | lab-es+<compile mode> | hf (step); lab[-<attention impl>] | hf | ...
    ms: float  # median milliseconds per call (pretrain / finetune: per optimizer step)
    tokens_per_s: float | None  # batch * T / median seconds (None for fine-tuning's variable lengths)
    speedup_vs_hf: float | None = None  # this row's tokens/s over the hf row's (same kind, preset, dtype, T)
    gflop: float | None = None  # counted matmul + attention GFLOP per call (steps only)
    mfu: float | None = None  # achieved FLOP/s over the measured matmul peak of this dtype
    peak_mb: float | None = None  # peak memory (see module docstring)
    step_mb: float | None = None  # memory added by running the steps
    vocab: int | None = None  # rows of the word table
    examples_per_s: float | None = None  # finetune: training examples per second
    compile_s: float | None = None  # compiled candidates: wall time of the warm-up calls
    note: str = ""


def run(bc: BenchConfig, device: torch.device, log=print) -> dict:
    kinds = bc.kinds or default_kinds(device)
    peak_n = bc.peak_n or peak_size(device)
    peaks = {dtype: matmul_peak(dtype, device, peak_n) for dtype in bc.dtypes}
    log(f"matmul peak ({peak_n}^3): " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    log(HEADER)
    rows: list[Row] = []
    for name in bc.presets:
        for dtype in bc.dtypes:
            for T in bc.step_seq_lens if "step" in kinds or "compile" in kinds else ():
                compared = (
                    compare("step", name, dtype, T, bc, device, peaks[dtype], log) if "step" in kinds else []
                )
                rows += compared
                if "compile" in kinds:
                    B = max(1, bc.tokens_per_step // T)
                    eager = next((r for r in compared if r.impl == "lab-es"), None)
                    hf = next((r for r in compared if r.impl == "hf"), None)
                    rows += compiled_step_rows(
                        name, T, B, dtype, device, bc.compile_modes, bc.compile_backend, bc.warmup, bc.repeats,
                        peaks[dtype], gflop=eager and eager.gflop, hf=hf, memory=bc.memory, log=log,
                    )  # fmt: skip
            for kind in [k for k in ("encoder", "attention") if k in kinds]:
                for T in bc.layer_seq_lens:
                    rows += compare(kind, name, dtype, T, bc, device, peaks[dtype], log)
    if "pretrain" in kinds or "finetune" in kinds:
        with _work_dir(bc.work_dir) as work:
            if "pretrain" in kinds:
                rows.append(pretrain_row(bc.pretrain, device, work / "pretrain", peaks=peaks, log=log))
                log(format_row(rows[-1]))
            if "finetune" in kinds:
                rows.append(finetune_row(bc.finetune, device, work / "finetune", log=log))
                log(format_row(rows[-1]))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": asdict(bc),
        "kinds": list(kinds),
        "matmul_peak_n": peak_n,
        "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
        "rows": [asdict(r) for r in rows],
    }


class _work_dir:
    """The given folder, or a temporary one removed afterwards."""

    def __init__(self, path: str):
        self.path, self.tmp = path, None

    def __enter__(self) -> Path:
        if self.path:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return Path(self.path)
        self.tmp = tempfile.mkdtemp(prefix="lab-bench-")
        return Path(self.tmp)

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def compare(kind, name, dtype, T, bc: BenchConfig, device, peak, log=print) -> list[Row]:
    """One comparison: lab's candidates and the peer at one shape, timed alternately."""
    B = max(1, bc.tokens_per_step // T)
    if kind == "step":
        impls = ["lab-es", "lab-gdes"]
    elif kind == "attention":
        chosen = bc.attention_impls or attention_impls(device)
        default = default_attention_impl()
        impls = ["lab" if impl is None or impl == default else f"lab-{impl}" for impl in chosen]
    else:
        impls = ["lab"]
    if bc.peer and (T <= HF_MAX_T or kind == "attention"):
        impls.append("hf")
        if kind == "encoder" and device.type == "cuda" and _importable("disentangled_flash"):
            impls.append("disentangled-flash")
    specs = {
        impl: {"kind": kind, "impl": impl, "preset": name, "dtype": dtype, "T": T, "batch": B}
        for impl in impls
    }
    fns = {impl: build(spec, device) for impl, spec in specs.items()}
    times = time_alternating(fns, bc.warmup, bc.repeats, device)
    rows = []
    for impl, fn in fns.items():
        seconds = statistics.median(times[impl])
        row = Row(
            kind, name, dtype, T, B, impl, 1e3 * seconds, B * T / seconds, vocab=_config(name, T).vocab_size
        )
        if kind == "step":
            # lab's step: the hand count, which FlopCounterMode confirms where it sees every product
            # (tests/test_bench.py) but undercounts behind fused attention kernels; the peer: counted
            counted = count_flops(fn)
            flops = rtd_step_flops(_config(name, T), B, T) if impl.startswith("lab") else counted
            if abs(counted - flops) > 0.01 * flops:
                row.note = f"FlopCounterMode saw {counted / 1e9:.1f} GFLOP"
            row.gflop = flops / 1e9
            row.mfu = flops / seconds / peak
        rows.append(row)
    del fns, fn
    if kind == "step" and bc.memory:
        # one candidate alive at a time, so that a CUDA peak holds nothing of the others
        for row in rows:
            _release(device)
            mem = measure_memory(specs[row.impl], device)
            row.peak_mb, row.step_mb = mem["peak_mb"], mem["step_mb"]
        _release(device)
    hf = next((r for r in rows if r.impl == "hf"), None)
    for row in rows:
        if hf is not None:
            row.speedup_vs_hf = row.tokens_per_s / hf.tokens_per_s
        log(format_row(row))
    return rows


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def compiled_step_rows(
    name, T, B, dtype, device, modes, backend="inductor", warmup=1, repeats=3, peak=None, gflop=None,
    hf: Row | None = None, memory=True, log=print,
) -> list[Row]:  # fmt: skip
    """The lab-es step with the model under torch.compile, once per mode. Warm-up is at least three
    calls (compilation, then CUDA-graph warm-up and recording in the reduce-overhead mode); their wall
    time is `compile_s`. The FLOPs are the eager step's hand count (the math is the same)."""
    if gflop is None:
        gflop = rtd_step_flops(_config(name, T), B, T) / 1e9
    rows = []
    for mode in modes:
        torch._dynamo.reset()  # every mode compiles from scratch
        fn = build_lab_step(name, T, B, dtype, device, "es", compile_mode=mode, compile_backend=backend)
        _sync(device)
        start = time.perf_counter()
        for _ in range(max(3, warmup)):
            fn()
        _sync(device)
        compile_s = time.perf_counter() - start
        seconds = statistics.median(time_alternating({mode: fn}, 0, repeats, device)[mode])
        row = Row("step", name, dtype, T, B, f"lab-es+{mode}", 1e3 * seconds, B * T / seconds, gflop=gflop,
                  vocab=_config(name, T).vocab_size, compile_s=compile_s, note=f"torch.compile backend={backend}")  # fmt: skip
        if peak:
            row.mfu = gflop * 1e9 / seconds / peak
        if hf is not None:
            row.speedup_vs_hf = row.tokens_per_s / hf.tokens_per_s
        if memory and device.type == "cuda":
            mem = cuda_memory(fn, device)
            row.peak_mb, row.step_mb = mem["peak_mb"], mem["step_mb"]
        rows.append(row)
        log(format_row(row))
        del fn
    return rows


# ----------------------------------------------------------------------------------------------
# The real loops: pre-training and fine-tuning throughput


def random_words(n: int, seed: int = 0) -> list[str]:
    """n distinct lower-case pseudo-words of 4-9 letters (a vocabulary SentencePiece can fill)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9)))] = None
    return list(words)


def write_random_corpus(
    path: Path, vocab: int, lines: int = 3000, words_per_line: int = 100, seed: int = 0
) -> Path:
    """A .txt corpus (one document per blank-line-separated block) of uniformly drawn random words,
    with ~1.4x `vocab` distinct words so that a `vocab`-piece SentencePiece model fills up."""
    rng = random.Random(seed)
    words = random_words(max(64, int(1.4 * vocab)), seed)
    blocks = [" ".join(rng.choices(words, k=words_per_line)) for _ in range(lines)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def pretrain_config(**fields):
    """A PretrainConfig of the fields it has; returns (config, names it does not have), so a check
    written for a newer loop (e.g. `compile="auto"`) still runs against an older one and says so."""
    from lab.pretrain import PretrainConfig

    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    missing = sorted(set(fields) - known)
    return PretrainConfig(**{k: v for k, v in fields.items() if k in known}), missing


def train_windows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def steady_ms_per_step(windows: list[dict]) -> float:
    """Median ms/step over the logged windows after the first (which holds the warm-up: compilation,
    first allocations); windows of warm-up steps only log no ms/step and are left out."""
    steady = [w["ms_per_step"] for w in windows[1:] or windows if w.get("ms_per_step") is not None]
    if not steady:
        raise ValueError("the run logged no steady training window; raise steps or lower log_every")
    return statistics.median(steady)


def pretrain_row(pb: PretrainBench, device, work: Path, peaks: dict | None = None, corpus: str = "",
                 log=print, **overrides) -> Row:  # fmt: skip
    """Tokens/s of lab.pretrain.train() itself at pb's size (on `corpus`, default a random-word one)."""
    from lab.pretrain import train

    work = Path(work)
    if not corpus:
        # about two passes' worth of text for the timed steps, within 200..3000 lines of 100 words
        lines = min(3000, max(200, 2 * pb.steps * pb.batch * pb.seq_len // 100))
        corpus = str(write_random_corpus(work / "corpus.txt", pb.vocab, lines))
    out_dir = work / "run"
    shutil.rmtree(out_dir, ignore_errors=True)  # an existing checkpoint would be resumed
    cfg, missing = pretrain_config(
        out_dir=str(out_dir), preset=pb.preset, corpus=corpus, vocab_size=pb.vocab, seq_len=pb.seq_len,
        batch_size=pb.batch, steps=pb.steps, log_every=pb.log_every, eval_every=pb.steps + 1, eval_batches=1,
        probe_every=0, ckpt_every=pb.steps, progress="none", device=str(device), **overrides,
    )  # fmt: skip
    log(f"pretrain: train() {pb.preset} T={pb.seq_len} batch {pb.batch} vocab {pb.vocab}, {pb.steps} steps")
    summary = train(cfg)
    ms = steady_ms_per_step(train_windows(out_dir))
    dtype = "bf16" if "bfloat16" in summary["dtype"] else "fp32"
    row = Row("pretrain", pb.preset, dtype, pb.seq_len, pb.batch, f"lab-{cfg.sharing}", ms,
              pb.batch * pb.seq_len / (ms / 1e3), vocab=summary["vocab_size"], compile_s=summary.get("compile_s"),
              note=f"train(); compile={getattr(cfg, 'compile', None)}" + (f"; no field {missing}" if missing else ""))  # fmt: skip
    if peaks and dtype in peaks:
        flops = rtd_step_flops(_config(pb.preset, pb.seq_len, summary["vocab_size"]), pb.batch, pb.seq_len)
        row.gflop = flops / 1e9
        row.mfu = flops / (ms / 1e3) / peaks[dtype]
    return row


def write_sst2_like(root: Path, words: list[str], n_train: int, n_dev: int, seed: int = 0) -> Path:
    """An SST-2-shaped task folder (root/SST-2/{train,dev}.tsv) of 5-40 random words per sentence;
    label 1 iff the first word sorts before the last (learnable, but only from the words)."""
    rng = random.Random(seed)
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            sentence = rng.choices(words, k=rng.randint(5, 40))
            lines.append(f"{' '.join(sentence)}\t{int(sentence[0] < sentence[-1])}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def random_init_checkpoint(path: Path, preset_name: str, vocab: int, words: list[str]) -> Path:
    """A random-init encoder of `preset_name` with a `vocab`-piece tokenizer, in HF format."""
    from lab.hf import save_pretrained
    from lab.tokenizer import train_tokenizer

    rng = random.Random(1)
    texts = [" ".join(rng.choices(words, k=100)) for _ in range(max(200, vocab // 20))]
    tokenizer = train_tokenizer(texts, vocab_size=vocab)
    save_pretrained(Encoder(preset(preset_name, vocab_size=tokenizer.vocab_size)), path, tokenizer=tokenizer)
    return path


def finetune_row(fb: FinetuneBench, device, work: Path, init: str = "", glue_dir: str = "", task: str = "sst2",
                 log=print) -> Row:  # fmt: skip
    """Training examples/s of lab.finetune.train() (default: a random-init encoder on random words)."""
    from lab import finetune

    work = Path(work)
    synthetic = not init
    if synthetic:
        words = random_words(max(64, int(1.4 * fb.vocab)))
        init = str(random_init_checkpoint(work / "init", fb.preset, fb.vocab, words))
        glue_dir = str(write_sst2_like(work / "glue", words, fb.examples, fb.eval_examples))
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)  # finished seeds there would be skipped, not timed
    cfg = finetune.FinetuneConfig(
        task=task, glue_dir=glue_dir, init=init, out_dir=str(out), epochs=fb.epochs, batch_size=fb.batch,
        max_seq_len=fb.seq_len, max_train_examples=fb.examples, max_eval_examples=fb.eval_examples, seeds=(1,),
        device=str(device),
    )  # fmt: skip
    log(
        f"finetune: train() {task} from {init}, {fb.examples} examples x {fb.epochs} epochs, batch {fb.batch}"
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        if synthetic:  # its small dev split is on purpose, not a partial download
            warnings.filterwarnings("ignore", message=".*the official split has")
        results = finetune.train(cfg)
    wall = time.perf_counter() - start
    history = read_jsonl(out / "metrics.jsonl")
    n = results["n_train_examples"]
    if len(history) > 1 and "elapsed_s" in history[0]:
        examples_per_s = (len(history) - 1) * n / (history[-1]["elapsed_s"] - history[0]["elapsed_s"])
        how = f"epochs 2-{len(history)}"
    else:
        examples_per_s, how = fb.epochs * n / wall, "whole run incl. loading"
    key = results["main_metric"]
    dtype = "bf16" if cfg.bf16 and torch.device(device).type == "cuda" else "fp32"
    return Row("finetune", fb.preset, dtype, fb.seq_len, fb.batch, "lab", 1e3 * fb.batch / examples_per_s, None,
               examples_per_s=examples_per_s,
               note=f"{task} {n} examples, {how}, dev {key} {results['mean'][key]:.3f}")  # fmt: skip


COLUMNS = ("kind", "preset", "dtype", "T", "batch", "impl", "ms", "tokens_per_s", "speedup_vs_hf")
COLUMNS += ("gflop", "mfu", "peak_mb", "step_mb", "vocab", "examples_per_s", "compile_s", "note")


def format_row(row: Row | dict) -> str:
    r = asdict(row) if isinstance(row, Row) else row

    def cell(key, fmt):
        value = r.get(key)
        return (
            "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
        )

    line = (
        f"{r['kind']:<9} {r['preset']:<7} {r['dtype']:<4} {r['T']:>5} {r['batch']:>3} {r['impl']:<18} "
        f"{r['ms']:>9.1f} {cell('tokens_per_s', '>9.0f')} {cell('speedup_vs_hf', '>6.2f')} {cell('gflop', '>7.1f')} "
        f"{cell('mfu', '>6.1%')} {cell('peak_mb', '>7.0f')} {cell('step_mb', '>7.0f')}"
    )
    extras = []
    if r.get("examples_per_s") is not None:
        extras.append(f"{r['examples_per_s']:,.0f} examples/s")
    if r.get("compile_s") is not None:
        extras.append(f"compile {r['compile_s']:.1f}s")
    return line + ("  " + ", ".join(extras) if extras else "")


HEADER = (
    f"{'kind':<9} {'preset':<7} {'dt':<4} {'T':>5} {'B':>3} {'impl':<18} {'ms':>9} {'tok/s':>9} "
    f"{'vs hf':>6} {'GFLOP':>7} {'MFU':>6} {'peakMB':>7} {'stepMB':>7}"
)


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _split(text: str | None, kind=str):
    return text and tuple(kind(t) for t in text.split(",") if t.strip())


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run at tiny sizes, every kind"
    )
    parser.add_argument("--presets", help="comma-separated model presets (default mini,xsmall)")
    parser.add_argument("--dtypes", help="comma-separated: fp32,bf16")
    parser.add_argument("--seq-lens", help="comma-separated T for the RTD step (default 128,512)")
    parser.add_argument(
        "--layer-seq-lens", help="comma-separated T for encoder/attention (default 128,512,1024)"
    )
    parser.add_argument(
        "--kinds",
        help=f"comma-separated subset of {','.join(ALL_KINDS)} (default: all on CUDA, "
        f"{','.join(CLASSIC_KINDS)} on CPU)",
    )
    parser.add_argument("--tokens-per-step", type=int, help="batch size = this // T")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--compile-modes", help=f"comma-separated torch.compile modes ({','.join(COMPILE_MODES)})"
    )
    parser.add_argument(
        "--attention-impls", help="comma-separated lab attention implementations (default: all)"
    )
    parser.add_argument("--work-dir", help="keep the pretrain / finetune corpora and runs here")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-peer", action="store_true", help="lab only (no transformers)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--csv", help="write the rows here")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe), device)))
        return 0

    bc = QUICK if args.quick else BenchConfig()
    overrides = {
        "presets": _split(args.presets),
        "dtypes": _split(args.dtypes),
        "step_seq_lens": _split(args.seq_lens, int),
        "layer_seq_lens": _split(args.layer_seq_lens, int),
        "kinds": _split(args.kinds),
        "compile_modes": _split(args.compile_modes),
        "attention_impls": _split(args.attention_impls),
        "tokens_per_step": args.tokens_per_step,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "work_dir": args.work_dir,
        "memory": False if args.no_memory else None,
        "peer": False if args.no_peer else None,
    }
    try:
        bc = dataclasses.replace(bc, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as err:
        parser.error(str(err))
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result = run(bc, device)
    if args.json:
        atomic_write_json(args.json, result)
    if args.csv:
        write_csv(args.csv, result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
