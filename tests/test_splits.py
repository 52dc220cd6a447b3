"""Train / validation / test: the synthetic tasks generate three disjoint splits, GLUE's validation is a
fixed slice of its train file, and fine-tuning's choice of epoch never sees the test split (a planted
leak must be caught)."""

import numpy as np
import pytest
import torch
from test_finetune import WORDS, make_checkpoint, synthetic_sst2

from lab.finetune import data as finetune_data
from lab.finetune import glue, synthetic_tasks
from lab.finetune import loop as finetune
from lab.finetune.loop import FinetuneConfig
from lab.finetune.tasks import get_task

ROLES = ("train", "validation", "test")

# ---------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name,sizes", [("synth_tag", (300, 300, 500)), ("synth_gram", (2000, 500, 1000))])
def test_synthetic_splits_are_disjoint_sized_and_seeded(name, sizes):
    task = get_task(name)
    splits = task.load(synthetic_seed=0)
    assert tuple(splits) == task.splits == ROLES
    assert tuple(len(splits[s]) for s in ROLES) == sizes == task.official_sizes
    texts = {s: splits[s].texts_a for s in ROLES}
    for s in ROLES:
        assert len(set(texts[s])) == len(texts[s]), s  # distinct within a split
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1 :]:
            assert not set(texts[a]) & set(texts[b]), (a, b)
    again = task.load(synthetic_seed=0)
    assert all(again[s].texts_a == texts[s] and again[s].labels == splits[s].labels for s in ROLES)
    other = task.load(synthetic_seed=1)
    assert all(other[s].texts_a != texts[s] for s in ROLES)
    if name == "synth_gram":  # balanced in every split
        assert [sum(splits[s].labels) for s in ROLES] == [n - n // 2 for n in sizes]


def test_synth_tag_held_out_words_only_in_validation_and_test():
    held_out = synthetic_tasks.held_out_words(0)
    splits = get_task("synth_tag").load(synthetic_seed=0)
    words = {s: {w for text in splits[s].texts_a for w in text.split()} for s in ROLES}
    assert not words["train"] & held_out
    assert len(words["validation"] & held_out) > 50 and len(words["test"] & held_out) > 50


# ---------------------------------------------------------------------------------------------- GLUE


class Words:
    """A stand-in tokenizer: one id per word, 10 + the word's length."""

    cls_id, sep_id, pad_id = 1, 2, 0

    def encode_batch(self, texts):
        return [[10 + len(w) for w in t.split()] for t in texts]


def test_validation_size_is_a_tenth_of_train_at_most_2000():
    assert [glue.validation_size(n) for n in (5, 50, 8551, 20_000, 392_702)] == [1, 5, 855, 2000, 2000]
    assert get_task("cola").official_sizes == (8551 - 855, 855, 1043)
    assert get_task("mnli").official_sizes == (392_702 - 2000, 2000, 9815, 9832)


def test_glue_validation_is_carved_from_train_the_same_for_every_seed(tmp_path):
    root = synthetic_sst2(tmp_path, n_train=250, n_dev=40)
    lines = (root / "SST-2" / "train.tsv").read_text().splitlines()
    lines[1:] = [f"{i} {line}" for i, line in enumerate(lines[1:])]  # every row distinct
    (root / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    task = get_task("sst2")
    whole = task.read_file("train", root)
    splits = task.load(root)
    train, validation = splits["train"], splits["validation"]
    assert (len(train), len(validation), len(splits["test"])) == (225, 25, 40)
    assert not set(train.line_numbers) & set(validation.line_numbers)
    assert sorted(train.line_numbers + validation.line_numbers) == whole.line_numbers
    assert not set(train.texts_a) & set(validation.texts_a)
    assert task.load_split("validation", root).texts_a == validation.texts_a

    # the slice is fixed per task: fine-tuning seeds and the train cap leave it alone
    seen = []
    for seeds, cap in (((1,), None), ((7, 8), None), ((1,), 20)):
        cfg = FinetuneConfig(task="sst2", glue_dir=str(root), seeds=seeds, max_train_examples=cap).resolved()
        train_data, valid_data, _, record = finetune_data.load_data(cfg, task, Words(), 64)
        seen.append(valid_data.ids.tolist())
        assert record["validation"] == {"role": "validation", "used": 25, "loaded": 25, "official": 2000,
                                        "malformed": 0, "sliced": False}  # fmt: skip
        assert record["train"]["loaded"] == 225 and len(train_data) == (cap or 225)
    assert seen[0] == seen[1] == seen[2]


# ---------------------------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = synthetic_sst2(tmp_path_factory.mktemp("glue"), n_train=64, n_dev=15)  # odd: accuracy a != 1 - a
    texts = [" ".join(WORDS + ["zebra"])] * 3 + get_task("sst2").read_file("train", root).texts_a
    return root, make_checkpoint(tmp_path_factory.mktemp("ckpt"), texts, vocab_size=48)


def fine_tune(tiny, flip_test_labels: bool, leak: bool = False) -> dict:
    """One seed fine-tuned on the tiny SST-2-like task; the test labels flipped if asked. `leak` plants
    the bug the design must exclude: the test split handed to selection as the validation split."""
    root, ckpt = tiny
    cfg = FinetuneConfig(task="sst2", glue_dir=str(root), init=str(ckpt), epochs=3, lr=1e-3, batch_size=16,
                         seeds=(1,), device="cpu").resolved()  # fmt: skip
    task = get_task("sst2")
    encoder, tokenizer = finetune.load_encoder(cfg.init)
    train_data, validation, tests, _ = finetune_data.load_data(cfg, task, tokenizer, 64)
    if flip_test_labels:
        test = tests["test"]
        test.labels = 1 - test.labels
        test.labels_host = test.labels.numpy()
    if leak:
        validation = tests["test"]
    device = torch.device("cpu")
    model, metrics, history = finetune.finetune_seed(
        cfg, 1, task, encoder, train_data, validation, tests, device
    )
    predictions = finetune.predict(model, tests["test"], cfg, device)  # the chosen state's logits
    return {"metrics": metrics, "history": history, "predictions": predictions}


def selection_ignores_test_labels(real: dict, flipped: dict) -> bool:
    """Whether two runs that differ only in their test labels chose alike: same epoch, same validation
    curve and metrics, same predictions of the chosen state."""

    def validation(run):
        per_epoch = [{k: v for k, v in row.items() if k.startswith("validation_")} for row in run["history"]]
        chosen = {k: v for k, v in run["metrics"].items() if k.startswith("validation_")}
        return run["metrics"]["best_epoch"], per_epoch, chosen

    return validation(real) == validation(flipped) and np.array_equal(
        real["predictions"], flipped["predictions"]
    )


def test_the_test_split_never_reaches_model_selection(tiny):
    real, flipped = fine_tune(tiny, False), fine_tune(tiny, True)
    assert selection_ignores_test_labels(real, flipped)
    # the flip did reach the reported numbers: 15 examples, accuracy a against 1 - a
    assert real["metrics"]["accuracy"] == pytest.approx(1 - flipped["metrics"]["accuracy"])
    assert real["metrics"]["accuracy"] != flipped["metrics"]["accuracy"]
    assert real["metrics"]["epochs"] == 3 and len(real["history"]) == 3
    assert all(set(row) & {"accuracy", "last_accuracy"} == set() for row in real["history"])


def test_a_planted_leak_fails_the_check(tiny):
    real, flipped = fine_tune(tiny, False, leak=True), fine_tune(tiny, True, leak=True)
    assert not selection_ignores_test_labels(real, flipped)


def test_the_test_split_is_scored_exactly_twice_after_training(tiny, monkeypatch):
    scored, real_score = [], finetune._score

    def counted(task, model, splits, cfg, device):
        scored.append(tuple(splits))
        return real_score(task, model, splits, cfg, device)

    monkeypatch.setattr(finetune, "_score", counted)
    run = fine_tune(tiny, False)
    assert scored == [("validation",)] * 3 + [("test",)] * 2
    assert {"accuracy", "validation_accuracy", "last_accuracy", "best_epoch", "epochs"} == set(run["metrics"])


def test_task_sizes_count_each_role_under_the_caps():
    from lab.analysis.runs import ExperimentConfig, TaskSizes, task_sizes
    from lab.util import replace_strict

    caps = {"finetune.max_train_examples": 100, "finetune.max_eval_examples": 400}
    cfg = replace_strict(ExperimentConfig(), **caps)
    assert task_sizes("synth_gram", cfg) == TaskSizes(train=100, validation=400, test=400)
    assert task_sizes("synth_tag", cfg) == TaskSizes(train=100, validation=300, test=400)
