"""One prepared run on a lent GPU: the benchmark rows, the CUDA correctness checks, a short pre-training
that counts host syncs, a one-process torchrun, and a GLUE fine-tune of the short run's discriminator
(how to run it, and what each part measures: the README's GPU section).

This module holds the sizes (`GPU`, `SMOKE`), the parts (`PARTS`, each `part_*(c: Check) -> dict`) and
the command line (`GpuCheckConfig`, `cli`). Beside it: lab/bench/budget.py runs the parts in order
within the time budget, lab/bench/devicecheck.py holds the float64 correctness checks,
lab/bench/syncs.py the host-sync counter, lab/bench/gpureport.py writes gpucheck.json / .csv /
summary.txt. Only the system `python3` of the GPU machine runs it (CUDA torch, transformers,
sentencepiece, safetensors, scikit-learn, scipy, tqdm; no network), so nothing here imports anything
else at module level.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lab.bench import benchmark as bench
from lab.bench.budget import Part, remaining_s, run_parts, run_process_group
from lab.bench.builders import attention_impls, default_attention_impl
from lab.bench.devicecheck import Shape, check_encoder, check_rtd_loss, describe_check, exact_fp32
from lab.bench.gpureport import rate, summary_text, write_outputs
from lab.bench.loops import (
    FinetuneBench,
    PretrainBench,
    bench_corpus,
    finetune_row,
    pretrain_row,
    steady_ms_per_step,
    train_windows,
)
from lab.bench.measure import HEADER, Row, format_row, matmul_peak
from lab.bench.syncs import SyncCounter
from lab.cli import USER_ERROR, config_parser, param, parse_config
from lab.util import data_dir, pick_device, read_jsonl

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
    correctness: Shape  # preset, layers, T, batch (one row padded by a quarter)
    step: tuple[str, int, int, str]  # preset, T, batch, dtype
    attention: tuple[str, tuple[int, ...], int, str]  # preset, T values, tokens per call, dtype
    pretrain: PretrainBench
    short_run: PretrainBench  # on WikiText-2
    torchrun: PretrainBench
    finetune: FinetuneBench
    compile_backend: str
    warmup: int
    repeats: int
    memory: bool  # peak memory of the steps (in-process on CUDA; subprocesses on CPU, off in smoke)


GPU = Sizes(
    peak_n=8192,
    correctness=("xsmall", 2, 512, 3),
    step=("base", 512, 32, "bf16"),
    attention=("base", (512, 1024, 2048), 16384, "bf16"),
    pretrain=PretrainBench("xsmall", 32000, 128, 128, steps=30, log_every=10),
    short_run=PretrainBench("xsmall", 32000, 128, 128, steps=30, log_every=10),
    torchrun=PretrainBench("xsmall", 32000, 128, 32, steps=8, log_every=4),
    # compiled (the encoder layer, once) at two padded widths, 64 and 128: a handful of graphs (training
    # and evaluation, then one with a dynamic width), far from dynamo's recompile limit
    finetune=FinetuneBench(
        "xsmall",
        32000,
        examples=1024,
        eval_examples=872,
        batch=32,
        seq_len=128,
        compile=True,
        length_bucket=64,
    ),
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
    pretrain=PretrainBench("tiny", 300, 32, 8, steps=4, log_every=2),
    short_run=PretrainBench("tiny", 300, 32, 8, steps=6, log_every=3),
    torchrun=PretrainBench("tiny", 300, 32, 8, steps=2, log_every=1),
    finetune=FinetuneBench(
        "tiny", 300, examples=32, eval_examples=16, batch=16, seq_len=32, epochs=2, length_bucket=16
    ),
    compile_backend="eager",  # dynamo's tracing without code generation: the CPU has no time for more
    warmup=1,
    repeats=2,
    memory=False,
)


@dataclass
class Check:
    """What every part gets, and what the parts hand on."""

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
    with exact_fp32():
        c.peaks = {dtype: matmul_peak(dtype, c.device, c.sizes.peak_n) for dtype in ("bf16", "fp32")}
    info["matmul_peak_n"] = c.sizes.peak_n
    info["matmul_peak_tflops"] = {d: p / 1e12 for d, p in c.peaks.items()}
    info["attention_impls"] = [i or "default" for i in attention_impls(c.device)]
    info["default_attention_impl"] = default_attention_impl()
    info["shipped_tokenizers"] = sorted(p.name for p in shipped_tokenizers(c.data))
    from lab.pretrain.loop import PretrainConfig

    defaults = PretrainConfig()
    info["pretrain_compile_default"] = f"{defaults.compile}/{defaults.compile_mode}"
    info["skipped_by_design"] = SKIPPED_BY_DESIGN
    c.log(
        f"{info['device_name']}: bf16 {rate(c.peaks['bf16'])}, fp32 {rate(c.peaks['fp32'])} at {c.sizes.peak_n}^3; "
        f"attention {info['attention_impls']}"
    )
    return info


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
    with exact_fp32():
        for dtype in dtypes:
            checks[f"rtd_loss/{dtype}"] = check_rtd_loss(c.device, c.sizes.correctness, dtype)
        impls = [i for i in attention_impls(c.device) if i != "flex"]  # flex: the last part, isolated
        for impl in impls:
            for dtype in dtypes:
                key = f"encoder[{impl or 'default'}]/{dtype}"
                try:
                    checks[key] = check_encoder(impl, dtype, c.device, c.sizes.correctness)
                except Exception as err:  # one implementation failing must not hide the others
                    checks[key] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    for key, value in checks.items():
        c.log(f"  {key:<32} {describe_check(value)}")
    return {"checks": checks, "ok": all(v["ok"] for v in checks.values())}


def _bench_config(c: Check, **kw) -> bench.BenchConfig:
    return bench.BenchConfig(warmup=c.sizes.warmup, repeats=c.sizes.repeats, memory=c.sizes.memory, **kw)


def part_step(c: Check) -> dict:
    name, T, B, dtype = c.sizes.step
    # one candidate in memory at a time: the peer alone peaked at 60 GB at base T=512 batch 32
    bc = _bench_config(
        c,
        presets=(name,),
        dtypes=(dtype,),
        step_seq_lens=(T,),
        tokens_per_step=B * T,
        kinds=("step",),
        one_at_a_time=True,
    )
    c.log(HEADER)
    rows = bench.compare("step", name, dtype, T, bc, c.device, c.peaks[dtype], c.log)
    c.state["step_rows"] = rows
    return {"rows": rows}


def part_attention(c: Check) -> dict:
    name, lengths, tokens, dtype = c.sizes.attention
    impls = tuple(i for i in attention_impls(c.device) if i != "flex")  # flex: the last part, isolated
    bc = _bench_config(
        c,
        presets=(name,),
        dtypes=(dtype,),
        tokens_per_step=tokens,
        kinds=("attention",),
        attention_impls=impls,
    )
    c.log(HEADER)
    rows = c.partial.setdefault("rows", [])
    for T in lengths:
        rows += bench.compare("attention", name, dtype, T, bc, c.device, c.peaks[dtype], c.log)
    return {"rows": rows}


def part_pretrain(c: Check) -> dict:
    row = pretrain_row(c.sizes.pretrain, c.device, c.work / "pretrain", peaks=c.peaks, log=c.log)
    c.state["pretrain_run"] = c.work / "pretrain" / "run"  # a discriminator for the fine-tune
    c.log(format_row(row))
    return {"rows": [row], "tokenizers_trained_here": tokenizers_trained_here(c)}


def wikitext(c: Check) -> Path:
    path = c.data / "wikitext-2" / "wiki.train.tokens"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; run `python -m lab gpucheck --prepare-data --data-dir {c.data}` where "
            "$LAB_DATA_DIR holds wikitext-2/, and copy that folder to the GPU machine with the checkout"
        )
    return path


def part_short_run(c: Check) -> dict:
    from lab.pretrain.loop import PretrainConfig, train

    size = c.sizes.short_run
    out_dir = c.work / "short-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    eval_every = ckpt_every = size.steps  # evaluation at step 0 only, one checkpoint at the end
    cfg = PretrainConfig(
        out_dir=str(out_dir),
        preset=size.preset,
        corpus=str(wikitext(c)),
        vocab_size=size.vocab,
        seq_len=size.seq_len,
        batch_size=size.batch,
        steps=size.steps,
        log_every=size.log_every,
        eval_every=eval_every,
        eval_batches=4,
        probe_every=0,
        ckpt_every=ckpt_every,
        progress="line",
        device=str(c.device),
    )
    with SyncCounter(c.device) as counter:
        summary = train(cfg)
    # the loop's warm-up steps (3 when compiled, else 1) synchronise on purpose to time themselves;
    # bucket k holds step k's end, so steady buckets start after the last warm-up step
    warmup = (3 if summary["compiled"] else 1) + 1
    syncs = counter.report(size.steps, size.log_every, eval_every, ckpt_every, warmup=warmup)
    c.state["short_run"] = out_dir
    windows = train_windows(out_dir)
    ms = steady_ms_per_step(windows)
    row = Row(
        "pretrain",
        size.preset,
        "bf16" if "bfloat16" in summary["dtype"] else "fp32",
        size.seq_len,
        size.batch,
        f"lab-{cfg.sharing}",
        ms,
        size.batch * size.seq_len / (ms / 1e3),
        vocab=summary["vocab_size"],
        note=f"WikiText-2, under sync counting; compile={cfg.compile}",
    )
    c.log(
        f"  syncs per steady-state step: {syncs['syncs_per_steady_step']:.2f} over {syncs['steady_steps']} steps "
        f"({syncs['method']}); elsewhere {syncs['syncs_elsewhere']}"
    )
    for site, n in syncs["steady_sites"]:
        c.log(f"    {n:>4}  {site}")
    final = summary.get("final_eval", {})
    return {
        "syncs": syncs,
        "rows": [row],
        "final_eval": {k: final.get(k) for k in ("mlm_loss", "mlm_acc", "rtd_acc", "rtd_auc")},
        "final_train_loss": windows[-1]["loss"] if windows else None,
        "corpus": summary.get("corpus_info"),
        "tokenizers_trained_here": tokenizers_trained_here(c),
    }


def _child_env() -> dict:
    repo = str(Path(__file__).resolve().parents[2])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def allreduce_child(device_type: str) -> dict:
    """Run by `torchrun ... -m lab.bench.gpucheck --allreduce-child DEVICE`: one all-reduce on the device in a
    process group of the backend torch picks for it, and what it used (printed as the last line)."""
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device_type == "cuda"
        else torch.device("cpu")
    )
    x = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(x)
    world = dist.get_world_size()
    result = {
        "backend": dist.get_backend(),
        "world_size": world,
        "sum": float(x[0]),
        "expected": world * (world + 1) / 2,
        "device": str(x.device),
    }
    dist.destroy_process_group()
    return result


def part_torchrun(c: Check) -> dict:
    size = c.sizes.torchrun
    out_dir = c.work / "torchrun"
    shutil.rmtree(out_dir, ignore_errors=True)
    flags = {
        "out-dir": out_dir,
        "preset": size.preset,
        "corpus": wikitext(c),
        "vocab-size": size.vocab,
        "seq-len": size.seq_len,
        "batch-size": size.batch,
        "steps": size.steps,
        "log-every": size.log_every,
        "eval-every": size.steps,
        "eval-batches": 1,
        "probe-every": 0,
        "ckpt-every": size.steps,
        "progress": "line",
        "device": c.device.type,
        "compile": "off",  # this part is about the process group, so it runs eagerly
    }
    argv = [f"--{k}={v}" for k, v in flags.items()]
    env = _child_env()
    if c.device.type == "cuda":
        env["NCCL_DEBUG"] = "INFO"  # evidence in the log that a NCCL communicator was created
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command = [*torchrun, "-m", "lab", "pretrain", *argv]
    c.log("  " + " ".join(command[1:]))
    start = time.perf_counter()
    # a world of one never all-reduces in the loop (DDP is not wrapped), so a second launch does one
    # all-reduce on the device and says which backend carried it
    reduce_command = [*torchrun, "-m", "lab.bench.gpucheck", "--allreduce-child", c.device.type]
    reduce = run_process_group(reduce_command, env, timeout=min(120.0, remaining_s()))
    if reduce.returncode != 0:
        raise RuntimeError(
            f"torchrun all-reduce exited with {reduce.returncode}:\n{(reduce.stdout + reduce.stderr)[-3000:]}"
        )
    allreduce = json.loads(reduce.stdout.strip().splitlines()[-1])
    c.partial["allreduce"] = allreduce
    proc = run_process_group(command, env, timeout=remaining_s())
    wall = time.perf_counter() - start
    output = reduce.stdout + reduce.stderr + proc.stdout + proc.stderr
    result = {
        "returncode": proc.returncode,
        "wall_s": wall,
        "backend": allreduce["backend"],
        "allreduce": allreduce,
        "nccl_log_lines": sum("NCCL INFO" in line for line in output.splitlines()),
        "command": " ".join(command[1:]),
    }
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{output[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    losses = [r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if r["split"] == "train"]
    result.update(
        world_size=summary["world_size"],
        device_used=summary["device"],
        steps=summary["steps"],
        tokens_per_s=summary["tokens_per_s"],
        train_losses=losses,
        ok=summary["steps"] == size.steps
        and bool(losses)
        and all(math.isfinite(x) for x in losses)
        and allreduce["sum"] == allreduce["expected"],
    )
    c.log(
        f"  torchrun: exit 0, {summary['steps']} steps on {summary['device']}, world {summary['world_size']}, "
        f"losses {', '.join(f'{x:.3f}' for x in losses)}; all-reduce over {allreduce['backend']} on "
        f"{allreduce['device']}: {allreduce['sum']} (expected {allreduce['expected']}); "
        f"{result['nccl_log_lines']} NCCL INFO lines"
    )
    return result


def part_finetune(c: Check) -> dict:
    # the short run's discriminator (WikiText-2) when that part ran before, else the pretrain part's
    # (random-word corpus: the pipeline and its speed, not a meaningful dev score); the result says which
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
    row = finetune_row(
        c.sizes.finetune,
        c.device,
        c.work / "finetune",
        init=str(run_dir),
        glue_dir=str(c.data / "glue"),
        task=task[0],
        log=c.log,
    )
    results = json.loads((c.work / "finetune" / "run" / "results.json").read_text())
    c.log(format_row(row) + f"  ({row.note})")
    return {"rows": [row], "task": task[0], "dev": results["metrics_per_seed"][0], "init": str(run_dir)}


def part_compile(mode: str) -> Callable[[Check], dict]:
    def run(c: Check) -> dict:
        name, T, B, dtype = c.sizes.step
        step_rows = c.state.get("step_rows", [])
        eager = next((r for r in step_rows if r.impl == "lab-es"), None)
        hf = next((r for r in step_rows if r.impl == "hf"), None)
        rows = bench.compiled_step_rows(
            name,
            T,
            B,
            dtype,
            c.device,
            (mode,),
            c.sizes.compile_backend,
            c.sizes.warmup,
            c.sizes.repeats,
            c.peaks[dtype],
            gflop=eager and eager.gflop,
            hf=hf,
            memory=c.sizes.memory,
            log=c.log,
        )
        result = {"rows": rows, "mode": mode}
        if eager is not None:
            result["speedup_vs_eager"] = eager.ms / rows[0].ms
        return result

    return run


def flex_child(smoke: bool, device_type: str) -> dict:
    """Run by `python -m lab.bench.gpucheck --flex-child`: FlexAttention's checks (the encoder against
    transformers in float64, fp32 and bf16) and its attention rows, in a process of their own, so that
    a sticky CUDA error in its never-run backward cannot fail any other part."""
    sizes = SMOKE if smoke else GPU
    device = torch.device(device_type)
    if "flex" not in attention_impls(device):
        return {"checks": {}, "rows": [], "note": f"flex does not train on {device_type} with this torch"}
    checks = {}
    with exact_fp32():
        for dtype in ("fp32", "bf16"):
            try:
                checks[f"encoder[flex]/{dtype}"] = check_encoder("flex", dtype, device, sizes.correctness)
            except Exception as err:
                checks[f"encoder[flex]/{dtype}"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    name, lengths, tokens, dtype = sizes.attention
    bc = bench.BenchConfig(
        warmup=sizes.warmup,
        repeats=sizes.repeats,
        memory=False,
        presets=(name,),
        dtypes=(dtype,),
        tokens_per_step=tokens,
        kinds=("attention",),
        attention_impls=("flex",),
    )
    peak = matmul_peak(dtype, device, sizes.peak_n)
    rows = []
    for T in lengths:
        rows += [
            dataclasses.asdict(r) for r in bench.compare("attention", name, dtype, T, bc, device, peak, print)
        ]
    return {"checks": checks, "rows": rows}


def part_flex(c: Check) -> dict:
    command = [sys.executable, "-m", "lab.bench.gpucheck", "--flex-child", c.device.type] + (
        ["--smoke"] if c.smoke else []
    )
    proc = run_process_group(command, _child_env(), timeout=remaining_s())
    for line in proc.stdout.splitlines()[:-1]:
        c.log("  " + line)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the flex subprocess exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in result["checks"].items():
        c.log(f"  {key:<32} {describe_check(value)}")
    if result.get("note"):
        c.log(f"  {result['note']}")
    return {**result, "ok": all(v["ok"] for v in result["checks"].values())}


def part_compile_pretrain(c: Check) -> dict:
    """The xsmall pre-training loop with compile_mode="default", against the pretrain part's run with
    the loop's own default (compile_mode="auto": reduce-overhead at xsmall): does auto's pick hold?"""
    from lab.pretrain.loop import PretrainConfig, compile_mode

    row = pretrain_row(
        c.sizes.pretrain,
        c.device,
        c.work / "pretrain-default",
        peaks=c.peaks,
        log=c.log,
        compile="on",
        compile_mode="default",
    )
    row.impl += "+default"
    c.log(format_row(row))
    auto = PretrainConfig(preset=c.sizes.pretrain.preset)
    return {
        "rows": [row],
        "mode": "default",
        "shape": f"pretrain {c.sizes.pretrain.preset}",
        "auto_mode": compile_mode(auto, 1),
    }


# In the order a first run on a lent GPU must bring its answers back: the device and its peak, the
# correctness checks, the step against the peer, pre-training throughput, fine-tuning; then what
# extends them. The budgets (expected seconds on an H100 / H200) add up to GPU_BUDGET_S, so a run in
# which every part takes its budget runs them all; a part may overrun to 1.5x, and the last parts are
# then skipped, with a note. Compiling parts, from cold-cache compiles on a CPU (figures/bench/README.md,
# "Compile time": CPU-seconds of the first three steps, one thread) times 2 for the GPU (inductor's
# Triton kernels against its C++ ones, bf16 casts; an assumption until a GPU run times them):
# pretrain compiles the whole xsmall model (auto = reduce-overhead, CUDA graphs), 48 s on the CPU, so
# ~95 s; the layer alone (compile:*, finetune) 10-11 s, so ~20 s; short_run, at the same shapes, can
# reuse pretrain's kernels from the inductor cache on disk.
# a table, one part per line, easier to read across than reflowed (so the formatter skips it)
PARTS = (
    Part("env", 15, part_env),
    Part("correctness", 40, part_correctness),
    Part("step", 60, part_step),
    Part("pretrain", 100, part_pretrain, cleanup_compile=True),
    Part("finetune", 40, part_finetune, cleanup_compile=True),
    Part("short_run", 45, part_short_run, cleanup_compile=True),
    Part("torchrun", 35, part_torchrun),
    Part("compile:default", 40, part_compile("default"), cleanup_compile=True),
    Part("attention", 30, part_attention),
    Part("compile:pretrain-default", 35, part_compile_pretrain, cleanup_compile=True, smoke=False),
    Part("flex", 40, part_flex),  # last and in a subprocess: a sticky CUDA error there fails nothing else
)  # fmt: skip
SKIPPED_BY_DESIGN = {
    "compile:max-autotune": "autotuning takes minutes per shape at base T=512, more than the 480 s budget of "
    "the whole check; time it on its own with `python -m lab bench --kinds compile --compile-modes max-autotune`",
    "compile:reduce-overhead": "the base step under CUDA graphs: not what compile_mode auto picks at base, and "
    "its whole-model compile does not fit beside the parts above; time it on its own with "
    "`python -m lab bench --kinds compile --compile-modes reduce-overhead`",
}


# ----------------------------------------------------------------------------------------------
# Data for the device


def prepare_data(source: Path, dest: Path, log=print, sizes: tuple[Sizes, ...] = (GPU,)) -> list[Path]:
    """Copy the files the GPU check reads from `source` ($LAB_DATA_DIR) into `dest` (e.g. .gpudata/),
    and train the tokenizers its parts need at `sizes` there (prepare_tokenizers)."""
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
    for s in sizes:
        copied += prepare_tokenizers(dest, s, log)
    return copied


def prepare_tokenizers(dest: Path, sizes: Sizes, log=print) -> list[Path]:
    """Train the tokenizers the parts at `sizes` need into dest/tokenizers/<cache key>/spm.model: WikiText-2's
    (short_run, torchrun) and the random-word corpus's (pretrain, compile:pretrain-default). SentencePiece
    trains single-threaded, 30-90 s for 32k pieces, time the device's budget has no room for; the cache
    key hashes the corpus's content (lab/pretrain/data.py), so the device's own copy finds them."""
    from lab.pretrain.data import corpus_tokenizer, open_corpus

    wiki = dest / "wikitext-2" / "wiki.train.tokens"
    with tempfile.TemporaryDirectory() as scratch:
        corpora = sorted(
            {
                (str(wiki), sizes.short_run.vocab),
                (str(wiki), sizes.torchrun.vocab),
                (str(bench_corpus(sizes.pretrain, Path(scratch))), sizes.pretrain.vocab),
            }
        )
        previous = os.environ.get("LAB_CACHE_DIR")
        os.environ["LAB_CACHE_DIR"] = str(dest)  # cache_dir() / "tokenizers" is then dest/tokenizers
        try:
            for corpus, vocab in corpora:
                start = time.perf_counter()
                corpus_tokenizer(open_corpus(corpus), vocab)
                log(
                    f"tokenizer: {vocab} pieces on {Path(corpus).name} in {time.perf_counter() - start:.0f} s"
                )
        finally:
            if previous is None:
                os.environ.pop("LAB_CACHE_DIR")
            else:
                os.environ["LAB_CACHE_DIR"] = previous
    return [p / "spm.model" for p in shipped_tokenizers(dest)]


def shipped_tokenizers(data: Path) -> list[Path]:
    """The tokenizer folders prepare_data put under `data`."""
    folder = Path(data) / "tokenizers"
    return sorted(p for p in folder.iterdir() if (p / "spm.model").is_file()) if folder.is_dir() else []


def install_tokenizers(data: Path, cache: Path) -> int:
    """Copy the shipped tokenizers into this run's cache folder ($LAB_CACHE_DIR); returns how many."""
    shipped = shipped_tokenizers(data)
    for folder in shipped:
        shutil.copytree(folder, Path(cache) / "tokenizers" / folder.name, dirs_exist_ok=True)
    return len(shipped)


