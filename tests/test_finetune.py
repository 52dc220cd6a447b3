import json
import random
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lab.finetune import data as finetune_data
from lab.finetune import glue, tasks
from lab.finetune import loop as finetune
from lab.finetune import table as results_table
from lab.finetune.loop import FinetuneConfig
from lab.finetune.task import LabelledSplit, TaskDefaults
from lab.finetune.tasks import get_task
from lab.hf import save_pretrained
from lab.model import Encoder, preset
from lab.tokenizer import train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
WORDS = "apple river stone cloud green quick table music paper light north seven window garden".split()


def synthetic_sst2(root, n_train=256, n_dev=128, seed=0):
    """An SST-2-shaped task that a tiny model can learn: label 1 iff the word "zebra" appears."""
    rng = random.Random(seed)
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(4, 10))
            if i % 2:
                words[rng.randrange(len(words))] = "zebra"
            lines.append(f"{' '.join(words)} \t{i % 2}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def make_checkpoint(path, texts, vocab_size=120, vocab_rows=None):
    """A random tiny encoder + a tokenizer trained on `texts`, saved in HF format."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    cfg = preset(
        "tiny", vocab_size=vocab_rows or tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0
    )
    save_pretrained(Encoder(cfg), path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = synthetic_sst2(tmp_path_factory.mktemp("glue"))
    texts = [" ".join(WORDS + ["zebra"])] * 3 + get_task("sst2").load_split("train", root).texts_a
    return root, make_checkpoint(tmp_path_factory.mktemp("ckpt"), texts, vocab_size=48)


def test_learns_a_trivial_task_above_90_percent(synthetic, tmp_path):
    root, ckpt = synthetic
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path), epochs=6,
                         lr=1e-3, batch_size=16, head_dropout=0.0, seeds=(1,), device="cpu")  # fmt: skip
    results = finetune.train(cfg)
    seed = results["metrics_per_seed"][0]
    assert seed["accuracy"] > 0.9, results["metrics_per_seed"]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the epoch is chosen on validation (the only metrics of the per-epoch rows); test is reported
    assert all("accuracy" not in h and "validation_accuracy" in h for h in history)
    best = max(history, key=lambda h: h["validation_accuracy"])
    assert seed["best_epoch"] == best["epoch"] and seed["validation_accuracy"] == best["validation_accuracy"]
    assert seed["epochs"] == 6 and "last_accuracy" in seed and "last_validation_accuracy" not in seed


@pytest.fixture
def registered():
    """`tasks.register` for a test: its tasks are gone after it."""
    added = []
    yield lambda task: added.append(tasks.register(task))
    for task in added:
        del tasks.TASKS[task.name]


def test_a_glue_like_task_is_one_entry(registered, synthetic, tmp_path):
    # the "zebra" files under a folder and a name of their own, with no fine-tuning defaults given
    root, ckpt = synthetic
    shutil.copytree(root / "SST-2", root / "Zebra")
    registered(glue.GlueTask(name="zebra_spotting", dir_name="Zebra", official_sizes=glue.glue_sizes(256, 128), header=True,
                             num_columns=None, text_columns=("sentence",), label_column="label",
                             labels=("0", "1"), metrics=("mcc", "accuracy"), main_metric="mcc",
                             hf_name="", hf_text_columns=()))  # fmt: skip
    cfg = FinetuneConfig(task="Zebra-Spotting", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path),
                         epochs=1, max_train_examples=32, seeds=(1,), device="cpu")  # fmt: skip
    assert cfg.resolved().lr == TaskDefaults().lr  # a task naming no defaults gets the generic ones
    results = finetune.train(cfg)
    assert results["task"] == "zebra_spotting" and results["main_metric"] == "mcc"
    assert set(results["mean"]) == {"mcc", "accuracy", "last_mcc", "last_accuracy"}
    assert results["splits"]["test"]["official"] == 128 and results["test_complete"]
    assert results["splits"]["validation"] == {"role": "validation", "used": 25, "loaded": 25, "official": 25,
                                               "malformed": 0, "sliced": False}  # fmt: skip
    rows = results_table.results_table(tmp_path, tmp_path / "table", include_paper=False)
    assert "zebra_spotting" in rows[0]
    with pytest.raises(ValueError, match="already registered as 'zebra_spotting'"):
        registered(glue.GlueTask(name="ZEBRA-spotting", dir_name="Zebra", header=True, num_columns=None,
                                 text_columns=("sentence",), label_column="label", labels=("0", "1"),
                                 metrics=("mcc",), main_metric="mcc", hf_name="", hf_text_columns=()))  # fmt: skip


def test_the_logged_learning_rate_is_the_schedule(synthetic, tmp_path):
    """32 examples in batches of 16: 2 steps per epoch, 6 in all, 2 of warmup. Each epoch's row holds the
    lr of its last step s (1, 3, 5): warmup (s + 1) / 2, then (6 - s) / 4, by hand."""
    root, ckpt = synthetic
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path), epochs=3,
                         lr=1e-3, batch_size=16, warmup_steps=2, max_train_examples=32, max_eval_examples=16,
                         seeds=(1,), device="cpu")  # fmt: skip
    finetune.train(cfg)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert [h["lr"] for h in history] == pytest.approx([1e-3 * 2 / 2, 1e-3 * 3 / 4, 1e-3 * 1 / 4], rel=1e-12)


def test_summary_is_mean_median_and_sample_std_hand_computed():
    per_seed = [
        {"seed": 1, "accuracy": 0.5, "best_epoch": 2, "epochs": 3, "validation_accuracy": 0.6, "last_accuracy": 0.4},
        {"seed": 2, "accuracy": 0.9, "best_epoch": 1, "epochs": 3, "validation_accuracy": 0.8, "last_accuracy": 0.2},
        {"seed": 3, "accuracy": 0.7, "best_epoch": 3, "epochs": 3, "validation_accuracy": 0.7, "last_accuracy": 0.6},
    ]  # fmt: skip
    mean, median, std = finetune._summary(per_seed)
    assert set(mean) == {"accuracy", "last_accuracy"}  # test metrics only: no seed, epochs or validation_
    assert mean["accuracy"] == pytest.approx(0.7) and median["accuracy"] == pytest.approx(0.7)
    assert std["accuracy"] == pytest.approx(0.2)  # sqrt((0.04 + 0.04 + 0) / 2): the sample std
    assert mean["last_accuracy"] == pytest.approx(0.4) and median["last_accuracy"] == pytest.approx(0.4)
    assert std["last_accuracy"] == pytest.approx(0.2)
    per_seed = [{k: v for k, v in m.items() if k not in ("epochs", "validation_accuracy")} for m in per_seed]
    one = finetune._summary(per_seed[:1])
    assert one == ({"accuracy": 0.5, "last_accuracy": 0.4},) * 2 + ({"accuracy": 0.0, "last_accuracy": 0.0},)
    assert finetune._summary(per_seed[:2])[1]["accuracy"] == pytest.approx(0.7)  # median of two: their mean


def test_seeds_and_results_files_agree(synthetic, tmp_path):
    root, ckpt = synthetic
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path), epochs=2,
                         batch_size=32, seeds=(1, 2, 3), max_train_examples=64, max_eval_examples=50,
                         device="cpu")  # fmt: skip
    results = finetune.train(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (
        on_disk["task"] == "sst2" and on_disk["n_test_examples"] == 50 and on_disk["n_train_examples"] == 64
    )
    assert on_disk["n_validation_examples"] == 25  # 10 % of the 256 rows of train.tsv
    assert on_disk["splits"]["test"] == {"role": "test", "used": 50, "loaded": 128, "official": 872, "malformed": 0,
                                         "sliced": True}  # fmt: skip
    assert on_disk["splits"]["train"] == {"role": "train", "used": 64, "loaded": 231,
                                                          "official": 67349 - 2000, "malformed": 0, "sliced": True}  # fmt: skip
    assert on_disk["selection"] == finetune.SELECTION
    assert [m["seed"] for m in results["metrics_per_seed"]] == [1, 2, 3]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(h["seed"], h["epoch"]) for h in history] == [(s, e) for s in (1, 2, 3) for e in (1, 2)]
    for m in results["metrics_per_seed"]:
        rows = [h for h in history if h["seed"] == m["seed"]]
        best = rows[m["best_epoch"] - 1]["validation_accuracy"]
        assert m["validation_accuracy"] == best == max(h["validation_accuracy"] for h in rows)
        assert m["epochs"] == 2 and {"accuracy", "last_accuracy"} <= set(m)
        assert json.loads((tmp_path / "seeds" / f"seed_{m['seed']}.json").read_text())["metrics"] == m
    assert on_disk["config"]["lr"] == pytest.approx(6e-6 * glue.LR_SCALE)  # SST-2 default, resolved


@pytest.mark.parametrize("task,metric", [("cola", "mcc"), ("sst2", "accuracy"), ("stsb", "pearson")])
def test_real_glue_slice_end_to_end(data_root, tmp_path, task, metric):
    split = get_task(task).load_split("train", data_root / "glue").take(300)
    texts = split.texts_a + (split.texts_b or [])
    ckpt = make_checkpoint(tmp_path / "ckpt", texts, vocab_size=400)
    cfg = FinetuneConfig(task=task, glue_dir=str(data_root / "glue"), init=str(ckpt), out_dir=str(tmp_path / "out"),
                         epochs=1, batch_size=16, max_train_examples=64, max_eval_examples=64, seeds=(1,),
                         device="cpu")  # fmt: skip
    finetune.train(cfg)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = get_task(task).metrics
    assert results["main_metric"] == metric and results["n_test_examples"] == 64
    assert set(results["mean"]) == {*metrics, *(f"last_{m}" for m in metrics)}
    official = get_task(task).official_size("test")
    assert results["official_test_examples"] == official and results["test_complete"]
    assert results["splits"]["test"] == {"role": "test", "used": 64, "loaded": official, "official": official,
                                         "malformed": 0, "sliced": True}  # fmt: skip
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    seed = results["metrics_per_seed"][0]
    assert seed[f"validation_{metric}"] == history[0][f"validation_{metric}"]
    assert seed[metric] == seed[f"last_{metric}"]  # one epoch: the chosen state is the last


def test_mnli_reports_matched_and_mismatched(synthetic, tmp_path):
    _, ckpt = synthetic
    cfg = FinetuneConfig(task="mnli", glue_dir=str(FIXTURES), init=str(ckpt), out_dir=str(tmp_path), epochs=1,
                         seeds=(1, 2), device="cpu")  # fmt: skip
    results = finetune.train(cfg)
    assert results["main_metric"] == "m_accuracy" and set(results["mean"]) == {
        "m_accuracy",
        "mm_accuracy",
        "last_m_accuracy",
        "last_mm_accuracy",
    }
    assert results["n_test_examples"] == 4 and results["n_train_examples"] == 2
    assert results["n_validation_examples"] == 1 and "validation_accuracy" in results["metrics_per_seed"][0]


class Words:
    """A stand-in tokenizer: one id per word, 10 + the word's length."""

    cls_id, sep_id = 1, 2

    def encode_batch(self, texts):
        return [[10 + len(w) for w in t.split()] for t in texts]


def test_pair_encoding_truncates_like_transformers_longest_first():
    # (len a, len b, budget for both) -> tokens kept of a and b, worked out by hand from the rule: the
    # shorter side stays whole if it fits in half the budget; otherwise the shorter (a on a tie) keeps
    # floor(budget / 2) and the longer ceil(budget / 2).
    cases = {(10, 3, 7): (4, 3), (3, 10, 7): (3, 4), (6, 5, 7): (4, 3), (5, 6, 7): (3, 4), (5, 5, 7): (3, 4),
             (4, 4, 5): (2, 3), (10, 2, 7): (5, 2), (6, 5, 8): (4, 4), (2, 3, 7): (2, 3)}  # fmt: skip
    for (len_a, len_b, budget), kept in cases.items():
        assert finetune_data._pair_lengths(len_a, len_b, budget) == kept, (len_a, len_b, budget)
    split = LabelledSplit("rte", "test", "-", ["a " * 6, "a a"], ["bb " * 5, "bb " * 3], [0, 1])
    rows = finetune_data.encode_split(split, Words(), max_len=10)  # budget 7 for the two texts
    assert rows[0] == [1, 11, 11, 11, 11, 2, 12, 12, 12, 2]  # a keeps 4 of 6, b 3 of 5
    assert rows[1] == [1, 11, 11, 2, 12, 12, 12, 2]  # fits: nothing cut
    single = LabelledSplit("sst2", "test", "-", ["a " * 10], None, [0])
    assert finetune_data.encode_split(single, Words(), max_len=5) == [[1, 11, 11, 11, 2]]


def test_pair_truncation_equals_a_transformers_fast_tokenizer():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(40)} | {"[UNK]": 40}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend)
    for len_a in range(1, 12):
        for len_b in range(1, 12):
            for budget in (4, 5, 7, 8):
                a, b = " ".join(f"w{i}" for i in range(len_a)), " ".join(f"w{20 + i}" for i in range(len_b))
                ids = hf(a, b, truncation="longest_first", max_length=budget, add_special_tokens=False)[
                    "input_ids"
                ]
                kept = (sum(i < 20 for i in ids), sum(i >= 20 for i in ids))
                assert finetune_data._pair_lengths(len_a, len_b, budget) == kept, (len_a, len_b, budget)


