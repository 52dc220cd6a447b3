"""Two fine-tuning tasks on the synthetic language (lab/synthetic.py) whose labels are known by
construction; registered with the GLUE tasks by lab/finetune/tasks.py.

    get_task("synth_tag").load(synthetic_seed=0)   -> {"train": ..., "validation": ..., "test": LabelledSplit}

The synthetic tasks let a CPU run show downstream effects of pre-training in minutes, on data whose
ground truth is exact. Both are generated from `SyntheticLanguage(seed)`, the grammar and lexicon of
the `synthetic:SEED` pre-training corpus, from draws of their own (`SyntheticLanguage.sentences`):

* `synth_tag` (token level): tag every word with its latent class (35 word classes + the full stop).
  Few labelled sentences (300), none of which contains a third of each content class's words
  (`held_out_words`); validation and test sentences do. Those words, and the rare ones of the Zipf tail, can only be
  tagged from what pre-training put in their embeddings (and from their contexts), so the task
  measures the class structure the embeddings hold rather than what 300 sentences can teach.
* `synth_gram` (sequence level, CoLA-like): grammatical sentence (label 1) vs a corrupted one
  (label 0), balanced in every split. A corruption either replaces a content word by a word of another content
  class or transposes two adjacent words, and is kept only if the result is outside the grammar
  (`is_grammatical`, a parser of the generator's grammar), so every label 0 is truly ungrammatical.
  Class swaps range from blatant (a verb where a noun must be) to selectional (a tool as the object
  of `verb.consume`): telling them apart takes the word classes the pre-training should have learnt.

Train, validation (model selection only) and test (reported only) are disjoint: every sentence is drawn
once (deduplicated before the split), and no two corrupted sentences coincide either. The same seed
gives the same splits anywhere; another seed, other splits. Splits are `LabelledSplit`s: `texts_a` holds the sentences (words separated by
spaces); `labels` holds one class id per word (synth_tag) or 0/1 (synth_gram).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.finetune.task import LabelledSplit, Task, TaskDefaults
from lab.synthetic import ADJECTIVES, CLAUSE_VERBS, FUNCTION, NOUNS, VERBS, SyntheticLanguage

# Every word class of the language, in label-id order; "punct" is the class of the full stop.
WORD_CLASSES = (*FUNCTION, *NOUNS, *VERBS, *ADJECTIVES, "adv.manner", "num", "punct")
FUNCTION_CLASSES = frozenset(FUNCTION) | {"punct"}
CONTENT_CLASSES = tuple(c for c in WORD_CLASSES if c not in FUNCTION_CLASSES)


@dataclass(frozen=True)
class SyntheticTask(Task):
    """A task generated from the synthetic language; `official_sizes` are the sentences generated
    for train, validation and test."""

    generated = True

    def load(self, glue_dir: str | Path | None = None, synthetic_seed: int = 0) -> dict[str, LabelledSplit]:
        """The train, validation and test splits for `SyntheticLanguage(synthetic_seed)`; deterministic."""
        return generate(self, synthetic_seed)

    def score(self, name: str, preds: np.ndarray, gold: np.ndarray) -> float:
        if name != "content_accuracy":
            return super().score(name, preds, gold)
        content = np.isin(gold, [WORD_CLASSES.index(c) for c in CONTENT_CLASSES])
        return float((preds[content] == gold[content]).mean()) if content.any() else float("nan")


# The synthetic tasks are small (300 / 2,000 training sentences of ~8 words), so they get more epochs
# and higher rates than GLUE. Measured on the dev split of a pilot (the split that is now validation):
# synth_tag on a `tiny` discriminator pre-trained 600 steps on synthetic:0 against the same model
# untrained (accuracy 0.83 vs 0.79; at 1e-4 or 3e-4 it does not converge in its ~100 steps); synth_gram
# on a `tiny` discriminator pre-trained 1,500 steps on synthetic:0 reaches MCC ~0.74 at 3e-4 with its
# best epoch 14 of 20 (at 1e-3 it is noisier). synth_tag runs 40 epochs (400 steps): with 10, the
# `cpu-results` recipe's pre-trained discriminators (`tiny`, 1,500 steps) were still improving on
# validation at the last epoch in 58 of 60 runs.
SYNTHETIC_TASKS: tuple[SyntheticTask, ...] = (
    SyntheticTask(
        "synth_tag",
        "token",
        WORD_CLASSES,
        ("accuracy", "content_accuracy"),
        "accuracy",
        official_sizes=(300, 300, 500),
        defaults=TaskDefaults(epochs=40, lr=1e-3, batch_size=32, head_dropout=0.1, max_seq_len=128),
    ),
    SyntheticTask(
        "synth_gram",
        "sequence",
        ("0", "1"),
        ("mcc", "accuracy"),
        "mcc",
        official_sizes=(2000, 500, 1000),
        defaults=TaskDefaults(epochs=20, lr=3e-4, batch_size=32, head_dropout=0.1, max_seq_len=128),
    ),
)


# ---------------------------------------------------------------------------------------------- grammar


def _np_ends(classes: Sequence[str], i: int, allowed: Sequence[str], subject: bool) -> set[int]:
    """Positions where a noun phrase of one of the `allowed` classes starting at `i` can end:
    `name` | `pron` (subjects of class noun.person) | (det | num) [adjective of the noun] noun."""
    ends: set[int] = set()
    if i >= len(classes):
        return ends
    first = classes[i]
    if first == "name" and "name" in allowed:
        ends.add(i + 1)
    if first == "pron" and subject and "noun.person" in allowed:
        ends.add(i + 1)
    if first in ("det", "num"):
        for noun in allowed:
            if noun == "name":
                continue
            if i + 1 < len(classes) and classes[i + 1] == noun:
                ends.add(i + 2)
            if i + 2 < len(classes) and classes[i + 1] in NOUNS[noun] and classes[i + 2] == noun:
                ends.add(i + 3)
    return ends


def _clause_ends(classes: Sequence[str], i: int, depth: int) -> set[int]:
    """Positions where a clause starting at `i` can end (lab/synthetic.py `_Generator.clause`):
    subject verb (comp clause | [object] [adv.manner] [prep noun-phrase])."""
    ends: set[int] = set()
    for verb, (subjects, objects, phrases) in VERBS.items():
        for j in _np_ends(classes, i, subjects, subject=True):
            if j >= len(classes) or classes[j] != verb:
                continue
            k = j + 1
            if verb in CLAUSE_VERBS and depth == 0 and k < len(classes) and classes[k] == "comp":
                ends |= _clause_ends(classes, k + 1, depth + 1)
            for m in _np_ends(classes, k, objects, subject=False) if objects is not None else {k}:
                for n in {m, m + 1} if m < len(classes) and classes[m] == "adv.manner" else {m}:
                    ends.add(n)
                    for prep, nouns in phrases:
                        if n < len(classes) and classes[n] == prep:
                            ends |= _np_ends(classes, n + 1, nouns, subject=False)
    return ends


def is_grammatical(classes: Sequence[str]) -> bool:
    """Whether the grammar of lab/synthetic.py can produce this sequence of word classes as one sentence:
    clause [conj clause] "." (selectional constraints of verbs and adjectives included)."""
    body = len(classes) - 1
    if body < 1 or classes[-1] != "punct":
        return False
    for end in _clause_ends(classes, 0, 0):
        if end == body:
            return True
        if end < body and classes[end] == "conj" and body in _clause_ends(classes, end + 1, 0):
            return True
    return False


def _corrupt(words: list[str], lang: SyntheticLanguage, rng: random.Random, taken: set[str]) -> list[str]:
    """An ungrammatical variant of a sentence: a content word replaced by a word of another content
    class, or two adjacent words transposed; redrawn until the grammar rejects it and it is not in
    `taken` (the corrupted sentences of every split so far, which it joins)."""
    content = [i for i, w in enumerate(words) if lang.word_class[w] not in FUNCTION_CLASSES]
    for _ in range(200):
        out = list(words)
        if content and rng.random() < 0.5:
            i = rng.choice(content)
            cls = rng.choice([c for c in CONTENT_CLASSES if c != lang.word_class[words[i]]])
            out[i] = rng.choices(lang.classes[cls], weights=lang.word_weights(cls))[0]
        else:
            i = rng.randrange(len(words) - 2)  # never moves the final full stop
            out[i], out[i + 1] = out[i + 1], out[i]
        text = " ".join(out)
        if out != words and text not in taken and not is_grammatical([lang.word_class[w] for w in out]):
            taken.add(text)
            return out
    raise RuntimeError(f"found no ungrammatical variant of {' '.join(words)!r}")


# ---------------------------------------------------------------------------------------------- generation


def held_out_words(seed: int = 0) -> frozenset[str]:
    """A third of the words of every content class (a seeded choice) that synth_tag's training
    sentences never contain: validation and test tag them only from what pre-training put in their embeddings and
    from their contexts."""
    lang = SyntheticLanguage(seed)
    rng = random.Random(f"synth_tag:{seed}:held-out")
    return frozenset(
        w for c in CONTENT_CLASSES for w in rng.sample(lang.classes[c], len(lang.classes[c]) // 3)
    )


def generate(task: SyntheticTask, seed: int = 0) -> dict[str, LabelledSplit]:
    """The train, validation and test splits of a synthetic task for `SyntheticLanguage(seed)`, drawn in
    that order from one stream of sentences; deterministic."""
    t = task
    lang = SyntheticLanguage(seed)
    unseen = held_out_words(seed) if t.is_token_level else frozenset()
    stream, seen, parts = lang.sentences(f"task:{t.name}"), set(), {split: [] for split in t.splits}
    for split, size in zip(t.splits, t.official_sizes):
        while len(parts[split]) < size:
            words = next(stream)
            key = " ".join(words)
            if key in seen or (split == "train" and unseen.intersection(words)):
                continue
            seen.add(key)  # distinct sentences, so no two splits share one
            parts[split].append(words)
    source = f"synthetic:{seed}/{t.name}"
    out, corrupted_texts = {}, set()
    for split, part in parts.items():
        if t.is_token_level:
            texts = [" ".join(words) for words in part]
            labels = [[WORD_CLASSES.index(lang.word_class[w]) for w in words] for words in part]
        else:
            rng = random.Random(f"{t.name}:{seed}:{split}")
            corrupted = set(rng.sample(range(len(part)), len(part) // 2))  # balanced labels
            texts = [
                " ".join(_corrupt(w, lang, rng, corrupted_texts) if i in corrupted else w)
                for i, w in enumerate(part)
            ]
            labels = [0 if i in corrupted else 1 for i in range(len(part))]
        out[split] = LabelledSplit(t.name, split, source, texts, None, labels, list(range(1, len(part) + 1)))
    return out
