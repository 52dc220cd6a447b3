"""The results of `python -m lab gpucheck`: DIR/gpucheck.json (every part's record, the benchmark rows,
the GPU targets with the values measured), DIR/gpucheck.csv (the rows in the benchmark's CSV format,
lab/bench/measure.py) and DIR/summary.txt (one screen, also printed at the end of the run).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

from lab.bench.devicecheck import describe_check
from lab.bench.measure import COLUMNS, Row
from lab.util import atomic_write_bytes, atomic_write_json, write_csv

# packages the GPU machine lacks: the run records which of them got imported at all (it should be none)
OPTIONAL_MODULES = ("matplotlib", "seaborn", "papermill", "IPython", "ipywidgets", "jupyter", "datasets")


def rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def _rows(records: dict) -> list[dict]:
    rows = []
    for record in records.values():
        for row in (record.get("result") or {}).get("rows", []):
            rows.append(dataclasses.asdict(row) if isinstance(row, Row) else row)
    return rows


def _jsonable(records: dict) -> dict:
    def convert(value):
        if isinstance(value, Row):
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
        return {
            "target": text,
            "value": value,
            "min": minimum,
            "unit": unit,
            "met": None if value is None else value >= minimum,
        }

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
    return out


def target_lines(targets: list[dict]) -> list[str]:
    """One line per target: its measured value, its goal and met / MISSED (blank when not measured)."""
    lines = ["targets:"]
    for t in targets:
        if t["value"] is None:
            value = "not measured"
        elif t["unit"] == "%":
            value = f"{100 * t['value']:.1f} %"
        elif t["unit"] == "x":
            value = f"{t['value']:,.2f} {t['unit']}"
        else:
            value = f"{t['value']:,.0f} {t['unit']}"
        goal = f"{100 * t['min']:.0f} %" if t["unit"] == "%" else f"{t['min']:,} {t['unit']}"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['target']:<58} {value:>16}  (>= {goal}) {verdict}")
    return lines


def compile_lines(parts: dict, env: dict) -> list[str]:
    """The compile parts: the pre-training loop's auto mode against default, and the step's mode sweep."""
    lines: list[str] = []
    compiled = [
        (n, r["result"])
        for n, r in parts.items()
        if n.startswith("compile:") and r.get("result") and "shape" not in r["result"]
    ]
    loop = (parts.get("compile:pretrain-default") or {}).get("result")
    pre = next(iter(_rows({"pretrain": parts["pretrain"]})), None) if "pretrain" in parts else None
    if loop and pre:
        lines.append(
            f"{loop['shape']} loop: compile_mode auto ({loop['auto_mode']}) {pre['tokens_per_s']:,.0f} tok/s, "
            f"default {loop['rows'][0]['tokens_per_s']:,.0f} tok/s"
        )
    if compiled:
        cells = [
            f"{res['mode']} {res['rows'][0]['ms']:.1f} ms (compile {res['rows'][0]['compile_s']:.0f} s)"
            for _, res in compiled
        ]
        best = min(compiled, key=lambda item: item[1]["rows"][0]["ms"])[1]["mode"]
        lines.append(
            "compile sweep (step part's shape; later modes reuse earlier compilation where they can): "
            + "; ".join(cells)
            + f"; fastest: {best} (pre-training default compile/mode: "
            f"{env.get('pretrain_compile_default')})"
        )
    return lines


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
        lines.append(f"matmul peak at {env['matmul_peak_n']}^3: bf16 {rate(1e12 * peaks['bf16'])}, fp32 {rate(1e12 * peaks['fp32'])}; "
                     f"attention impls {env.get('attention_impls')}")  # fmt: skip
    lines.append("parts: " + ", ".join(f"{n} {r['status']}" + (f" {r['seconds']:.0f}s" if "seconds" in r else "") for n, r in parts.items()))  # fmt: skip
    lines += target_lines(result["targets"])
    corr = (parts.get("correctness") or {}).get("result")
    if corr:
        lines.append("correctness on the device (vs float64 reference):")
        for key, value in corr["checks"].items():
            lines.append(f"  {key:<32} {describe_check(value)}")
    short = (parts.get("short_run") or {}).get("result")
    if short:
        s = short["syncs"]
        sites = "; ".join(f"{n}x {site}" for site, n in s["steady_sites"][:3]) or "none"
        lines.append(
            f"host syncs per steady-state step: {s['syncs_per_steady_step']:.2f} ({s['steady_steps']} steps; {sites}); "
            f"{s['syncs_elsewhere']} at log/eval/ckpt/warm-up steps. Final eval {short['final_eval']}"
        )
    tr = (parts.get("torchrun") or {}).get("result")
    if tr:
        ar = tr.get("allreduce") or {}
        lines.append(
            f"torchrun 1 process: {tr['steps']} steps on {tr['device_used']}, world {tr['world_size']}, "
            f"{tr['tokens_per_s']:,.0f} tok/s; all-reduce over {tr['backend']} on {ar.get('device')}: "
            f"{ar.get('sum')} (expected {ar.get('expected')}), {tr['nccl_log_lines']} NCCL INFO lines"
        )
    ft = (parts.get("finetune") or {}).get("result")
    if ft:
        dev = {k: round(v, 4) for k, v in ft["dev"].items() if isinstance(v, float)}
        source = "the short run" if Path(ft.get("init", "")).name == "short-run" else ft.get("init")
        lines.append(f"fine-tune {ft['task']} from {source}: dev {dev}")
    lines += compile_lines(parts, env)
    trained = sorted(
        {k for r in parts.values() for k in (r.get("result") or {}).get("tokenizers_trained_here", [])}
    )
    lines.append(f"tokenizers: {len(env.get('shipped_tokenizers', []))} shipped in the data folder, "
                 f"{len(trained)} trained here" + (" (run --prepare-data where the data is)" if trained else ""))  # fmt: skip
    killed = {n: r["killed"] for n, r in parts.items() if r.get("killed")}
    if killed:
        lines.append(
            "processes killed when their part ended: " + ", ".join(f"{n} {k}" for n, k in killed.items())
        )
    for name, reason in (env.get("skipped_by_design") or {}).items():
        lines.append(f"skipped: {name}: {reason[:150]}")
    for name, record in parts.items():
        if record["status"] in ("error", "timeout", "interrupted", "skipped"):
            lines.append(
                f"{record['status']}: {name}: {(record.get('error') or record.get('note', '')).splitlines()[0][:150]}"
            )
    offenders = result["optional_modules_imported"]
    lines.append("optional packages imported: " + (", ".join(offenders) if offenders else "none"))
    slug = result["device_slug"]
    lines.append(
        f"to commit: cp DIR/gpucheck.json figures/bench/gpu_{slug}.json; gpucheck.csv -> gpu_{slug}.csv; summary.txt -> gpu_{slug}.txt"
    )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, records: dict, meta: dict, start: float) -> dict:
    """Rewrite gpucheck.json, gpucheck.csv and summary.txt in `out` from the records so far; returns
    what gpucheck.json holds."""
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
    write_csv(out / "gpucheck.csv", result["rows"], COLUMNS, digits=None)
    atomic_write_bytes(out / "summary.txt", summary_text(result).encode())
    return result