def test_config_defaults_and_validation():
    cfg = FinetuneConfig(task="CoLA").resolved()
    assert (cfg.task, cfg.epochs, cfg.batch_size, cfg.head_dropout, cfg.max_seq_len) == (
        "cola",
        10,
        32,
        0.1,
        64,
    )
    assert FinetuneConfig(task="mnli").resolved().epochs == 3  # 2 in the large recipe, at least 3 for small
    assert FinetuneConfig(task="cola", lr=1e-4).resolved().lr == 1e-4
    with pytest.raises(
        ValueError, match="unknown task 'squad'; known tasks: cola, .*, synth_tag, synth_gram"
    ):
        FinetuneConfig(task="squad")
    with pytest.raises(ValueError, match="FinetuneConfig.batch_size must be positive"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ValueError, match="FinetuneConfig.seeds is empty"):
        FinetuneConfig(seeds=())


def test_bad_inputs_give_clear_errors(synthetic, tmp_path):
    root, ckpt = synthetic
    base = dict(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(ValueError, match=r"sst2 train file not found: .*SST-2/train\.tsv; expected the GLUE"):
        finetune.train(FinetuneConfig(**{**base, "glue_dir": str(tmp_path)}))

    bad = tmp_path / "bad"
    (bad / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (bad / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "a film\tpositive\n" * 5)
    with pytest.raises(ValueError, match="5 of 5 rows are unusable for sst2"):
        finetune.train(FinetuneConfig(**{**base, "glue_dir": str(bad)}))

    texts = get_task("sst2").load_split("train", root).texts_a
    small = make_checkpoint(tmp_path / "small", texts, vocab_size=48, vocab_rows=40)
    with pytest.raises(
        ValueError,
        match="has 40 embedding rows but its tokenizer .* produces ids up to \\d+; use the tokenizer",
    ):
        finetune.train(FinetuneConfig(**{**base, "init": str(small)}))

    with pytest.raises(ValueError, match="FinetuneConfig.init is empty"):
        finetune.train(FinetuneConfig(**{**base, "init": ""}))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no export/discriminator/"):
        finetune.train(FinetuneConfig(**{**base, "init": str(tmp_path / "run")}))


def test_run_dir_init_uses_exported_discriminator(synthetic, tmp_path):
    root, ckpt = synthetic
    run = tmp_path / "gdes"
    (run / "export").mkdir(parents=True)
    shutil.copytree(ckpt, run / "export" / "discriminator")
    model_dir, spm = finetune.resolve_init(str(run))
    assert model_dir == run / "export" / "discriminator" and spm.name == "spm.model"
    assert results_table.checkpoint_label(str(model_dir)) == "gdes"


def test_cli_trains_and_builds_table(synthetic, tmp_path, monkeypatch):
    root, ckpt = synthetic
    out = tmp_path / "ft" / "ckpt" / "sst2"
    argv = ["--task", "sst2", "--glue-dir", str(root), "--init", str(ckpt), "--out-dir", str(out), "--epochs", "1",
            "--max-train-examples", "32", "--max-eval-examples", "32", "--seeds", "1,2", "--device", "cpu"]  # fmt: skip
    assert finetune.cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["metrics_per_seed"]) == 2 and results["config"]["max_train_examples"] == 32

    stem = tmp_path / "chosen" / "glue_results"
    assert results_table.cli(["--runs", str(tmp_path / "ft"), "--out-dir", str(stem.parent)]) == 0
    lines = stem.with_suffix(".csv").read_text().splitlines()
    assert lines[0].startswith(
        "checkpoint,source,sst2,sst2_std,sst2_seeds,sst2_last,sst2_n_test,sst2_test_official"
    )
    assert lines[1].startswith(f"{ckpt.name},ours,{100 * results['mean']['accuracy']:.2f},")
    assert any(line.startswith("DeBERTaV3-large (paper),paper,96.90") for line in lines)
    assert stem.with_suffix(".png").stat().st_size > 1000

    # without --out-dir the table stays with the runs, never in the working tree's figures/
    monkeypatch.chdir(tmp_path)
    assert results_table.cli(["--runs", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "runs" / "glue_results.csv").read_text().splitlines()[1:] == lines[1:]
    several = tmp_path / "several"
    finetune.run_table(["sst2"], [ckpt], seeds=(1,), out_dir=several, glue_dir=str(root), epochs=1,
                       max_train_examples=16, max_eval_examples=16, device="cpu")  # fmt: skip
    assert (several / "glue_results.csv").exists() and not (tmp_path / "figures").exists()

    with pytest.raises(SystemExit):
        finetune.cli(["--task", "sst2", "--bogus-flag", "1"])
    assert finetune.cli(["--task", "squad", "--init", str(ckpt), "--out-dir", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit):  # no --out-dir: refused before anything trains
        finetune.cli(["--task", "sst2", "--init", str(ckpt)])


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_seeds_resume_without_redoing_finished_ones(synthetic, tmp_path, monkeypatch):
    root, ckpt = synthetic
    base = dict(task="sst2", glue_dir=str(root), init=str(ckpt), epochs=2, batch_size=16, seeds=(1, 2, 3),
                max_train_examples=48, max_eval_examples=32, device="cpu")  # fmt: skip
    reference = finetune.train(FinetuneConfig(out_dir=str(tmp_path / "straight"), **base))

    real, trained = finetune.finetune_seed, []

    def interrupted_at_seed_2(cfg, seed, *args):
        if seed == 2 and not trained.count(2):
            trained.append(2)
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of seed 2
        trained.append(seed)
        return real(cfg, seed, *args)

    monkeypatch.setattr(finetune, "finetune_seed", interrupted_at_seed_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune.train(FinetuneConfig(out_dir=str(out), **base))
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["seed_1.json"]  # no partial file
    assert not (out / "results.json").exists()
    seed_1_mtime = (out / "seeds" / "seed_1.json").stat().st_mtime_ns

    results = finetune.train(FinetuneConfig(out_dir=str(out), **base))
    assert trained == [1, 2, 2, 3]  # seed 1 was not trained again
    assert (out / "seeds" / "seed_1.json").stat().st_mtime_ns == seed_1_mtime
    without_out = lambda r: {**r, "config": {**r["config"], "out_dir": None}}  # noqa: E731
    assert without_out(results) == without_out(reference)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(h["seed"], h["epoch"]) for h in history] == [(s, e) for s in (1, 2, 3) for e in (1, 2)]

    trained.clear()  # a finished run is not trained again, and fewer seeds reuse the saved ones
    assert finetune.train(FinetuneConfig(out_dir=str(out), **base)) == results and trained == []
    assert finetune.train(FinetuneConfig(out_dir=str(out), **{**base, "seeds": (3, 1)}))[
        "metrics_per_seed"
    ] == [
        results["metrics_per_seed"][2],
        results["metrics_per_seed"][0],
    ]
    assert trained == []


def test_changed_config_or_checkpoint_is_not_mixed_with_saved_seeds(synthetic, tmp_path):
    root, ckpt = synthetic
    base = dict(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path / "out"), epochs=1,
                batch_size=16, seeds=(1,), max_train_examples=32, max_eval_examples=16, device="cpu")  # fmt: skip
    finetune.train(FinetuneConfig(**base))
    with pytest.raises(ValueError, match=r"seed_1\.json was fine-tuned with a different configuration "
                                         r"\(lr: 3\.6e-05 then, 0\.001 now\); use another out_dir"):  # fmt: skip
        finetune.train(FinetuneConfig(**{**base, "seeds": (1, 2), "lr": 1e-3}))
    assert not (tmp_path / "out" / "seeds" / "seed_2.json").exists()

    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    finetune.train(FinetuneConfig(**{**base, "init": str(moved), "out_dir": str(tmp_path / "b")}))
    weights = next(p for p in moved.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the checkpoint was replaced
    with pytest.raises(
        ValueError,
        match=r"seed_1\.json was fine-tuned with a different configuration \(the init checkpoint changed\)",
    ):
        finetune.train(FinetuneConfig(**{**base, "init": str(moved), "out_dir": str(tmp_path / "b")}))


# ---------------------------------------------------------------------------------------------- test sizes


def test_test_split_with_skipped_rows_is_flagged_with_both_counts(synthetic, tmp_path):
    root, ckpt = synthetic
    glue_dir = tmp_path / "glue"
    shutil.copytree(root, glue_dir)
    lines = ["sentence\tlabel"] + [f"{' '.join(WORDS[: 3 + i % 5])}\t{i % 2}" for i in range(872)]
    lines[10], lines[20] = "a row without a label", "a film\tpositive"  # 2 rows the loader must skip
    (glue_dir / "SST-2" / "dev.tsv").write_text("\n".join(lines) + "\n")
    cfg = FinetuneConfig(task="sst2", glue_dir=str(glue_dir), init=str(ckpt), out_dir=str(tmp_path / "out"),
                         epochs=1, batch_size=32, max_train_examples=32, seeds=(1,), device="cpu")  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"sst2 test .* has 870 examples, the official split has 872 \(2 malformed"
    ):
        results = finetune.train(cfg)
    assert results["n_test_examples"] == 870 and results["official_test_examples"] == 872
    assert results["splits"]["test"] == {"role": "test", "used": 870, "loaded": 870, "official": 872, "malformed": 2,
                                         "sliced": False}  # fmt: skip
    assert results["test_complete"] is False

    rows = results_table.results_table(tmp_path / "out", tmp_path / "table", include_paper=False)
    assert (rows[0]["sst2_n_test"], rows[0]["sst2_test_official"]) == (870, 872)
    header, row = (tmp_path / "table.csv").read_text().splitlines()
    assert dict(zip(header.split(","), row.split(",")))["sst2_n_test"] == "870"


# ---------------------------------------------------------------------------------------------- batching


def test_batch_widths_round_up_to_the_bucket():
    data = finetune_data.Encoded.build([[1] * 3, [1] * 17, [1] * 40], [0, 1, 0], pad_id=0)
    assert data.ids.shape == (3, 40)
    assert data.width(np.array([0]), 1) == 3 and data.width(np.array([0]), 16) == 16
    assert data.width(np.array([0, 1]), 16) == 32 and data.width(np.array([2]), 16) == 40  # capped at T
    ids, mask, labels = data.batch(torch.tensor([1, 0]), 32)
    assert ids.shape == (2, 32) and mask.sum(1).tolist() == [17, 3] and labels.tolist() == [1, 0]


@pytest.mark.parametrize("token_level", [False, True])
def test_padding_to_a_bucket_does_not_change_a_batch_loss(token_level):
    cfg = preset("tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    head = finetune.TokenClassifier if token_level else finetune.Classifier
    model = head(Encoder(cfg), 3, head_dropout=0.0).eval()
    with torch.no_grad():
        model.out.weight.mul_(300.0)  # logits of order 1, so that a wrong mask shows in the loss
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 50, n).tolist() for n in (5, 9, 12)]
    labels = [rng.integers(0, 3, len(r)).tolist() for r in rows] if token_level else [0, 2, 1]
    data = finetune_data.Encoded.build(rows, labels, pad_id=0)
    task = SimpleNamespace(is_regression=False)
    losses = []
    for width in (12, 16, 29):
        wide = finetune_data.Encoded.build(rows, labels, pad_id=0)
        wide.ids = torch.nn.functional.pad(data.ids, (0, width - 12))
        if token_level:
            wide.labels = torch.nn.functional.pad(data.labels, (0, width - 12), value=finetune_data.IGNORE)
        ids, mask, y = wide.batch(torch.arange(3), width)
        assert ids.shape == (3, width) and int(mask.sum()) == 26
        losses.append(finetune._loss(task, model(ids, mask), y).item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    # the comparison can fail: unmasked padding changes the loss
    ids, mask, y = wide.batch(torch.arange(3), 29)
    assert abs(finetune._loss(task, model(ids, torch.ones_like(mask)), y).item() - losses[0]) > 1e-3


def test_bucketed_fine_tuning_equals_unbucketed(synthetic, tmp_path):
    root, ckpt = synthetic
    base = dict(task="sst2", glue_dir=str(root), init=str(ckpt), epochs=2, lr=1e-3, batch_size=16, seeds=(1,),
                max_train_examples=64, max_eval_examples=64, eval_batch_size=16, device="cpu")  # fmt: skip
    runs = {}
    for bucket in (1, 16):
        out = tmp_path / f"bucket{bucket}"
        finetune.train(FinetuneConfig(out_dir=str(out), length_bucket=bucket, **base))
        runs[bucket] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for exact, bucketed in zip(runs[1], runs[16]):
        assert bucketed["train_loss"] == pytest.approx(exact["train_loss"], rel=1e-5)
        assert bucketed["validation_accuracy"] == exact["validation_accuracy"]
    assert runs[1][-1]["train_loss"] < runs[1][0]["train_loss"]  # it did learn: the comparison is not vacuous


def test_training_steps_make_no_host_sync(synthetic, tmp_path, monkeypatch):
    """Host reads (.item(), .cpu(), .tolist(), .numpy(), bool/float of a tensor) happen per epoch and per
    evaluation, never per step: halving the batch size (twice the steps) must not add any."""
    root, ckpt = synthetic
    counts = Counter()
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    seen = {}
    for batch_size in (16, 8):
        counts.clear()
        cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path / str(batch_size)),
                             epochs=2, batch_size=batch_size, max_train_examples=64, max_eval_examples=32,
                             seeds=(1,), device="cpu")  # fmt: skip
        finetune.finetune_seed(cfg.resolved(), 1, get_task("sst2"), *_prepared(cfg))
        seen[batch_size] = dict(counts)
    assert seen[16] == seen[8], seen


