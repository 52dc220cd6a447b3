"""Running a check's parts in order within a time budget: a part is skipped with a note when its
budget no longer fits in what is left, stopped (SIGALRM, main thread) when it overruns its budget by
half, and a failing part records its error, traceback and partial result while the rest continue.
The caller gets a record per part and a write() call after each, so an interrupted run still leaves
what it measured. `python -m lab gpucheck` runs its PARTS with it (lab/bench/gpucheck.py).
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class PartContext(Protocol):
    """What run_parts reads of the context every part gets (lab/bench/gpucheck.py's `Check` has it)."""

    device: torch.device
    smoke: bool
    log: Callable[[str], None]
    partial: dict


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # expected seconds on an H100 / H200, generous; the part is skipped if it does not fit
    run: Callable[..., dict]  # part(context) -> its result
    cleanup_compile: bool = False  # drop compiled code afterwards (frees CUDA graphs' memory pools)
    smoke: bool = True  # run in the smoke mode too (the other compile modes add no new code path)


class PartTimeout(Exception):
    pass


_DEADLINE = [math.inf]  # perf_counter time at which the whole run must end


def remaining_s() -> float:
    """Seconds left of the running budget (at least 1): a part's own subprocess timeouts use it."""
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


def run_parts(c: PartContext, parts, budget_s: float, write: Callable[[dict], None]) -> dict:
    """Run `parts` in order within `budget_s`; returns {name: record} and calls write() after each.
    Uses c.device, c.smoke (every part runs until the total is spent) and c.log, and keeps c.partial,
    what a part has put there, when it stops or fails."""
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
            # the parts left out of the smoke run are gpucheck's extra compile modes
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
            c.log(
                f"== {part.name}: {record['status']} in {record['seconds']:.0f} s"
                + (f" — {record['error'].splitlines()[0][:200]}" if "error" in record else "")
            )
        records[part.name] = record
        write(records)
    return records


def _cleanup(c: PartContext, part: Part) -> None:
    if c.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    if part.cleanup_compile:
        torch._dynamo.reset()
    gc.collect()
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
