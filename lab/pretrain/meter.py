"""What a training loop reports, without making the device wait: losses summed on the device and
read at log steps only, wall-clock time split into training and overhead, and the log line or bar.

Used by lab/pretrain/loop.py; the row keys it reads are the ones its `log_window` writes.
"""

from __future__ import annotations

import contextlib
import time

import torch
from tqdm.auto import tqdm

from lab.training import sync


class Meter:
    """Training losses summed on the device between log steps (read there only), and where the
    wall-clock time went: training, or overhead — the warm-up steps (compilation, CUDA-graph capture,
    first allocations), evaluation, the probe and checkpoints. Overhead is timed between device
    synchronisations, which those steps need anyway, so ms/step and tokens/s count training alone."""

    KINDS = ("warmup", "eval", "probe", "checkpoint")

    def __init__(
        self, device: torch.device, start: int, warmup: int, losses=("loss", "mlm_loss", "rtd_loss")
    ):
        self.device, self.start, self.warmup = device, start, warmup
        self.sums = {k: torch.zeros((), device=device) for k in losses}  # summed over the window's steps
        self.steps = self.steady_steps = self.steady_steps_total = 0  # the first two: since the last log
        self.overhead_in_window = dict.fromkeys(self.KINDS, 0.0)
        self.total_overhead = dict.fromkeys(self.KINDS, 0.0)
        self.t_start = self.t_window = self.t_step = time.perf_counter()
        self.overhead_in_step = 0.0
        self.compile_s: float | None = None  # the warm-up steps' time beyond steady steps

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Add one step's losses (device tensors) to the window's sums."""
        for key, value in self.sums.items():
            value += losses[key].detach()

    @contextlib.contextmanager
    def overhead(self, kind: str):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self._charge(kind, time.perf_counter() - t0)

    def _charge(self, kind: str, seconds: float) -> None:
        self.overhead_in_window[kind] += seconds
        self.total_overhead[kind] += seconds
        self.overhead_in_step += seconds

    def step_done(self, step: int) -> None:
        self.steps += 1
        if step - self.start <= self.warmup:  # a warm-up step: synchronise and charge its time
            sync(self.device)
            now = time.perf_counter()
            self._charge("warmup", now - self.t_step - self.overhead_in_step)
            self.t_step = now
        else:
            self.steady_steps += 1
            self.steady_steps_total += 1
        self.overhead_in_step = 0.0

    def window(self, now: float) -> dict:
        """Timing of the steps since the last log (call after the losses are read: the device is idle)."""
        train_s = now - self.t_window - sum(self.overhead_in_window.values())
        ms = 1000 * train_s / self.steady_steps if self.steady_steps else None
        if ms is not None and self.compile_s is None:
            self.compile_s = max(0.0, self.total_overhead["warmup"] - self.warmup * ms / 1000)
        row = {
            "ms_per_step": ms,
            "train_s": train_s if self.steady_steps else 0.0,
            "overhead_s": sum(self.overhead_in_window.values()),
            **{f"{kind}_s": seconds for kind, seconds in self.overhead_in_window.items()},
            "elapsed_s": now - self.t_start,
        }
        self.overhead_in_window = dict.fromkeys(self.KINDS, 0.0)
        self.steps = self.steady_steps = 0
        self.t_window = now
        return row

    def reset_sums(self) -> None:
        for value in self.sums.values():
            value.zero_()


PROGRESS = ("line", "bar", "none")  # the modes of Progress, a config's `progress` field


class Progress:
    """One dense log line per interval (mode "line"), a tqdm bar (mode "bar", for notebooks) or
    nothing ("none", or on every process but the main one)."""

    def __init__(self, total: int, start: int, desc: str, mode: str = "line", enabled: bool = True):
        self.total, self.enabled = total, enabled and mode != "none"
        self.bar = None
        if self.enabled and mode == "bar":
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(self, row: dict, eta_s: float | None, n: int) -> None:
        if not self.enabled:
            return
        speed = "warm-up" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                mlm=f"{row['mlm_loss']:.3f}",
                rtd=f"{row['rtd_loss']:.4f}",
                speed=speed,
            )
            return
        ms = "" if row["ms_per_step"] is None else f"{row['ms_per_step']:.0f} ms/step | "
        print(
            f"step {row['step']:>6}/{self.total} | loss {row['loss']:.4f} | mlm {row['mlm_loss']:.4f} "
            f"| rtd {row['rtd_loss']:.4f} | lr {row['lr']:.2e} | {ms}{speed} "
            f"| +{row['overhead_s']:.1f} s eval/probe/ckpt/warm-up | ETA {duration(eta_s)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float | None) -> str:
    """Seconds as `1h05m` or `4m07s` (`?` while unknown)."""
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
