"""Fine-tuning data: a task's splits tokenised and padded once into tensors (`Encoded`) that live on
the training device, and the record of what was used against the official split sizes.

Inputs are `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, pairs truncated as `transformers`' fast
tokenizers do with `truncation="longest_first"`; token tasks (lab/finetune/synthetic_tasks.py) label the first piece of
each word and ignore the rest (`IGNORE`). A training or evaluation step slices its batch from the
padded tensors, so nothing is tokenised, padded or copied to the device per step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lab.finetune.config import FinetuneConfig
from lab.finetune.task import LabelledSplit, Task
from lab.tokenizer import Tokenizer
from lab.util import to_device

IGNORE = -100  # label of positions a token task does not score ([CLS], [SEP], non-first pieces, padding)


def _pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each side of a pair, as `transformers`' fast tokenizers' `longest_first`
    (tokenizers' `truncate_encodings`): the shorter side is kept whole if it fits in half the budget,
    the longer side gets the rest; when both exceed half, the shorter (a, on a tie) keeps
    floor(budget / 2) and the longer ceil(budget / 2)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_a > len_b:
        keep_b = min(len_b, budget // 2)
        return budget - keep_b, keep_b
    keep_a = min(len_a, budget // 2)
    return keep_a, budget - keep_a


def encode_split(split: LabelledSplit, tokenizer: Tokenizer, max_len: int) -> list[list[int]]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, at most max_len ids (pairs: see `_pair_lengths`)."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    texts_a = tokenizer.encode_batch(split.texts_a)
    if split.texts_b is None:
        return [[cls, *a[: max_len - 2], sep] for a in texts_a]
    rows = []
    for a, b in zip(texts_a, tokenizer.encode_batch(split.texts_b)):
        keep_a, keep_b = _pair_lengths(len(a), len(b), max_len - 3)
        rows.append([cls, *a[:keep_a], sep, *b[:keep_b], sep])
    return rows


def encode_words(split: LabelledSplit, tokenizer: Tokenizer, max_len: int) -> tuple[list, list]:
    """Token-task rows `[CLS] pieces [SEP]` and their labels: each word's class on its first piece,
    IGNORE elsewhere. Words cut by max_len lose their label (counted by the caller)."""
    sentences = [text.split() for text in split.texts_a]
    pieces = tokenizer.encode_batch([w for words in sentences for w in words])
    rows, label_rows, k = [], [], 0
    for words, classes in zip(sentences, split.labels):
        if len(words) != len(classes):
            raise ValueError(
                f"{split.source}: {len(words)} words but {len(classes)} labels in {' '.join(words)!r}"
            )
        ids, labels = [tokenizer.cls_id], [IGNORE]
        for y in classes:
            word = pieces[k] or [tokenizer.unk_id]
            ids += word
            labels += [y] + [IGNORE] * (len(word) - 1)
            k += 1
        rows.append([*ids[: max_len - 1], tokenizer.sep_id])
        label_rows.append([*labels[: max_len - 1], IGNORE])
    return rows, label_rows


@dataclass
class Encoded:
    """A split tokenised and padded once: ids [N, T], lengths [N], labels [N] or (token tasks) [N, T]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    lengths_host: np.ndarray  # the same lengths on the host, to plan batch widths without a sync
    labels_host: np.ndarray  # the same labels on the host, to score predictions without a copy back

    @classmethod
    def build(cls, rows: list[list[int]], labels, pad_id: int, dtype=torch.long) -> Encoded:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        if labels and isinstance(labels[0], list):  # token labels, padded with IGNORE
            y = torch.full(ids.shape, IGNORE, dtype=torch.long)
            for i, r in enumerate(labels):
                y[i, : len(r)] = torch.tensor(r)
        else:
            y = torch.tensor(labels, dtype=dtype)
        return cls(ids, torch.from_numpy(lengths), y, lengths, y.numpy())

    def __len__(self) -> int:
        return len(self.lengths_host)

    def to(self, device: torch.device) -> Encoded:
        """One copy per split to the device (pinned and asynchronous on CUDA)."""
        if device.type != "cuda":
            return self

        def move(t):
            return to_device(t, device)

        return Encoded(
            move(self.ids), move(self.lengths), move(self.labels), self.lengths_host, self.labels_host
        )

    def width(self, idx: np.ndarray, bucket: int) -> int:
        """Padded width of a batch: its longest row rounded up to a multiple of `bucket`."""
        longest = int(self.lengths_host[idx].max())
        return min(-(-longest // bucket) * bucket, self.ids.shape[1])

    def batch(self, idx: torch.Tensor, width: int):
        """(ids [B, W], attention mask [B, W], labels [B] or [B, W]) of the rows `idx` (on the device)."""
        ids = self.ids[idx, :width]  # [B, W]
        mask = (torch.arange(width, device=ids.device) < self.lengths[idx, None]).long()  # [B, W]
        labels = self.labels[idx] if self.labels.dim() == 1 else self.labels[idx, :width]
        return ids, mask, labels


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, generator: torch.Generator, mega_batches: int = 50
) -> torch.Tensor:
    """A shuffled order of the examples in which each run of `batch_size` holds similar lengths: the
    examples are shuffled, cut into mega-batches of `mega_batches * batch_size`, each sorted by length
    (longest first), cut into batches, and the batch order shuffled. Batches stay random draws of the
    data (an example's neighbours are random within its mega-batch) and pad far less."""
    order = torch.randperm(len(lengths), generator=generator).numpy()  # [N]
    size = mega_batches * batch_size
    grouped = []
    for start in range(0, len(order), size):
        mega = order[start : start + size]
        mega = mega[np.argsort(-lengths[mega], kind="stable")]  # longest first
        grouped += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    batches = torch.randperm(len(grouped), generator=generator).tolist()
    return torch.from_numpy(np.concatenate([grouped[b] for b in batches]))  # [N]


def load_data(cfg: FinetuneConfig, task: Task, tokenizer: Tokenizer, max_len: int):
    """(train Encoded, validation Encoded, {test split: Encoded}, data record for results.json): tokenised
    once. Train is capped by `max_train_examples`, validation and every test split alike by
    `max_eval_examples` (fixed slices, the same for every seed); each split's size is checked against
    the official one (a partial test split is warned about). The record is {split: {"role", "official", "loaded", "used", "malformed", "sliced"}}
    (token tasks add "words" scored and "words_in_split")."""
    splits = task.load(cfg.glue_dir or None, cfg.synthetic_seed or 0)
    encode = encode_words if task.is_token_level else lambda s, t, n: (encode_split(s, t, n), s.labels)
    label_dtype = torch.float if task.is_regression else torch.long
    encoded, record = {}, {}
    for split in task.splits:
        part = splits[split].take(cfg.max_train_examples if split == "train" else cfg.max_eval_examples)
        encoded[split] = Encoded.build(*encode(part, tokenizer, max_len), tokenizer.pad_id, label_dtype)
        record[split] = info = _split_record(task, splits[split], part)
        if task.is_token_level:
            info["words"] = int((encoded[split].labels_host != IGNORE).sum())
            info["words_in_split"] = sum(len(y) for y in part.labels)  # fewer when max_seq_len cuts words
        partial = info["official"] is not None and info["loaded"] != info["official"]
        if partial and info["role"] == "test":  # the reported numbers; results.json records every split
            warnings.warn(
                f"{task.name} {split} ({splits[split].source}) has {info['loaded']} examples, the official split "
                f"has {info['official']} ({info['malformed']} malformed row(s) skipped): its metrics are over a "
                "partial test set, recorded as such in results.json",
                stacklevel=3,
            )
    tests = {split: encoded[split] for split in task.test_splits}
    return encoded["train"], encoded["validation"], tests, record


def _split_record(task: Task, full: LabelledSplit, used: LabelledSplit) -> dict:
    """A split's role, how many examples it has against its official count, and how many were used."""
    return {
        "role": task.role(full.split),
        "used": len(used),
        "loaded": len(full),
        "official": task.official_size(full.split),
        "malformed": len(full.malformed),
        "sliced": len(used) < len(full),
    }
