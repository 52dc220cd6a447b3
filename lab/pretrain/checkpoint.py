"""Pre-training checkpoints that outlive a kill, a corrupt file and a full disk.

A run keeps a small ring of checkpoints in `<out_dir>/checkpoints/`: `step-00000400.pt`, ... (the
newest `keep` of them). Each is written atomically — `torch.save` into a temporary file in the same
folder, fsync, then a rename — next to a SHA-256 sidecar `step-00000400.pt.sha256` in `sha256sum`
format (so `cd checkpoints && sha256sum -c *.sha256` checks them by hand). The sidecar is written
before the rename, so a checkpoint file never exists without its checksum.

A state holding a non-finite tensor (a diverged run's weights or optimizer moments) is refused
before anything is written (`nonfinite_tensors`), so the ring only ever holds finite checkpoints.

On resume, `latest` verifies the newest checkpoint (checksum, then that it loads and is a
pre-training checkpoint) and falls back to the previous good one with a warning naming the bad file.
Where none is good it raises one `CheckpointError` that names the files and the way out. Runs from
before the ring wrote a single `checkpoints/last.pt` without a checksum; it is still read (as the
oldest candidate), so such a run resumes.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lab.util import atomic_write_bytes, replace_file, sha256_file

LEGACY_NAME = "last.pt"
REQUIRED_KEYS = ("step", "model", "optimizer", "data", "config")
# Test hook for the fault-injection tests: "kill-before-rename" (optionally ":<file name>") makes the
# process SIGKILL itself after a checkpoint's temporary file and checksum are written, before the rename.
FAULT_ENV = "LAB_FAULT_INJECT"
_RING = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A run's checkpoints cannot be read, or a checkpoint or export cannot be written; the message
    names the files and what to do."""

    def __init__(self, message: str, bad: list[Path] | None = None):
        super().__init__(message)
        self.bad = bad or []


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older good one."""


def ring_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def candidates(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in `folder`, newest first: the ring by step, then a legacy last.pt."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ring = sorted((p for p in folder.iterdir() if _RING.match(p.name)), key=_step_of, reverse=True)
    legacy = folder / LEGACY_NAME
    return ring + ([legacy] if legacy.is_file() else [])


def _step_of(path: Path) -> int:
    return int(_RING.match(path.name).group(1))


# ----------------------------------------------------------------------------------------------
# Writing


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested state that hold a NaN or an
    infinity. One device reduction per device, read back once; the names are searched for only when
    one is found."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                tensors.append((name, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return []
    return [name for name, t in tensors if not bool(torch.isfinite(t).all())]


def save(state: dict[str, Any], folder: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `step`, atomically and with its checksum, then delete all
    but the newest `keep` checkpoints. A state with a non-finite tensor is refused before anything
    is written (CheckpointError naming the tensors). Any OSError (a full disk, a failing write)
    leaves the existing checkpoints untouched and raises CheckpointError naming the newest intact one."""
    folder = Path(folder)
    path = ring_path(folder, step)
    previous = [p for p in candidates(folder) if p != path]
    bad = nonfinite_tensors(state)
    if bad:
        intact = (
            f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"
        )
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"refusing to write checkpoint {path}: non-finite values in {shown}; {intact}. The run diverged: "
            "train again in a new out_dir with a lower lr, more warmup_steps or dtype=fp32"
        )
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        atomic_write_bytes(sidecar(path), f"{sha256_file(Path(tmp))}  {path.name}\n".encode())
        _fault_point("kill-before-rename", path)
        replace_file(tmp, path)
        tmp = None
        _fsync_dir(folder)
    except OSError as err:
        intact = (
            f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"could not write checkpoint {path} ({type(err).__name__}: {err}); {intact}. Free disk space "
            f"in {folder} (or fix the error) and rerun the same command to resume"
        ) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    prune(folder, step, keep)
    return path


def prune(folder: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the newest keep - 1 older ones; files of later steps (there
    are none in a normal run) are left alone."""
    older = [p for p in candidates(folder) if p.name == LEGACY_NAME or _step_of(p) < step]
    for path in older[max(0, keep - 1) :]:
        path.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files left by a killed write (only the main process writes checkpoints)."""
    for path in folder.glob(".step-*.tmp"):
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not bring the old file back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_point(point: str, path: Path) -> None:
    name, _, target = os.environ.get(FAULT_ENV, "").partition(":")
    if name == point and target in ("", path.name):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class Found:
    path: Path
    state: dict[str, Any]
    bad: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints skipped, and why


def verify(path: Path, map_location=None) -> dict[str, Any]:
    """Load one checkpoint, checking its checksum when it has one; raises ValueError with the reason."""
    check = sidecar(path)
    if check.is_file():
        expected = (check.read_text().split() or [""])[0]
        if sha256_file(path) != expected:
            raise ValueError("its SHA-256 does not match its .sha256 file (damaged, truncated or replaced)")
    elif path.name != LEGACY_NAME:
        raise ValueError(f"its checksum file {check.name} is missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # every failure mode of the unpickler / zip reader means "unreadable"
        first_line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"unreadable ({type(err).__name__}: {first_line})") from err
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise ValueError(f"not a pre-training checkpoint (it lacks {', '.join(REQUIRED_KEYS)})")
    return state


def latest(folder: str | os.PathLike, map_location=None, warn: bool = True) -> Found | None:
    """The newest good checkpoint in `folder` (None when there is none at all). Damaged newer ones are
    skipped with a CheckpointWarning; if every one is damaged, CheckpointError names them all."""
    folder = Path(folder)
    bad: list[tuple[Path, str]] = []
    for path in candidates(folder):
        try:
            state = verify(path, map_location)
        except (ValueError, OSError) as err:
            bad.append((path, str(err)))
            continue
        if warn:
            for bad_path, reason in bad:
                warnings.warn(
                    f"checkpoint {bad_path} is not usable: {reason}; resuming from the previous good "
                    f"checkpoint {path} instead",
                    CheckpointWarning,
                    stacklevel=2,
                )
        return Found(path, state, bad)
    if not bad:
        return None
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    raise CheckpointError(
        f"no usable checkpoint in {folder}; every one is damaged:\n{listing}\n"
        "Either start fresh in another directory (a new --out-dir), or rerun with "
        f"--discard-bad-checkpoints to move these files to {folder / 'bad'} and train this run from step 0.",
        bad=[path for path, _ in bad],
    )


def set_aside(paths: list[Path], folder: str | os.PathLike) -> Path:
    """Move damaged checkpoints (and their checksums) into `folder`/bad/<time>/, keeping them for
    inspection rather than deleting them; returns that folder."""
    target = Path(folder) / "bad" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for part in (path, sidecar(path)):
            if part.exists():
                os.replace(part, target / part.name)
    return target


def load_state(run_dir: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """The newest good checkpoint's state of a run directory (for tools such as the tour)."""
    folder = Path(run_dir) / "checkpoints"
    found = latest(folder, map_location)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint in {folder}; pass a run directory that has trained at least one checkpoint"
        )
    return found.state
