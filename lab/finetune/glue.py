"""GLUE tasks: what each task's files look like, how to read them, and how each task is scored.

Layout read by `load_split` (the one written by GLUE's `download_glue_data.py`):

    <glue_dir>/<TASK>/train.tsv
    <glue_dir>/<TASK>/dev.tsv                                  (MNLI: dev_matched.tsv + dev_mismatched.tsv)

Files are tab-separated with quoting disabled (`csv.QUOTE_NONE`): GLUE sentences contain bare `"`
characters that a quoting reader would swallow across lines. A UTF-8 byte-order mark is ignored, a
missing final newline is fine, CoLA has no header (4 columns: source, label, mark, sentence).
Rows that cannot be used (wrong column count, unparsable label, label outside the task's set) are
never dropped silently: each is reported with its line number in a warning and kept in
`GlueSplit.malformed`. When most rows are bad the file is the wrong one (a test split without
labels, another task's file) and loading fails instead.

Label ids follow the order of the HuggingFace `glue` dataset, so ids agree between `load_split`
and `load_hf_split`. Metrics are fractions in [0, 1] (correlations in [-1, 1]), computed with
scikit-learn / scipy.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lab.util import data_dir

# More than this fraction of malformed rows means the file is not the task's file: raise, don't warn.
MAX_MALFORMED_FRACTION = 0.5


@dataclass(frozen=True)
class GlueTask:
    name: str  # canonical key: "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"
    dir_name: str  # folder under the GLUE root, e.g. "CoLA", "SST-2"
    dev_splits: tuple[str, ...]  # ("dev",) or, for MNLI, ("dev_matched", "dev_mismatched")
    header: bool  # whether the first line names the columns (False only for CoLA)
    num_columns: int | None  # expected columns without a header (CoLA: 4); with a header, its length
    text_columns: tuple[str | int, ...]  # one (single sentence) or two (pair) columns, by name or index
    label_column: str | int  # by name, or by index without a header
    labels: tuple[str, ...]  # label strings in id order; empty for regression (STS-B)
    metrics: tuple[str, ...]  # keys returned by compute_metrics
    main_metric: str  # the paper's headline metric for the task; picks the best dev epoch
    hf_name: str  # config name of the HuggingFace "glue" dataset
    hf_text_columns: tuple[str, ...]  # the same text columns in the HuggingFace dataset
    score_range: tuple[float, float] = (0.0, 5.0)  # regression only: valid target range

    @property
    def num_labels(self) -> int:
        """Size of the output layer: 1 for regression, else the number of classes."""
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


_ACC = ("accuracy",)
_F1_ACC = ("f1", "accuracy")
# Columns: name, dir_name, dev_splits, header, num_columns, text_columns, label_column, labels, metrics,
# main_metric, hf_name, hf_text_columns (see GlueTask).
# a table, one entry per line, easier to read across than reflowed (so the formatter skips it)
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("dev",), False, 4, (3,), 1, ("0", "1"), ("mcc",), "mcc",
                 "cola", ("sentence",)),
        GlueTask("sst2", "SST-2", ("dev",), True, None, ("sentence",), "label", ("0", "1"), _ACC,
                 "accuracy", "sst2", ("sentence",)),
        GlueTask("mrpc", "MRPC", ("dev",), True, None, ("#1 String", "#2 String"), "Quality", ("0", "1"),
                 _F1_ACC, "accuracy", "mrpc", ("sentence1", "sentence2")),
        GlueTask("stsb", "STS-B", ("dev",), True, None, ("sentence1", "sentence2"), "score", (),
                 ("pearson", "spearman"), "pearson", "stsb", ("sentence1", "sentence2")),
        GlueTask("qqp", "QQP", ("dev",), True, None, ("question1", "question2"), "is_duplicate", ("0", "1"),
                 _F1_ACC, "accuracy", "qqp", ("question1", "question2")),
        GlueTask("mnli", "MNLI", ("dev_matched", "dev_mismatched"), True, None, ("sentence1", "sentence2"),
                 "gold_label", ("entailment", "neutral", "contradiction"), _ACC, "accuracy", "mnli",
                 ("premise", "hypothesis")),
        GlueTask("qnli", "QNLI", ("dev",), True, None, ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), _ACC, "accuracy", "qnli", ("question", "sentence")),
        GlueTask("rte", "RTE", ("dev",), True, None, ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment"), _ACC, "accuracy", "rte", ("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", ("dev",), True, None, ("sentence1", "sentence2"), "label", ("0", "1"), _ACC,
                 "accuracy", "wnli", ("sentence1", "sentence2")),
    ]
}  # fmt: skip

# Example counts of the official GLUE files (as written by `download_glue_data.py`, equal to the
# HuggingFace `glue` dataset's splits). A loaded split of another size (skipped malformed rows, a
# truncated download) is flagged next to its metric by lab/finetune/loop.py.
OFFICIAL_SIZES: dict[str, dict[str, int]] = {
    "cola": {"train": 8551, "dev": 1043},
    "sst2": {"train": 67349, "dev": 872},
    "mrpc": {"train": 3668, "dev": 408},
    "stsb": {"train": 5749, "dev": 1500},
    "qqp": {"train": 363846, "dev": 40430},
    "mnli": {"train": 392702, "dev_matched": 9815, "dev_mismatched": 9832},
    "qnli": {"train": 104743, "dev": 5463},
    "rte": {"train": 2490, "dev": 277},
    "wnli": {"train": 635, "dev": 71},
}

# Prefix of a dev split's metric keys in multi-dev tasks (MNLI reports "m_accuracy", "mm_accuracy").
_SPLIT_PREFIX = {"dev": "", "dev_matched": "m_", "dev_mismatched": "mm_"}
_HF_SPLIT = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def get_task(name: str) -> GlueTask:
    """Look a task up by any common spelling: "CoLA", "sst-2", "SST2", "STS-B", "mnli", ..."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def official_size(task: str, split: str) -> int | None:
    """Examples in the official `split` of `task` (None where unknown)."""
    return OFFICIAL_SIZES.get(get_task(task).name, {}).get(split)


