import builtins
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lab.finetune import glue
from lab.finetune.task import ConstantPredictionWarning, Task
from lab.finetune.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


# ---------------------------------------------------------------------------------------------- task table


def test_task_table_metrics_and_label_counts():
    expected = {
        "cola": ("mcc", 2),
        "sst2": ("accuracy", 2),
        "mrpc": ("accuracy", 2),
        "stsb": ("pearson", 1),
        "qqp": ("accuracy", 2),
        "mnli": ("accuracy", 3),
        "qnli": ("accuracy", 2),
        "rte": ("accuracy", 2),
        "wnli": ("accuracy", 2),
    }
    assert {t.name for t in glue.GLUE_TASKS} == set(expected)
    for name, (metric, num_labels) in expected.items():
        task = get_task(name)
        assert task.main_metric == metric and task.num_labels == num_labels, name
    assert get_task("stsb").is_regression and not get_task("cola").is_regression
    assert get_task("mrpc").metrics == ("f1", "accuracy") == get_task("qqp").metrics
    assert get_task("stsb").metrics == ("pearson", "spearman")
    assert get_task("mnli").test_splits == ("test_matched", "test_mismatched")
    assert get_task("mnli").main_key == "m_accuracy" and get_task("cola").main_key == "mcc"
    assert not get_task("cola").is_pair and get_task("rte").is_pair


def test_task_names_accept_common_spellings_and_reject_unknown():
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"
    assert get_task("CoLA").name == "cola"
    with pytest.raises(ValueError, match="known tasks: cola, sst2"):
        get_task("squad")


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    # tp 3, fn 1, fp 2, tn 4
    gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    mcc = (3 * 4 - 2 * 1) / (5 * 4 * 6 * 5) ** 0.5  # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    assert get_task("cola").compute_metrics(pred, gold) == {"mcc": pytest.approx(mcc)}
    assert get_task("mrpc").compute_metrics(pred, gold) == {"f1": pytest.approx(6 / 9), "accuracy": 0.7}
    assert get_task("sst2").compute_metrics(pred, gold) == {"accuracy": 0.7}

    logits = np.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    assert get_task("mnli").compute_metrics(logits, [1, 0, 0, 2]) == {"accuracy": 0.5}

    # x = [1, 2, 3, 10], y = [1, 3, 2, 4]: deviations from the means (4, 2.5) give sum dx dy = 13,
    # sum dx^2 = 50, sum dy^2 = 5, so pearson = 13 / sqrt(250); the ranks [1, 2, 3, 4] vs [1, 3, 2, 4]
    # give spearman = 1 - 6 * 2 / (4 * 15) = 0.8.
    stsb = get_task("stsb").compute_metrics([1.0, 2.0, 3.0, 10.0], [1.0, 3.0, 2.0, 4.0])
    assert stsb == {"pearson": pytest.approx(13 / 250**0.5), "spearman": pytest.approx(0.8)}
    as_logits = get_task("stsb").compute_metrics(
        np.array([[1.0], [2.0], [3.0], [10.0]]), [1.0, 3.0, 2.0, 4.0]
    )
    assert as_logits == stsb


def test_constant_predictions_score_zero_with_a_warning_never_nan():
    """Matthews, Pearson and Spearman of a constant side are 0 / 0: a defined 0.0, and a warning that
    names the metric and the constant side (scipy's pearsonr alone gives NaN)."""
    gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.warns(ConstantPredictionWarning, match=r"mcc of constant predictions \(all 1\)"):
        assert get_task("cola").compute_metrics([1] * 10, gold) == {"mcc": 0.0}
    with pytest.warns(ConstantPredictionWarning, match="mcc of constant labels"):
        assert get_task("cola").compute_metrics(gold, [0] * 10) == {"mcc": 0.0}
    with pytest.warns(ConstantPredictionWarning) as caught:
        stsb = get_task("stsb").compute_metrics([2.5] * 4, [1.0, 3.0, 2.0, 4.0])
    assert stsb == {"pearson": 0.0, "spearman": 0.0}
    assert [str(w.message).split()[0] for w in caught] == ["pearson", "spearman"]
    with pytest.warns(ConstantPredictionWarning):
        out = get_task("stsb").split_metrics({"test": (np.array([[3.0]] * 3), [1.0, 2.0, 5.0])})
    assert out == {"pearson": 0.0, "spearman": 0.0}  # regression logits [N, 1], still defined
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a varying prediction is scored without any warning
        varying = get_task("stsb").compute_metrics([1.0, 2.0, 4.0], [1.0, 2.0, 3.0])
    assert varying == {"pearson": pytest.approx(0.98198, abs=1e-5), "spearman": pytest.approx(1.0)}


def test_official_sizes_agree_with_the_glue_files_on_disk(data_root):
    """The table's counts against the real dev and train files of the tasks the data folder holds
    (CoLA, SST-2, STS-B): a mistyped count, or a reader that drops or adds rows, fails here."""
    checked = 0
    for task in (t.name for t in glue.GLUE_TASKS):
        for split in get_task(task).splits:
            if get_task(task).split_path(split, data_root / "glue").is_file():
                assert len(get_task(task).load_split(split, data_root / "glue")) == get_task(
                    task
                ).official_size(split)
                checked += 1
    assert checked >= 6
    assert get_task("mnli").official_size("test") is None  # MNLI has two test splits, no plain "test"


def test_split_metrics_prefixes_mnli_and_validation_splits():
    out = get_task("mnli").split_metrics(
        {"test_matched": ([0, 1], [0, 1]), "test_mismatched": ([0, 1], [0, 2])}
    )
    assert out == {"m_accuracy": 1.0, "mm_accuracy": 0.5}
    assert get_task("mnli").split_metrics({"validation": ([0, 1], [0, 0])}) == {"validation_accuracy": 0.5}


