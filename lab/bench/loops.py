"""The benchmark's real-loop rows (`python -m lab bench --kinds pretrain,finetune`, lab/bench/benchmark.py): the
throughput of `lab.pretrain.loop.train()` and `lab.finetune.loop.train()` themselves, data loading included, on
generated data so that no download is needed.

  pretrain_row   tokens/s of pre-training on a random-word corpus (write_random_corpus) with a
                 SentencePiece vocabulary of PretrainBench.vocab pieces: the median ms/step of the
                 logged windows after the first (steady_ms_per_step)
  finetune_row   training examples/s of fine-tuning a random-init encoder (random_init_checkpoint) on an
                 SST-2-shaped task of random words (write_sst2_like): epochs 2.. over their wall time
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.bench.builders import model_config, rtd_step_flops
from lab.bench.measure import Row
from lab.model import Encoder, preset
from lab.training import autocast_dtype
from lab.util import read_jsonl


@dataclass(frozen=True)
class PretrainBench:
    """Size of the pretrain row: what train() runs."""

    preset: str = "xsmall"
    vocab: int = 32000  # SentencePiece pieces (+ [MASK]) trained on the random-word corpus
    seq_len: int = 128
    batch: int = 128
    steps: int = 30  # timed through train(); the first log window (warm-up, compilation) is dropped
    log_every: int = 10


@dataclass(frozen=True)
class FinetuneBench:
    """Size of the finetune row: the generated task and what train() runs on it."""

    preset: str = "xsmall"
    vocab: int = 32000
    examples: int = 2048  # training examples (SST-2-shaped, 5-40 random words each)
    eval_examples: int = 128  # dev examples evaluated after every epoch
    batch: int = 32
    seq_len: int = 128
    epochs: int = 3  # examples/s is taken over epochs 2..epochs
    compile: bool = False  # torch.compile the fine-tuned model (FinetuneConfig.compile)
    length_bucket: int = 0  # batch widths a multiple of this (FinetuneConfig.length_bucket); 0 = its default


def random_words(n: int, seed: int = 0) -> list[str]:
    """n distinct lower-case pseudo-words of 4-9 letters (a vocabulary SentencePiece can fill)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9)))] = None
    return list(words)