def main_metric(task: str) -> str:
    """Key of the headline dev metric in `dev_metrics` output, e.g. "mcc" or, for MNLI, "m_accuracy"."""
    t = get_task(task)
    return _SPLIT_PREFIX[t.dev_splits[0]] + t.main_metric


# ---------------------------------------------------------------------------------------------- metrics


def compute_metrics(task: str, predictions: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> dict:
    """Score one split. `predictions` are class ids, class logits [N, C], or regression scores [N]."""
    t = get_task(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.ndim == 2:  # logits or probabilities
        preds = preds[:, 0] if t.is_regression else preds.argmax(axis=1)
    if preds.shape != gold.shape:
        raise ValueError(f"{t.name}: {preds.shape[0]} predictions for {gold.shape[0]} labels")
    if len(gold) == 0:
        raise ValueError(f"{t.name}: no examples to score")
    return {name: metric(name, preds, gold) for name in t.metrics}


class ConstantPredictionWarning(UserWarning):
    """A correlation metric (Matthews, Pearson, Spearman) of constant predictions or labels: 0 / 0,
    scored 0.0 instead of NaN."""


def _constant_side(preds: np.ndarray, gold: np.ndarray) -> str | None:
    for side, values in (("predictions", preds), ("labels", gold)):
        if len(values) and np.all(values == values[0]):
            return f"{side} (all {values[0].item()!r})"
    return None


def metric(name: str, preds: np.ndarray, gold: np.ndarray) -> float:
    """One metric of class ids ("mcc", "accuracy", "f1") or scores ("pearson", "spearman").

    A correlation of constant predictions (or labels) is 0 / 0. It is scored 0.0 — what Matthews'
    coefficient gives a classifier that always answers the same class (sklearn's convention too),
    and the score of a prediction that carries no information about the labels — never NaN, and a
    ConstantPredictionWarning names the metric and the constant side, so the caller can record it
    (lab/finetune/loop.py's history keeps the metric; a NaN would have sorted an epoch last or first)."""
    if name in ("mcc", "pearson", "spearman"):
        constant = _constant_side(preds, gold)
        if constant is not None:
            warnings.warn(
                f"{name} of constant {constant} is undefined (0 / 0); scored 0.0",
                ConstantPredictionWarning,
                stacklevel=3,
            )
            return 0.0
    if name == "mcc":
        return float(matthews_corrcoef(gold, preds))
    if name == "accuracy":
        return float(accuracy_score(gold, preds))
    if name == "f1":
        return float(f1_score(gold, preds))
    if name == "pearson":
        return float(pearsonr(preds.astype(float), gold.astype(float))[0])
    if name == "spearman":
        return float(spearmanr(preds.astype(float), gold.astype(float))[0])
    raise ValueError(f"unknown metric {name!r}; known: mcc, accuracy, f1, pearson, spearman")


def dev_metrics(task: str, per_split: dict[str, tuple]) -> dict:
    """Metrics of every dev split, keys prefixed for MNLI: {"dev_matched": (preds, labels), ...} → dict."""
    out = {}
    for split, (preds, labels) in per_split.items():
        prefix = _SPLIT_PREFIX[split]
        out.update({prefix + k: v for k, v in compute_metrics(task, preds, labels).items()})
    return out


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class GlueSplit:
    task: str  # canonical task key
    split: str  # "train", "dev", "dev_matched", "dev_mismatched"
    source: str  # file path or "hf:glue/<name>/<split>"
    texts_a: list[str]
    texts_b: list[str] | None  # None for single-sentence tasks
    labels: list  # int class ids, or float scores for regression
    line_numbers: list[int] = field(default_factory=list)  # 1-based line of each kept row in the file
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason) of skipped rows

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None, seed: int = 0) -> GlueSplit:
        """A random subset of `n` rows (same subset for the same seed), or self when n is None or >= len."""
        if n is None or n >= len(self):
            return self
        idx = sorted(np.random.default_rng(seed).choice(len(self), size=n, replace=False).tolist())

        def pick(xs):
            return [xs[i] for i in idx] if xs is not None else None

        lines = pick(self.line_numbers) if self.line_numbers else []
        return GlueSplit(
            self.task,
            self.split,
            self.source,
            pick(self.texts_a),
            pick(self.texts_b),
            pick(self.labels),
            lines,
            list(self.malformed),
        )