def tokenizers_trained_here(c: Check) -> list[str]:
    """Cache keys of the tokenizers this run trained itself (none when --prepare-data shipped them)."""
    shipped = {p.name for p in shipped_tokenizers(c.data)}
    folder = c.work / "cache" / "tokenizers"
    return sorted(p.name for p in folder.iterdir() if p.name not in shipped) if folder.is_dir() else []


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


GPU_BUDGET_S = 480.0  # the whole check within 8 minutes: a lent GPU's session leaves room for a rerun
SMOKE_BUDGET_S = 900.0  # the CPU smoke run: every part at tiny sizes on a CPU shared with other jobs


@dataclass(frozen=True)
class GpuCheckConfig:
    out_dir: str = param("", "folder for gpucheck.json / .csv / summary.txt / gpucheck.log (required)")
    data_dir: str = param(".gpudata", "data folder with wikitext-2/ and glue/")
    work_dir: str = param("", "scratch folder for corpora, runs and caches; '' = a temporary one")
    smoke: bool = param(False, "CPU, tiny sizes: every part's code path in about a minute")
    budget_s: float = param(0.0, "total seconds for all parts; 0 = GPU_BUDGET_S, 480 (smoke: 900)")
    only: tuple[str, ...] = param((), "part names to run (env always runs); none = all")
    device: str = param("auto", "auto (cuda if present) | cuda | cpu; --smoke means cpu")
    prepare_data: bool = param(
        False,
        "copy $LAB_DATA_DIR's files into --data-dir, train the tokenizers the parts need there, and exit",
    )


