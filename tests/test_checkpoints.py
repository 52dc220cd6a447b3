"""Faults survived, nothing lost: the checkpoint ring and its checksums, fallback from damaged files,
one clear message when none is usable, failing writes, and kills at any moment (lab/pretrain/checkpoint.py)."""

import dataclasses
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_pretrain import TINY_RUN

from lab.pretrain import checkpoint, export
from lab.pretrain.checkpoint import CheckpointError, CheckpointWarning
from lab.pretrain.loop import PretrainConfig, train
from lab.pretrain.setup import check_resumable
from lab.util import read_jsonl

# the shared tiny run with a checkpoint every other step, so a kill or a fault finds several to fall back on
SETTINGS = {**TINY_RUN, "ckpt_every": 2}


def quick(run_dir, **kw) -> PretrainConfig:
    return PretrainConfig(out_dir=str(run_dir), **{**SETTINGS, **kw})


def cli_args(run_dir, **kw) -> list[str]:
    values = {**SETTINGS, **kw, "out_dir": str(run_dir)}
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return [sys.executable, "-m", "lab", "pretrain", *args]


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def final_eval(run_dir):
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "eval"][-1]


def assert_same_run(run_dir, reference):
    a, b = losses(reference), losses(run_dir)
    assert len(a) == len(b) == SETTINGS["steps"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    fa, fb = final_eval(reference), final_eval(run_dir)
    assert all(abs(fa[k] - fb[k]) < 1e-6 for k in ("mlm_loss", "rtd_loss", "rtd_auc"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here, in this process or in a killed subprocess (OMP_NUM_THREADS=1), uses one thread:
    the number of threads changes the order of float reductions, and so the last bit of a loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run: what every interrupted one must end up equal to."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lab-cache"))
        train(quick(run_dir))
    return run_dir


def ckpt(run_dir, step) -> Path:
    return checkpoint.ring_path(Path(run_dir) / "checkpoints", step)


# -- the ring and its checksums --------------------------------------------------------------------


def small_state(step):
    return {
        "step": step,
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "data": {},
        "config": {},
    }


def test_the_ring_keeps_the_newest_checkpoints_each_with_a_sha256sum_checksum(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(small_state(step), tmp_path, step, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "step-00000004.pt",
        "step-00000004.pt.sha256",
        "step-00000006.pt",
        "step-00000006.pt.sha256",
    ]
    for step in (4, 6):
        path = checkpoint.ring_path(tmp_path, step)
        expected = hashlib.sha256(path.read_bytes()).hexdigest()
        assert (tmp_path / f"{path.name}.sha256").read_text() == f"{expected}  {path.name}\n"
    found = checkpoint.latest(tmp_path)
    assert found.path.name == "step-00000006.pt" and found.state["model"]["w"][0] == 6 and not found.bad


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_state_with_a_non_finite_tensor_is_refused_before_anything_is_written(tmp_path, where):
    checkpoint.save(small_state(2), tmp_path, 2, keep=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = small_state(4)
    if where == "model":
        bad["model"]["w"][1] = float("nan")
    else:  # deep in the optimizer state, as an exploded Adam moment would be
        bad["optimizer"] = {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}}
    with pytest.raises(CheckpointError, match=rf"non-finite values in {where}\..*step-00000002.pt is intact"):
        checkpoint.save(bad, tmp_path, 4, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the good one was not evicted
    assert checkpoint.latest(tmp_path).state["step"] == 2


def test_a_run_keeps_keep_checkpoints(straight, tmp_path):
    names = sorted(p.name for p in (straight / "checkpoints").glob("*.pt"))
    assert names == ["step-00000006.pt", "step-00000008.pt"]  # keep_checkpoints=2 of 2, 4, 6, 8
    train(quick(tmp_path / "three", steps=6, keep_checkpoints=3))
    assert len(list((tmp_path / "three" / "checkpoints").glob("*.pt"))) == 3


# -- damaged checkpoints ---------------------------------------------------------------------------


def damage(path: Path, how: str, run_dir: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":  # a partial copy, a failing disk
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":  # same size, all zeros (a lost block device write)
        path.write_bytes(bytes(len(data)))
    elif how == "another_file":  # some other file copied over it
        path.write_bytes((run_dir / "tokenizer" / "spm.model").read_bytes())
    elif how == "not_a_checkpoint":  # a valid torch file with a matching checksum, but not a checkpoint
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
        checkpoint.sidecar(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "zeroed", "another_file", "not_a_checkpoint"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(straight, tmp_path, how):
    run_dir = tmp_path / "run"
    train(quick(run_dir, stop_after=6))
    damage(ckpt(run_dir, 6), how, run_dir)
    with pytest.warns(CheckpointWarning, match=r"step-00000006\.pt is not usable.*step-00000004\.pt"):
        train(quick(run_dir))
    assert_same_run(run_dir, straight)
    # the damaged file is kept for inspection, out of the ring
    assert [p.name for p in (run_dir / "checkpoints" / "bad").glob("*/*.pt")] == ["step-00000006.pt"]


def test_no_usable_checkpoint_is_one_clear_error_naming_the_files_and_the_way_out(straight, tmp_path):
    run_dir = tmp_path / "run"
    train(quick(run_dir, stop_after=6))
    damage(ckpt(run_dir, 6), "truncated", run_dir)
    damage(ckpt(run_dir, 4), "zeroed", run_dir)
    with pytest.raises(CheckpointError) as err:
        train(quick(run_dir))
    message = str(err.value)
    assert "step-00000006.pt" in message and "step-00000004.pt" in message
    assert "--discard-bad-checkpoints" in message and "--out-dir" in message
    # the command line prints that message alone: no traceback
    result = subprocess.run(cli_args(run_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: no usable checkpoint in" in result.stderr and "step-00000004.pt" in result.stderr
    # the way out: move them aside and start the run over
    train(quick(run_dir, discard_bad_checkpoints=True))
    assert_same_run(run_dir, straight)
    assert len(list((run_dir / "checkpoints" / "bad").glob("*/*.pt"))) == 2


def test_a_run_from_before_the_ring_resumes_from_its_last_pt(straight, tmp_path):
    run_dir = tmp_path / "run"
    train(quick(run_dir, stop_after=4))
    folder = run_dir / "checkpoints"
    (folder / "step-00000004.pt").rename(folder / "last.pt")  # the old layout: one file, no checksum
    for path in folder.glob("step-*"):  # the other checkpoints and every checksum
        path.unlink()
    train(quick(run_dir))
    assert_same_run(run_dir, straight)
    assert not (folder / "last.pt").exists()  # pruned once the ring holds two newer checkpoints


# -- failing writes --------------------------------------------------------------------------------


def test_a_write_that_fails_halfway_keeps_the_previous_checkpoint_and_a_rerun_resumes(
    straight, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint of step 6: half of it reaches the disk
            real_save(obj, path, *args, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_up)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-00000004\.pt is intact"):
        train(quick(run_dir))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-00000002.pt",
        "step-00000002.pt.sha256",
        "step-00000004.pt",
        "step-00000004.pt.sha256",
    ]  # no temporary file, no half checkpoint
    assert checkpoint.latest(folder).state["step"] == 4
    train(quick(run_dir))
    assert_same_run(run_dir, straight)


def test_a_failing_export_keeps_the_checkpoint_and_a_rerun_finishes(straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_pretrained", no_space)
    with pytest.raises(CheckpointError, match="export.*step-00000008.pt is intact.*rerun"):
        train(quick(run_dir))
    monkeypatch.undo()
    summary = train(quick(run_dir))
    assert summary["completed"] and (run_dir / "export" / "discriminator" / "model.safetensors").is_file()
    assert losses(run_dir) == losses(straight)


# -- kills -----------------------------------------------------------------------------------------


def test_a_kill_between_the_temporary_file_and_the_rename_loses_nothing(straight, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", checkpoint.FAULT_ENV: "kill-before-rename:step-00000004.pt"}
    killed = subprocess.run(cli_args(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = run_dir / "checkpoints"
    assert (folder / "step-00000002.pt").is_file() and not (folder / "step-00000004.pt").exists()
    assert list(folder.glob(".step-00000004.pt.*.tmp"))  # the complete temporary file, never renamed
    env.pop(checkpoint.FAULT_ENV)
    rerun = subprocess.run(cli_args(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_run(run_dir, straight)
    assert not list(folder.glob("*.tmp"))


def newest_step(run_dir) -> int:
    ring = [p for p in checkpoint.candidates(Path(run_dir) / "checkpoints") if p.name != "last.pt"]
    return int(ring[0].stem.split("-")[1]) if ring else -1


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_final_losses(tmp_path):
    settings = dict(steps=40, ckpt_every=3, eval_every=10, probe_every=5)
    reference = tmp_path / "reference"
    train(quick(reference, **settings))
    run_dir, rng = tmp_path / "run", random.Random(13)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed_at = []
    for _ in range(4):
        before = newest_step(run_dir)
        resumed_at.append(before)
        process = subprocess.Popen(cli_args(run_dir, **settings), env=env, stderr=subprocess.DEVNULL)
        # once this invocation has written a checkpoint of its own, kill it at a random moment after
        while process.poll() is None and newest_step(run_dir) <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is not None:
            break  # it finished first
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = subprocess.run(
        cli_args(run_dir, **settings), env=env, capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert len(set(resumed_at)) >= 3  # it really resumed from several different steps
    a, b = losses(reference), losses(run_dir)
    assert len(a) == len(b) == 40
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    fa, fb = final_eval(reference), final_eval(run_dir)
    assert all(abs(fa[k] - fb[k]) < 1e-6 for k in ("mlm_loss", "rtd_loss", "rtd_auc", "mlm_acc", "rtd_acc"))


def test_ci_runs_the_slow_tests():
    """The tests marked slow (the kill-at-random-moments resume above among them) run in CI, after the
    default suite, through the Makefile target that selects them."""
    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert "make test-slow" in ci and ci.index("make test-slow") > ci.index("make test")
    target = (root / "Makefile").read_text().split("\ntest-slow:")[1].split("\n\n")[0]
    assert "-m slow" in target


def test_atomically_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """The temp file behind every atomic write is private (mkstemp: 0600); the finished file must be
    readable like any other the user writes (umask applied), or a shared figures/ folder is unreadable."""
    from lab import util

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    util.atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_run_saved_before_a_field_existed_resumes_at_that_fields_default(tmp_path):
    """A checkpoint's config lacks the fields added since it was saved: they ran at their defaults, so
    resuming with the defaults is allowed, and with another value refused, naming the field."""
    cfg = PretrainConfig(out_dir=str(tmp_path / "run"))
    saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("init_generator", "emd")}
    check_resumable(saved, cfg, tmp_path)  # the defaults: resumable
    with pytest.raises(ValueError, match=r"emd: False -> True"):
        check_resumable(saved, dataclasses.replace(cfg, emd=True), tmp_path)
