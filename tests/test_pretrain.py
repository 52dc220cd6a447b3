"""RTD pre-training: masking and labels, overfitting, resume, torchrun equivalence, export, and bad
input (the gradient isolation of each sharing mode is in test_sharing.py)."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_pretrain import CORPUS, interrupt_at_step, tiny_config, train_losses
from transformers import DebertaV2Model

import lab
from lab.finetune.loop import load_encoder
from lab.model import preset
from lab.pretrain import checkpoint, step
from lab.pretrain import evaluate as pretrain_evaluate
from lab.pretrain import loop as pretrain
from lab.pretrain.data import prepare_corpus
from lab.pretrain.loop import PretrainConfig, train
from lab.pretrain.probe import gradient_probe
from lab.pretrain.setup import Dist
from lab.rtd import RTDModel, draw_noise, mask_tokens, sample
from lab.util import read_jsonl

SPECIAL = torch.tensor([0, 1, 2, 3])


def tiny_rtd(sharing, **kw):
    torch.manual_seed(0)
    return RTDModel(preset("tiny", hidden_dropout=0.0, attention_dropout=0.0), sharing, **kw)


def packed_batch(B=4, T=32, vocab=999, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return ids, torch.ones_like(ids)


# -- masking and labels ---------------------------------------------------------------------------


def test_masking_follows_the_official_count_per_row_and_never_touches_special_tokens():
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
    # NGramMaskGenerator: max(1, round(0.15 L)) over the row's L tokens ([CLS], [SEP], [UNK] included),
    # at most one per window of 6 words (rows of 128: 19 masks; padded rows of 100: 15)
    expected = [
        min(max(1, int(round(L * 0.15))), math.ceil(U / 6))
        for L, U in zip(mask.sum(1).tolist(), eligible.sum(1).tolist())
    ]
    assert changed.sum(1).tolist() == expected
    assert {19, 15} <= set(expected)
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
    is_mask, is_same = chosen == 999, chosen == original
    is_random = ~is_mask & ~is_same
    assert abs(is_mask.float().mean().item() - 0.8) < 0.03
    # "unchanged" is the 10 % kept plus the ~0.1 % of random draws that hit the original token
    assert abs(is_same.float().mean().item() - 0.1) < 0.03
    assert abs(is_random.float().mean().item() - 0.1) < 0.03
    # a random replacement is an ordinary token of the vocabulary: never a special id, never [MASK]
    random_tokens = chosen[is_random]
    assert not torch.isin(random_tokens, SPECIAL).any() and (random_tokens < 999).all()


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


def grads(model, loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def test_evaluate_matches_hand_computed_values():
    """A rigged model: the generator's logits are its head's bias alone (token 8 certain, token 7 at
    logit -20, every other token at -1e4) and the discriminator says "replaced" with logit 1 everywhere.
    Batch 1 (2 rows of [CLS] + 14 x token 7 + [SEP]) masks 2 per row, all replaced by 8; batch 2
    (2 rows of [CLS] + 28 x token 8 + [SEP]) masks 4 per row, all sampled back as 8 (not replaced).
    Hence 12 masked of 92 tokens, 4 replaced; an unweighted mean over batches would give MLM 10."""
    model = tiny_rtd("gdes")
    with torch.no_grad():
        model.mlm_head.norm.weight.zero_()
        model.mlm_head.norm.bias.zero_()  # the head's output is its bias
        model.mlm_head.bias.fill_(-1e4)
        model.mlm_head.bias[8], model.mlm_head.bias[7] = 0.0, -20.0
        model.rtd_head.classifier.weight.zero_()
        model.rtd_head.classifier.bias.fill_(1.0)
    batches = [torch.tensor([[1] + [7] * 14 + [2]] * 2), torch.tensor([[1] + [8] * 28 + [2]] * 2)]
    tok = SimpleNamespace(special_ids={0, 1, 2, 3, 999}, mask_id=999)
    row = pretrain_evaluate.evaluate(model, batches, tok, PretrainConfig(), torch.device("cpu"), None)
    nll_7, nll_8 = 20 + math.log1p(math.exp(-20)), math.log1p(math.exp(-20))  # -log p(7), -log p(8)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE of logit 1: label 1 -> softplus(-1)
    assert row == {
        "mlm_loss": pytest.approx((4 * nll_7 + 8 * nll_8) / 12, rel=1e-6),
        "mlm_acc": pytest.approx(8 / 12),
        "rtd_loss": pytest.approx((4 * softplus(-1) + 88 * softplus(1)) / 92, rel=1e-6),
        "rtd_acc": pytest.approx(4 / 92),
        "rtd_auc": pytest.approx(0.5),  # one score for every token
        "replaced_rate": pytest.approx(4 / 92),
        "replaced_of_masked": pytest.approx(4 / 12),
    }


def global_batch_parts(model, ids, mask, noise, parts):
    """Forward each of `parts` row slices of one global batch with the global counts, as train_step does."""
    totals = step.global_totals([ids], [mask], SPECIAL, 0.15, Dist())
    rows = len(ids) // parts
    return [
        model(
            ids[i : i + rows],
            mask[i : i + rows],
            SPECIAL,
            999,
            noise=noise.rows(slice(i, i + rows)),
            totals=totals,
        )
        for i in range(0, len(ids), rows)
    ]


@pytest.mark.parametrize("parts", [1, 2])
def test_decoupled_es_accumulates_only_the_mlm_gradient_on_the_shared_table(parts):
    """Over 1 or 2 micro-batches (the accumulation branch), the shared table ends with the MLM-only
    gradient of the whole batch's mean loss, and every other parameter with the joint gradient —
    both taken from one plain full-batch forward."""
    cfg = PretrainConfig(sharing="es", optimization="decoupled")
    ids, mask = packed_batch(8, 32)
    ids[1, 10:16] = 3  # rows with different word counts, so the parts hold different masked counts
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(0), "cpu")
    model = tiny_rtd("es")
    full = model(ids, mask, SPECIAL, 999, noise=noise)  # means over the whole batch
    (g_mlm,) = grads(model, full.mlm_loss, [model.generator_table])
    (g_head,) = grads(model, full.loss, [model.rtd_head.dense.weight])
    for out in global_batch_parts(model, ids, mask, noise, parts):
        step.backward(model, out, cfg)
    torch.testing.assert_close(model.generator_table.grad, g_mlm, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(model.rtd_head.dense.weight.grad, g_head, atol=1e-7, rtol=1e-5)
    assert g_head.abs().sum() > 0


def test_the_probe_measures_the_same_conflict_under_es_and_gdes_at_initialisation():
    """With E_delta = 0, GDES's discriminator reads exactly ES's table, so at step 0 (same weights,
    batch and noise) both probes see the same two gradients; only ES passes RTD's onto E_G."""
    ids, mask = packed_batch()
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(0), "cpu")
    rows = {}
    for sharing in ("es", "gdes"):
        model = tiny_rtd(sharing)
        out = model(ids, mask, SPECIAL, 999, noise=noise)
        rows[sharing] = gradient_probe(model, out, 50.0)
        if sharing == "gdes":  # the cosine, from torch's own cosine_similarity
            (g_mlm,) = grads(model, out.mlm_loss, [model.generator_table])
            (g_rtd,) = grads(model, 50.0 * out.rtd_loss, [model.embedding_delta])
            expected = torch.nn.functional.cosine_similarity(g_mlm.flatten(), g_rtd.flatten(), dim=0)
    es, gdes = rows["es"], rows["gdes"]
    assert gdes["grad_cos"] == pytest.approx(expected.item(), abs=1e-6)
    assert es["grad_cos"] == pytest.approx(gdes["grad_cos"], abs=1e-6)
    assert es["grad_norm_rtd"] == pytest.approx(gdes["grad_norm_rtd"], rel=1e-5)
    assert es["rtd_grad_on_generator"] == pytest.approx(es["grad_norm_rtd"], rel=1e-6)
    assert gdes["rtd_grad_on_generator"] == 0.0


