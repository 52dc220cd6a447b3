"""An artificial language with known latent structure: the default pre-training corpus.

Why: the tug-of-war analysis asks whether the generator's and the discriminator's word embeddings keep
"coherent semantic structure". On natural text that structure is only known roughly; here every word
has a class by construction, so an analysis can measure how well each embedding table recovers it
(`SyntheticLanguage.word_class`, `token_classes`).

Design (everything is drawn from one seed, so `SyntheticLanguage(seed)` is the same language anywhere):

* Lexicon. 27 content classes -- 12 noun classes (`noun.person`, `noun.animal`, ..., `name`), 8 verb
  classes (`verb.consume`, `verb.move`, ...), 5 adjective classes, `adv.manner` and `num` -- with 10-50
  pronounceable pseudo-words each (2-3 syllables such as "bodame"), plus 8 function-word classes (`det`,
  `pron`, `prep.loc`, `prep.dir`, `prep.with`, `prep.time`, `conj`, `comp`) of 2-5 one-syllable words,
  and the full stop ".". Spelling carries no class information (no class-specific suffixes), so a
  class can only be recovered from the contexts a word occurs in.
* Frequencies. Within a class, words follow a Zipf law (weight 1/rank); class frequencies follow from
  the grammar below.
* Grammar with selectional constraints. A clause is built around a verb class whose frame fixes the
  classes that may fill the subject, the object and an optional prepositional phrase, e.g.
  `verb.consume`: subject ∈ {person, animal, name}, object ∈ {food, plant}; `verb.move`: no object,
  "prep.dir + place". Noun phrases are `det (adj) noun`, `num noun`, a `name`, or a `pron` (for people).
  Adjective classes attach only to some noun classes (`adj.taste` → food/plant, `adj.emotion` →
  person/animal). `verb.speak`/`verb.think` may take a `comp` + clause instead of an object, and two
  clauses may be joined by a `conj`. Sentences end with " .".
* Topics. Each document has one of 8 topics. A topic multiplies the weight of each verb class and each
  noun class by a random factor (log-normal) and favours a random quarter of the words of every class
  (x4), so documents differ in vocabulary the way topical text does.

Documents are single lines of space-separated lowercase words. A tokenizer trained on the corpus by
`lab.tokenizer.train_tokenizer` makes every pseudo-word one piece "▁word" (its vocabulary tops out near
920 pieces, whatever larger vocab_size is asked for): `token_classes` maps those piece ids to classes
and reports the coverage. The default corpus (`DEFAULT_WORDS` words) takes a few seconds to
generate and gives a few thousand steps of 128-token examples before repeating.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

DEFAULT_WORDS = 3_000_000  # about 3.6M tokens: ~28k examples of 128 tokens
NUM_TOPICS = 8
GENERATOR_VERSION = 1  # bump when the generated text changes, so cached corpora are not reused

# Noun classes with their adjective classes (which adjectives may modify them).
NOUNS = {
    "noun.person": ["adj.size", "adj.emotion"],
    "noun.animal": ["adj.color", "adj.size", "adj.emotion"],
    "noun.food": ["adj.color", "adj.taste"],
    "noun.plant": ["adj.color", "adj.size", "adj.taste"],
    "noun.tool": ["adj.color", "adj.size", "adj.quality"],
    "noun.vehicle": ["adj.color", "adj.size", "adj.quality"],
    "noun.material": ["adj.color", "adj.quality"],
    "noun.place": ["adj.size", "adj.quality"],
    "noun.abstract": ["adj.quality"],
    "noun.time": [],
    "noun.body": ["adj.size", "adj.color"],
    "name": [],
}
AGENTS = ["noun.person", "name"]
CREATURES = ["noun.person", "noun.animal", "name"]
CONCRETE = [
    "noun.animal",
    "noun.food",
    "noun.plant",
    "noun.tool",
    "noun.vehicle",
    "noun.material",
    "noun.body",
]
PLACE_PP = ("prep.loc", ["noun.place"])
TIME_PP = ("prep.time", ["noun.time"])
# Verb frames: subject classes, object classes (None: intransitive), optional prepositional phrases.
VERBS = {
    "verb.consume": (CREATURES, ["noun.food", "noun.plant"], [PLACE_PP, TIME_PP]),
    "verb.make": (AGENTS, ["noun.tool", "noun.vehicle", "noun.food"], [("prep.with", ["noun.material"])]),
    "verb.move": (CREATURES + ["noun.vehicle"], None, [("prep.dir", ["noun.place"]), TIME_PP]),
    "verb.perceive": (CREATURES, CONCRETE + ["noun.person", "name"], [PLACE_PP, TIME_PP]),
    "verb.speak": (AGENTS, ["noun.abstract"], [("prep.dir", ["noun.person", "name"])]),
    "verb.think": (AGENTS, ["noun.abstract"], [TIME_PP]),
    "verb.grow": (["noun.plant", "noun.animal"], None, [PLACE_PP, TIME_PP]),
    "verb.use": (
        AGENTS,
        ["noun.tool", "noun.vehicle", "noun.body"],
        [("prep.with", ["noun.person", "name"])],
    ),
}
CLAUSE_VERBS = ("verb.speak", "verb.think")  # may take `comp` + clause instead of an object
ADJECTIVES = ["adj.color", "adj.size", "adj.emotion", "adj.taste", "adj.quality"]
FUNCTION = {
    "det": 4,
    "pron": 3,
    "prep.loc": 3,
    "prep.dir": 2,
    "prep.with": 2,
    "prep.time": 3,
    "conj": 2,
    "comp": 2,
}
STOP = "."

ONSETS = list("ptkbdgmnlrsvfzh") + ["sh", "ch", "tr", "pl", "kr", "st"]
VOWELS = list("aeiou") + ["ai", "ou"]
CODAS = ["", "", "", "n", "l", "r", "s", "m"]


@dataclass(frozen=True)
class TokenClassMap:
    """Token id → class for the words that encode to exactly one piece."""

    classes: dict[int, str]  # token id -> class name
    coverage: float  # fraction of word types that are one piece
    token_coverage: float  # the same fraction weighted by the words' Zipf weight within their class
    missing: list[str]  # words that encode to several pieces


class SyntheticLanguage:
    """The lexicon, grammar and topics of one synthetic language; `documents()` generates text."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        rng = random.Random(f"lexicon:{seed}")
        sizes = {c: rng.randint(30, 50) for c in NOUNS}
        sizes.update({c: rng.randint(20, 40) for c in VERBS})
        sizes.update({c: rng.randint(12, 25) for c in ADJECTIVES})
        sizes.update({"adv.manner": rng.randint(12, 20), "num": 10})
        used: set[str] = {STOP}
        self.classes: dict[str, list[str]] = {}  # class -> words, most frequent first
        for name, count in FUNCTION.items():
            self.classes[name] = [self._new_word(rng, used, syllables=1) for _ in range(count)]
        for name, count in sizes.items():
            self.classes[name] = [
                self._new_word(rng, used, syllables=rng.choice((2, 2, 3))) for _ in range(count)
            ]
        self.word_class: dict[str, str] = {w: c for c, words in self.classes.items() for w in words}
        self.word_class[STOP] = "punct"
        self.function_classes = frozenset(FUNCTION) | {"punct"}
        # Topics: per-class weight factors and a favoured quarter of each class's words.
        self.topics = []
        for _ in range(NUM_TOPICS):
            factors = {c: float(np.exp(rng.gauss(0.0, 0.8))) for c in (*NOUNS, *VERBS)}
            favoured = {
                c: set(rng.sample(range(len(ws)), max(1, len(ws) // 4))) for c, ws in self.classes.items()
            }
            self.topics.append((factors, favoured))

    @staticmethod
    def _new_word(rng: random.Random, used: set[str], syllables: int) -> str:
        while True:
            if syllables == 1:
                word = rng.choice(ONSETS) + rng.choice(VOWELS)
            else:
                word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
                word += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
            if word not in used:
                used.add(word)
                return word

    def word_weights(self, cls: str, topic: int | None = None) -> np.ndarray:
        """Sampling probabilities of the words of `cls` (Zipf by rank, favoured words x4 under `topic`)."""
        weights = 1.0 / np.arange(1, len(self.classes[cls]) + 1)
        if topic is not None:
            for i in self.topics[topic][1][cls]:
                weights[i] *= 4.0
        return weights / weights.sum()

    # --- generation --------------------------------------------------------------------------------

    def documents(self, num_words: int = DEFAULT_WORDS) -> Iterator[str]:
        """Documents (one line of words each) until at least `num_words` words; a smaller corpus is a
        prefix of a larger one from the same seed."""
        return _Generator(self, num_words).run()

    def sentences(self, stream: str) -> Iterator[list[str]]:
        """Endless single sentences (lists of words ending with "."), each under a random topic, from the
        same grammar and lexicon as `documents` but from draws of their own named by `stream`, so a
        downstream task's sentences do not repeat the pre-training corpus's sequence of draws."""
        generator = _Generator(self, 0, stream=stream)
        while True:
            words: list[str] = []
            generator.sentence(generator.rng.randrange(NUM_TOPICS), words)
            yield words

    def token_classes(self, tokenizer) -> TokenClassMap:
        """Map token ids to classes for the words `tokenizer` encodes as a single piece."""
        classes, missing = {}, []
        weight_hit = weight_all = 0.0
        for cls, words in self.classes.items():
            for word, weight in zip(words, self.word_weights(cls)):
                ids = tokenizer.encode(word)
                weight_all += weight
                if len(ids) == 1 and ids[0] not in tokenizer.special_ids:
                    classes[ids[0]] = cls
                    weight_hit += weight
                else:
                    missing.append(word)
        total = len(self.word_class) - 1  # the full stop is not a word
        return TokenClassMap(classes, (total - len(missing)) / total, weight_hit / weight_all, missing)

    def describe(self) -> str:
        content = sum(len(w) for c, w in self.classes.items() if c not in self.function_classes)
        return (
            f"synthetic language seed={self.seed}: {len(self.classes)} classes, {content} content words, "
            f"{len(self.word_class) - content} function words, {NUM_TOPICS} topics"
        )


class _Generator:
    """One pass of text generation; word draws come from numpy in blocks, structure from `random`."""

    def __init__(self, language: SyntheticLanguage, num_words: int, stream: str = "corpus"):
        self.lang = language
        self.num_words = num_words
        self.rng = random.Random(f"{stream}:{language.seed}")
        # The corpus keeps its original numpy seed (cached corpora stay valid); other streams mix in
        # a checksum of their name.
        self.np_rng = np.random.default_rng(
            language.seed if stream == "corpus" else [language.seed, zlib.crc32(stream.encode())]
        )
        self.buffers: dict[tuple[int, str], list[str]] = {}

    def word(self, topic: int, cls: str) -> str:
        buffer = self.buffers.get((topic, cls))
        if not buffer:
            words = self.lang.classes[cls]
            draws = self.np_rng.choice(len(words), size=512, p=self.lang.word_weights(cls, topic))
            buffer = self.buffers[(topic, cls)] = [words[i] for i in draws]
        return buffer.pop()

    def pick(self, topic: int, classes: list[str]) -> str:
        factors = self.lang.topics[topic][0]
        return self.rng.choices(classes, weights=[factors[c] for c in classes])[0]

    def noun_phrase(self, topic: int, cls: str, out: list[str], subject: bool = False) -> None:
        rng = self.rng
        if cls == "name":
            out.append(self.word(topic, "name"))
        elif subject and cls == "noun.person" and rng.random() < 0.2:
            out.append(self.word(topic, "pron"))
        else:
            out.append(self.word(topic, "num" if rng.random() < 0.1 else "det"))
            adjectives = NOUNS[cls]
            if adjectives and rng.random() < 0.4:
                out.append(self.word(topic, rng.choice(adjectives)))
            out.append(self.word(topic, cls))

    def clause(self, topic: int, out: list[str], depth: int = 0) -> None:
        rng = self.rng
        verb = self.pick(topic, list(VERBS))
        subjects, objects, phrases = VERBS[verb]
        self.noun_phrase(topic, self.pick(topic, subjects), out, subject=True)
        out.append(self.word(topic, verb))
        if verb in CLAUSE_VERBS and depth == 0 and rng.random() < 0.3:
            out.append(self.word(topic, "comp"))
            self.clause(topic, out, depth + 1)
            return
        if objects is not None:
            self.noun_phrase(topic, self.pick(topic, objects), out)
        if rng.random() < 0.25:
            out.append(self.word(topic, "adv.manner"))
        if rng.random() < 0.5:
            prep, nouns = rng.choice(phrases)
            out.append(self.word(topic, prep))
            self.noun_phrase(topic, self.pick(topic, nouns), out)

    def sentence(self, topic: int, out: list[str]) -> None:
        """clause [conj clause] ."""
        self.clause(topic, out)
        if self.rng.random() < 0.15:
            out.append(self.word(topic, "conj"))
            self.clause(topic, out)
        out.append(STOP)

    def run(self) -> Iterator[str]:
        produced = 0
        while produced < self.num_words:
            topic = self.rng.randrange(NUM_TOPICS)
            words: list[str] = []
            for _ in range(self.rng.randint(6, 30)):
                self.sentence(topic, words)
            produced += len(words)
            yield " ".join(words)


def parse_synthetic(source: str) -> tuple[int, int]:
    """(seed, words) of a corpus spec `synthetic`, `synthetic:SEED` or `synthetic:seed=S,words=N`."""
    seed, words = 0, DEFAULT_WORDS
    options = source.partition(":")[2]
    try:
        for item in filter(None, options.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                seed = int(key)
            elif key.strip() in ("seed", "words"):
                seed, words = (int(value), words) if key.strip() == "seed" else (seed, int(value))
            else:
                raise ValueError(key)
    except ValueError:
        raise ValueError(
            f"corpus {source!r} is not understood; use synthetic, synthetic:SEED or synthetic:seed=S,words=N"
        ) from None
    if words < 1:
        raise ValueError(f"corpus {source!r}: words must be positive")
    return seed, words
