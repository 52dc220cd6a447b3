"""Continued RTD pre-training from DeBERTa-v3 checkpoints (lab/pretrain/init.py), offline: small
checkpoints built on disk with `transformers` (random weights, its own save_pretrained, a SentencePiece
model), then step-0 equality with `transformers`, each sharing mode training, the export, resume, bad
input, and the TensorBoard mirror (lab/pretrain/tensorboard.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pretrain import interrupt_at_step, train_losses
from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model

import lab
from lab.pretrain import init as continued
from lab.pretrain.cli import cli as pretrain_cli
from lab.pretrain.data import open_corpus
from lab.pretrain.loop import PretrainConfig, train
from lab.pretrain.probe import average_pairwise_cosine
from lab.pretrain.snapshots import load_snapshot, snapshot_path
from lab.tokenizer import train_tokenizer
from lab.util import read_jsonl

MODES = ("es", "nes", "gdes")
HIDDEN, HEADS, FFN = 64, 2, 128


def v3_config(vocab_size: int, layers: int, hidden: int = HIDDEN) -> DebertaV2Config:
    """DebertaV2Config with the DeBERTa-v3 settings (the class defaults are not v3)."""
    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        pad_token_id=0,
    )


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorm ones, zero biases), so that a tensor loaded
    into the wrong place, or not at all, changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_checkpoint(model, folder: Path, spm: Path | None, rtd_head: bool = False) -> Path:
    model.save_pretrained(folder)
    if spm is not None:
        (folder / "spm.model").write_bytes(spm.read_bytes())
    if rtd_head:  # the official code's RTD head, as the released checkpoints carry it
        g, hidden = torch.Generator().manual_seed(7), model.config.hidden_size
        extra = {
            "mask_predictions.LayerNorm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
            "mask_predictions.LayerNorm.bias": 0.1 * torch.randn(hidden, generator=g),
            "mask_predictions.dense.weight": 0.05 * torch.randn(hidden, hidden, generator=g),
            "mask_predictions.dense.bias": 0.1 * torch.randn(hidden, generator=g),
            "mask_predictions.classifier.weight": 0.05 * torch.randn(1, hidden, generator=g),
            "mask_predictions.classifier.bias": 0.1 * torch.randn(1, generator=g),
        }
        weights = load_file(folder / "model.safetensors")
        save_file({**weights, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A text folder, its SentencePiece model, a 4-layer discriminator with an RTD head (its table 5 rows
    longer than the tokenizer's ids, as released tables are padded), one without a head, and a
    2-layer generator with its MLM head."""
    root = tmp_path_factory.mktemp("continued")
    documents = list(open_corpus("synthetic:seed=5,words=30000").documents())
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("\n\n".join(documents[: len(documents) // 2]) + "\n")
    (root / "text" / "b.txt").write_text("\n\n".join(documents[len(documents) // 2 :]) + "\n")
    tok = train_tokenizer(documents, 400, root / "spm")
    spm = root / "spm" / "spm.model"
    vocab = tok.vocab_size + 5
    torch.manual_seed(0)
    disc = randomised(DebertaV2Model(v3_config(vocab, 4)), 1)
    save_checkpoint(disc, root / "disc", spm, rtd_head=True)
    save_checkpoint(randomised(DebertaV2Model(v3_config(vocab, 4)), 2), root / "plain", spm)
    save_checkpoint(randomised(DebertaV2ForMaskedLM(v3_config(vocab, 2)), 3), root / "gen", spm)
    return root


def config(assets, out_dir, **changes) -> PretrainConfig:
    base = dict(
        init_discriminator=str(assets / "disc"),
        corpus=str(assets / "text"),
        seq_len=32,
        steps=8,
        batch_size=8,
        log_every=1,
        eval_every=100,
        eval_batches=2,
        probe_every=4,
        ckpt_every=4,
        dropout=0.0,
        progress="none",
        out_dir=str(out_dir),
    )
    return PretrainConfig(**{**base, **changes})


def batch_with_padding(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 24), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 17:], mask[2, 9:] = 0, 0
    ids[mask == 0] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()  # non-pad rows only


# -- step 0 is the checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["half", "new", "checkpoint"])
@pytest.mark.parametrize("sharing", MODES)
def test_step_0_discriminator_is_the_checkpoint(assets, tmp_path, sharing, generator):
    init_generator = str(assets / "gen") if generator == "checkpoint" else generator
    cfg = config(assets, tmp_path / "r", sharing=sharing, init_generator=init_generator)
    torch.manual_seed(cfg.seed)
    model = continued.open_checkpoints(cfg).model(cfg).eval()
    reference = DebertaV2Model.from_pretrained(assets / "disc").eval()
    ids, mask = batch_with_padding(reference.config.vocab_size)
    with torch.no_grad():
        ours = model.discriminator(ids, mask, model.discriminator_word_embeds(ids))
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(ours, theirs, mask) < 1e-5
    if sharing == "gdes":
        assert model.embedding_delta.abs().max() == 0  # E_D = E_G + 0: the loaded table itself
    weights = load_file(assets / "disc" / "model.safetensors")
    assert torch.equal(model.rtd_head.classifier.weight, weights["mask_predictions.classifier.weight"])
    assert torch.equal(model.rtd_head.norm.bias, weights["mask_predictions.LayerNorm.bias"])


def test_the_half_generator_is_the_discriminators_bottom_layers(assets, tmp_path):
    cfg = config(assets, tmp_path / "r", sharing="nes", init_generator="half")
    model = continued.open_checkpoints(cfg).model(cfg).eval()
    reference = DebertaV2Model.from_pretrained(assets / "disc", output_hidden_states=True).eval()
    ids, mask = batch_with_padding(reference.config.vocab_size)
    with torch.no_grad():
        ours = model.generator(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask).hidden_states[2]  # after layer 2 of 4
    assert len(model.generator.layers) == 2
    assert max_diff(ours, theirs, mask) < 1e-5


@pytest.mark.parametrize("sharing", ["nes", "gdes"])
def test_a_generator_checkpoint_brings_its_layers_and_mlm_head(assets, tmp_path, sharing):
    cfg = config(assets, tmp_path / "r", sharing=sharing, init_generator=str(assets / "gen"))
    model = continued.open_checkpoints(cfg).model(cfg).eval()
    reference = DebertaV2ForMaskedLM.from_pretrained(assets / "gen").eval()
    ids, mask = batch_with_padding(reference.config.vocab_size)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        if sharing == "nes":  # the generator keeps its own table: the whole MLM model is the checkpoint
            ours = model.mlm_head(model.generator(ids, mask), model.generator_table)
            assert max_diff(ours, theirs, mask) < 1e-5
    weights = load_file(assets / "gen" / "model.safetensors")
    assert torch.equal(model.mlm_head.dense.weight, weights["cls.predictions.transform.dense.weight"])
    assert torch.equal(model.mlm_head.bias, weights["cls.predictions.bias"])
    if sharing == "gdes":  # E_G is the discriminator's table, so that D starts at its checkpoint
        disc = load_file(assets / "disc" / "model.safetensors")
        assert torch.equal(model.generator_table, disc["embeddings.word_embeddings.weight"])


def test_continuing_defaults_lower_lr_and_warmup_unless_given(assets, tmp_path):
    cfg = config(assets, tmp_path)
    assert (cfg.lr, cfg.warmup_steps) == (continued.CONTINUE_LR, continued.CONTINUE_WARMUP_STEPS)
    assert config(assets, tmp_path, lr=3e-3, warmup_steps=2).lr == 3e-3
    scratch = PretrainConfig()
    assert (scratch.lr, scratch.warmup_steps) == (5e-4, 100)


# -- training, export, resume ---------------------------------------------------------------------------


def eval_mlm(run_dir: Path) -> list[float]:
    return [r["mlm_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "eval"]


@pytest.mark.parametrize("sharing", MODES)
def test_each_mode_lowers_the_heldout_mlm_loss_and_exports_for_transformers(assets, tmp_path, sharing):
    run = tmp_path / sharing
    summary = train(config(assets, run, sharing=sharing, steps=12, lr=3e-3, warmup_steps=2, eval_every=12))
    first, last = eval_mlm(run)[0], eval_mlm(run)[-1]
    assert summary["completed"] and last < first - 0.1, (first, last)
    export = run / "export" / "discriminator"
    assert (export / "spm.model").read_bytes() == (assets / "disc" / "spm.model").read_bytes()
    hf = DebertaV2Model.from_pretrained(export).eval()
    ours = lab.from_pretrained(export)
    ids, mask = batch_with_padding(hf.config.vocab_size)
    with torch.no_grad():
        diff = max_diff(hf(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask), mask)
    assert diff < 1e-5
    assert hf.config.vocab_size == DebertaV2Model.from_pretrained(assets / "disc").config.vocab_size


def test_a_continued_run_continues_and_fine_tunes(assets, tmp_path):
    """A run's export is itself a checkpoint to continue from (with its RTD head), and fine-tunes."""
    first = tmp_path / "first"
    train(config(assets, first, sharing="gdes", steps=4, ckpt_every=4))
    cfg = config(assets, tmp_path / "second", init_discriminator=str(first), init_generator=str(first))
    model = continued.open_checkpoints(cfg).model(cfg)
    heads = load_file(first / "export" / "discriminator" / "rtd_head.safetensors")
    assert torch.equal(model.rtd_head.dense.weight, heads["rtd_head.dense.weight"])
    heads = load_file(first / "export" / "generator" / "mlm_head.safetensors")
    assert torch.equal(model.mlm_head.bias, heads["mlm_head.bias"])
    from lab.finetune.loop import load_encoder

    encoder, tokenizer = load_encoder(str(first))
    assert tokenizer.fingerprint == continued.open_checkpoints(cfg).tokenizer.fingerprint
    assert encoder.cfg.num_layers == 4


def test_resume_after_a_kill_is_exact(assets, tmp_path, monkeypatch):
    straight = config(assets, tmp_path / "straight", sharing="gdes", init_generator=str(assets / "gen"))
    train(straight)
    restore_clip = interrupt_at_step(monkeypatch, 7)  # six completed steps
    split = config(assets, tmp_path / "split", sharing="gdes", init_generator=str(assets / "gen"))
    with pytest.raises(KeyboardInterrupt):
        train(split)
    restore_clip()
    train(split)
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


# -- bad input: one error line, nothing written ---------------------------------------------------------


def not_deberta(root: Path) -> Path:
    folder = root / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    return folder


def no_tokenizer(assets: Path, root: Path) -> Path:
    folder = root / "no-spm"
    save_checkpoint(DebertaV2Model(v3_config(100, 2)), folder, spm=None)
    return folder


def wide_generator(assets: Path, root: Path) -> Path:
    vocab = DebertaV2Config.from_pretrained(assets / "disc").vocab_size
    return save_checkpoint(
        DebertaV2ForMaskedLM(v3_config(vocab, 2, hidden=96)), root / "wide", assets / "spm" / "spm.model"
    )


def other_vocab_generator(assets: Path, root: Path) -> Path:
    spm = assets / "spm" / "spm.model"
    return save_checkpoint(DebertaV2ForMaskedLM(v3_config(700, 2)), root / "v700", spm)


BAD = {
    "not DeBERTa": (lambda a, r: ["--init-discriminator", str(not_deberta(r))], "'bert' model"),
    "no tokenizer": (lambda a, r: ["--init-discriminator", str(no_tokenizer(a, r))], "has no spm.model"),
    "wide generator": (
        lambda a, r: ["--init-discriminator", str(a / "disc"), "--init-generator", str(wide_generator(a, r))],
        "hidden_size=96",
    ),
    "generator vocabulary": (
        lambda a, r: [
            "--init-discriminator",
            str(a / "disc"),
            "--init-generator",
            str(other_vocab_generator(a, r)),
        ],
        "vocab_size=700",
    ),
    "generator without MLM head": (
        lambda a, r: ["--init-discriminator", str(a / "disc"), "--init-generator", str(a / "plain")],
        "no complete MLM head",
    ),
    "preset contradicts": (
        lambda a, r: ["--init-discriminator", str(a / "disc"), "--preset", "base"],
        "preset='base'",
    ),
    "a tokenizer of its own": (
        lambda a, r: ["--init-discriminator", str(a / "disc"), "--tokenizer", str(a / "spm" / "spm.model")],
        "drop --tokenizer",
    ),
    "longer than the checkpoint": (
        lambda a, r: ["--init-discriminator", str(a / "disc"), "--seq-len", "1024"],
        "max_position_embeddings=512",
    ),
    "generator without discriminator": (lambda a, r: ["--init-generator", "new"], "needs init_discriminator"),
}


def exit_code(argv: list[str]) -> int:
    """`python -m lab pretrain ARGV`'s exit code (argparse exits on a value the config refuses)."""
    try:
        return pretrain_cli(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(assets, tmp_path, monkeypatch, capsys, case):
    make_args, message = BAD[case]
    args = make_args(assets, tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    out = tmp_path / "run"
    code = exit_code([*args, "--corpus", str(assets / "text"), "--out-dir", str(out), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if "error:" in line] == [err[-1]] and message in err[-1], err
    assert not out.exists() and not (cache / "tokens").exists()


def test_a_hub_name_without_network_is_one_error_line(assets, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "LAB_CACHE_DIR": str(tmp_path / "c"),
    }
    out = tmp_path / "run"
    args = ["--init-discriminator", "microsoft/deberta-v3-xsmall", "--corpus", str(assets / "text")]
    result = subprocess.run(
        [sys.executable, "-m", "lab", "pretrain", *args, "--out-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "microsoft/deberta-v3-xsmall" in lines[0], (
        lines
    )
    assert not out.exists() and not (tmp_path / "c" / "tokens").exists()


# -- TensorBoard -----------------------------------------------------------------------------------------


def test_tensorboard_events_repeat_metrics_and_the_probes(assets, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(config(assets, run, sharing="gdes", tensorboard=True, stop_after=4))
    train(config(assets, run, sharing="gdes", tensorboard=True))  # resumed: the events are written afresh
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0])).Reload()
    rows = read_jsonl(run / "metrics.jsonl")
    for split, key in [
        ("train", "mlm_loss"),
        ("eval", "rtd_auc"),
        ("probe", "grad_cos"),
        ("probe", "similarity_pull_rtd"),
    ]:
        expected = [(r["step"], r[key]) for r in rows if r["split"] == split]
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert max(abs(v - w) for (_, v), (_, w) in zip(got, expected)) < 1e-5
    cosines = {e.step: e.value for e in events.Scalars("embedding_cosine/discriminator")}
    assert sorted(cosines) == [0, 4, 8]
    snapshot = load_snapshot(snapshot_path(run, 8))
    assert abs(cosines[8] - average_pairwise_cosine(snapshot["discriminator"])) < 1e-6


# -- the notebook ----------------------------------------------------------------------------------------


def test_01_pretrain_continues_a_checkpoint_given_as_init_discriminator(assets, tmp_path):
    from lab.notebook import runner

    out = tmp_path / "nb"
    params = {"init_discriminator": str(assets / "disc"), "corpus": str(assets / "text"), "steps": 4}
    runner.run_notebook("01_pretrain", {**params, "batch_size": 4, "seq_len": 32}, out)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["init_discriminator"] == str(assets / "disc")
        and json.loads((out / "summary.json").read_text())["completed"]
    )
    assert (out / "tokenizer" / "spm.model").read_bytes() == (assets / "disc" / "spm.model").read_bytes()
    assert DebertaV2Config.from_pretrained(out / "export" / "discriminator").num_hidden_layers == 4