def test_the_exported_gdes_discriminator_reproduces_the_trained_one(tmp_path):
    """After training (E_delta no longer zero), the HF-format export, loaded by lab and by transformers,
    gives the hidden states the trained discriminator computes from stopgrad(E_G) + E_delta."""
    train(quick(tmp_path, "gdes", steps=4, probe_every=0, eval_every=100))
    state = checkpoint.load_state(tmp_path / "gdes")
    vocab = state["model"]["generator.word_embeddings.weight"].shape[0]
    model = RTDModel(preset("tiny", vocab_size=vocab, max_seq_len=512), "gdes")
    model.load_state_dict(state["model"])
    model.eval()
    assert model.embedding_delta.abs().max() > 1e-3  # E_delta has moved away from zero
    ids = torch.randint(4, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trained = model.discriminator(ids, mask, model.discriminator_word_embeds(ids))
        ours = lab.from_pretrained(tmp_path / "gdes" / "export" / "discriminator").eval()(ids)
        hf = DebertaV2Model.from_pretrained(tmp_path / "gdes" / "export" / "discriminator").eval()
        theirs = hf(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, trained, atol=1e-5, rtol=1e-5)


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
    return tiny_config(tmp_path / name, **kw)


def eval_metrics(run_dir):
    """The held-out rows' MLM and RTD losses, step by step."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["split"] == "eval"]
    return [(r["step"], r["mlm_loss"], r["rtd_loss"]) for r in rows]


@pytest.mark.parametrize("sharing", ["es", "nes", "gdes"])
def test_train_writes_the_run_directory_and_hf_loads_the_discriminator(tmp_path, sharing):
    summary = train(quick(tmp_path, sharing=sharing))
    run = tmp_path / "run"
    for name in [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/step-00000008.pt",
        "checkpoints/step-00000008.pt.sha256",
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
    probes = [r for r in rows if r["split"] == "probe"]
    assert [r["step"] for r in probes] == [0, 2, 4, 6]
    for r in probes:
        assert -1 < r["grad_cos"] < 1 and r["grad_norm_mlm"] > 0 and r["grad_norm_rtd"] > 0
        # only ES lets the RTD gradient reach E_G, and then E_G is D's own table: the same gradient
        if sharing == "es":
            assert r["rtd_grad_on_generator"] == pytest.approx(r["grad_norm_rtd"], rel=1e-6)
        else:
            assert r["rtd_grad_on_generator"] == 0.0
    # 8 steps teach the discriminator something: its AUC rises above chance and above step 0's
    evals = [r for r in rows if r["split"] == "eval"]
    final = json.loads((run / "summary.json").read_text())["final_eval"]
    assert final == {k: v for k, v in evals[-1].items() if k not in ("split", "step")}
    assert final["rtd_auc"] > max(0.65, evals[0]["rtd_auc"] + 0.1)
    assert final["replaced_of_masked"] <= 1 and final["replaced_rate"] > 0.1
    # the merged discriminator loads in transformers and matches our own loader
    hf = DebertaV2Model.from_pretrained(run / "export" / "discriminator").eval()
    ours = lab.from_pretrained(run / "export" / "discriminator")
    ids = torch.randint(4, 500, (2, 20))
    with torch.no_grad():
        diff = hf(input_ids=ids).last_hidden_state - ours(ids)
    assert diff.abs().max() < 1e-5


def record_fixed_corruption(monkeypatch) -> list:
    """Every (held-out batch, corrupted ids, labels) the evaluations draw, in order."""
    calls, real = [], pretrain_evaluate.fixed_corruption

    def recording(ids, *args):
        corrupted, labels = real(ids, *args)
        calls.append((ids.clone(), corrupted, labels))
        return corrupted, labels

    monkeypatch.setattr(pretrain_evaluate, "fixed_corruption", recording)
    return calls


def test_the_fixed_corruption_set_is_the_same_for_every_sharing_mode_seed_and_evaluation(
    tmp_path, monkeypatch
):
    """ES and GDES of one seed, and ES of another seed, score their discriminators on the same corrupted
    held-out rows; each evaluation of a run draws the same set again; fixed_auc is logged in [0, 1]."""
    drawn = {}
    for name, changes in {
        "es": dict(sharing="es"),
        "gdes": dict(sharing="gdes"),
        "seed1": dict(seed=1),
    }.items():
        with monkeypatch.context() as patch:
            drawn[name] = record_fixed_corruption(patch)
            train(quick(tmp_path, name, steps=4, probe_every=0, **changes))  # evaluations at steps 0 and 4
        rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["split"] == "eval"]
        assert [r["step"] for r in rows] == [0, 4]
        assert all(0 <= r["fixed_auc"] <= 1 and math.isfinite(r["fixed_rtd_loss"]) for r in rows)
    es = drawn["es"]
    assert len(es) == 2 * 2  # two held-out batches per evaluation
    for a, b in [*zip(es[:2], es[2:]), *zip(es, drawn["gdes"]), *zip(es, drawn["seed1"])]:
        for x, y in zip(a, b):
            assert torch.equal(x, y)  # the same rows, corrupted ids and labels
    for ids, corrupted, labels in es:
        changed = corrupted != ids
        assert torch.equal(labels, changed.float()) and 0 < changed.float().mean() < 0.2
        assert not changed[:, 0].any() and not changed[:, -1].any()  # [CLS] and [SEP] stay
    # the draws follow the module's constant seed, not the run's
    monkeypatch.setattr(pretrain_evaluate, "FIXED_CORRUPTION_SEED", 7)
    ids = es[0][0]
    cdf = pretrain_evaluate.unigram_cdf(
        prepare_corpus(CORPUS, vocab_size=600, seq_len=32).token_counts, [0, 1, 2, 3]
    )
    other, _ = pretrain_evaluate.fixed_corruption(ids, 0, cdf, SPECIAL, 0.15)
    assert not torch.equal(other, es[0][1])


def test_fixed_corruption_draws_replacements_from_the_unigram_counts_without_specials():
    """Counts on ids 5 and 6 only (and on the special ids, which are left out): every replacement is 5 or
    6, about in proportion 1 : 3, and a draw equal to the original token is labelled 0."""
    counts = torch.zeros(20, dtype=torch.long)
    counts[[1, 2]], counts[5], counts[6] = 10_000, 1_000, 3_000
    cdf = pretrain_evaluate.unigram_cdf(counts.numpy(), [0, 1, 2, 3])
    ids, _ = packed_batch(B=64, T=32, vocab=20)
    ids[:8, 1:-1] = 5  # rows where a draw of 5 is no replacement
    corrupted, labels = pretrain_evaluate.fixed_corruption(ids, 0, cdf, SPECIAL, 0.15)
    drawn = corrupted[corrupted != ids]
    assert set(drawn.tolist()) <= {5, 6} and 0.15 < (drawn == 5).float().mean() < 0.35
    assert torch.equal(labels, (corrupted != ids).float())
    assert (corrupted[:8] == 6).sum() == labels[:8].sum()  # in the all-5 rows only the 6s count


def test_steps_0_exports_the_untrained_model_for_fine_tuning(tmp_path):
    """The untrained control: steps=0 evaluates and exports the freshly initialised model of its seed
    (no step taken), says so in summary.json, and a rerun resumes it; fine-tuning's loader reads it."""
    cfg = quick(tmp_path, steps=0, sharing="gdes", seed=3)
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 0 and summary["completed"] and summary["tokens_seen"] == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in rows] == [("eval", 0)] and 0 <= rows[0]["fixed_auc"] <= 1
    assert (run / "checkpoints" / "step-00000000.pt").is_file()
    assert (run / "embeddings" / "step-00000000.safetensors").is_file()
    encoder, tok = load_encoder(str(run))
    torch.manual_seed(cfg.seed)  # as lab/pretrain/setup.py initialises
    fresh = RTDModel(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512), "gdes")
    exported = encoder.state_dict()
    assert exported.keys() == fresh.discriminator_state_dict().keys()
    for key, value in fresh.discriminator_state_dict().items():
        assert torch.equal(exported[key], value), key
    again = train(cfg)
    assert again["steps"] == 0 and again["final_eval"] == summary["final_eval"]
    assert [(r["split"], r["step"]) for r in read_jsonl(run / "metrics.jsonl")] == [("eval", 0)]
    with pytest.raises(ValueError, match="steps must be >= 0"):
        quick(tmp_path, steps=-1)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    train(quick(tmp_path, "straight"))
    train(quick(tmp_path, "split", stop_after=4))
    assert len(train_losses(tmp_path / "split")) == 4
    train(quick(tmp_path, "split"))
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_the_logged_learning_rate_is_the_schedule(tmp_path):
    """TINY_RUN: lr 2e-3, 2 warmup steps, 8 steps, a train row after every step with the lr of that
    step (0-based s = row step - 1): warmup (s + 1) / 2, then (8 - s) / 6, by hand."""
    train(quick(tmp_path, "lr", eval_every=8, probe_every=0))
    rows = [r for r in read_jsonl(tmp_path / "lr" / "metrics.jsonl") if r["split"] == "train"]
    by_hand = [1 / 2, 1, 6 / 6, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * f for f in by_hand], rel=1e-12)


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    restore_clip = interrupt_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path, "interrupted"))
    state = checkpoint.load_state(tmp_path / "interrupted")
    assert state["step"] == 5  # five completed steps were saved on the way out
    restore_clip()
    train(quick(tmp_path, "interrupted"))
    train(quick(tmp_path, "straight"))
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "interrupted")
    assert len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def inject_after_backward(monkeypatch, bad_calls, poison):
    """Make step.backward's `bad_calls`-th calls (1-based) leave `poison(model)` in the gradients."""
    real_backward, calls = step.backward, {"n": 0}

    def poisoned(model, out, cfg, *args, **kw):
        real_backward(model, out, cfg, *args, **kw)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            poison(model)

    monkeypatch.setattr(step, "backward", poisoned)