def test_metrics_reject_length_mismatch():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        get_task("sst2").compute_metrics([0, 1, 1], [0, 1])


# ---------------------------------------------------------------------------------------------- loading


def test_cola_without_header_reports_malformed_line_and_keeps_quotes():
    with pytest.warns(UserWarning, match="line 4: 3 columns"):
        train = get_task("cola").read_file("train", FIXTURES)
    assert len(train) == 5 and train.texts_b is None
    assert train.labels == [1, 0, 1, 0, 1]
    assert train.line_numbers == [1, 2, 3, 5, 6]
    assert train.malformed == [(4, "3 columns, expected 4")]
    # A bare quote must not swallow the following lines into one field.
    assert train.texts_a[1] == 'He said "the boat sank.'
    assert train.texts_a[3] == 'The more you eat, the more you want "to'


def test_file_without_final_newline_keeps_last_row():
    dev = get_task("cola").load_split("test", FIXTURES)
    assert len(dev) == 3 and dev.texts_a[-1] == "Mary sang a song." and not dev.malformed


def test_bom_header_and_label_outside_set():
    with pytest.warns(UserWarning, match=r"line 5: label '2' not in \['0', '1'\]"):
        train = get_task("SST-2").read_file("train", FIXTURES)
    assert train.texts_a[0] == "hide new secretions from the parental units"  # header found despite the BOM
    assert train.texts_a[1] == '" the best film of the year'
    assert train.labels == [0, 1, 0, 0, 1]
    assert train.line_numbers == [2, 3, 4, 6, 7]


def test_regression_scores_and_unparsable_score():
    with pytest.warns(UserWarning, match="line 3: label 'n/a' is not a number"):
        train = get_task("stsb").read_file("train", FIXTURES)
    assert train.labels == [5.0, 0.25, 2.6]
    assert train.texts_b == ["An air plane is taking off.", "A dog runs.", "Two men are playing chess."]


def test_pair_tasks_and_mnli_test_splits():
    splits = get_task("mnli").load(FIXTURES)
    assert set(splits) == {"train", "validation", "test_matched", "test_mismatched"}
    assert get_task("mnli").read_file("train", FIXTURES).labels == [
        0,
        2,
        1,
    ]  # entailment, contradiction, neutral
    assert sorted(splits["train"].labels + splits["validation"].labels) == [0, 1, 2]  # 1 row carved
    assert splits["test_mismatched"].texts_b == ["She made sound.", "She was tired."]
    mrpc = get_task("mrpc").read_file("train", FIXTURES)
    assert mrpc.labels == [1, 0] and mrpc.texts_a[1] == "Yucaipa owned Dominick 's."


def test_missing_split_names_path_and_layout(tmp_path):
    with pytest.raises(ValueError, match=r"RTE.*train\.tsv.*expected the GLUE layout <glue_dir>/RTE/"):
        get_task("rte").load_split("train", tmp_path)
    with pytest.raises(ValueError, match="test_matched"):
        get_task("mnli").load_split("dev", FIXTURES)


def test_mostly_bad_labels_is_an_error(tmp_path):
    (tmp_path / "SST-2").mkdir()
    rows = "".join(f"sentence {i}\t{'positive' if i % 4 else 1}\n" for i in range(8))
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    with pytest.raises(ValueError, match=r"6 of 8 rows are unusable for sst2 .*line 3: label 'positive'"):
        get_task("sst2").load_split("test", tmp_path)


def test_wrong_header_is_an_error(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("text\ttarget\nok\t1\n")
    with pytest.raises(ValueError, match=r"header lacks column\(s\) \['sentence', 'label'\]"):
        get_task("sst2").load_split("test", tmp_path)


def test_take_is_a_seeded_subset():
    dev = get_task("mrpc").read_file("train", FIXTURES)
    assert dev.take(None) is dev
    one = dev.take(1, seed=3)
    assert len(one) == 1 and one.take(1) is one
    assert one.texts_a == dev.take(1, seed=3).texts_a


def test_hf_loader_without_datasets_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        get_task("rte").load_hf_split("test")


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "task,n_train,n_dev", [("cola", 8551, 1043), ("sst2", 67349, 872), ("stsb", 5749, 1500)]
)
def test_real_glue_files(data_root, task, n_train, n_dev):
    splits = {file: get_task(task).read_file(file, data_root / "glue") for file in ("train", "dev")}
    assert (len(splits["train"]), len(splits["dev"])) == (n_train, n_dev)
    assert get_task(task).official_sizes == glue.glue_sizes(n_train, n_dev)
    assert not splits["train"].malformed and not splits["dev"].malformed
    if task == "cola":
        assert sum(splits["dev"].labels) == 721 and sum(splits["train"].labels) == 6023
    if task == "sst2":
        assert sum(splits["train"].labels) == 37569 and sum(splits["dev"].labels) == 444
    if task == "stsb":
        assert min(splits["dev"].labels) == 0.0 and max(splits["dev"].labels) == 5.0
        assert splits["dev"].texts_a[0] == "A man with a hard hat is dancing."


def test_a_task_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="level 'sentence'; choose one of"):
        Task("x", "sentence", ("0", "1"), ("mcc",), "mcc")
    with pytest.raises(ValueError, match="main_metric 'f1' is not one of"):
        Task("x", "sequence", ("0", "1"), ("mcc",), "f1")
    with pytest.raises(ValueError, match="1 official sizes for the splits"):
        Task("x", "sequence", ("0", "1"), ("mcc",), "mcc", official_sizes=(10,))