def _prepared(cfg):
    cfg = cfg.resolved()
    encoder, tokenizer = finetune.load_encoder(cfg.init)
    train_data, validation, tests, _ = finetune_data.load_data(cfg, get_task(cfg.task), tokenizer, 64)
    return encoder, train_data, validation, tests, torch.device("cpu")


def test_interrupted_task_table_resumes_finished_tasks(synthetic, tmp_path, monkeypatch):
    _, ckpt = synthetic
    real, trained = finetune.finetune_seed, []

    def interrupted_in_mrpc(cfg, seed, task, *args):
        if task.name == "mrpc" and not trained.count("mrpc"):
            trained.append("mrpc")
            raise KeyboardInterrupt
        trained.append(task.name)
        return real(cfg, seed, task, *args)

    monkeypatch.setattr(finetune, "finetune_seed", interrupted_in_mrpc)
    common = dict(out_dir=tmp_path / "runs", out_stem=tmp_path / "table", glue_dir=str(FIXTURES), epochs=1,
                  device="cpu")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        finetune.run_table(["cola", "mrpc"], [str(ckpt)], seeds=(1,), **common)
    rows = finetune.run_table(["cola", "mrpc"], [str(ckpt)], seeds=(1,), **common)
    assert trained == ["cola", "mrpc", "mrpc"]  # cola was not fine-tuned again
    assert {"cola", "mrpc"} <= set(rows[0])


