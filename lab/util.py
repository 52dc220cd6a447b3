"""Small shared helpers: where data lives, strict configs, atomic files, device choice.
The command line's config parsing is lab/cli.py."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def data_dir() -> Path:
    """Root of local datasets (WikiText, GLUE, ...): $LAB_DATA_DIR, default ~/.cache/lab/data."""
    return Path(os.environ.get("LAB_DATA_DIR", Path.home() / ".cache" / "lab" / "data")).expanduser()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a freed tensor held, for the next one, instead of handing
    it back to the kernel: no block of its own mapping for a large request (M_MMAP_MAX = 0) and no
    trimming of the heap while less than 2 GiB of its top is free (M_TRIM_THRESHOLD).

    A training process asks for the same large tensors every step (at a 128k vocabulary a [V, D]
    gradient is 197 MB). By default glibc maps every block above 32 MB afresh and unmaps it when it is
    freed, so every step the kernel faults those pages in again and zeroes them: about a tenth of the
    `xsmall` CPU step (figures/bench/README.md, "Without the page faults"). Only where tensors live
    changes, not what is computed. The cost: the process keeps its peak memory until it exits, which a
    training process reaches again every step anyway. For `lab pretrain` and `lab finetune`, not for a
    notebook's long-lived kernel; LAB_KEEP_FREED_MEMORY=0 turns it off. Returns whether it applied
    (glibc only: elsewhere, or turned off, it does nothing)."""
    if os.environ.get("LAB_KEEP_FREED_MEMORY", "1") == "0":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cache_dir() -> Path:
    """Where tokenised corpora and trained tokenizers are cached: $LAB_CACHE_DIR, default ~/.cache/lab."""
    path = Path(os.environ.get("LAB_CACHE_DIR", Path.home() / ".cache" / "lab")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def replace_strict(cfg: T, **changes: Any) -> T:
    """`dataclasses.replace` with an error that names the unknown field and lists the valid ones.
    A field holding a config takes a dict of its own changes, or dotted keys: `pretrain={"steps": 5}`
    or `**{"pretrain.steps": 5}`."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted({k.split(".")[0] for k in changes} - names)
    if unknown:
        raise ValueError(
            f"unknown {type(cfg).__name__} field(s) {unknown}; valid fields are: {', '.join(sorted(names))}"
        )
    nested: dict[str, dict[str, Any]] = {}
    for key, value in list(changes.items()):  # whole dicts first, dotted keys on top of them
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, key)):
            nested.setdefault(key, {}).update(changes.pop(key))
    for key in [k for k in changes if "." in k]:
        head, _, rest = key.partition(".")
        nested.setdefault(head, {})[rest] = changes.pop(key)
    for head, sub in nested.items():
        changes[head] = replace_strict(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **changes)


_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temp file over `path`, with the permissions a plain open() would have given it
    (mkstemp makes files private: 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device`; on CUDA through pinned (page-locked) memory, so the copy does not
    block the host. On the CPU the tensor itself."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → cuda if present, else cpu; anything else is passed to torch.device as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_csv(
    path: str | os.PathLike, rows: list[dict], columns: Sequence[str] | None = None, digits: int | None = 6
) -> Path:
    """`rows` as a CSV file: the header is `columns` (other keys dropped) or every key in first-seen
    order; floats with `digits` significant digits (None: as Python prints them). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {k: (f"{v:.{digits}g}" if digits and isinstance(v, float) else v) for k, v in r.items()}
            )
    return path


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks (about a second per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
