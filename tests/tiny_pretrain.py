"""The tiny pre-training run that the training-loop tests (test_pretrain.py) and the checkpoint tests
(test_checkpoints.py) share: a `tiny` model on a small synthetic corpus, 8 steps of 8 x 32 tokens, with
every interval short enough that logging, evaluation, the probe and checkpoints all happen."""

from pathlib import Path

from lab.pretrain import loop
from lab.pretrain.loop import PretrainConfig
from lab.util import read_jsonl

CORPUS = "synthetic:seed=3,words=40000"
TINY_RUN = dict(
    preset="tiny",
    corpus=CORPUS,
    vocab_size=600,
    seq_len=32,
    steps=8,
    batch_size=8,
    lr=2e-3,
    warmup_steps=2,
    log_every=1,
    eval_every=4,
    eval_batches=2,
    probe_every=2,
    ckpt_every=4,
    progress="none",
)


def tiny_config(out_dir, **changes) -> PretrainConfig:
    """The tiny run writing into `out_dir`, with `changes` to any PretrainConfig field."""
    return PretrainConfig(out_dir=str(out_dir), **{**TINY_RUN, **changes})


def train_losses(run_dir) -> list[float]:
    """The training loss of every logged step of the run in `run_dir`."""
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def interrupt_at_step(monkeypatch, step: int):
    """Ctrl-C during optimizer step `step` (1-based) of the next run: the loop's clip raises
    KeyboardInterrupt on its `step`-th call, after `step` - 1 completed steps. Returns the call that
    puts the real clip back (for the resumed run)."""
    real_clip, calls = loop.clip, {"n": 0}

    def interrupting_clip(model, cfg):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real_clip(model, cfg)

    monkeypatch.setattr(loop, "clip", interrupting_clip)
    return lambda: monkeypatch.setattr(loop, "clip", real_clip)
