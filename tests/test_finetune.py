import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from lab import finetune, glue
from lab.finetune import FinetuneConfig
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
    texts = [" ".join(WORDS + ["zebra"])] * 3 + glue.load_split("sst2", "train", root).texts_a
    return root, make_checkpoint(tmp_path_factory.mktemp("ckpt"), texts, vocab_size=48)


def test_learns_a_trivial_task_above_90_percent(synthetic, tmp_path):
    root, ckpt = synthetic
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path), epochs=6,
                         lr=1e-3, batch_size=16, head_dropout=0.0, seeds=(1,), device="cpu")  # fmt: skip
    results = finetune.train(cfg)
    assert results["metrics_per_seed"][0]["accuracy"] > 0.9, results["metrics_per_seed"]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert results["metrics_per_seed"][0]["accuracy"] == max(
        h["accuracy"] for h in history
    )  # best epoch kept


def test_seeds_give_mean_median_std_and_results_file(synthetic, tmp_path):
    root, ckpt = synthetic
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), out_dir=str(tmp_path), epochs=1,
                         batch_size=32, seeds=(1, 2, 3), max_train_examples=64, max_eval_examples=50,
                         device="cpu")  # fmt: skip
    results = finetune.train(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["task"] == "sst2" and on_disk["n_dev_examples"] == 50 and on_disk["n_train_examples"] == 64
    accs = [m["accuracy"] for m in results["metrics_per_seed"]]
    assert [m["seed"] for m in results["metrics_per_seed"]] == [1, 2, 3]
    assert results["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert results["median"]["accuracy"] == pytest.approx(np.median(accs))
    assert results["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert on_disk["config"]["lr"] == pytest.approx(6e-6 * finetune.LR_SCALE)  # SST-2 default, resolved


@pytest.mark.parametrize("task,metric", [("cola", "mcc"), ("sst2", "accuracy"), ("stsb", "pearson")])
def test_real_glue_slice_end_to_end(data_root, tmp_path, task, metric):
    split = glue.load_split(task, "train", data_root / "glue").take(300)
    texts = split.texts_a + (split.texts_b or [])
    ckpt = make_checkpoint(tmp_path / "ckpt", texts, vocab_size=400)
    cfg = FinetuneConfig(task=task, glue_dir=str(data_root / "glue"), init=str(ckpt), out_dir=str(tmp_path / "out"),
                         epochs=1, batch_size=16, max_train_examples=64, max_eval_examples=64, seeds=(1,),
                         device="cpu")  # fmt: skip
    finetune.train(cfg)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = glue.get_task(task).metrics
    assert results["main_metric"] == metric and results["n_dev_examples"] == 64
    assert set(results["mean"]) == {*metrics, *(f"last_{m}" for m in metrics)}
    official = glue.official_size(task, "dev")
    assert results["official_dev_examples"] == official and results["dev_complete"]
    assert results["dev_splits"]["dev"] == {"used": 64, "loaded": official, "official": official, "malformed": 0,
                                            "sliced": True}  # fmt: skip


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
    assert results["n_dev_examples"] == 4 and results["n_train_examples"] == 3


def test_pair_encoding_truncates_the_longer_side_first():
    class Words:
        cls_id, sep_id = 1, 2

        def encode_batch(self, texts):
            return [[10 + len(w) for w in t.split()] for t in texts]

    split = glue.GlueSplit("rte", "dev", "-", ["a " * 10, "a a"], ["b b", "b " * 3], [0, 1])
    rows = finetune.encode_split(split, Words(), max_len=9)
    assert rows[0] == [1, 11, 11, 11, 11, 2, 11, 11, 2]  # a cut from 10 to 4; b kept whole
    assert rows[1] == [1, 11, 11, 2, 11, 11, 11, 2]  # fits: nothing cut
    single = glue.GlueSplit("sst2", "dev", "-", ["a " * 10], None, [0])
    assert finetune.encode_split(single, Words(), max_len=5) == [[1, 11, 11, 11, 2]]


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

    texts = glue.load_split("sst2", "train", root).texts_a
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
    assert finetune.checkpoint_label(str(model_dir)) == "gdes"


def test_cli_trains_and_builds_table(synthetic, tmp_path):
    root, ckpt = synthetic
    out = tmp_path / "ft" / "ckpt" / "sst2"
    argv = ["--task", "sst2", "--glue-dir", str(root), "--init", str(ckpt), "--out", str(out), "--epochs", "1",
            "--max-train-examples", "32", "--max-eval-examples", "32", "--seeds", "1,2", "--device", "cpu"]  # fmt: skip
    assert finetune.cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["metrics_per_seed"]) == 2 and results["config"]["max_train_examples"] == 32

    stem = tmp_path / "figures" / "glue"
    assert finetune.cli(["--table", str(tmp_path / "ft"), "--table-out", str(stem)]) == 0
    lines = stem.with_suffix(".csv").read_text().splitlines()
    assert lines[0].startswith(
        "checkpoint,source,sst2,sst2_std,sst2_seeds,sst2_last,sst2_n_dev,sst2_dev_official"
    )
    assert lines[1].startswith(f"{ckpt.name},ours,{100 * results['mean']['accuracy']:.2f},")
    assert any(line.startswith("DeBERTaV3-large (paper),paper,96.90") for line in lines)
    assert stem.with_suffix(".png").stat().st_size > 1000

    with pytest.raises(SystemExit):
        finetune.cli(["--task", "sst2", "--bogus-flag", "1"])
    assert finetune.cli(["--task", "squad", "--init", str(ckpt), "--out", str(tmp_path / "x")]) == 1
