"""The tiny pre-training run that the training-loop tests (test_pretrain.py) and the checkpoint tests
(test_checkpoints.py) share: a `tiny` model on a small synthetic corpus, 8 steps of 8 x 32 tokens, with
every interval short enough that logging, evaluation, the probe and checkpoints all happen."""

from lab.pretrain.loop import PretrainConfig

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
