"""GLUE tasks: what each task's files look like, how to read them, how each task is scored, and its
fine-tuning defaults. Each task is one `GlueTask` entry of `GLUE_TASKS` (registered by lab/finetune/tasks.py).

Layout read by `GlueTask.load_split` (the one written by GLUE's `download_glue_data.py`):

    <glue_dir>/<TASK>/train.tsv
    <glue_dir>/<TASK>/dev.tsv                                  (MNLI: dev_matched.tsv + dev_mismatched.tsv)

Splits: GLUE's test labels are not public, so a task's test split(s), reported only, are the official
dev file(s): "test" (MNLI: "test_matched" and "test_mismatched", metric keys m_ / mm_). Its validation
split, which picks the fine-tuning epoch and nothing else, is carved from the official train file:
`validation_size` rows (10 % of train, at most 2,000) drawn with a seed fixed per task (`carve_validation`,
never the fine-tuning seed), so every fine-tuning seed and every pre-trained model sees the same
validation set. Those rows are removed from train before FinetuneConfig.max_train_examples caps what is
left. `official_sizes` are therefore (train file - validation, validation, dev file(s)): `glue_sizes`.

Files are tab-separated with quoting disabled (`csv.QUOTE_NONE`): GLUE sentences contain bare `"`
characters that a quoting reader would swallow across lines. A UTF-8 byte-order mark is ignored, a
missing final newline is fine, CoLA has no header (4 columns: source, label, mark, sentence).
Rows that cannot be used (wrong column count, unparsable label, label outside the task's set) are
never dropped silently: each is reported with its line number in a warning and kept in
`LabelledSplit.malformed`. When most rows are bad the file is the wrong one (a test split without
labels, another task's file) and loading fails instead.

Label ids follow the order of the HuggingFace `glue` dataset, so ids agree between `load_split`
and `load_hf_split`.

Fine-tuning defaults start from the official DeBERTaV3-large recipe and are scaled for the small
models this workbench trains:
  * learning rate x6: the official small/xsmall MNLI rate is 4.5e-5 against 7e-6 for large;
  * at least 3 epochs (the small-model MNLI recipe uses 3 where large uses 2);
  * warmup as a fraction of all steps (FinetuneConfig.warmup_ratio) instead of the paper's step
    counts, which assume the full training sets and would swallow a whole run on a slice;
  * batch size, head dropout and max length as in the paper (max length is capped by the model's).
"""

from __future__ import annotations

import csv
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from lab.finetune.task import LabelledSplit, Task, TaskDefaults
from lab.util import data_dir

