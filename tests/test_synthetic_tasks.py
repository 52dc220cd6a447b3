"""The synthetic-language downstream tasks: labels correct by construction, splits disjoint and
deterministic, and a model that knows the word classes solves the tagging task through the real
fine-tuning pipeline while one that does not, fails."""

from collections import Counter

import pytest
import torch

from lab.finetune import loop as finetune
from lab.finetune import synthetic_tasks
from lab.finetune.glue import GLUE_TASKS
from lab.finetune.loop import FinetuneConfig
from lab.finetune.synthetic_tasks import SYNTHETIC_TASKS
from lab.finetune.tasks import get_task
from lab.hf import save_pretrained
from lab.model import Encoder, preset
from lab.synthetic import SyntheticLanguage
from lab.tokenizer import train_tokenizer


def classes_of(lang, text):
    return [lang.word_class[w] for w in text.split()]


def test_lookup_accepts_spellings_and_keeps_glue_names_distinct():
    assert get_task("Synth-Tag").name == "synth_tag" and get_task("SYNTHGRAM").name == "synth_gram"
    assert get_task("SST-2").name == "sst2"
    assert not {t.name for t in SYNTHETIC_TASKS} & {t.name for t in GLUE_TASKS}
    with pytest.raises(ValueError, match="unknown task 'synth'; known tasks: cola, .*synth_tag, synth_gram"):
        get_task("synth")
    assert get_task("synth_gram").main_key == "mcc" and get_task("mnli").main_key == "m_accuracy"


def test_tag_labels_are_the_generators_word_classes():
    lang = SyntheticLanguage(3)
    splits = get_task("synth_tag").load(synthetic_seed=3)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [300, 300, 500]
    assert set(lang.word_class.values()) == set(synthetic_tasks.WORD_CLASSES)
    for split in splits.values():
        for text, labels in zip(split.texts_a, split.labels):
            assert [synthetic_tasks.WORD_CLASSES[y] for y in labels] == classes_of(lang, text)
            assert text.endswith(" .") and synthetic_tasks.is_grammatical(classes_of(lang, text))
    # Every word class occurs in test; a third of each content class's words never occurs in train.
    test_words = {w for t in splits["test"].texts_a for w in t.split()}
    train_words = {w for t in splits["train"].texts_a for w in t.split()}
    assert {y for row in splits["test"].labels for y in row} == set(range(len(synthetic_tasks.WORD_CLASSES)))
    held_out = synthetic_tasks.held_out_words(3)
    for cls in synthetic_tasks.CONTENT_CLASSES:
        assert len(held_out & set(lang.classes[cls])) == len(lang.classes[cls]) // 3, cls
    assert not train_words & held_out and len(test_words & held_out) > 100
    assert held_out != synthetic_tasks.held_out_words(4)


def test_splits_are_deterministic_disjoint_and_seeded():
    for name in (t.name for t in SYNTHETIC_TASKS):
        a, b = get_task(name).load(synthetic_seed=0), get_task(name).load(synthetic_seed=0)
        assert a["train"].texts_a == b["train"].texts_a and a["test"].labels == b["test"].labels
        assert not set(a["train"].texts_a) & set(a["test"].texts_a)
        assert get_task(name).load(synthetic_seed=1)["train"].texts_a != a["train"].texts_a
    # The tasks draw their own sentences, not the pre-training corpus's.
    corpus = " ".join(SyntheticLanguage(0).documents(5_000))
    first = get_task("synth_tag").load(synthetic_seed=0)["train"].texts_a[:20]
    assert sum(text in corpus for text in first) < 5


def test_grammar_checker_on_hand_made_class_sequences():
    ok = ["det", "noun.person", "verb.consume", "det", "adj.taste", "noun.food", "punct"]
    assert synthetic_tasks.is_grammatical(ok)
    assert synthetic_tasks.is_grammatical(["pron", "verb.think", "comp", "name", "verb.move", "punct"])
    assert synthetic_tasks.is_grammatical(
        ["det", "noun.animal", "verb.grow", "prep.loc", "det", "noun.place", "conj", *ok]
    )
    assert not synthetic_tasks.is_grammatical(
        ["name", "verb.grow", "punct"]
    )  # verb.grow takes plants and animals
    assert not synthetic_tasks.is_grammatical(ok[:-1])  # no full stop
    assert not synthetic_tasks.is_grammatical(
        ["det", "noun.person", "verb.consume", "det", "noun.tool", "punct"]
    )
    assert not synthetic_tasks.is_grammatical(
        ["det", "adj.taste", "noun.person", "verb.move", "punct"]
    )  # adj class
    assert not synthetic_tasks.is_grammatical(
        ["pron", "verb.think", "comp", "pron", "verb.think", "comp", "name", "verb.move", "punct"]
    )  # fmt: skip  (one level of comp only)
    assert not synthetic_tasks.is_grammatical(["det", "verb.move", "noun.person", "punct"])
    # every sentence of the pre-training corpus is accepted
    lang = SyntheticLanguage(0)
    for doc in lang.documents(3_000):
        for sentence in doc.split(" . "):
            words = sentence.removesuffix(" .").split() + ["."]
            assert synthetic_tasks.is_grammatical([lang.word_class[w] for w in words]), sentence


