"""RTD pre-training: masking and labels, gradient isolation per sharing mode, overfitting, resume,
torchrun equivalence, export, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DebertaV2Model

import lab
from lab import pretrain
from lab.model import preset
from lab.pretrain import PretrainConfig, train
from lab.rtd import RTDModel, draw_noise, mask_tokens, sample
from lab.util import read_jsonl

SPECIAL = torch.tensor([0, 1, 2, 3])
CORPUS = "synthetic:seed=3,words=40000"


def tiny_rtd(sharing, **kw):
    torch.manual_seed(0)
    return RTDModel(preset("tiny", hidden_dropout=0.0, attention_dropout=0.0), sharing, **kw)


def packed_batch(B=4, T=32, vocab=999, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return ids, torch.ones_like(ids)


# -- masking and labels ---------------------------------------------------------------------------


def test_masking_rate_is_15_percent_and_never_touches_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 999, (512, 128), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[::7, 50] = 3  # some [UNK]
    mask = torch.ones_like(ids)
    mask[::5, 100:] = 0  # some padding
    noise = draw_noise(*ids.shape, 0.15, g, "cpu")
    masked, positions, valid = mask_tokens(ids, mask, SPECIAL, 999, noise, 0.15)
    changed = masked != ids
    eligible = mask.bool() & (ids > 3)
    assert abs(changed.sum().item() / eligible.sum().item() - 0.15) < 0.01
    assert not changed[~eligible].any()  # specials and padding never masked
    assert (masked[changed] == 999).all()  # all [MASK], no 80/10/10
    assert valid.sum() == changed.sum()


def test_bert_strategy_mixes_mask_random_and_unchanged():
    g = torch.Generator().manual_seed(1)
    ids, mask = packed_batch(256, 128, seed=1)
    noise = draw_noise(*ids.shape, 0.15, g, "cpu")
    masked, positions, valid = mask_tokens(ids, mask, SPECIAL, 999, noise, 0.15, "bert")
    chosen = masked.gather(1, positions)[valid]
    original = ids.gather(1, positions)[valid]
    frac_mask = (chosen == 999).float().mean().item()
    frac_same = (chosen == original).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03
    assert ((chosen > 3) & (chosen < 999)).all() | (chosen == 999).any()


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3])).expand(20000, 3)
    draws = sample(logits, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


def test_a_sample_equal_to_the_original_is_labelled_original():
    model = tiny_rtd("gdes")
    ids, mask = packed_batch()
    # make the generator certain of the original token: its head bias overwhelms everything
    with torch.no_grad():
        model.mlm_head.bias.fill_(-1e4)
        model.mlm_head.bias[7] = 1e4
    ids[:, 1:-1] = 7
    out = model(ids, mask, SPECIAL, 999)
    assert out.valid.sum() > 0
    assert (out.corrupted_ids == ids).all() and out.labels.sum() == 0
    # and with a generator certain of another token, exactly the masked positions are replaced
    with torch.no_grad():
        model.mlm_head.bias.fill_(-1e4)
        model.mlm_head.bias[8] = 1e4
    out = model(ids, mask, SPECIAL, 999)
    assert out.labels.sum() == out.valid.sum()


# -- gradient isolation ---------------------------------------------------------------------------


def grads(model, loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def norm(g):
    return 0.0 if g is None else g.abs().sum().item()


def test_gdes_gradients_are_disentangled():
    model = tiny_rtd("gdes")
    out = model(*packed_batch(), SPECIAL, 999)
    E_G, delta = model.generator_table, model.embedding_delta
    g_rtd_EG, g_rtd_delta = grads(model, out.rtd_loss, [E_G, delta])
    g_mlm_EG, g_mlm_delta = grads(model, out.mlm_loss, [E_G, delta])
    assert norm(g_rtd_EG) == 0.0  # RTD never reaches E_G
    assert norm(g_mlm_delta) == 0.0  # MLM never reaches E_delta
    assert norm(g_mlm_EG) > 0 and norm(g_rtd_delta) > 0
    assert torch.count_nonzero(delta) == 0  # E_delta starts at zero
    torch.testing.assert_close(model.discriminator_table(), E_G)


def test_es_shares_one_table_that_both_losses_update():
    model = tiny_rtd("es")
    assert model.discriminator.word_embeddings is model.generator.word_embeddings
    out = model(*packed_batch(), SPECIAL, 999)
    (g_rtd,) = grads(model, out.rtd_loss, [model.generator_table])
    (g_mlm,) = grads(model, out.mlm_loss, [model.generator_table])
    assert norm(g_rtd) > 0 and norm(g_mlm) > 0


def test_nes_tables_each_get_only_their_own_loss():
    model = tiny_rtd("nes")
    E_G, E_D = model.generator_table, model.discriminator.word_embeddings.weight
    assert E_G is not E_D
    out = model(*packed_batch(), SPECIAL, 999)
    g_rtd_EG, g_rtd_ED = grads(model, out.rtd_loss, [E_G, E_D])
    g_mlm_EG, g_mlm_ED = grads(model, out.mlm_loss, [E_G, E_D])
    assert norm(g_rtd_EG) == 0.0 and norm(g_mlm_ED) == 0.0
    assert norm(g_rtd_ED) > 0 and norm(g_mlm_EG) > 0


def test_decoupled_es_keeps_the_rtd_gradient_off_the_shared_table():
    cfg = PretrainConfig(sharing="es", optimization="decoupled")
    model = tiny_rtd("es")
    out = model(*packed_batch(), SPECIAL, 999)
    (g_mlm,) = grads(model, out.mlm_loss, [model.generator_table])
    pretrain.backward(model, out, cfg, accum=1)
    torch.testing.assert_close(model.generator_table.grad, g_mlm)
    assert model.rtd_head.dense.weight.grad.abs().sum() > 0


def test_gdes_export_writes_the_merged_table_under_the_normal_name():
    model = tiny_rtd("gdes")
    with torch.no_grad():
        model.embedding_delta.normal_()
    state = model.discriminator_state_dict()
    torch.testing.assert_close(state["word_embeddings.weight"], model.generator_table + model.embedding_delta)


@pytest.mark.parametrize("sharing", ["es", "nes", "gdes"])
def test_overfitting_one_batch_drives_both_losses_down(sharing):
    model = tiny_rtd(sharing)
    ids, mask = packed_batch(8, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(0), "cpu")
    first = model(ids, mask, SPECIAL, 999, noise=noise)
    for _ in range(60):
        out = model(ids, mask, SPECIAL, 999, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.mlm_loss < 0.3 * first.mlm_loss
    assert out.rtd_loss < 0.5 * first.rtd_loss


# -- the training loop ----------------------------------------------------------------------------


def quick(tmp_path, name="run", **kw) -> PretrainConfig:
    values = dict(
        out_dir=str(tmp_path / name),
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
    values.update(kw)
    return PretrainConfig(**values)


def train_losses(run_dir):
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("sharing", ["es", "nes", "gdes"])
def test_train_writes_the_run_directory_and_hf_loads_the_discriminator(tmp_path, sharing):
    summary = train(quick(tmp_path, sharing=sharing))
    run = tmp_path / "run"
    for name in [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "tokenizer/spm.model",
        "token_counts.npy",
        "token_classes.json",
        "embeddings.safetensors",
        "export/discriminator/model.safetensors",
        "export/generator/model.safetensors",
    ]:
        assert (run / name).is_file(), name
    assert summary["steps"] == 8 and summary["completed"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert {r["split"] for r in rows} == {"train", "eval", "probe"}
    assert all(-1 <= r["grad_cos"] <= 1 for r in rows if r["split"] == "probe")
    assert json.loads((run / "summary.json").read_text())["final_eval"]["rtd_auc"] > 0
    # the merged discriminator loads in transformers and matches our own loader
    hf = DebertaV2Model.from_pretrained(run / "export" / "discriminator").eval()
    ours = lab.from_pretrained(run / "export" / "discriminator")
    ids = torch.randint(4, 500, (2, 20))
    with torch.no_grad():
        diff = hf(input_ids=ids).last_hidden_state - ours(ids)
    assert diff.abs().max() < 1e-5


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    train(quick(tmp_path, "straight"))
    train(quick(tmp_path, "split", stop_after=4))
    assert len(train_losses(tmp_path / "split")) == 4
    train(quick(tmp_path, "split"))
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_clip = pretrain.clip

    def interrupting_clip(model, cfg):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        real_clip(model, cfg)

    monkeypatch.setattr(pretrain, "clip", interrupting_clip)
    with pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path, "interrupted"))
    state = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 5  # five completed steps were saved on the way out
    monkeypatch.setattr(pretrain, "clip", real_clip)
    train(quick(tmp_path, "interrupted"))
    train(quick(tmp_path, "straight"))
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "interrupted")
    assert len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = quick(tmp_path, "nan", log_every=1, ckpt_every=2)
    real_backward = pretrain.backward
    calls = {"n": 0}

    def poisoned(model, out, cfg, accum):
        calls["n"] += 1
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        real_backward(model, out, cfg, accum)

    monkeypatch.setattr(pretrain, "backward", poisoned)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(cfg)
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_two_process_torchrun_matches_one_process(tmp_path):
    common = [
        "--preset",
        "tiny",
        "--corpus",
        CORPUS,
        "--vocab-size",
        "600",
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--eval-every",
        "100",
        "--probe-every",
        "0",
        "--dropout",
        "0.0",
        "--progress",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "lab", "pretrain", *common, "--out-dir", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "lab",
            "pretrain",
            *common,
            "--out-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_sharing_mode_and_fields_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sharing"):
        PretrainConfig(sharing="tied")
    with pytest.raises(ValueError, match="sharing"):
        RTDModel(preset("tiny"), "tied")
    with pytest.raises(ValueError, match="gen_width_ratio"):
        RTDModel(preset("tiny"), "gdes", gen_width_ratio=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        train(quick(tmp_path, batch_size=7, grad_accum=2))


def test_cli_rejects_unknown_flags_and_bad_values():
    cmd = [sys.executable, "-m", "lab", "pretrain"]
    bad_flag = subprocess.run([*cmd, "--no-such-flag", "1"], capture_output=True, text=True)
    assert bad_flag.returncode == 2 and "unrecognized arguments" in bad_flag.stderr
    bad_value = subprocess.run([*cmd, "--sharing", "tied"], capture_output=True, text=True)
    assert bad_value.returncode == 2 and "sharing" in bad_value.stderr


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train(quick(tmp_path, "r", stop_after=2))
    with pytest.raises(ValueError, match="sharing"):
        train(quick(tmp_path, "r", sharing="es"))


def test_checkpoint_whose_vocabulary_does_not_fit_the_tokenizer_is_refused(tmp_path):
    train(quick(tmp_path, "v", stop_after=2))
    path = tmp_path / "v" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["generator.word_embeddings.weight"] = torch.zeros(50, 64)
    torch.save(state, path)
    with pytest.raises(ValueError, match="vocabulary"):
        train(quick(tmp_path, "v"))


def test_missing_or_too_short_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no/such"):
        train(quick(tmp_path, corpus="/no/such/folder"))
    (tmp_path / "short.txt").write_text("just a few words here\n")
    with pytest.raises(ValueError, match="fewer than two examples"):
        train(quick(tmp_path, corpus=str(tmp_path / "short.txt")))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        train(quick(tmp_path, corpus=str(tmp_path / "empty.txt")))


def test_enhanced_mask_decoder_trains_its_position_table():
    model = tiny_rtd("gdes", emd=True)
    out = model(*packed_batch(), SPECIAL, 999)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.emd.position_embeddings.weight.grad.abs().sum() > 0