def write_random_corpus(
    path: Path, vocab: int, lines: int = 3000, words_per_line: int = 100, seed: int = 0
) -> Path:
    """A .txt corpus (one document per blank-line-separated block) of uniformly drawn random words,
    with ~1.4x `vocab` distinct words so that a `vocab`-piece SentencePiece model fills up."""
    rng = random.Random(seed)
    words = random_words(max(64, int(1.4 * vocab)), seed)
    blocks = [" ".join(rng.choices(words, k=words_per_line)) for _ in range(lines)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def bench_corpus(pb: PretrainBench, folder: Path) -> Path:
    """folder/corpus.txt: the random-word corpus pretrain_row trains on, about two passes' worth of text
    for the timed steps (200..3000 lines of 100 words); the same bytes for the same `pb` wherever it is
    written, so its tokenizer is found in the cache (keyed by content)."""
    lines = min(3000, max(200, 2 * pb.steps * pb.batch * pb.seq_len // 100))
    return write_random_corpus(Path(folder) / "corpus.txt", pb.vocab, lines)


def train_windows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def steady_ms_per_step(windows: list[dict]) -> float:
    """Median ms/step over the logged windows after the first (which holds the warm-up: compilation,
    first allocations); windows of warm-up steps only log no ms/step and are left out."""
    steady = [w["ms_per_step"] for w in windows[1:] or windows if w.get("ms_per_step") is not None]
    if not steady:
        raise ValueError("the run logged no steady training window; raise steps or lower log_every")
    return statistics.median(steady)


def pretrain_row(
    pb: PretrainBench, device, work: Path, peaks: dict | None = None, corpus: str = "", log=print, **overrides
) -> Row:
    """Tokens/s of lab.pretrain.loop.train() itself at pb's size (on `corpus`, default a random-word one)."""
    from lab.pretrain.loop import PretrainConfig, train

    work = Path(work)
    corpus = corpus or str(bench_corpus(pb, work))
    out_dir = work / "run"
    shutil.rmtree(out_dir, ignore_errors=True)  # an existing checkpoint would be resumed
    cfg = PretrainConfig(
        out_dir=str(out_dir),
        preset=pb.preset,
        corpus=corpus,
        vocab_size=pb.vocab,
        seq_len=pb.seq_len,
        batch_size=pb.batch,
        steps=pb.steps,
        log_every=pb.log_every,
        eval_every=pb.steps + 1,
        eval_batches=1,
        probe_every=0,
        ckpt_every=pb.steps,
        progress="none",
        device=str(device),
        **overrides,
    )
    log(f"pretrain: train() {pb.preset} T={pb.seq_len} batch {pb.batch} vocab {pb.vocab}, {pb.steps} steps")
    summary = train(cfg)
    ms = steady_ms_per_step(train_windows(out_dir))
    dtype = "bf16" if "bfloat16" in summary["dtype"] else "fp32"
    row = Row(
        "pretrain",
        pb.preset,
        dtype,
        pb.seq_len,
        pb.batch,
        f"lab-{cfg.sharing}",
        ms,
        pb.batch * pb.seq_len / (ms / 1e3),
        vocab=summary["vocab_size"],
        compile_s=summary.get("compile_s"),
        note=f"train(); compile={cfg.compile}",
    )
    if peaks and dtype in peaks:
        flops = rtd_step_flops(
            model_config(pb.preset, pb.seq_len, summary["vocab_size"]), pb.batch, pb.seq_len
        )
        row.gflop = flops / 1e9
        row.mfu = flops / (ms / 1e3) / peaks[dtype]
    return row


def write_sst2_like(root: Path, words: list[str], n_train: int, n_dev: int, seed: int = 0) -> Path:
    """An SST-2-shaped task folder (root/SST-2/{train,dev}.tsv) of 5-40 random words per sentence;
    label 1 iff the first word sorts before the last (learnable, but only from the words)."""
    rng = random.Random(seed)
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            sentence = rng.choices(words, k=rng.randint(5, 40))
            lines.append(f"{' '.join(sentence)}\t{int(sentence[0] < sentence[-1])}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def random_init_checkpoint(path: Path, preset_name: str, vocab: int, words: list[str]) -> Path:
    """A random-init encoder of `preset_name` with a `vocab`-piece tokenizer, in HF format."""
    from lab.hf import save_pretrained
    from lab.tokenizer import train_tokenizer

    rng = random.Random(1)
    texts = [" ".join(rng.choices(words, k=100)) for _ in range(max(200, vocab // 20))]
    tokenizer = train_tokenizer(texts, vocab_size=vocab)
    save_pretrained(Encoder(preset(preset_name, vocab_size=tokenizer.vocab_size)), path, tokenizer=tokenizer)
    return path


def finetune_row(
    fb: FinetuneBench, device, work: Path, init: str = "", glue_dir: str = "", task: str = "sst2", log=print
) -> Row:
    """Training examples/s of lab.finetune.loop.train() (default: a random-init encoder on random words)."""
    from lab.finetune import loop as finetune
    from lab.finetune.glue import validation_size

    work = Path(work)
    synthetic = not init
    if synthetic:
        words = random_words(max(64, int(1.4 * fb.vocab)))
        init = str(random_init_checkpoint(work / "init", fb.preset, fb.vocab, words))
        # enough rows that fb.examples remain after the validation split is carved from train
        rows = next(
            n for n in range(fb.examples, 2 * fb.examples + 2) if n - validation_size(n) >= fb.examples
        )
        glue_dir = str(write_sst2_like(work / "glue", words, rows, fb.eval_examples))
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)  # finished seeds there would be skipped, not timed
    cfg = finetune.FinetuneConfig(
        task=task,
        glue_dir=glue_dir,
        init=init,
        out_dir=str(out),
        epochs=fb.epochs,
        batch_size=fb.batch,
        max_seq_len=fb.seq_len,
        max_train_examples=fb.examples,
        max_eval_examples=fb.eval_examples,
        seeds=(1,),
        device=str(device),
        compile="on" if fb.compile else "off",
        length_bucket=fb.length_bucket,
    )
    log(
        f"finetune: train() {task} from {init}, {fb.examples} examples x {fb.epochs} epochs, batch {fb.batch}"
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        if synthetic:  # its small dev split is on purpose, not a partial download
            warnings.filterwarnings("ignore", message=".*the official split has")
        results = finetune.train(cfg)
    wall = time.perf_counter() - start
    history = read_jsonl(out / "metrics.jsonl")
    n = results["n_train_examples"]
    if len(history) > 1:  # training alone (each epoch's evaluation is not timed), warm-up epoch left out
        examples_per_s = (len(history) - 1) * n / sum(row["train_s"] for row in history[1:])
        how = f"epochs 2-{len(history)}, training only"
    else:
        examples_per_s, how = fb.epochs * n / wall, "whole run incl. loading"
    key = results["main_metric"]
    dtype = "bf16" if autocast_dtype(cfg.dtype, torch.device(device)) == torch.bfloat16 else "fp32"
    return Row(
        "finetune",
        fb.preset,
        dtype,
        fb.seq_len,
        fb.batch,
        "lab",
        1e3 * fb.batch / examples_per_s,
        None,
        examples_per_s=examples_per_s,
        note=f"{task} {n} examples, {how}, compile={fb.compile}, dev {key} {results['mean'][key]:.3f}",
    )
