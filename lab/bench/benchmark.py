"""Performance benchmark: lab's RTD step, encoder and attention against a `transformers` peer, plus the
throughput of the real pre-training and fine-tuning loops.

    python -m lab bench                           # CPU: mini + xsmall, fp32 + bf16 (several minutes)
    python -m lab bench --device cuda             # GPU: every kind below
    python -m lab bench --quick                   # seconds: tiny sizes, every kind, smoke test
    python -m lab bench --out-dir runs/bench      # runs/bench/bench.json and bench.csv

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
  pretrain   tokens/s of `lab.pretrain.loop.train()` itself (data loading, masking, the whole loop with its
             defaults, compilation included where the default compiles) on a random-word corpus with a
             SentencePiece vocabulary of `pretrain.vocab` pieces: the median ms/step of the logged
             windows after the first (which holds the warm-up and any compilation).
  finetune   training examples/s of `lab.finetune.loop.train()` on an SST-2-shaped task of random words
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

Alone (`alone_ms`, `alone_speedup_vs_hf`, CPU steps): that fresh subprocess then times `repeats` more
steps of its one candidate. The alternating timing shares one process, and so one heap, between the
candidates: a large tensor one candidate asks for may be served from memory another one freed, already
mapped, or may need fresh pages whose first touch the kernel must fault in and zero (at xsmall a
[V, D] gradient is 197 MB, 48,000 pages). Which candidate gets which depends on what ran before it,
and on a 2-core CPU the difference is a large share of a step. The alone figure is the step as a
training process holding one model runs it; the table shows both, and the two ratios need not agree.
Over those same steps, `alone_sys_ms` and `alone_faults` give the kernel's share per step (CPU ms in
the kernel, minor page faults; measure.kernel_share): how much of a candidate's wall time is its
allocator's fresh pages rather than its arithmetic, and so how much a ratio moves with the machine's
memory state from run to run.

FLOPs (`gflop`, `mfu`): matmul and attention FLOPs (forward and backward), not element-wise work. For
lab's step, `rtd_step_flops`, the count written out by hand, which FlopCounterMode reproduces where it
sees every product (the tests check this) but undercounts behind fused attention kernels it has no
formula for; for the peer, FlopCounterMode over one step. `mfu` divides the achieved FLOP/s by the machine's
matmul peak, measured in the same run with square matmuls in that dtype where the device saturates:
8192^3 on CUDA (smaller products leave a large GPU partly idle and understate its peak), 2048^3 on
the CPU; `matmul_peak_n` in the results says which. bf16 means torch.autocast(dtype=bfloat16) with
fp32 parameters and fp32 AdamW.

The code: this module holds the configuration, the comparisons (`run`, `compare`) and the CLI;
lab/bench/builders.py builds what gets timed (lab's step, encoder and attention, and the peer
`HFPeer`), lab/bench/measure.py times, counts and probes them and defines the `Row` every result fills,
lab/bench/loops.py times the real pre-training and fine-tuning loops.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lab.bench.builders import (
    attention_impls,
    build,
    build_lab_step,
    default_attention_impl,
    model_config,
    rtd_step_flops,
)
from lab.bench.loops import FinetuneBench, PretrainBench, finetune_row, pretrain_row
from lab.bench.measure import (
    COLUMNS,
    HEADER,
    Row,
    allocator_env,
    allocator_text,
    count_flops,
    cuda_memory,
    format_row,
    matmul_peak,
    measure_memory,
    memory_probe,
    peak_size,
    sync,
    time_alternating,
)
from lab.cli import config_parser, param, parse_values, run_verb
from lab.training import COMPILE_MODES, compile_scope
from lab.util import atomic_write_json, pick_device, replace_strict, write_csv

CLASSIC_KINDS = ("step", "encoder", "attention")
ALL_KINDS = (*CLASSIC_KINDS, "compile", "pretrain", "finetune")


def default_kinds(device: torch.device) -> tuple[str, ...]:
    """What `python -m lab bench` runs when --kinds is not given: everything on CUDA; on a CPU the
    three comparisons (the pre-training and fine-tuning loops at xsmall take many minutes there)."""
    return ALL_KINDS if device.type == "cuda" else CLASSIC_KINDS


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...] = param(("mini", "xsmall"), "model sizes (lab.model presets, their vocab sizes)")
    dtypes: tuple[str, ...] = param(("fp32", "bf16"), "bf16 = autocast, fp32 master weights")
    step_seq_lens: tuple[int, ...] = param((128, 512), "T for the RTD step")
    layer_seq_lens: tuple[int, ...] = param(
        (128, 512, 1024), "T for encoder / attention; the peer only to 512"
    )
    tokens_per_step: int = param(512, "batch size = tokens_per_step // T (at least 1)")
    warmup: int = param(1, "untimed calls per candidate before timing")
    repeats: int = param(3, "timed calls per candidate, alternating between candidates")
    kinds: tuple[str, ...] = param(
        (),
        f"comparisons to run, of {','.join(ALL_KINDS)}; none = all on CUDA, step,encoder,attention on the CPU",
    )
    memory: bool = param(True, "measure peak memory of every RTD step (a subprocess each on CPU)")
    peer: bool = param(True, "run the transformers peer (needs `transformers`)")
    attention_impls: tuple[str, ...] = param((), "lab attention implementations; none = every available one")
    compile_modes: tuple[str, ...] = param(("default",), "torch.compile modes of the compile candidates")
    compile_backend: str = param("inductor", "torch.compile backend ('aot_eager' skips code generation)")
    peak_n: int = param(0, "matmul size of the peak measurement; 0 = peak_size(device)")
    pretrain: PretrainBench = field(default_factory=PretrainBench)
    finetune: FinetuneBench = field(default_factory=FinetuneBench)
    work_dir: str = param("", "corpora and runs of the pretrain / finetune kinds; '' = a temporary folder")
    out_dir: str = param("", "folder for bench.json and bench.csv; '' = print only")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    one_at_a_time: bool = param(
        False,
        "build, time and free one candidate at a time instead of alternating between them: for sizes whose "
        "candidates do not fit in memory together (base at T=512 on an 80 GB GPU)",
    )

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
# The benchmark


def run(bc: BenchConfig, device: torch.device, log=print) -> dict:
    kinds = bc.kinds or default_kinds(device)
    peak_n = bc.peak_n or peak_size(device)
    peaks = {dtype: matmul_peak(dtype, device, peak_n) for dtype in bc.dtypes}
    log(f"matmul peak ({peak_n}^3): " + ", ".join(f"{d} {p / 1e9:.3g} GFLOP/s" for d, p in peaks.items()))
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
                        name,
                        T,
                        B,
                        dtype,
                        device,
                        bc.compile_modes,
                        bc.compile_backend,
                        bc.warmup,
                        bc.repeats,
                        peaks[dtype],
                        gflop=eager and eager.gflop,
                        hf=hf,
                        memory=bc.memory,
                        log=log,
                    )
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
        "allocator_env": allocator_env(),
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
        impls = ["lab" if impl == default else f"lab-{impl}" for impl in chosen]
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
    times, counted = {}, {}
    if bc.one_at_a_time:
        for impl, spec in specs.items():
            fn = build(spec, device)
            times.update(time_alternating({impl: fn}, bc.warmup, bc.repeats, device))
            counted[impl] = count_flops(fn) if kind == "step" else None
            del fn
            _release(device)
    else:
        fns = {impl: build(spec, device) for impl, spec in specs.items()}
        times = time_alternating(fns, bc.warmup, bc.repeats, device)
        counted = {impl: count_flops(fn) if kind == "step" else None for impl, fn in fns.items()}
        del fns
    rows = []
    for impl in specs:
        seconds = statistics.median(times[impl])
        row = Row(
            kind,
            name,
            dtype,
            T,
            B,
            impl,
            1e3 * seconds,
            B * T / seconds,
            vocab=model_config(name, T).vocab_size,
        )
        if kind == "step":
            # lab's step: the hand count, which FlopCounterMode confirms where it sees every product
            # (tests/test_bench.py) but undercounts behind fused attention kernels; the peer: counted
            flops = rtd_step_flops(model_config(name, T), B, T) if impl.startswith("lab") else counted[impl]
            if abs(counted[impl] - flops) > 0.01 * flops:
                row.note = f"FlopCounterMode saw {counted[impl] / 1e9:.1f} GFLOP"
            row.gflop = flops / 1e9
            row.mfu = flops / seconds / peak
        rows.append(row)
    if kind == "step" and bc.memory:
        # one candidate alive at a time, so that a CUDA peak holds nothing of the others; on the CPU
        # the probe's fresh process also times the candidate alone
        for row in rows:
            _release(device)
            mem = measure_memory({**specs[row.impl], "alone_repeats": bc.repeats}, device)
            row.peak_mb, row.step_mb, row.alone_ms = mem["peak_mb"], mem["step_mb"], mem.get("alone_ms")
            row.alone_sys_ms, row.alone_faults = mem.get("alone_sys_ms"), mem.get("alone_faults")
        _release(device)
    hf = next((r for r in rows if r.impl == "hf"), None)
    for row in rows:
        if hf is not None:
            row.speedup_vs_hf = row.tokens_per_s / hf.tokens_per_s
            if row.alone_ms and hf.alone_ms:
                row.alone_speedup_vs_hf = hf.alone_ms / row.alone_ms
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
    name,
    T,
    B,
    dtype,
    device,
    modes,
    backend="inductor",
    warmup=1,
    repeats=3,
    peak=None,
    gflop=None,
    hf: Row | None = None,
    memory=True,
    log=print,
) -> list[Row]:
    """The lab-es step with the model under torch.compile, once per mode. Warm-up is at least three
    calls (compilation, then CUDA-graph warm-up and recording in the reduce-overhead mode); their wall
    time is `compile_s`. The FLOPs are the eager step's hand count (the math is the same)."""
    if gflop is None:
        gflop = rtd_step_flops(model_config(name, T), B, T) / 1e9
    rows = []
    for mode in modes:
        torch._dynamo.reset()  # every mode compiles from scratch
        fn = build_lab_step(name, T, B, dtype, device, "es", compile_mode=mode, compile_backend=backend)
        sync(device)
        start = time.perf_counter()
        for _ in range(max(3, warmup)):
            fn()
        sync(device)
        compile_s = time.perf_counter() - start
        seconds = statistics.median(time_alternating({mode: fn}, 0, repeats, device)[mode])
        row = Row(
            "step",
            name,
            dtype,
            T,
            B,
            f"lab-es+{mode}",
            1e3 * seconds,
            B * T / seconds,
            gflop=gflop,
            vocab=model_config(name, T).vocab_size,
            compile_s=compile_s,
            note=f"torch.compile backend={backend}, {compile_scope('auto', mode)} compiled",
        )
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
# Command line


def cli(argv: list[str] | None = None) -> int:
    """`python -m lab bench`: BenchConfig's flags (--quick starts from QUICK instead of the defaults)."""
    parser = config_parser(BenchConfig, "python -m lab bench", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run at tiny sizes, every kind"
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # one peak-memory measurement, in a child
    values = parse_values(parser, sys.argv[1:] if argv is None else argv)
    quick, probe = values.pop("quick", False), values.pop("memory_probe", None)
    try:
        bc = replace_strict(QUICK if quick else BenchConfig(), **values)
    except ValueError as err:
        parser.error(str(err))
    device = pick_device(bc.device)
    if probe:
        print(json.dumps(memory_probe(json.loads(probe), device)))
        return 0
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} threads, torch {torch.__version__}, allocator: {allocator_text()}")

    def action() -> None:
        result = run(bc, device)
        if bc.out_dir:
            atomic_write_json(Path(bc.out_dir) / "bench.json", result)
            write_csv(Path(bc.out_dir) / "bench.csv", result["rows"], COLUMNS, digits=None)

    return run_verb(action)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