def inf_gradient(model):
    model.rtd_head.dense.weight.grad[0, 0] = float("inf")  # the loss itself stays finite


def test_a_finite_loss_with_an_inf_gradient_skips_the_step_and_training_goes_on(tmp_path, monkeypatch):
    inject_after_backward(monkeypatch, {3}, inf_gradient)
    train(quick(tmp_path, "inf", ckpt_every=1, keep_checkpoints=10, probe_every=0))
    ring = tmp_path / "inf" / "checkpoints"
    states = {s: checkpoint.verify(checkpoint.ring_path(ring, s)) for s in (2, 3, 4, 8)}
    for name, before in states[2]["model"].items():  # step 3 was skipped: weights exactly as after step 2
        assert torch.equal(states[3]["model"][name], before), name
    before, after = states[2]["optimizer"]["state"], states[3]["optimizer"]["state"]
    for i in before:  # and the optimizer's moments and step count did not move either
        assert all(torch.equal(after[i][k], before[i][k]) for k in before[i]), i
    assert not torch.equal(
        states[4]["model"]["rtd_head.dense.weight"], states[3]["model"]["rtd_head.dense.weight"]
    )
    for state in states.values():
        assert checkpoint.nonfinite_tensors(state) == []
    rows = [r for r in read_jsonl(tmp_path / "inf" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    assert json.loads((tmp_path / "inf" / "summary.json").read_text())["skipped_steps"] == 1


def test_non_finite_steps_in_a_row_stop_with_a_clear_error_and_finite_checkpoints(tmp_path, monkeypatch):
    """A NaN loss at step 3, then inf gradients: the run stops after three skipped steps in a row,
    and every checkpoint it wrote (steps 2 to 5, before and during the bad run) holds finite weights."""

    def poison(model):
        inf_gradient(model)
        model.generator_table.grad.fill_(float("nan"))

    inject_after_backward(monkeypatch, {3, 4, 5, 6}, poison)
    cfg = quick(tmp_path, "nan", log_every=4, ckpt_every=1, keep_checkpoints=10, probe_every=0)
    with pytest.raises(FloatingPointError, match="steps in a row up to step 5 .* skipped.*is intact"):
        train(cfg)
    ring = checkpoint.candidates(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in ring][0] == "step-00000004.pt"
    for path in ring:
        assert checkpoint.nonfinite_tensors(checkpoint.verify(path)) == []


# Tensor methods that read a value back to the host: on CUDA each waits for the device to finish.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
LAB = Path(lab.__file__).parent
HOST_SIDE = {
    LAB / "pretrain" / "data.py",
    LAB / "tokenizer.py",
}  # the data pipeline works on CPU tensors by design
LOOP = {
    LAB / "pretrain" / "loop.py",
    LAB / "pretrain" / "meter.py",
    LAB / "training.py",
    LAB / "pretrain" / "checkpoint.py",
}


def count_host_reads(monkeypatch, cfg) -> Counter:
    """Run train(cfg) and count, by call site, the host reads of tensors (and the blocking copies the
    loop itself makes) outside torch and outside the data pipeline."""
    torch_dir = Path(torch.__file__).parent
    counts = Counter()

    def call_site():
        frame = sys._getframe(2)
        while frame is not None and Path(frame.f_code.co_filename).is_relative_to(torch_dir):
            frame = frame.f_back
        return (Path(frame.f_code.co_filename), frame.f_lineno) if frame is not None else (None, 0)

    def counting(name, real):
        def method(self, *args, **kwargs):
            path, line = call_site()
            if path is not None and path not in HOST_SIDE:
                counts[f"{path.name}:{line} .{name}"] += 1
            return real(self, *args, **kwargs)

        return method

    def counting_to(real):
        def to(self, *args, **kwargs):
            frame = sys._getframe(1)  # the loop's own calls (torch's internal same-device .to are free)
            path, line = Path(frame.f_code.co_filename), frame.f_lineno
            moves = any(isinstance(a, (str, torch.device)) for a in args) or "device" in kwargs
            if path in LOOP and moves and not kwargs.get("non_blocking", False):
                counts[f"{path.name}:{line} blocking .to"] += 1
            return real(self, *args, **kwargs)

        return to

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        patch.setattr(torch.Tensor, "to", counting_to(torch.Tensor.to))
        train(cfg)
    return counts


def steady_state_host_reads(tmp_path, monkeypatch) -> Counter:
    """Host reads of 4 steady-state steps: a 7-step run minus a 3-step run, both with one eval (step 0),
    one log and one checkpoint (the last step) and no probe, so everything else cancels."""
    prepare_corpus(CORPUS, vocab_size=600, seq_len=32, heldout_fraction=0.02)  # tokenizer cached first
    rare = dict(log_every=1000, eval_every=1000, ckpt_every=1000, probe_every=0)
    short = count_host_reads(monkeypatch, quick(tmp_path, "short", steps=3, **rare))
    long = count_host_reads(monkeypatch, quick(tmp_path, "long", steps=7, **rare))
    assert sum(short.values()) > 0  # the counter sees the eval / log / checkpoint reads
    return long - short


def test_a_steady_state_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    assert steady_state_host_reads(tmp_path, monkeypatch) == Counter()


def test_the_host_read_count_catches_one_item_per_step(tmp_path, monkeypatch):
    real_clip = pretrain.clip

    def clip_and_read(model, cfg):
        norm = real_clip(model, cfg)
        model.generator_table.grad.norm().item()  # the kind of read a steady step must not do
        return norm

    monkeypatch.setattr(pretrain, "clip", clip_and_read)
    extra = steady_state_host_reads(tmp_path, monkeypatch)
    assert sum(extra.values()) == 4 and all(".item" in site for site in extra)


@pytest.mark.slow  # inductor's first CPU compile takes minutes with a cold cache
def test_compile_on_runs_on_cpu_and_reports_its_compile_time(tmp_path, capsys):
    # no dropout: compiled code draws its dropout masks from another generator
    common = dict(steps=5, probe_every=2, eval_every=100, dropout=0.0)
    summary = train(quick(tmp_path, "compiled", compile="on", progress="line", **common))
    assert summary["compiled"] and summary["compile_mode"] == "default"
    assert summary["compile_s"] > 0 and summary["overhead_s"]["warmup"] >= summary["compile_s"]
    assert "compiled in" in capsys.readouterr().out
    train(quick(tmp_path, "eager", compile="off", **common))
    a, b = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3  # losses ~40: fused kernels round differently


def test_compile_modes_reach_torch_compile_and_auto_is_off_on_cpu(tmp_path, monkeypatch, capsys):
    modes = []

    def fake_compile(module, mode=None, backend=None):  # the wiring only: the module runs eagerly
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    summary = train(
        quick(tmp_path, "on", steps=5, compile="on", compile_mode="max-autotune", progress="line")
    )
    assert modes == ["max-autotune"] and summary["compiled"] and summary["compile_s"] >= 0
    # the first three steps are the warm-up: timed apart from the steady ones
    rows = [r for r in read_jsonl(tmp_path / "on" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["ms_per_step"] is None for r in rows] == [True, True, True, False, False]
    assert all(r["warmup_s"] > 0 for r in rows[:3]) and all(r["warmup_s"] == 0 for r in rows[3:])
    assert "compiled in" in capsys.readouterr().out
    assert not train(quick(tmp_path, "auto", steps=2))["compiled"] and modes == ["max-autotune"]
    assert summary["compile_scope"] == "model"  # auto under a CUDA-graph mode: the whole step
    # mode default: every encoder layer of G and D compiled (regionally), unless the scope says model
    regional = train(quick(tmp_path, "layers", steps=2, compile="on", compile_mode="default"))
    layers = len(modes) - 1
    assert regional["compile_scope"] == "layers" and layers >= 3 and modes[1:] == [None] * layers
    whole = train(
        quick(tmp_path, "model", steps=2, compile="on", compile_mode="default", compile_scope="model")
    )
    assert whole["compile_scope"] == "model" and len(modes) == layers + 2  # one call, for the whole step


def test_compile_accepts_the_old_boolean_and_rejects_unknown_modes():
    assert PretrainConfig(compile=True).compile == "on" and PretrainConfig(compile=False).compile == "off"
    with pytest.raises(ValueError, match="compile_mode"):
        PretrainConfig(compile_mode="fastest")
    with pytest.raises(ValueError, match="compile='off'"):
        PretrainConfig(compile="on", optimization="decoupled", sharing="es")


def test_throughput_counts_training_alone(tmp_path, monkeypatch):
    """A slow evaluation shows up as overhead, not in ms/step or tokens/s."""
    real_evaluate = pretrain_evaluate.evaluate  # evaluate_run calls this module's evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pretrain_evaluate, "evaluate", slow_evaluate)
    train(quick(tmp_path, "slow-eval", steps=6, log_every=3, eval_every=3, probe_every=0))
    rows = [r for r in read_jsonl(tmp_path / "slow-eval" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [3, 6]
    second = rows[1]  # steps 4-6: the step-3 evaluation (with its 0.5 s sleep) falls in this window
    assert second["eval_s"] >= 0.5 and second["overhead_s"] >= second["eval_s"]
    # the window's wall time is training + overhead, and ms/step is the training part alone
    assert second["train_s"] == pytest.approx(3 * second["ms_per_step"] / 1000)
    assert second["tokens_per_s"] == pytest.approx(8 * 32 * 1000 / second["ms_per_step"])
    assert second["elapsed_s"] - rows[0]["elapsed_s"] >= second["train_s"] + second["overhead_s"] - 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A split-sensitive setting: no dropout, no warm-up, a real lr, and an AdamW whose eps dominates the
# tiny model's gradients and a clip that never binds, so the update follows the gradient's scale. With
# the default eps and clip, Adam and the clip would hide a gradient off by a constant factor (a missing
# division or multiplication by the number of processes).
SPLIT_SENSITIVE = dict(dropout=0.0, warmup_steps=0, lr=3e-2, adam_eps=1.0, grad_clip=1e6, eval_every=100)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load_state(run_dir)["model"]


def max_weight_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_gradient_accumulation_trains_exactly_like_one_batch(tmp_path):
    """1, 2 and 4 micro-batches of the same global batch: the same per-step losses (1e-5 relative), the
    same held-out numbers (the same rows and noise, whatever the split) and the same weights after 4
    updates; and the updates are large enough that a wrong split would show."""
    runs = {}
    for accum in (1, 2, 4):
        name = f"accum{accum}"
        train(quick(tmp_path, name, steps=4, grad_accum=accum, probe_every=0, **SPLIT_SENSITIVE))
        runs[accum] = (
            train_losses(tmp_path / name),
            final_weights(tmp_path / name),
            eval_metrics(tmp_path / name),
        )
    ref_losses, ref_weights, ref_eval = runs[1]
    assert [row[0] for row in ref_eval] == [0, 4]
    for accum in (2, 4):
        losses, weights, held_out = runs[accum]
        assert max(abs(x - y) / abs(x) for x, y in zip(ref_losses, losses)) < 1e-5, accum
        assert max_weight_difference(ref_weights, weights) < 1e-5, accum
        assert [r[0] for r in held_out] == [0, 4]
        assert (
            max(abs(x - y) / abs(x) for a, b in zip(ref_eval, held_out) for x, y in zip(a[1:], b[1:])) < 1e-5
        )
    initial = RTDModel(
        preset("tiny", vocab_size=ref_weights["embedding_delta"].shape[0], max_seq_len=512), "gdes"
    )
    assert max_weight_difference(ref_weights, {k: v for k, v in initial.state_dict().items()}) > 1e-2


@pytest.mark.parametrize(
    "sharing, optimization, accum",
    # decoupled ES takes an extra gradient of the MLM loss alone: under DDP it must not upset the
    # one-backward-per-forward reducer and must be averaged like every other gradient
    [("gdes", "joint", 2), ("es", "decoupled", 1)],
)
def test_two_process_torchrun_trains_exactly_like_one_process(tmp_path, sharing, optimization, accum):
    """2 processes x `accum` micro-batches against 1 x 1: the same losses and, after 3 updates at a real
    lr with a scale-sensitive optimizer (SPLIT_SENSITIVE), the same weights."""
    args = dict(sharing=sharing, optimization=optimization, steps=3, probe_every=2, **SPLIT_SENSITIVE)
    # the probe's extra gradients (rank 0 only) must not disturb DDP's reducer
    train(quick(tmp_path, "one", **args))
    cfg = quick(tmp_path, "two", grad_accum=accum, **args)
    flags = []
    for field, value in dataclasses.asdict(cfg).items():
        if value != getattr(PretrainConfig(), field):
            flags += [f"--{field.replace('_', '-')}", str(value)]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "-m", "lab", "pretrain", *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # the workers' own messages come first, the launcher's traceback last: show both ends
    assert two.returncode == 0, two.stderr[:3000] + "\n[...]\n" + two.stderr[-1000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5
    assert max_weight_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two")) < 1e-5
    one, two = eval_metrics(tmp_path / "one"), eval_metrics(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] == [0, 3]
    assert max(abs(x - y) / abs(x) for a, b in zip(one, two) for x, y in zip(a[1:], b[1:])) < 1e-5


def test_stream_seeds_never_collide():
    """Every (purpose, step, micro-batch, rank) of a realistic run gets its own seed: 3 purposes x
    1000 steps x 8 micro-batches x 8 ranks (the linear mix it replaces collided at micro-batch 1,
    rank 0 vs micro-batch 0, rank 7), and another base seed gives other streams again."""
    keys = [(p, s, m, r) for p in range(3) for s in range(1000) for m in range(8) for r in range(8)]
    seeds = {step.stream_seed(0, *key) for key in keys}
    assert len(seeds) == len(keys)
    assert not seeds & {step.stream_seed(1, *key) for key in keys[:20000]}
    assert step.stream_seed(0, 1, 5, 1, 0) != step.stream_seed(0, 1, 5, 0, 7)


def test_decoupled_clip_groups_follow_ownership():
    """The generator side owns E_G (under ES the shared table), the discriminator side owns E_delta
    (GDES); a large RTD-side gradient must not scale the shared table's MLM gradient."""
    for sharing in ("es", "nes", "gdes"):
        model = tiny_rtd(sharing)
        gen, disc = step.clip_groups(model)
        assert {id(p) for p in gen} | {id(p) for p in disc} == {id(p) for p in model.parameters()}
        assert not {id(p) for p in gen} & {id(p) for p in disc}
        assert any(p is model.generator_table for p in gen)
        assert any(p is model.rtd_head.dense.weight for p in disc)
        if sharing == "gdes":
            assert any(p is model.embedding_delta for p in disc)
        if sharing == "nes":
            assert any(p is model.discriminator.word_embeddings.weight for p in disc)
    model = tiny_rtd("es")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.generator_table.grad[5] = 0.1  # a small MLM-only gradient on the shared table: below the clip
    model.rtd_head.dense.weight.grad.fill_(1.0)  # a large discriminator gradient, clipped to norm 1
    total = pretrain.clip(model, PretrainConfig(sharing="es", optimization="decoupled", compile="off"))
    assert torch.equal(model.generator_table.grad[5], torch.full_like(model.generator_table.grad[5], 0.1))
    assert model.rtd_head.dense.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert total.item() == pytest.approx((0.1**2 * 64 + 64 * 64) ** 0.5, rel=1e-5)


def test_a_torchrun_worker_keeps_its_exit_code(tmp_path):
    # torchrun workers leave through os._exit (lab/pretrain/cli.py): an error must still fail the job
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
         str(free_port()), "-m", "lab", "pretrain", "--preset", "tiny", "--corpus", str(tmp_path / "missing.txt"),
         "--steps", "1", "--progress", "none", "--out-dir", str(tmp_path / "run")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "error:" in run.stderr and "missing.txt" in run.stderr
    assert "exitcode  : 2" in run.stderr  # the worker's own code, as the launcher reports it


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
    state = checkpoint.load_state(tmp_path / "v")
    state["model"]["generator.word_embeddings.weight"] = torch.zeros(50, 64)
    checkpoint.save(state, tmp_path / "v" / "checkpoints", state["step"])
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


def test_attention_impl_reaches_the_model_and_is_validated(tmp_path):
    with pytest.raises(ValueError, match="attention_impl"):
        PretrainConfig(attention_impl="fast")
    cfg = PretrainConfig(
        out_dir=str(tmp_path / "flex"), preset="tiny", corpus="synthetic:seed=3,words=20000", vocab_size=600,
        seq_len=32, steps=2, batch_size=4, attention_impl="flex", dropout=0.0, progress="none", device="cpu",
    )  # fmt: skip
    # FlexAttention has no CPU backward in this torch: training with it must stop with a clear message
    # (this is the proof that the field reaches the attention modules)
    with pytest.raises(ValueError, match="flex"):
        train(cfg)
