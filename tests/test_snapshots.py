"""Word-table snapshots (lab/pretrain/snapshots.py): which steps, which tables and rows, how big, and resumption."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_pretrain import tiny_config

from lab.pretrain import checkpoint
from lab.pretrain.cli import cli
from lab.pretrain.loop import train
from lab.pretrain.snapshots import choose_ids, load_snapshots, planned_steps, rows_within, snapshot_steps
from lab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gdes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gdes")
    train(tiny_config(out, sharing="gdes"))  # 8 steps, probe every 2
    return out


def test_snapshots_at_step_0_the_probe_steps_and_the_end(gdes_run):
    assert snapshot_steps(gdes_run) == [0, 2, 4, 6, 8] == planned_steps(8, 2)
    ids = json.loads((gdes_run / "embeddings" / "ids.json").read_text())["ids"]
    snapshots = load_snapshots(gdes_run)
    for step, snap in snapshots.items():
        assert set(snap) == {"generator", "discriminator", "delta", "ids"}, step
        assert snap["ids"].tolist() == ids
        assert snap["generator"].shape == (len(ids), 64)
        # E_D is what the discriminator reads: E_G + E_delta (float16 rounding apart)
        torch.testing.assert_close(
            snap["discriminator"], snap["generator"] + snap["delta"], atol=2e-3, rtol=0
        )
    assert snapshots[0]["delta"].abs().max() == 0  # E_delta starts at zero
    assert not torch.equal(snapshots[0]["generator"], snapshots[8]["generator"])  # the tables moved
    final = load_file(str(gdes_run / "embeddings.safetensors"))  # the exported final tables
    for key in ("generator", "discriminator", "delta"):
        torch.testing.assert_close(snapshots[8][key], final[key][ids], atol=1e-3, rtol=1e-3)


def test_kept_ids_are_the_most_frequent_non_special_tokens(gdes_run):
    ids = json.loads((gdes_run / "embeddings" / "ids.json").read_text())["ids"]
    counts = np.load(gdes_run / "token_counts.npy")
    special = set(Tokenizer.load(gdes_run / "tokenizer" / "spm.model").special_ids)
    assert not special & set(ids)
    left_out = [i for i in np.flatnonzero(counts > 0) if i not in special and i not in set(ids)]
    if left_out:  # the bound cut the vocabulary: nothing left out is more frequent than what was kept
        assert counts[ids].min() >= counts[left_out].max()
    assert list(counts[ids]) == sorted(counts[ids], reverse=True)  # most frequent first
    assert choose_ids(np.array([0, 9, 9, 5, 7, 0, 3, 8]), {0, 1}, 3) == [2, 7, 4]


def test_es_snapshot_holds_the_shared_table_twice(tmp_path):
    train(tiny_config(tmp_path, sharing="es", steps=2, probe_every=0))
    assert snapshot_steps(tmp_path) == [0, 2]  # probe off: the first and the last step
    snap = load_snapshots(tmp_path)[2]
    assert set(snap) == {"generator", "discriminator", "ids"}
    assert torch.equal(snap["generator"], snap["discriminator"])


def test_size_bound_cuts_rows_not_steps(tmp_path):
    budget = 0.05  # MB: 50 kB for 5 snapshots of 1 kB header + rows of 3 x 64 x 2 + 8 bytes -> 22 rows
    assert rows_within(budget, 5, 64, 1024) == 22
    (tmp_path / "embeddings").mkdir()  # left by an earlier run in this folder, whose rows do not carry over
    (tmp_path / "embeddings" / "ids.json").write_text(json.dumps({"ids": [7]}))
    train(tiny_config(tmp_path, snapshot_mb=budget))
    files = sorted((tmp_path / "embeddings").glob("step-*.safetensors"))
    assert len(files) == 5
    assert sum(f.stat().st_size for f in files) <= budget * 1e6
    assert load_snapshots(tmp_path)[0]["generator"].shape == (22, 64)
    train(tiny_config(tmp_path / "off", snapshot_mb=0))
    assert not (tmp_path / "off" / "embeddings").exists()


def test_resume_neither_duplicates_nor_loses_snapshots(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_config(whole))
    train(tiny_config(split, stop_after=7))  # snapshots 0 2 4 6, checkpoints at 4 and 7
    assert snapshot_steps(split) == [0, 2, 4, 6]
    # as if the interrupted invocation had snapshots every step: one past the resume point, off the schedule
    snapshot = split / "embeddings" / "step-00000006.safetensors"
    snapshot.with_name("step-00000005.safetensors").write_bytes(snapshot.read_bytes())
    ids_before = (split / "embeddings" / "ids.json").read_text()
    newest = checkpoint.candidates(split / "checkpoints")[0]  # a kill before step 7's checkpoint:
    newest.unlink()
    checkpoint.sidecar(newest).unlink()  # resume from step 4, before the snapshots of 5 and 6
    (split / "embeddings" / ".step-00000008.safetensors.x.tmp").write_bytes(b"torn")  # a killed write
    train(tiny_config(split))
    assert snapshot_steps(split) == snapshot_steps(whole) == [0, 2, 4, 6, 8]
    assert (split / "embeddings" / "ids.json").read_text() == ids_before  # the rows chosen once
    assert not list((split / "embeddings").glob(".*.tmp"))
    # CPU training is deterministic: the resumed run's snapshots are the uninterrupted run's
    for step, snap in load_snapshots(split).items():
        torch.testing.assert_close(snap, load_snapshots(whole)[step], atol=0, rtol=0)


def test_command_line_probe_every_10_over_30_steps(tmp_path, capsys):
    args = ["--out-dir", str(tmp_path), "--preset", "tiny", "--corpus", "synthetic:seed=3,words=40000"]
    args += ["--vocab-size", "600", "--steps", "30", "--probe-every", "10", "--batch-size", "2"]
    args += ["--seq-len", "16", "--eval-every", "30", "--ckpt-every", "30", "--progress", "none"]
    assert cli(args) == 0
    assert snapshot_steps(tmp_path) == [0, 10, 20, 30]
