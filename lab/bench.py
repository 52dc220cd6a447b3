"""Performance benchmark: lab's RTD step, encoder and attention against a `transformers` peer.

    python -m lab.bench                      # mini + xsmall, fp32 + bf16 (several minutes on a CPU)
    python -m lab.bench --quick              # seconds: tiny sizes, one repeat, smoke test
    python -m lab.bench --json runs/bench/bench.json --csv runs/bench/bench.csv

What is measured, all in one process (memory aside, see below):
  step       one RTD training step: generator + discriminator forward, backward, AdamW step.
             lab: `RTDModel` with sharing "es" (like for like with the peer) and "gdes" (our default).
             hf:  the peer as users build it from transformers: `DebertaV2ForMaskedLM` generator (half
             depth, same width, logits at every position), `DebertaV2Model` + a linear RTD head as
             discriminator, the discriminator's word_embeddings set to the generator's (ES), same
             config (lab.hf.to_hf_config), batch, length, dtype, 15% masking, multinomial sampling.
  encoder    Encoder / DebertaV2Model forward + backward of a scalar loss.
  attention  one DisentangledSelfAttention forward + backward.
Candidates of one comparison are timed alternately (A B A B ...), after warm-up; each figure is the
median over the repeats, and the table also shows the ratio lab / hf of tokens per second.

Memory (`peak_mb`, `step_mb`): on CUDA, torch.cuda.max_memory_allocated in-process. On CPU, torch's
allocations are invisible to tracemalloc, so every measurement runs in a fresh subprocess that builds
the model, records its resident set (VmRSS), resets the kernel's high-water mark (/proc/self/clear_refs
"5"), runs two steps (the first allocates the optimizer state) and reads VmHWM: `peak_mb` is the
process's peak resident memory, `step_mb` the part added by the steps (activations, gradients,
optimizer state). Both include allocator caching.

FLOPs (`gflop`, `mfu`): torch.utils.flop_counter.FlopCounterMode over one step counts matmuls and
attention (forward and backward), not element-wise work. `mfu` divides the achieved FLOP/s by the
machine's matmul peak, measured in the same run with a large square matmul in that dtype.
bf16 means torch.autocast(dtype=bfloat16) with fp32 parameters and fp32 AdamW.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lab.model import DisentangledSelfAttention, Encoder, preset, relative_index
from lab.rtd import RTDModel, generator_config
from lab.util import atomic_write_json

SPECIAL_IDS = (0, 1, 2, 3)  # [PAD] [CLS] [SEP] [UNK]
RTD_WEIGHT = 50.0


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...] = ("mini", "xsmall")  # model sizes (lab.model presets, their vocab sizes)
    dtypes: tuple[str, ...] = ("fp32", "bf16")  # bf16 = autocast, fp32 master weights
    step_seq_lens: tuple[int, ...] = (128, 512)  # T for the RTD step
    layer_seq_lens: tuple[int, ...] = (128, 512, 1024)  # T for encoder / attention; hf only up to 512
    tokens_per_step: int = 512  # batch size = tokens_per_step // T (at least 1)
    warmup: int = 1  # untimed calls per candidate before timing
    repeats: int = 3  # timed calls per candidate, alternating between candidates
    kinds: tuple[str, ...] = ("step", "encoder", "attention")  # which comparisons to run
    memory: bool = True  # measure peak memory of every RTD step (a subprocess each on CPU)
    peer: bool = True  # run the transformers peer (needs `transformers`)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("BenchConfig.repeats must be >= 1 and warmup >= 0")
        unknown = set(self.dtypes) - {"fp32", "bf16"}
        if unknown:
            raise ValueError(f"BenchConfig.dtypes has {sorted(unknown)}; choose fp32 and/or bf16")
        unknown = set(self.kinds) - {"step", "encoder", "attention"}
        if unknown:
            raise ValueError(f"BenchConfig.kinds has {sorted(unknown)}; choose from step, encoder, attention")


QUICK = BenchConfig(
    presets=("tiny",),
    dtypes=("fp32", "bf16"),
    step_seq_lens=(32,),
    layer_seq_lens=(32, 64),
    tokens_per_step=64,
    warmup=1,
    repeats=2,
)
HF_MAX_T = 512  # the peer is benchmarked up to the released models' length


# ----------------------------------------------------------------------------------------------
# What gets timed: each builder returns a zero-argument callable that does the work once


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _config(name: str, T: int):
    # longer inputs raise max_seq_len only; the relative buckets (and so the attention) are unchanged
    return preset(name, max_seq_len=max(512, T))


def _batch(cfg, B: int, T: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_IDS), cfg.vocab_size - 1, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    return ids.to(device), torch.ones(B, T, dtype=torch.long, device=device)


def _optimizer(model: nn.Module, device: torch.device):
    # the fused kernel (CPU and CUDA) updates every parameter in one pass
    return torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01, fused=True)


def build_lab_step(name: str, T: int, B: int, dtype: str, device: torch.device, sharing: str):
    cfg = _config(name, T)
    model = RTDModel(cfg, sharing=sharing).to(device).train()
    opt = _optimizer(model, device)
    ids, mask = _batch(cfg, B, T, device)
    special = torch.tensor(SPECIAL_IDS, device=device)
    mask_id = cfg.vocab_size - 1

    def step():
        with _autocast(device, dtype):
            loss = model(ids, mask, special, mask_id, rtd_weight=RTD_WEIGHT).loss
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
    cfg = _config(name, T)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, cfg.hidden_size, generator=g).to(device).requires_grad_()
    table = torch.randn(2 * cfg.position_buckets, cfg.hidden_size, generator=g).to(device).requires_grad_()
    if impl == "lab":
        attention = DisentangledSelfAttention(cfg).to(device).train()
        lo, R, index = relative_index(T, cfg.position_buckets, cfg.max_relative_positions)
        index = index.to(device)
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


def matmul_peak(dtype: str, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n x n matmuls: the practical ceiling of this machine."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device).to(torch_dtype)
    b = torch.randn(n, n, device=device).to(torch_dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _read_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def memory_probe(spec: dict, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Peak memory of `steps` calls of one candidate (run this in a fresh process on CPU)."""
    fn = build(spec, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20}
    base_kb = _read_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        fn()
    peak_kb = _read_status_kb("VmHWM")
    return {"peak_mb": peak_kb / 1024, "step_mb": (peak_kb - base_kb) / 1024}


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
    kind: str  # step | encoder | attention
    preset: str
    dtype: str  # fp32 | bf16 (autocast)
    T: int
    batch: int
    impl: str  # lab-es | lab-gdes | hf (step); lab | hf (encoder, attention)
    ms: float  # median milliseconds per call
    tokens_per_s: float  # batch * T / median seconds
    speedup_vs_hf: float | None = None  # this row's tokens/s over the hf row's (same kind, preset, dtype, T)
    gflop: float | None = None  # counted matmul + attention GFLOP per call (steps only)
    mfu: float | None = None  # achieved FLOP/s over the measured matmul peak of this dtype
    peak_mb: float | None = None  # peak memory (see module docstring)
    step_mb: float | None = None  # memory added by running the steps


