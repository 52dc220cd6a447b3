from collections import Counter

from lab.synthetic import NOUNS, VERBS, SyntheticLanguage
from lab.tokenizer import train_tokenizer


def test_same_seed_same_language_and_corpus():
    a, b = SyntheticLanguage(3), SyntheticLanguage(3)
    assert a.word_class == b.word_class
    assert list(a.documents(5_000)) == list(b.documents(5_000))
    assert SyntheticLanguage(4).word_class != a.word_class
    small, large = list(a.documents(2_000)), list(a.documents(10_000))
    assert large[: len(small)] == small  # a smaller corpus is a prefix of a larger one


def test_class_structure():
    lang = SyntheticLanguage(0)
    content = [c for c in lang.classes if c not in lang.function_classes]
    assert 24 <= len(content) <= 32
    assert all(10 <= len(lang.classes[c]) <= 50 for c in content)
    assert len(set(lang.word_class)) == len(lang.word_class)  # every word has exactly one class
    docs = list(lang.documents(50_000))
    words = [w for d in docs for w in d.split()]
    assert 50_000 <= len(words) < 52_000
    assert all(w in lang.word_class for w in words)
    # Zipf within a class: the first-ranked word is the most frequent of its class.
    counts = Counter(words)
    for cls in ("noun.person", "verb.consume", "adj.color"):
        ranked = lang.classes[cls]
        assert counts[ranked[0]] > counts[ranked[-1]]
    # Selectional constraint: the word right after a consumption verb is a determiner/numeral, then an
    # optional adjective, then food or plant -- never, e.g., a place.
    consume = set(lang.classes["verb.consume"])
    objects = Counter()
    for doc in docs:
        seq = doc.split()
        for i, w in enumerate(seq[:-3]):
            if w in consume and lang.word_class[seq[i + 1]] in ("det", "num"):
                nxt = seq[i + 2] if lang.word_class[seq[i + 2]] in NOUNS else seq[i + 3]
                objects[lang.word_class[nxt]] += 1
    assert set(objects) == set(VERBS["verb.consume"][1])
    # Topics skew word choice: two documents' word distributions differ across topics.
    assert len({frozenset(Counter(d.split()).most_common(15)) for d in docs[:20]}) > 1


def test_default_corpus_is_sized():
    # generation speed is not asserted here (wall-clock bounds flake on a loaded machine): it is a
    # few seconds on a 2-core CPU, and `make demo` logs how long corpus preparation takes
    words = sum(len(d.split()) for d in SyntheticLanguage(0).documents())
    assert words >= 2_000_000


def test_token_classes_cover_words():
    lang = SyntheticLanguage(1)
    docs = list(lang.documents(60_000))
    tok = train_tokenizer(docs, vocab_size=2000)
    mapping = lang.token_classes(tok)
    assert mapping.coverage > 0.95 and mapping.token_coverage > 0.99
    for token_id, cls in list(mapping.classes.items())[:50]:
        word = tok.id_to_piece(token_id).lstrip("▁")
        assert lang.word_class[word] == cls
