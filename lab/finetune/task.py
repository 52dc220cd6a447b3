"""What a fine-tuning task is: `Task`, the one protocol GLUE (lab/finetune/glue.py) and the synthetic
language's tasks (lab/finetune/synthetic_tasks.py) implement, and `LabelledSplit`, the examples of one
split of any task.

A task knows its name, its level (one label per sequence or per word), its labels, its metrics and
the main one, its splits and their official sizes, its fine-tuning defaults, and how to load itself.

Every task has three roles of split: "train" (fitted), "validation" (model selection only: the epoch
kept) and one or more test splits (reported only, never seen by selection; MNLI has two). GLUE's test
splits are its official dev files, its validation a fixed slice of its train file (lab/finetune/glue.py);
the synthetic tasks generate all three (lab/finetune/synthetic_tasks.py).
The registry of tasks is lab/finetune/tasks.py. Metrics are fractions in [0, 1] (correlations in
[-1, 1]), computed with scikit-learn / scipy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

LEVELS = ("sequence", "token")  # one label per sequence (or pair), or one per word
VALIDATION = "validation"  # the one split model selection reads
# Prefix of a split's metric keys: the validation split's are "validation_<metric>"; a test split's are
# bare, or, in MNLI's two, "m_accuracy" and "mm_accuracy".
SPLIT_PREFIX = {VALIDATION: "validation_", "test": "", "test_matched": "m_", "test_mismatched": "mm_"}


@dataclass(frozen=True)
class TaskDefaults:
    """A task's fine-tuning defaults: what FinetuneConfig's None fields resolve to (lab/finetune/config.py).
    These values serve a task that names none of its own."""

    epochs: int = 3  # passes over the training set
    lr: float = 6e-5  # peak learning rate
    batch_size: int = 32  # examples per step
    head_dropout: float = 0.1  # dropout before the output layer
    max_seq_len: int = 128  # tokens incl. [CLS]/[SEP], capped by the model's


@dataclass(frozen=True)
class Task:
    """A fine-tuning task. Subclasses say where the examples come from (`load`) and their official sizes."""

    name: str  # canonical key, unique in the registry (lab/finetune/tasks.py)
    level: str  # "sequence": one label per sequence (or pair); "token": one label per word
    labels: tuple[str, ...]  # label names in id order; empty for regression (STS-B)
    metrics: tuple[str, ...]  # keys returned by compute_metrics
    main_metric: str  # the headline metric: picks the epoch on validation, reported on test (`main_key`)
    test_splits: tuple[str, ...] = ("test",)  # reported only; MNLI: ("test_matched", "test_mismatched")
    official_sizes: tuple[
        int, ...
    ] = ()  # examples in each of `splits` (train, validation, tests); () = unknown
    defaults: TaskDefaults = TaskDefaults()  # what FinetuneConfig's None fields become

    generated = False  # True: the examples are generated from the synthetic language (seeded), not read

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"task {self.name}: level {self.level!r}; choose one of {LEVELS}")
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name}: main_metric {self.main_metric!r} is not one of {self.metrics}"
            )
        if self.official_sizes and len(self.official_sizes) != len(self.splits):
            raise ValueError(
                f"task {self.name}: {len(self.official_sizes)} official sizes for the splits {self.splits}"
            )

    @property
    def num_labels(self) -> int:
        """Size of the output layer: 1 for regression, else the number of classes."""
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def is_token_level(self) -> bool:
        return self.level == "token"

    @property
    def is_pair(self) -> bool:
        return False

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", VALIDATION, *self.test_splits)

    def role(self, split: str) -> str:
        """ "train", "validation" or "test": what a split is used for."""
        return split if split in ("train", VALIDATION) else "test"

    @property
    def main_key(self) -> str:
        """Key of the main metric on the (first) test split, e.g. "mcc" or, for MNLI, "m_accuracy"."""
        return SPLIT_PREFIX[self.test_splits[0]] + self.main_metric

    @property
    def selection_key(self) -> str:
        """Key of the main metric on the validation split, which picks the epoch: "validation_mcc"."""
        return SPLIT_PREFIX[VALIDATION] + self.main_metric

    def official_size(self, split: str) -> int | None:
        """Examples in the official `split` (None where unknown)."""
        known = dict(zip(self.splits, self.official_sizes))
        return known.get(split)

    def load(self, glue_dir: str | Path | None = None, synthetic_seed: int = 0) -> dict[str, LabelledSplit]:
        """{"train": ..., "validation": ..., <test splits>: ...}: read from `glue_dir` or generated from
        `synthetic_seed`."""
        raise NotImplementedError(f"task {self.name} does not say how to load its examples")

    def missing_files(self, glue_dir: str | Path | None = None) -> list[str]:
        """Files `load` needs that are not there ([] for a generated task)."""
        return []

    def score(self, name: str, preds: np.ndarray, gold: np.ndarray) -> float:
        """One of the task's metrics; a task with a metric of its own overrides this."""
        return metric(name, preds, gold)

    def compute_metrics(self, predictions: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> dict:
        """Score one split. `predictions` are class ids, class logits [N, C], or regression scores [N];
        token tasks take flat per-word class ids."""
        preds = np.asarray(predictions)
        gold = np.asarray(labels)
        if preds.ndim == 2:  # logits or probabilities
            preds = preds[:, 0] if self.is_regression else preds.argmax(axis=1)
        if preds.shape != gold.shape:
            raise ValueError(f"{self.name}: {preds.shape[0]} predictions for {gold.shape[0]} labels")
        if len(gold) == 0:
            raise ValueError(f"{self.name}: no examples to score")
        return {name: self.score(name, preds, gold) for name in self.metrics}

    def split_metrics(self, per_split: dict[str, tuple]) -> dict:
        """Metrics of several splits, keys prefixed by SPLIT_PREFIX: {"test_matched": (preds, labels), ...}
        -> {"m_accuracy": ...}; {"validation": ...} -> {"validation_accuracy": ...}."""
        out = {}
        for split, (preds, labels) in per_split.items():
            prefix = SPLIT_PREFIX[split]
            out.update({prefix + k: v for k, v in self.compute_metrics(preds, labels).items()})
        return out


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


@dataclass
class LabelledSplit:
    """The labelled examples of one split of a task, read from files or generated."""

    task: str  # canonical task key
    split: str  # "train", "validation", "test", "test_matched", "test_mismatched"
    source: str  # file path, "hf:glue/<name>/<split>" or "synthetic:<seed>/<task>"
    texts_a: list[str]
    texts_b: list[str] | None  # None for single-sentence tasks
    labels: list  # int class ids, float scores for regression, or (token tasks) one class id per word
    line_numbers: list[int] = field(default_factory=list)  # 1-based line of each kept row in the file
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason) of skipped rows

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None, seed: int = 0) -> LabelledSplit:
        """A random subset of `n` rows (same subset for the same seed), or self when n is None or >= len."""
        if n is None or n >= len(self):
            return self
        idx = sorted(np.random.default_rng(seed).choice(len(self), size=n, replace=False).tolist())
        return self.rows(idx)

    def rows(self, idx: Sequence[int], split: str | None = None, malformed: bool = True) -> LabelledSplit:
        """The rows `idx` (in that order), renamed `split` if given; `malformed` keeps the skipped rows' record."""

        def pick(xs):
            return [xs[i] for i in idx] if xs is not None else None

        lines = pick(self.line_numbers) if self.line_numbers else []
        return LabelledSplit(
            self.task,
            split or self.split,
            self.source,
            pick(self.texts_a),
            pick(self.texts_b),
            pick(self.labels),
            lines,
            list(self.malformed) if malformed else [],
        )