# More than this fraction of malformed rows means the file is not the task's file: raise, don't warn.
MAX_MALFORMED_FRACTION = 0.5
VALIDATION_MAX = 2_000  # rows of the train file carved into the validation split: 10 %, at most this
# The file each split is read from (validation: carved from train) and its HuggingFace `glue` name.
_FILE = {
    "train": "train",
    "validation": "train",
    "test": "dev",
    "test_matched": "dev_matched",
    "test_mismatched": "dev_mismatched",
}
_HF_SPLIT = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def validation_size(n_train: int) -> int:
    """Rows of a train file of `n_train` rows carved into the validation split: 10 %, at most 2,000, at least 1."""
    return max(1, min(VALIDATION_MAX, n_train // 10))


def glue_sizes(train_file: int, *dev_files: int) -> tuple[int, ...]:
    """Official sizes of (train, validation, test splits) from the rows of GLUE's train and dev files."""
    carved = validation_size(train_file)
    return (train_file - carved, carved, *dev_files)


def carve_validation(t: Task, train_file: LabelledSplit) -> tuple[LabelledSplit, LabelledSplit]:
    """(train, validation): `validation_size` rows of the train file drawn with a seed fixed per task (the
    same for every fine-tuning seed and every model), and the rest, both in file order."""
    if len(train_file) < 2:
        raise ValueError(
            f"{train_file.source}: {len(train_file)} usable row(s); {t.name} needs at least 2 to carve a "
            "validation split from train"
        )
    rng = random.Random(f"glue:{t.name}:validation")  # a string seed: the same draw in every process
    held = set(rng.sample(range(len(train_file)), validation_size(len(train_file))))
    train = train_file.rows([i for i in range(len(train_file)) if i not in held])
    validation = train_file.rows(sorted(held), split="validation", malformed=False)
    return train, validation


@dataclass(frozen=True, kw_only=True)
class GlueTask(Task):
    """A sequence-level task read from GLUE's files (or the HuggingFace `glue` dataset)."""

    level: str = "sequence"
    dir_name: str  # folder under the GLUE root, e.g. "CoLA", "SST-2"
    header: bool  # whether the first line names the columns (False only for CoLA)
    num_columns: int | None  # expected columns without a header (CoLA: 4); with a header, its length
    text_columns: tuple[str | int, ...]  # one (single sentence) or two (pair) columns, by name or index
    label_column: str | int  # by name, or by index without a header
    hf_name: str  # config name of the HuggingFace "glue" dataset
    hf_text_columns: tuple[str, ...]  # the same text columns in the HuggingFace dataset
    score_range: tuple[float, float] = (0.0, 5.0)  # regression only: valid target range

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def load(self, glue_dir: str | Path | None = None, synthetic_seed: int = 0) -> dict[str, LabelledSplit]:
        """{"train": ..., "validation": ..., "test": ...} (MNLI: "test_matched", "test_mismatched") from the
        local GLUE layout; validation carved from train.tsv (`carve_validation`)."""
        train, validation = carve_validation(self, _read_split(self, "train", glue_dir))
        tests = {split: self.load_split(split, glue_dir) for split in self.test_splits}
        return {"train": train, "validation": validation, **tests}

    def split_path(self, split: str, glue_dir: str | Path | None = None) -> Path:
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")
        root = Path(glue_dir) if glue_dir is not None else data_dir() / "glue"
        return root / self.dir_name / f"{_FILE[split]}.tsv"

    def missing_files(self, glue_dir: str | Path | None = None) -> list[str]:
        paths = dict.fromkeys(self.split_path(split, glue_dir) for split in self.splits)
        return [str(p) for p in paths if not p.is_file()]

    def load_split(self, split: str, glue_dir: str | Path | None = None) -> LabelledSplit:
        """One split from `<glue_dir>/<TASK>/<file>.tsv` (glue_dir defaults to $LAB_DATA_DIR/glue): train and
        validation carved from train.tsv, a test split read from its dev file."""
        return self._pick(split, lambda s: _read_split(self, s, glue_dir))

    def read_file(self, file: str, glue_dir: str | Path | None = None) -> LabelledSplit:
        """One whole GLUE file, "train" or a dev file ("dev", MNLI "dev_matched"), before any carving."""
        splits = {_FILE[s]: s for s in (*self.test_splits, "train")}
        if file not in splits:
            raise ValueError(f"{self.name} has the files {list(splits)}, not {file!r}")
        return _read_split(self, splits[file], glue_dir)

    def load_hf_split(self, split: str) -> LabelledSplit:
        """The same split from `datasets.load_dataset("glue", ...)` (needs the package and network or cache)."""
        return self._pick(split, lambda s: _read_hf_split(self, s))

    def _pick(self, split: str, read) -> LabelledSplit:
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")
        if split in self.test_splits:
            return read(split)
        train, validation = carve_validation(self, read("train"))
        return train if split == "train" else validation


# Official DeBERTaV3-large recipe: epochs, warmup steps, lr, batch, head dropout, max len, from the
# fine-tuning scripts of microsoft/DeBERTa (`experiments/glue/*.sh`) and the paper's appendix (He, Gao,
# Chen, "DeBERTaV3", ICLR 2023, arXiv 2111.09543). WNLI is not in the paper's table: MRPC-like settings.
LR_SCALE = 6.0  # small-model rate / large-model rate in the official MNLI recipes (4.5e-5 / 7e-6)


def recipe(epochs: int, warmup: int, lr: float, batch: int, dropout: float, max_len: int) -> TaskDefaults:
    """The fine-tuning defaults scaled from the official large-model recipe (see the module's docstring);
    the paper's warmup step counts are not used (FinetuneConfig.warmup_ratio)."""
    return TaskDefaults(max(epochs, 3), lr * LR_SCALE, batch, dropout, max_len)


_ACC = ("accuracy",)
_F1_ACC = ("f1", "accuracy")
_PAIR = ("sentence1", "sentence2")
# One task per entry: name, dir_name, splits and the official sizes of its train and dev files (as written
# by `download_glue_data.py`, equal to the HuggingFace `glue` dataset's; a loaded split of another size is
# flagged next to its metric by lab/finetune/data.py), file columns, labels, metrics, the paper's recipe.
# a table, one entry per few lines, easier to read across than reflowed (so the formatter skips it)
GLUE_TASKS: tuple[GlueTask, ...] = (
    GlueTask(name="cola", dir_name="CoLA", official_sizes=glue_sizes(8551, 1043), header=False, num_columns=4,
             text_columns=(3,), label_column=1, labels=("0", "1"), metrics=("mcc",), main_metric="mcc",
             hf_name="cola", hf_text_columns=("sentence",), defaults=recipe(10, 50, 5.5e-6, 32, 0.1, 64)),
    GlueTask(name="sst2", dir_name="SST-2", official_sizes=glue_sizes(67349, 872), header=True, num_columns=None,
             text_columns=("sentence",), label_column="label", labels=("0", "1"), metrics=_ACC,
             main_metric="accuracy", hf_name="sst2", hf_text_columns=("sentence",),
             defaults=recipe(8, 500, 6e-6, 32, 0.1, 128)),
    GlueTask(name="mrpc", dir_name="MRPC", official_sizes=glue_sizes(3668, 408), header=True, num_columns=None,
             text_columns=("#1 String", "#2 String"), label_column="Quality", labels=("0", "1"),
             metrics=_F1_ACC, main_metric="accuracy", hf_name="mrpc", hf_text_columns=_PAIR,
             defaults=recipe(6, 50, 6e-6, 32, 0.2, 128)),
    GlueTask(name="stsb", dir_name="STS-B", official_sizes=glue_sizes(5749, 1500), header=True, num_columns=None,
             text_columns=_PAIR, label_column="score", labels=(), metrics=("pearson", "spearman"),
             main_metric="pearson", hf_name="stsb", hf_text_columns=_PAIR,
             defaults=recipe(4, 50, 7e-6, 32, 0.1, 128)),
    GlueTask(name="qqp", dir_name="QQP", official_sizes=glue_sizes(363846, 40430), header=True, num_columns=None,
             text_columns=("question1", "question2"), label_column="is_duplicate", labels=("0", "1"),
             metrics=_F1_ACC, main_metric="accuracy", hf_name="qqp", hf_text_columns=("question1", "question2"),
             defaults=recipe(6, 1000, 1e-5, 64, 0.2, 320)),
    GlueTask(name="mnli", dir_name="MNLI", test_splits=("test_matched", "test_mismatched"),
             official_sizes=glue_sizes(392702, 9815, 9832), header=True, num_columns=None, text_columns=_PAIR,
             label_column="gold_label", labels=("entailment", "neutral", "contradiction"), metrics=_ACC,
             main_metric="accuracy", hf_name="mnli", hf_text_columns=("premise", "hypothesis"),
             defaults=recipe(2, 500, 7e-6, 64, 0.3, 256)),
    GlueTask(name="qnli", dir_name="QNLI", official_sizes=glue_sizes(104743, 5463), header=True, num_columns=None,
             text_columns=("question", "sentence"), label_column="label",
             labels=("entailment", "not_entailment"), metrics=_ACC, main_metric="accuracy", hf_name="qnli",
             hf_text_columns=("question", "sentence"), defaults=recipe(6, 200, 7e-6, 64, 0.2, 512)),
    GlueTask(name="rte", dir_name="RTE", official_sizes=glue_sizes(2490, 277), header=True, num_columns=None,
             text_columns=_PAIR, label_column="label", labels=("entailment", "not_entailment"), metrics=_ACC,
             main_metric="accuracy", hf_name="rte", hf_text_columns=_PAIR,
             defaults=recipe(6, 50, 1e-5, 32, 0.3, 320)),
    GlueTask(name="wnli", dir_name="WNLI", official_sizes=glue_sizes(635, 71), header=True, num_columns=None,
             text_columns=_PAIR, label_column="label", labels=("0", "1"), metrics=_ACC, main_metric="accuracy",
             hf_name="wnli", hf_text_columns=_PAIR, defaults=recipe(6, 50, 6e-6, 32, 0.1, 128)),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- loading


def _expected_layout(t: GlueTask) -> str:
    files = ", ".join(dict.fromkeys(f"{_FILE[s]}.tsv" for s in t.splits))
    return f"<glue_dir>/{t.dir_name}/{{{files}}}"


def _read_split(t: GlueTask, split: str, glue_dir: str | Path | None) -> LabelledSplit:
    path = t.split_path(split, glue_dir)
    if not path.is_file():
        raise ValueError(
            f"{t.name} {_FILE[split]} file not found: {path}; expected the GLUE layout {_expected_layout(t)}"
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

    result = LabelledSplit(
        t.name, split, str(path), texts[0], texts[1] if t.is_pair else None, labels, line_numbers, malformed
    )
    _check_malformed(result, len(rows))
    return result


def _check_malformed(result: LabelledSplit, n_rows: int) -> None:
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


def _read_hf_split(t: GlueTask, split: str) -> LabelledSplit:
    try:
        import datasets  # optional (the dev extra): only this loader needs it
    except ImportError as e:
        raise ValueError(
            f"loading GLUE {t.name} from the HuggingFace hub needs the `datasets` package "
            f"(pip install datasets), or use load_split with local files laid out as {_expected_layout(t)}"
        ) from e
    try:
        ds = datasets.load_dataset("glue", t.hf_name, split=_HF_SPLIT[_FILE[split]])
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

    result = LabelledSplit(
        t.name,
        split,
        f"hf:glue/{t.hf_name}/{_HF_SPLIT[_FILE[split]]}",
        pick(texts[0]),
        pick(texts[1]) if t.is_pair else None,
        labels,
        [i + 1 for i in keep],
        malformed,
    )
    _check_malformed(result, len(raw))
    return result
