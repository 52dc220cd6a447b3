"""How the benchmark measures (`python -m lab bench`, lab/bench/benchmark.py), and the row each measurement fills.

  time_alternating  seconds per call of several candidates, timed alternately after warm-up
  count_flops       matmul FLOPs of one call, as torch's FlopCounterMode sees them
  matmul_peak       the machine's practical FLOP/s ceiling in a dtype (square matmuls)
  allocator_env     the allocator settings the process runs under (they decide its page faults),
                    and allocator_text, the same as one line of text
  memory            peak memory of a candidate's steps: in-process on CUDA, a fresh subprocess on CPU,
                    which then also times the steps alone (`alone_ms`), with the kernel's share of
                    them (`alone_sys_ms`, `alone_faults`)
  Row               one benchmark result, with format_row / HEADER (the printed table) and
                    COLUMNS (the CSV's columns, lab.util.write_csv)

Why memory and FLOPs are measured the way they are is in lab/bench/benchmark.py's docstring.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lab.bench.builders import build
from lab.training import sync

# what decides whether a freed tensor's memory goes back to the kernel, and so how many fresh pages a
# step faults in (see the `alone_faults` column): glibc's malloc tunables, a preloaded allocator
ALLOCATOR_ENV = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "LD_PRELOAD",
    "THP_MEM_ALLOC_ENABLE",
)


def allocator_env() -> dict[str, str]:
    """The allocator settings this process runs under (ALLOCATOR_ENV), as set in its environment."""
    return {key: os.environ[key] for key in ALLOCATOR_ENV if key in os.environ}


def allocator_text() -> str:
    """allocator_env as the benchmark's and the profile's output print it."""
    return ", ".join(f"{k}={v}" for k, v in allocator_env().items()) or "the defaults"


def peak_size(device: torch.device) -> int:
    """n of the n x n x n matmuls that measure the peak: 8192 on CUDA, where 2048 leaves an H100/H200
    at about half its rate, and 2048 on a CPU, which it already saturates."""
    return 8192 if device.type == "cuda" else 2048


def time_alternating(fns: dict[str, callable], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Seconds per call for each candidate; candidates alternate within every repeat, and the order
    rotates between repeats so none always runs right after the same neighbour."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
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
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best


def _read_status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def memory_probe(spec: dict, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Peak memory of `steps` calls of one candidate (run this in a fresh process on CPU); there, then
    the median ms of spec["alone_repeats"] more calls (`alone_ms`): the candidate timed with no other
    candidate's memory in the process, as a user's training process runs it (see benchmark.py)."""
    fn = build(spec, device)
    if device.type == "cuda":
        return cuda_memory(fn, device, steps)
    base_kb = _read_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        fn()
    peak_kb = _read_status_kb("VmHWM")
    result = {"peak_mb": peak_kb / 1024, "step_mb": (peak_kb - base_kb) / 1024}
    if spec.get("alone_repeats"):
        repeats = spec["alone_repeats"]
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = time_alternating({"alone": fn}, 0, repeats, device)["alone"]
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["alone_ms"] = 1e3 * statistics.median(seconds)
        result.update(kernel_share(before, after, repeats))
    return result


def kernel_share(before, after, steps: int) -> dict[str, float]:
    """What the kernel did for a candidate's steps, per step, from two getrusage(RUSAGE_SELF) readings:
    `alone_sys_ms` the CPU time spent in the kernel (all threads), `alone_faults` the minor page
    faults, each a fresh page mapped and zeroed on first touch (4 KiB: a 197 MB tensor is 48,000).
    Over the same steps as alone_ms: where a step's wall time goes beyond its arithmetic."""
    return {
        "alone_sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
        "alone_faults": (after.ru_minflt - before.ru_minflt) / steps,
    }


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
        [sys.executable, "-m", "lab.bench.benchmark", "--memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The row a measurement fills, as a line of the printed table and of the CSV


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
    peak_mb: float | None = None  # peak memory (see lab/bench/benchmark.py's docstring)
    step_mb: float | None = None  # memory added by running the steps
    vocab: int | None = None  # rows of the word table
    examples_per_s: float | None = None  # finetune: training examples per second
    compile_s: float | None = None  # compiled candidates: wall time of the warm-up calls
    # CPU steps: median ms of the same step timed alone in a fresh process (the memory probe's), and
    # the hf row's alone_ms over this one's (the tokens/s ratio of the two timed alone)
    alone_ms: float | None = None
    alone_speedup_vs_hf: float | None = None
    # and over those steps, per step: kernel CPU ms and minor page faults (measure.kernel_share)
    alone_sys_ms: float | None = None
    alone_faults: float | None = None
    note: str = ""


COLUMNS = ("kind", "preset", "dtype", "T", "batch", "impl", "ms", "tokens_per_s", "speedup_vs_hf")
COLUMNS += ("gflop", "mfu", "peak_mb", "step_mb", "vocab", "examples_per_s", "compile_s")
COLUMNS += ("alone_ms", "alone_speedup_vs_hf", "alone_sys_ms", "alone_faults", "note")


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
    if r.get("alone_ms") is not None:
        ratio = r.get("alone_speedup_vs_hf")
        kernel = (
            ""
            if r.get("alone_faults") is None
            else f" (sys {r['alone_sys_ms']:.0f} ms, {r['alone_faults']:,.0f} faults)"
        )
        extras.append(
            f"alone {r['alone_ms']:.0f} ms{kernel}" + ("" if ratio is None else f", {ratio:.2f}x vs hf alone")
        )
    return line + ("  " + ", ".join(extras) if extras else "")


HEADER = (
    f"{'kind':<9} {'preset':<7} {'dt':<4} {'T':>5} {'B':>3} {'impl':<18} {'ms':>9} {'tok/s':>9} "
    f"{'vs hf':>6} {'GFLOP':>7} {'MFU':>6} {'peakMB':>7} {'stepMB':>7}"
)
