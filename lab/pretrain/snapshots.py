"""Word-table snapshots over training: how E_G, E_D (and E_delta under GDES) move, step by step.

Pre-training writes `<run_dir>/embeddings/step-XXXXXXXX.safetensors` at step 0, at the snapshot steps
(`PretrainConfig.snapshot_every`, by default the probe steps) and at the last step. Each file holds
the rows of a fixed set of token ids, `ids` (also in the file), as float16:

    generator      [N, D]  E_G
    discriminator  [N, D]  E_D as the discriminator reads it (the shared table under ES, E_G + E_delta under GDES)
    delta          [N, D]  E_delta (GDES only)
    ids            [N]     the token ids of the rows, most frequent first

The ids are chosen once per run and recorded in embeddings/ids.json: the most frequent non-special
tokens of the training split, at most `snapshot_rows`, and fewer when the planned snapshots would
otherwise exceed `snapshot_mb` (three tables of float16 per snapshot, whatever the sharing mode, so
ES, NES and GDES runs of one configuration keep the same rows). A few MB per run by default: the 300
steps of `make demo` (18 snapshots, D = 256) keep the 287 most frequent of its ~900 words.

Only the main process writes, each file atomically (temporary file, fsync, rename). A resumed run
deletes the snapshots after the step it resumes at (the interrupted invocation wrote them; the resumed
one writes them again), so a run's snapshots read as one uninterrupted run: no duplicates, no gaps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from lab.util import atomic_write_bytes, atomic_write_json

FOLDER = "embeddings"
IDS_FILE = "ids.json"
TABLES = ("generator", "discriminator", "delta")
_NAME = re.compile(r"step-(\d{8})\.safetensors")


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:08d}.safetensors"


def snapshot_steps(run_dir: str | Path) -> list[int]:
    """The steps that have a snapshot file, in order."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name)))


def planned_steps(steps: int, every: int) -> list[int]:
    """Step 0, every `every`-th step (0: none), and the last step."""
    return sorted({0, steps, *(range(every, steps, every) if every > 0 else ())})


def choose_ids(token_counts: np.ndarray, special_ids, max_rows: int) -> list[int]:
    """The `max_rows` most frequent non-special ids that occur in the training split, most frequent first
    (ties: lower id first)."""
    counts = np.asarray(token_counts)
    seen = [int(i) for i in np.flatnonzero(counts > 0) if int(i) not in set(special_ids)]
    seen.sort(key=lambda i: (-int(counts[i]), i))
    return seen[:max_rows]


HEADER_BYTES = 1024  # a file's safetensors header (names, shapes, offsets, metadata) stays below this


def rows_within(budget_mb: float, n_snapshots: int, hidden: int, max_rows: int) -> int:
    """Rows per snapshot so that n_snapshots files (three float16 tables, the int64 ids, a header) stay
    within budget_mb."""
    per_row = n_snapshots * (len(TABLES) * hidden * 2 + 8)  # bytes
    return max(1, min(max_rows, int((budget_mb * 1e6 - n_snapshots * HEADER_BYTES) // per_row)))


class Recorder:
    """Writes the snapshots of one pre-training run (see the module docstring); `run` is lab.pretrain's Run."""

    def __init__(self, run):
        cfg = run.cfg
        self.run, self.folder = run, Path(run.out_dir) / FOLDER
        self.every = cfg.snapshot_every or cfg.probe_every
        self.enabled = run.ddp.main and cfg.snapshot_mb > 0
        self.ids: torch.Tensor | None = None
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # left by a write that was killed
            stale.unlink(missing_ok=True)
        for step in snapshot_steps(run.out_dir):
            if step > run.start:
                snapshot_path(run.out_dir, step).unlink()
        record = self.folder / IDS_FILE
        if run.start == 0:  # a fresh run (none to resume) in a folder an earlier run may have used
            record.unlink(missing_ok=True)
        if record.is_file():  # chosen once per run: a resumed run keeps the rows it started with
            ids = json.loads(record.read_text())["ids"]
        else:
            n = len(planned_steps(cfg.steps, self.every))
            rows = rows_within(cfg.snapshot_mb, n, run.model.generator_table.shape[1], cfg.snapshot_rows)
            ids = choose_ids(run.corpus.token_counts, run.tok.special_ids, rows)
            atomic_write_json(
                record,
                {
                    "ids": ids,
                    "rule": f"the most frequent non-special tokens of the training split, at most "
                    f"snapshot_rows={cfg.snapshot_rows}, fewer to keep {n} snapshots within "
                    f"snapshot_mb={cfg.snapshot_mb}",
                    "dtype": "float16",
                },
            )
        self.ids = torch.tensor(ids, dtype=torch.long)

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        return step == 0 or step == self.run.cfg.steps or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def write(self, step: int) -> Path:
        model = self.run.model
        index = self.ids.to(model.generator_table.device)
        rows = {
            k: v.detach()[index].to("cpu", torch.float16).contiguous()
            for k, v in model.exported_tables().items()
        }
        data = save(
            {**rows, "ids": self.ids.clone()}, metadata={"step": str(step), "sharing": model.sharing.name}
        )
        path = snapshot_path(self.run.out_dir, step)
        atomic_write_bytes(path, data)
        return path


def load_snapshot(path: str | Path) -> dict[str, torch.Tensor]:
    """One snapshot as float32 tables plus `ids`."""
    tensors = load_file(str(path))
    return {k: v if k == "ids" else v.float() for k, v in tensors.items()}


def load_snapshots(run_dir: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """{step: snapshot} for every snapshot of a run, in step order."""
    return {step: load_snapshot(snapshot_path(run_dir, step)) for step in snapshot_steps(run_dir)}