def test_synthetic_task_reads_the_language_seed_of_the_init_run(tmp_path):
    from lab.synthetic import SyntheticLanguage

    lang = SyntheticLanguage(5)
    texts = [*lang.documents(3_000), " ".join(lang.word_class)]
    run = tmp_path / "run"
    make_checkpoint(run / "export" / "discriminator", texts, vocab_size=1000)
    (run / "config.json").write_text(json.dumps({"corpus": "synthetic:seed=5,words=1000"}))
    assert finetune.corpus_seed(str(run)) == 5
    base = dict(task="synth_gram", init=str(run), epochs=1, max_train_examples=16, max_eval_examples=16,
                device="cpu")  # fmt: skip
    results = finetune.train(FinetuneConfig(out_dir=str(tmp_path / "a"), **base))
    assert results["config"]["synthetic_seed"] == 5
    assert results["splits"]["test"] == {"role": "test", "used": 16, "loaded": 1000, "official": 1000,
                                         "malformed": 0, "sliced": True}  # fmt: skip
    assert results["splits"]["validation"]["loaded"] == 500 and results["splits"]["validation"]["used"] == 16
    overridden = finetune.train(FinetuneConfig(out_dir=str(tmp_path / "b"), synthetic_seed=2, **base))
    assert overridden["config"]["synthetic_seed"] == 2

    (run / "config.json").write_text(json.dumps({"corpus": "wiki.train.tokens"}))
    with pytest.warns(UserWarning, match="was not pre-trained on the synthetic language"):
        finetune.train(FinetuneConfig(out_dir=str(tmp_path / "c"), **base))


def test_length_grouped_batches_are_a_shuffle_that_pads_less():
    """Every example once; each batch drawn from one mega-batch of a shuffled order (so batches stay
    random samples of the data); and far less padding than plain shuffled batches."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 128, size=2000)
    B, mega = 16, 10
    order = finetune_data.length_grouped_order(lengths, B, torch.Generator().manual_seed(3), mega).numpy()
    assert sorted(order.tolist()) == list(range(len(lengths)))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).numpy()
    mega_of = np.empty(len(lengths), dtype=int)
    mega_of[shuffled] = np.arange(len(lengths)) // (B * mega)
    batches = [order[i : i + B] for i in range(0, len(order), B)]
    assert all(len(set(mega_of[b])) == 1 for b in batches)
    assert len({int(mega_of[b[0]]) for b in batches[:5]}) > 1  # the batch order is shuffled too

    def padded(o):
        return sum(int(lengths[o[i : i + B]].max()) * len(o[i : i + B]) for i in range(0, len(o), B))

    assert padded(order) < 0.7 * padded(shuffled), (padded(order), padded(shuffled))