def test_gram_labels_balanced_and_true_by_construction():
    lang = SyntheticLanguage(0)
    splits = get_task("synth_gram").load(synthetic_seed=0)
    for split in splits.values():
        assert Counter(split.labels) == {0: len(split) // 2, 1: len(split) - len(split) // 2}
        for text, label in zip(split.texts_a, split.labels):
            assert synthetic_tasks.is_grammatical(classes_of(lang, text)) == bool(label), text
    # Each corrupted sentence is its original with one word replaced or two adjacent words transposed;
    # both kinds occur. The originals are the task's stream of distinct sentences, in order.
    stream, originals = lang.sentences("task:synth_gram"), []
    while len(originals) < len(splits["train"]):
        words = next(stream)
        if words not in originals:
            originals.append(words)
    kinds = Counter()
    for original, text, label in zip(originals, splits["train"].texts_a, splits["train"].labels):
        words = text.split()
        diff = [i for i, (a, b) in enumerate(zip(original, words)) if a != b]
        if label == 1:
            assert words == original
        elif len(diff) == 1:
            kinds["replaced"] += 1
            assert lang.word_class[words[diff[0]]] != lang.word_class[original[diff[0]]]
        else:
            kinds["transposed"] += 1
            i, j = diff
            assert j == i + 1 and (words[i], words[j]) == (original[j], original[i])
    assert kinds["replaced"] > 300 and kinds["transposed"] > 300, kinds


def test_token_metrics_hand_computed():
    tag = synthetic_tasks.WORD_CLASSES.index
    gold = [tag("det"), tag("noun.food"), tag("verb.make"), tag("punct")]
    pred = [tag("det"), tag("noun.plant"), tag("verb.make"), tag("det")]
    m = get_task("synth_tag").compute_metrics(pred, gold)
    assert m == {"accuracy": 0.5, "content_accuracy": 0.5}
    # synth_gram: 3 of 4 right, tp=1 tn=2 fp=0 fn=1 -> mcc = 2 / sqrt(1*2*3*2)
    g = get_task("synth_gram").compute_metrics([1, 0, 0, 0], [1, 1, 0, 0])
    assert g["accuracy"] == 0.75 and g["mcc"] == pytest.approx(2 / 12**0.5)


# ---------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def synthetic_tokenizer(tmp_path_factory):
    lang = SyntheticLanguage(0)
    lexicon = " ".join(lang.word_class)  # every word once, so every word becomes one piece
    tokenizer = train_tokenizer([*lang.documents(30_000), lexicon], vocab_size=1000)
    return lang, tokenizer


def checkpoint(path, lang, tokenizer, one_hot: bool):
    """A tiny random encoder; with `one_hot`, word-table rows are the one-hot vector of the word's class."""
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0)
    model = Encoder(cfg)
    if one_hot:
        classes = lang.token_classes(tokenizer).classes
        classes[tokenizer.encode(".")[-1]] = "punct"
        with torch.no_grad():
            model.word_embeddings.weight.zero_()
            for token, cls in classes.items():
                model.word_embeddings.weight[token, synthetic_tasks.WORD_CLASSES.index(cls)] = 1.0
    save_pretrained(model, path, tokenizer=tokenizer)
    return path


def test_class_embedding_solves_tagging_and_random_does_not(synthetic_tokenizer, tmp_path):
    lang, tokenizer = synthetic_tokenizer
    assert lang.token_classes(tokenizer).coverage == 1.0  # every word is one piece
    scores = {}
    for one_hot in (True, False):
        ckpt = checkpoint(tmp_path / f"ckpt{one_hot}", lang, tokenizer, one_hot)
        cfg = FinetuneConfig(task="synth_tag", init=str(ckpt), out_dir=str(tmp_path / f"out{one_hot}"), epochs=4,
                             lr=3e-3, head_dropout=0.0, synthetic_seed=0, seeds=(1,), device="cpu")  # fmt: skip
        results = finetune.train(cfg)
        scores[one_hot] = results["metrics_per_seed"][0]
        assert results["splits"]["test"]["words"] == results["splits"]["test"]["words_in_split"]
    assert scores[True]["accuracy"] > 0.95, scores
    # a random table tags the words training showed, not the held-out ones
    assert scores[False]["accuracy"] < 0.9 and scores[False]["content_accuracy"] < 0.75, scores