def run(bc: BenchConfig, device: torch.device, log=print) -> dict:
    peaks = {dtype: matmul_peak(dtype, device) for dtype in bc.dtypes}
    log("matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    log(HEADER)
    rows: list[Row] = []
    for name in bc.presets:
        for dtype in bc.dtypes:
            for T in bc.step_seq_lens if "step" in bc.kinds else ():
                rows += _compare("step", name, dtype, T, bc, device, peaks[dtype], log)
            for kind in [k for k in ("encoder", "attention") if k in bc.kinds]:
                for T in bc.layer_seq_lens:
                    rows += _compare(kind, name, dtype, T, bc, device, peaks[dtype], log)
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": asdict(bc),
        "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
        "rows": [asdict(r) for r in rows],
    }


def _compare(kind, name, dtype, T, bc: BenchConfig, device, peak, log) -> list[Row]:
    B = max(1, bc.tokens_per_step // T)
    impls = ["lab-es", "lab-gdes"] if kind == "step" else ["lab"]
    if bc.peer and T <= HF_MAX_T:
        impls.append("hf")
    specs = {
        impl: {"kind": kind, "impl": impl, "preset": name, "dtype": dtype, "T": T, "batch": B}
        for impl in impls
    }
    fns = {impl: build(spec, device) for impl, spec in specs.items()}
    times = time_alternating(fns, bc.warmup, bc.repeats, device)
    rows = []
    for impl, fn in fns.items():
        seconds = statistics.median(times[impl])
        row = Row(kind, name, dtype, T, B, impl, 1e3 * seconds, B * T / seconds)
        if kind == "step":
            row.gflop = count_flops(fn) / 1e9
            row.mfu = row.gflop * 1e9 / seconds / peak
            if bc.memory:
                mem = measure_memory(specs[impl], device)
                row.peak_mb, row.step_mb = mem["peak_mb"], mem["step_mb"]
        rows.append(row)
    del fns
    hf = next((r for r in rows if r.impl == "hf"), None)
    for row in rows:
        if hf is not None:
            row.speedup_vs_hf = row.tokens_per_s / hf.tokens_per_s
        log(format_row(row))
    return rows


COLUMNS = ("kind", "preset", "dtype", "T", "batch", "impl", "ms", "tokens_per_s", "speedup_vs_hf")
COLUMNS += ("gflop", "mfu", "peak_mb", "step_mb")


def format_row(row: Row | dict) -> str:
    r = asdict(row) if isinstance(row, Row) else row

    def cell(key, fmt):
        return "-" if r[key] is None else format(r[key], fmt)

    return (
        f"{r['kind']:<9} {r['preset']:<7} {r['dtype']:<4} {r['T']:>5} {r['batch']:>3} {r['impl']:<8} "
        f"{r['ms']:>9.1f} {r['tokens_per_s']:>9.0f} {cell('speedup_vs_hf', '>6.2f')} {cell('gflop', '>7.1f')} "
        f"{cell('mfu', '>6.1%')} {cell('peak_mb', '>7.0f')} {cell('step_mb', '>7.0f')}"
    )


HEADER = (
    f"{'kind':<9} {'preset':<7} {'dt':<4} {'T':>5} {'B':>3} {'impl':<8} {'ms':>9} {'tok/s':>9} "
    f"{'vs hf':>6} {'GFLOP':>7} {'MFU':>6} {'peakMB':>7} {'stepMB':>7}"
)


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run at tiny sizes")
    parser.add_argument("--presets", help="comma-separated model presets (default mini,xsmall)")
    parser.add_argument("--dtypes", help="comma-separated: fp32,bf16")
    parser.add_argument("--seq-lens", help="comma-separated T for the RTD step (default 128,512)")
    parser.add_argument(
        "--layer-seq-lens", help="comma-separated T for encoder/attention (default 128,512,1024)"
    )
    parser.add_argument("--kinds", help="comma-separated subset of step,encoder,attention")
    parser.add_argument("--tokens-per-step", type=int, help="batch size = this // T")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
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
        "presets": args.presets and tuple(args.presets.split(",")),
        "dtypes": args.dtypes and tuple(args.dtypes.split(",")),
        "step_seq_lens": args.seq_lens and tuple(int(t) for t in args.seq_lens.split(",")),
        "layer_seq_lens": args.layer_seq_lens and tuple(int(t) for t in args.layer_seq_lens.split(",")),
        "kinds": args.kinds and tuple(args.kinds.split(",")),
        "tokens_per_step": args.tokens_per_step,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory": False if args.no_memory else None,
        "peer": False if args.no_peer else None,
    }
    bc = BenchConfig(**{**asdict(bc), **{k: v for k, v in overrides.items() if v is not None}})
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result = run(bc, device)
    if args.json:
        atomic_write_json(args.json, result)
    if args.csv:
        write_csv(args.csv, result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
