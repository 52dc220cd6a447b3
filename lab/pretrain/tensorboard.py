"""TensorBoard event files mirroring a run's files (`PretrainConfig.tensorboard`, the `tensorboard` extra).

`metrics.jsonl` stays the record; `<run>/tensorboard/` repeats it for people who watch runs in
TensorBoard: every numeric field of every row as the scalar `<split>/<field>` at the row's step (train
losses, lr and throughput; held-out MLM / RTD measures; the gradient-conflict probe's `probe/grad_cos`
and `probe/similarity_pull_*`), and the embedding-similarity measure of the word-table snapshots
(embeddings/, lab/pretrain/snapshots.py): `embedding_cosine/<table>`, the average pairwise cosine of
each snapshotted table.

The mirror reads the files the loop wrote, at each log step and at the end. A new invocation (a fresh
run or a resumed one, whose metrics.jsonl was cut back to the checkpoint's step) replaces the event
files and writes every row again, so the events show the rows metrics.jsonl holds, once each.
"""

from __future__ import annotations

import importlib.util
import json
import math
import weakref
from pathlib import Path

from lab.pretrain.probe import average_pairwise_cosine
from lab.pretrain.snapshots import TABLES, load_snapshot, snapshot_path, snapshot_steps

FOLDER = "tensorboard"
_MIRRORS: dict[int, tuple[weakref.ref, _Mirror]] = {}  # id(run) -> (the run, its mirror): one per invocation


def require() -> None:
    """Raise if the tensorboard package (which torch.utils.tensorboard writes with) is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "tensorboard=True needs the tensorboard package: pip install 'deberta-lab[tensorboard]' "
            "(or pip install tensorboard), or drop --tensorboard"
        )


class _Mirror:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # the optional extra: imported only when asked for

        folder = run_dir / FOLDER
        if folder.is_dir():
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        self.run_dir, self.offset, self.snapshots = run_dir, 0, set()
        self.writer = SummaryWriter(str(folder))

    def sync(self) -> None:
        """Write the rows appended to metrics.jsonl and the snapshots written since the last call."""
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            with open(metrics, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
            self.offset += len(complete)
            for line in complete.decode("utf-8").splitlines():
                self._row(json.loads(line))
        for step in snapshot_steps(self.run_dir):
            if step not in self.snapshots:
                self.snapshots.add(step)
                tables = load_snapshot(snapshot_path(self.run_dir, step))
                for name in TABLES:
                    if name in tables:
                        self.writer.add_scalar(
                            f"embedding_cosine/{name}", average_pairwise_cosine(tables[name]), step
                        )
        self.writer.flush()

    def _row(self, row: dict) -> None:
        split, step = row.get("split", "row"), row["step"]
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or key == "step":
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{split}/{key}", value, step)


def mirror(run, close: bool = False) -> None:
    """Bring `<run.out_dir>/tensorboard/` up to date with metrics.jsonl and embeddings/; `run` is the loop's
    Run (one invocation: the first call of a new one starts the event files afresh); `close` at its end."""
    entry = _MIRRORS.get(id(run))
    if entry is None or entry[0]() is not run:
        entry = _MIRRORS[id(run)] = (weakref.ref(run), _Mirror(Path(run.out_dir)))
    entry[1].sync()
    if close:
        _MIRRORS.pop(id(run))[1].writer.close()