def child(argv: list[str]) -> int:
    """The check's own subprocesses: `--allreduce-child DEVICE` (under torchrun, from part_torchrun) and
    `--flex-child DEVICE [--smoke]` (from part_flex); each prints its JSON result as the last line."""
    role, device_type = argv[0], argv[1]
    if role == "--allreduce-child":
        print(json.dumps(allreduce_child(device_type)))
    else:
        print(json.dumps(flex_child("--smoke" in argv[2:], device_type)))
    return 0


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--allreduce-child"], ["--flex-child"]):
        return child(argv)
    parser = config_parser(GpuCheckConfig, "python -m lab gpucheck", __doc__.split("\n\n")[0])
    cfg = parse_config(GpuCheckConfig, parser, argv)
    if cfg.prepare_data:
        try:
            prepare_data(data_dir(), Path(cfg.data_dir), sizes=(GPU,))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return USER_ERROR
        return 0
    if not cfg.out_dir:
        parser.error("--out-dir DIR is required (or --prepare-data)")
    device = torch.device("cpu") if cfg.smoke else pick_device(cfg.device)
    if device.type != "cuda" and not cfg.smoke:
        parser.error("no CUDA device: this check is for a GPU machine; use --smoke for the CPU code paths")
    parts = PARTS
    if cfg.only:
        names = cfg.only
        unknown = sorted(set(names) - {p.name for p in PARTS})
        if unknown:
            parser.error(
                f"--only has unknown parts {unknown}; choose from {', '.join(p.name for p in PARTS)}"
            )
        parts = tuple(p for p in PARTS if p.name in names or p.name == "env")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="lab-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    # tokenisers, token caches and compiled kernels of this run stay in its scratch folder
    os.environ["LAB_CACHE_DIR"] = str(work / "cache")
    install_tokenizers(Path(cfg.data_dir), work / "cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    budget = cfg.budget_s or (SMOKE_BUDGET_S if cfg.smoke else GPU_BUDGET_S)
    log_file = open(out / "gpucheck.log", "w")  # noqa: SIM115 (open for the whole run)
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, log_file)
    try:
        c = Check(device, SMOKE if cfg.smoke else GPU, Path(cfg.data_dir), work, cfg.smoke)
        meta = {
            "smoke": cfg.smoke,
            "budget_s": budget,
            "data": str(cfg.data_dir),
            "argv": argv,
        }
        start = time.perf_counter()

        def write(records):
            return write_outputs(out, records, meta, start)

        records = run_parts(c, parts, budget, write)
        result = write(records)
        print(summary_text(result), end="")
    finally:
        sys.stdout = stdout
        log_file.close()
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
