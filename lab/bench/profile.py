"""Where lab's RTD step spends its time, and which layout of the relative shift is faster.

  python -m lab.bench.profile                       # both, xsmall T=128 batch 4 fp32, tables printed
  python -m lab.bench.profile --what layouts --repeats 20
  python -m lab.bench.profile --what step --out runs/profile.txt   # and its figures in runs/profile.csv

step     torch.profiler over `steps` RTD steps of lab (sharing "es", the benchmark's lab-es candidate,
         lab/bench/builders.py) after `warmup` untimed ones: the operators by self CPU time.
steps    lab-es, the same step with autograd's dense lookup gradients (lab.tied.disabled) and the
         `transformers` peer, timed alternately: ms per step, wall and process CPU time.
ceiling  the profile's operators in three groups the step cannot drop at the same formula and the same
         dropout (the matmuls, the fused AdamW, the dropout masks' draws) and the rest, per step, against
         the peer's step timed alternately with lab's: the ratio now, and the most it could be were
         everything outside the three groups free.
layouts  one DisentangledSelfAttention forward + backward (no dropout) with c2p / p2c read three
         ways, timed alternately: the gathers through relative_index, the model's relative shift
         (lab.model.skew, an as_strided view), and the same shift as a flatten-and-reshape of the score
         rows (Transformer-XL's pad-and-reshape: flat[start : start + T(R - 1)] viewed [T, R - 1], the
         first T columns kept, zero-padded only where that window runs past the end). Each figure is
         the median of the repeats, wall and process CPU time (the latter less sensitive to other
         processes on a shared machine).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import lab.model
import lab.tied
from lab.bench.builders import build_hf_step, build_lab_step, model_config
from lab.bench.measure import allocator_text
from lab.cli import config_parser, param, parse_values, run_verb
from lab.model import DisentangledSelfAttention, relative_index
from lab.util import replace_strict, write_csv


@dataclass(frozen=True)
class ProfileConfig:
    what: str = param(
        "step,layouts",
        "step (torch.profiler table), steps (lab vs the peer), ceiling (what the step cannot drop), layouts (shift)",
    )
    preset: str = param("xsmall", "model size (lab.model presets)")
    seq_len: int = param(128, "T; the shift applies up to position_buckets / 2 + 1")
    batch: int = param(4, "B (the benchmark's 512 tokens per step at T=128)")
    warmup: int = param(2, "untimed calls first")
    steps: int = param(3, "profiled RTD steps")
    repeats: int = param(15, "timed calls per layout, alternating")
    rows: int = param(25, "operators listed in the profile table")
    out: str = param("", "also write the tables to this file")


def skew_reshape(scores: torch.Tensor, start: int) -> torch.Tensor:
    """lab.model.skew as a flatten-and-reshape: the same [..., T, T] entries, other autograd nodes."""
    *lead, T, R = scores.shape
    flat = scores.flatten(-2)  # [..., T * R]
    short = start + T * (R - 1) - T * R  # how far the T x (R - 1) window runs past the end
    if short > 0:
        flat = F.pad(flat, (0, short))  # [..., T * R + short], a copy
    return flat[..., start : start + T * (R - 1)].view(*lead, T, R - 1)[..., :T]  # [..., T, T]


def layout_times(pc: ProfileConfig) -> dict[str, dict[str, float]]:
    """Median ms (wall and process CPU) of one attention forward + backward per layout."""
    cfg = replace_strict(model_config(pc.preset, pc.seq_len), attention_dropout=0.0)
    torch.manual_seed(0)
    attention = DisentangledSelfAttention(cfg).train()
    T = pc.seq_len
    lo, R, index = relative_index(T, cfg.position_buckets, cfg.max_relative_positions)
    h = torch.randn(pc.batch, T, cfg.hidden_size, requires_grad=True)
    rel = torch.randn(R, cfg.hidden_size, requires_grad=True)
    layouts = {
        "gather": {"diagonal_offset": lambda *args: None},
        "as_strided": {},
        "reshape": {"skew": skew_reshape},
    }

    def call(patch):
        saved = {name: getattr(lab.model, name) for name in patch}
        for name, fn in patch.items():
            setattr(lab.model, name, fn)
        try:
            attention(h, rel, index, None).square().sum().backward()
        finally:
            for name, fn in saved.items():
                setattr(lab.model, name, fn)

    reference = None
    for name, patch in layouts.items():  # warm-up, and the three must agree
        for _ in range(pc.warmup):
            call(patch)
        h.grad = None
        call(patch)
        if reference is None:
            reference = h.grad.clone()
        torch.testing.assert_close(h.grad, reference, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    return alternate(
        {name: lambda patch=patch: call(patch) for name, patch in layouts.items()}, 0, pc.repeats
    )


def layout_table(pc: ProfileConfig) -> tuple[str, dict[str, float]]:
    times = layout_times(pc)
    base = times["gather"]
    figures = {}
    for name, t in times.items():
        figures |= {
            f"layouts {name} wall ms": round(t["wall"], 2),
            f"layouts {name} cpu ms": round(t["cpu"], 2),
        }
        figures[f"layouts {name} cpu vs gather"] = round(base["cpu"] / t["cpu"], 2)
    lines = [
        f"attention forward + backward, {pc.preset} T={pc.seq_len} batch {pc.batch} fp32, "
        f"{torch.get_num_threads()} threads, median of {pc.repeats}",
        "| layout | wall ms | CPU ms | CPU vs gather |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {t['wall']:.2f} | {t['cpu']:.2f} | {base['cpu'] / t['cpu']:.2f}x |")
    return "\n".join(lines), figures


def alternate(calls: dict, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of each call, wall and process CPU time, the calls alternating in rotating order."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: {"wall": [], "cpu": []} for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return {n: {k: 1e3 * statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def steps_table(pc: ProfileConfig) -> tuple[str, dict[str, float]]:
    """lab-es (and the same step with autograd's dense lookups) against the peer: ms per step and the
    peer's time over lab's (tokens/s ratio)."""
    cpu = torch.device("cpu")
    dense_step = build_lab_step(pc.preset, pc.seq_len, pc.batch, "fp32", cpu, "es")

    def dense():
        with lab.tied.disabled():
            dense_step()

    calls = {
        "lab-es": build_lab_step(pc.preset, pc.seq_len, pc.batch, "fp32", cpu, "es"),
        "lab-es-dense-lookups": dense,
        "hf": build_hf_step(pc.preset, pc.seq_len, pc.batch, "fp32", cpu),
    }
    times = alternate(calls, pc.warmup, pc.repeats)
    ours, hf, dense_t = times["lab-es"], times["hf"], times["lab-es-dense-lookups"]
    figures = {f"steps {name} {k} ms": round(t[k]) for name, t in times.items() for k in ("wall", "cpu")}
    for k in ("wall", "cpu"):
        figures[f"steps lab-es vs hf by {k}"] = round(hf[k] / ours[k], 2)
        figures[f"steps lab-es vs lab-es-dense-lookups by {k}"] = round(dense_t[k] / ours[k], 2)
    text = "\n".join(
        [
            f"RTD step, {pc.preset} T={pc.seq_len} batch {pc.batch} fp32, {torch.get_num_threads()} threads, "
            f"median of {pc.repeats}",
            "| candidate | wall ms | CPU ms |",
            "|---|---|---|",
            *(f"| {name} | {t['wall']:.0f} | {t['cpu']:.0f} |" for name, t in times.items()),
            f"lab-es / hf tokens/s: {hf['wall'] / ours['wall']:.2f}x by wall time, "
            f"{hf['cpu'] / ours['cpu']:.2f}x by CPU time",
            f"lab-es / lab-es-dense-lookups tokens/s (what lab.tied saves): "
            f"{dense_t['wall'] / ours['wall']:.2f}x by wall time, {dense_t['cpu'] / ours['cpu']:.2f}x by CPU time",
        ]
    )
    return text, figures


# operator groups of lab's step that no rewrite at the same formula and dropout removes
FLOOR_GROUPS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "AdamW (fused)": ("aten::_fused_adamw_",),
    "dropout masks": ("aten::bernoulli_",),
}


def profiled_step(pc: ProfileConfig):
    """torch.profiler's key averages over `steps` lab-es steps, after `warmup` untimed ones."""
    step = build_lab_step(pc.preset, pc.seq_len, pc.batch, "fp32", torch.device("cpu"), "es")
    for _ in range(pc.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(pc.steps):
            step()
    return prof.key_averages()


def ceiling_table(pc: ProfileConfig) -> tuple[str, dict[str, float]]:
    """lab-es's step in groups against the peer's step: the ratio now and its ceiling at this formula."""
    per_step = {e.key: e.self_cpu_time_total / 1e3 / pc.steps for e in profiled_step(pc)}
    groups = {name: sum(per_step.get(op, 0.0) for op in ops) for name, ops in FLOOR_GROUPS.items()}
    total, floor = sum(per_step.values()), sum(groups.values())
    cpu = torch.device("cpu")
    calls = {
        "lab-es": build_lab_step(pc.preset, pc.seq_len, pc.batch, "fp32", cpu, "es"),
        "hf": build_hf_step(pc.preset, pc.seq_len, pc.batch, "fp32", cpu),
    }
    times = alternate(calls, pc.warmup, pc.repeats)
    ours, peer = times["lab-es"]["wall"], times["hf"]["wall"]
    parts = {**groups, "everything else": total - floor, "all operators (profiled)": total}
    figures = {f"ceiling {name} ms": round(ms, 2) for name, ms in parts.items()}
    figures |= {f"ceiling {name} share percent": round(100 * ms / total) for name, ms in parts.items()}
    figures |= {"ceiling lab-es wall ms": round(ours, 2), "ceiling hf wall ms": round(peer, 2)}
    figures |= {"ceiling lab-es vs hf now": round(peer / ours, 2), "ceiling at most": round(peer / floor, 2)}
    lines = [
        f"lab-es RTD step, {pc.preset} T={pc.seq_len} batch {pc.batch} fp32, {torch.get_num_threads()} threads: "
        f"self CPU ms per step over {pc.steps} profiled steps; the peer's step and lab's timed alternately, "
        f"median of {pc.repeats}",
        "| part of lab's step | ms per step | share |",
        "|---|---|---|",
        *(f"| {name} | {ms:.0f} | {ms / total:.0%} |" for name, ms in parts.items()),
        "",
        f"lab-es {ours:.0f} ms, the peer {peer:.0f} ms per step (wall): lab-es / peer tokens/s "
        f"{peer / ours:.2f}x now; with everything outside the three groups free, at most {peer / floor:.2f}x",
    ]
    return "\n".join(lines), figures


def step_table(pc: ProfileConfig) -> tuple[str, dict[str, float]]:
    """The profile of lab's ES step: operators by self CPU time over `steps` steps."""
    events = profiled_step(pc)
    head = (
        f"lab-es RTD step, {pc.preset} T={pc.seq_len} batch {pc.batch} fp32, {torch.get_num_threads()} "
        f"threads, {pc.steps} steps profiled"
    )
    return head + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=pc.rows), {}


def cli(argv: list[str] | None = None) -> int:
    parser = config_parser(ProfileConfig, "python -m lab.bench.profile", __doc__.split("\n\n")[0])
    values = parse_values(parser, sys.argv[1:] if argv is None else argv)
    pc = replace_strict(ProfileConfig(), **values)

    def action() -> None:
        parts = pc.what.split(",")
        builders = {
            "layouts": layout_table,
            "steps": steps_table,
            "step": step_table,
            "ceiling": ceiling_table,
        }
        unknown = set(parts) - set(builders)
        if unknown:
            raise ValueError(
                f"--what {pc.what}: unknown {sorted(unknown)}; choose from {', '.join(builders)}"
            )
        tables = [builders[name](pc) for name in builders if name in parts]
        # the allocator settings decide how many fresh pages a step faults in (lab/bench/measure.py)
        text = f"allocator: {allocator_text()}\n\n" + "\n\n".join(table for table, _ in tables)
        print(text)
        if pc.out:
            out = Path(pc.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
            figures = [
                {"quantity": k, "value": v} for _, table_figures in tables for k, v in table_figures.items()
            ]
            write_csv(out.with_suffix(".csv"), figures, ("quantity", "value"), digits=None)

    return run_verb(action)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
