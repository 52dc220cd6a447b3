"""Running a check's parts in order within a time budget: a part is skipped with a note when its
budget no longer fits in what is left, stopped (SIGALRM, main thread) when it overruns its budget by
half, and a failing part records its error, traceback and partial result while the rest continue.
The caller gets a record per part and a write() call after each, so an interrupted run still leaves
what it measured. `python -m lab gpucheck` runs its PARTS with it (lab/bench/gpucheck.py).

Whatever way a part ends (result, error, timeout, Ctrl-C, SIGTERM), every process it started is
killed before the next part begins: the process groups of its subprocesses (run_process_group starts
each in a session of its own, so torchrun's workers die with the launcher) and any other process
that descends from this one and was not there before the part (inductor's compile workers). A
subprocess's own timeout is never longer than what is left of its part (remaining_s).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
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
    """A part ran out of its time: stopped by the alarm, or one of its subprocesses timed out."""


class Interrupted(BaseException):
    """SIGTERM while parts run (e.g. `timeout` around the check): ends the run like Ctrl-C does."""


_DEADLINE = [math.inf]  # perf_counter time at which the running part must end (its stop, or the total)
_GROUPS: set[int] = set()  # process groups started by run_process_group and not yet killed
SMOKE_MIN_S = 5.0  # the smoke run starts a part while this much of the total is left
CHILD_MARGIN_S = 2.0  # a subprocess is timed out this long before its part is stopped: its output is kept


def remaining_s() -> float:
    """Seconds a subprocess of the running part may take (at least 1): what is left until the part is
    stopped, less CHILD_MARGIN_S."""
    return max(1.0, _DEADLINE[0] - time.perf_counter() - CHILD_MARGIN_S)


def run_process_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, at most remaining_s() long. Its whole process group
    (torchrun's workers and their compile workers included, not only the launcher) is killed however
    this call ends: on a timeout (then PartTimeout, with the end of its output), an exception, Ctrl-C
    or the part's stop."""
    timeout = min(timeout, remaining_s())
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _GROUPS.add(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        shown = " ".join(command)[:160].replace("\n", " ")
        raise PartTimeout(
            f"subprocess `{shown}` killed (process group) after {timeout:.0f} s:\n{(stdout + stderr)[-2000:]}"
        ) from None
    finally:
        _kill_group(proc.pid)  # what the launcher left behind, or all of it if this call was interrupted
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):  # already gone (or reaped and its id reused)
        return False
    finally:
        _GROUPS.discard(pgid)  # after the kill: a stop arriving in between leaves it to kill_started_since


def _descendants() -> dict[int, int]:
    """{pid: process group} of every live process below this one (Linux /proc; {} elsewhere)."""
    children: dict[int, list[int]] = {}
    groups = {}
    for entry in os.listdir("/proc") if sys.platform.startswith("linux") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are dead already
            children.setdefault(int(fields[1]), []).append(int(entry))
            groups[int(entry)] = int(fields[2])
    found, stack = {}, [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), ()):
            found[pid] = groups[pid]
            stack.append(pid)
    return found


def kill_started_since(before: dict[int, int]) -> int:
    """Kill what was started since `before` (a _descendants() snapshot): the process groups that
    run_process_group started, each new descendant's own group when it is not this process's group,
    and the new descendants themselves. Returns how many groups and processes were signalled."""
    killed = sum(_kill_group(pgid) for pgid in list(_GROUPS))
    own = os.getpgrp()
    new = {pid: pgid for pid, pgid in _descendants().items() if pid not in before}
    for pid, pgid in new.items():
        if pgid != own:
            killed += _kill_group(pgid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    if new and "torch._inductor.async_compile" in sys.modules:
        # compile workers were among them: forget their pool (killed first, so its shutdown does not
        # wait on a busy worker), and the next compilation starts a fresh one
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
    return killed


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`: Python regains control between
    kernel launches and inside compilation, which is where an overrunning part spends its time."""

    def expire(signum, frame):
        raise PartTimeout(f"stopped after {seconds:.0f} s, its time limit")

    def terminate(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    seconds = max(1.0, seconds)
    _DEADLINE[0] = time.perf_counter() + seconds
    previous = signal.signal(signal.SIGALRM, expire), signal.signal(signal.SIGTERM, terminate)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        _DEADLINE[0] = math.inf


def run_parts(c: PartContext, parts, budget_s: float, write: Callable[[dict], None]) -> dict:
    """Run `parts` in order within `budget_s`; returns {name: record} and calls write() after each.
    Uses c.device, c.smoke (every part runs until the total is spent) and c.log, and keeps c.partial,
    what a part has put there, when it stops or fails. Ctrl-C or SIGTERM records the running part as
    "interrupted", writes, and re-raises."""
    start = time.perf_counter()
    records: dict[str, dict] = {}
    for part in parts:
        elapsed = time.perf_counter() - start
        left = budget_s - elapsed
        # on the CPU smoke run the GPU budgets mean nothing; there every part runs until the total is spent
        need = part.budget_s if not c.smoke else SMOKE_MIN_S
        record = records[part.name] = {"budget_s": part.budget_s, "started_at_s": round(elapsed, 1)}
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
            try:
                _run_part(c, part, min(1.5 * part.budget_s if not c.smoke else left, left), record)
            except (KeyboardInterrupt, Interrupted):
                write(records)
                raise
            c.log(
                f"== {part.name}: {record['status']} in {record['seconds']:.0f} s"
                + (f" — {record['error'].splitlines()[0][:200]}" if "error" in record else "")
            )
        write(records)
    return records


def _run_part(c: PartContext, part: Part, limit_s: float, record: dict) -> None:
    """One part, stopped after `limit_s`; its outcome goes into `record`. Whatever way it ends, the
    processes it started are killed (`killed`: how many signals that took) before this returns."""
    before = _descendants()
    t0 = time.perf_counter()
    c.partial = {}
    try:
        with _time_limit(limit_s):
            result = part.run(c)
        record.update(status="ok", result=result)
        if isinstance(result, dict) and result.get("ok") is False:
            record["status"] = "failed-check"
    except PartTimeout as err:
        record.update(status="timeout", error=str(err), result=c.partial or None)
    except (KeyboardInterrupt, Interrupted) as err:
        record.update(status="interrupted", error=f"{type(err).__name__}: {err}", result=c.partial or None)
        raise
    except Exception as err:
        record.update(
            status="error",
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc()[-4000:],
            result=c.partial or None,
        )
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["killed"] = kill_started_since(before)
        _cleanup(c, part)


def _cleanup(c: PartContext, part: Part) -> None:
    if c.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    if part.cleanup_compile:
        torch._dynamo.reset()
    gc.collect()
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