def split_path(task: str, split: str, glue_dir: str | Path | None = None) -> Path:
    t = get_task(task)
    valid = ("train", *t.dev_splits)
    if split not in valid:
        raise ValueError(f"{t.name} has splits {valid}, not {split!r}")
    root = Path(glue_dir) if glue_dir is not None else data_dir() / "glue"
    return root / t.dir_name / f"{split}.tsv"


def _expected_layout(t: GlueTask) -> str:
    files = ", ".join(f"{s}.tsv" for s in ("train", *t.dev_splits))
    return f"<glue_dir>/{t.dir_name}/{{{files}}}"


def load_split(task: str, split: str, glue_dir: str | Path | None = None) -> GlueSplit:
    """Read `<glue_dir>/<TASK>/<split>.tsv` (glue_dir defaults to $LAB_DATA_DIR/glue)."""
    t = get_task(task)
    path = split_path(t.name, split, glue_dir)
    if not path.is_file():
        raise ValueError(
            f"{t.name} {split} file not found: {path}; expected the GLUE layout {_expected_layout(t)}"
        )
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops a byte-order mark
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(reader.line_num, row) for row in reader if row]
    if t.header:
        if not rows:
            raise ValueError(f"{path} is empty; expected a header line naming the columns")
        _, header = rows.pop(0)
        header = [h.strip() for h in header]
        missing = [c for c in (*t.text_columns, t.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing} of {t.name}; header is {header}")
        width = len(header)
        text_idx = [header.index(c) for c in t.text_columns]
        label_idx = header.index(t.label_column)
    else:
        width, text_idx, label_idx = t.num_columns, list(t.text_columns), t.label_column

    to_id = t.label_to_id
    texts: list[list[str]] = [[] for _ in text_idx]
    labels, line_numbers, malformed = [], [], []
    for line, row in rows:
        if len(row) != width:
            malformed.append((line, f"{len(row)} columns, expected {width}"))
            continue
        raw = row[label_idx].strip()
        if t.is_regression:
            try:
                label = float(raw)
            except ValueError:
                malformed.append((line, f"label {raw!r} is not a number"))
                continue
            lo, hi = t.score_range
            if not (math.isfinite(label) and lo <= label <= hi):
                malformed.append((line, f"score {raw!r} outside [{lo}, {hi}]"))
                continue
        elif raw in to_id:
            label = to_id[raw]
        else:
            malformed.append((line, f"label {raw!r} not in {list(t.labels)}"))
            continue
        for column, i in zip(texts, text_idx):
            column.append(row[i].strip())
        labels.append(label)
        line_numbers.append(line)

    result = GlueSplit(
        t.name, split, str(path), texts[0], texts[1] if t.is_pair else None, labels, line_numbers, malformed
    )
    _check_malformed(result, len(rows))
    return result


def _check_malformed(result: GlueSplit, n_rows: int) -> None:
    bad = result.malformed
    if not bad:
        return
    shown = "; ".join(f"line {line}: {why}" for line, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if len(bad) > MAX_MALFORMED_FRACTION * n_rows:
        raise ValueError(
            f"{result.source}: {len(bad)} of {n_rows} rows are unusable for {result.task} ({shown}); "
            f"is this the {result.task} {result.split} file, with labels?"
        )
    warnings.warn(f"{result.source}: skipped {len(bad)} malformed row(s) of {n_rows}: {shown}", stacklevel=3)


def load_task(task: str, glue_dir: str | Path | None = None) -> dict[str, GlueSplit]:
    """{"train": ..., "dev": ...} (MNLI: "dev_matched", "dev_mismatched") from the local GLUE layout."""
    t = get_task(task)
    return {split: load_split(t.name, split, glue_dir) for split in ("train", *t.dev_splits)}


def load_hf_split(task: str, split: str) -> GlueSplit:
    """The same split from `datasets.load_dataset("glue", ...)` (needs the package and network or cache)."""
    t = get_task(task)
    if split not in ("train", *t.dev_splits):
        raise ValueError(f"{t.name} has splits {('train', *t.dev_splits)}, not {split!r}")
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"loading GLUE {t.name} from the HuggingFace hub needs the `datasets` package "
            f"(pip install datasets), or use load_split with local files laid out as {_expected_layout(t)}"
        ) from e
    try:
        ds = datasets.load_dataset("glue", t.hf_name, split=_HF_SPLIT[split])
    except Exception as e:  # offline, hub down, no cache: every failure means the same to the caller
        raise ValueError(
            f"could not load GLUE {t.name} {split} from the HuggingFace hub ({type(e).__name__}: {e}); "
            f"download the data and use load_split with the layout {_expected_layout(t)}"
        ) from e
    texts = [[str(x) for x in ds[c]] for c in t.hf_text_columns]
    raw = list(ds["label"])
    labels, keep, malformed = [], [], []
    for i, y in enumerate(raw):
        valid = (y is not None and math.isfinite(y)) if t.is_regression else y in range(t.num_labels)
        if valid:
            labels.append(float(y) if t.is_regression else int(y))
            keep.append(i)
        else:
            malformed.append((i + 1, f"label {y!r} outside the task's set"))

    def pick(xs):
        return [xs[i] for i in keep]

    result = GlueSplit(
        t.name,
        split,
        f"hf:glue/{t.hf_name}/{_HF_SPLIT[split]}",
        pick(texts[0]),
        pick(texts[1]) if t.is_pair else None,
        labels,
        [i + 1 for i in keep],
        malformed,
    )
    _check_malformed(result, len(raw))
    return result
