"""Host-device synchronisations counted per optimizer step, with the Python line behind each.

On CUDA the counter uses torch.cuda.set_sync_debug_mode("warn"); on the CPU, where nothing synchronises,
it wraps the Tensor methods that would (item, tolist, cpu, __bool__, ...), so the same bookkeeping runs
in tests. `python -m lab gpucheck` uses it around a short pre-training (its short_run part).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class SyncCounter:
    """Host-device synchronisations per optimizer step, with the Python line that caused each.

    CUDA: torch.cuda.set_sync_debug_mode("warn") makes every synchronising call warn; the warnings are
    recorded (their filename:lineno is the calling line). CPU stand-in: the Tensor methods that
    synchronise when the tensor is on a GPU are wrapped and counted the same way. A global optimizer
    step hook splits the record into buckets: bucket k holds what ran between the k-th and the
    (k+1)-th optimizer.step() returning — step k's logging / checkpoint, step k's evaluation, and the
    forward, backward and update of the next step.
    """

    CPU_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, device: torch.device):
        self.device = device
        self.buckets: list[list[str]] = [[]]
        self._stack = contextlib.ExitStack()
        self._caught: list = []
        self._seen = 0

    def __enter__(self) -> SyncCounter:
        handle = register_optimizer_step_post_hook(self._on_step)
        self._stack.callback(handle.remove)
        if self.device.type == "cuda":
            self._caught = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, 0)
        else:
            for name in self.CPU_METHODS:
                original = getattr(torch.Tensor, name)
                own = name in vars(torch.Tensor)  # else inherited from the C base class: delete to restore
                setattr(torch.Tensor, name, self._counting(name, original))
                if own:
                    self._stack.callback(setattr, torch.Tensor, name, original)
                else:
                    self._stack.callback(delattr, torch.Tensor, name)
        return self

    def __exit__(self, *exc) -> None:
        self._flush()
        self._stack.close()

    def _counting(self, name: str, original):
        buckets = self.buckets

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            buckets[-1].append(f"{_short(caller.f_code.co_filename)}:{caller.f_lineno} ({name})")
            return original(tensor, *args, **kwargs)

        return counted

    def _flush(self) -> None:
        if self.device.type == "cuda":
            new = self._caught[self._seen :]
            self._seen = len(self._caught)
            self.buckets[-1] += [
                f"{_short(w.filename)}:{w.lineno}" for w in new if "synchronizing" in str(w.message)
            ]

    def _on_step(self, optimizer, args, kwargs) -> None:
        self._flush()
        self.buckets.append([])

    def report(self, steps: int, log_every: int, eval_every: int, ckpt_every: int, warmup: int = 2) -> dict:
        """Totals over steady buckets (from `warmup` on, not multiples of the log / eval / checkpoint
        intervals, not the last) and over the rest, with the most frequent call sites of each."""
        steady = [
            k
            for k in range(warmup, min(steps, len(self.buckets)))
            if k % log_every and k % eval_every and k % ckpt_every
        ]
        steady_events = [e for k in steady for e in self.buckets[k]]
        other_events = [e for k, b in enumerate(self.buckets) if k not in steady for e in b]
        return {
            "method": "set_sync_debug_mode('warn')"
            if self.device.type == "cuda"
            else "CPU stand-in: " + ", ".join(self.CPU_METHODS),
            "optimizer_steps": len(self.buckets) - 1,
            "warmup_buckets": warmup,
            "steady_steps": len(steady),
            "syncs_in_steady_steps": len(steady_events),
            "syncs_per_steady_step": len(steady_events) / max(1, len(steady)),
            "steady_sites": Counter(steady_events).most_common(8),
            "syncs_elsewhere": len(other_events),
            "other_sites": Counter(other_events).most_common(8),
        }


def _short(filename: str) -> str:
    """lab/x.py, torch/y.py, ... instead of the absolute path."""
    parts = Path(filename).parts
    for anchor in ("lab", "torch", "transformers"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return Path(filename).name
