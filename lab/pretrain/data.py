"""Pre-training data: corpus sources → cached token file → packed examples → sharded, resumable batches.

Sources (`CorpusSpec.source`):
* `synthetic`, `synthetic:SEED` or `synthetic:seed=S,words=N` -- the embedded language of lab.synthetic.
* a file, folder (searched recursively) or glob of `.txt` (documents are blank-line-separated blocks, or
  one per line with `txt_documents="line"`), `.jsonl` (one JSON object per line, text in `text_field`;
  a corrupt line is counted and reported with its line number, not fatal) and WikiText
  `wiki.*.tokens` / `wiki.*.raw` files (documents start at the top-level ` = Title = ` headings; the
  ` @-@ `, ` @,@ `, ` @.@ ` number/hyphen splits are joined back to `-`, `,`, `.` so the text reads
  like normal text; `<unk>` is kept as written).
* `hf:NAME[:CONFIG]` -- streamed with `datasets.load_dataset` (needs the package and network access).
Undecodable bytes are replaced by U+FFFD, counted, and reported per file as a warning.

Token cache: a corpus is tokenised once, streaming in chunks of documents, into a flat file of token ids
(uint16 when the vocabulary fits, else uint32) under `cache_dir()/tokens/<key>/` with a `meta.json`.
The key hashes the corpus identity (the files' sha256, or the synthetic seed and size), the
tokenizer model bytes and the format version; the folder is written under a temporary name and renamed,
so a reader never sees half a cache. Documents are separated by one [SEP] (as DeBERTa/BERT mark segment
boundaries); the stream is otherwise packed continuously across documents, like ELECTRA.

Examples: example i = [CLS] + tokens[i*(L-2) : (i+1)*(L-2)] + [SEP] (L = seq_len, no padding, so the
attention mask is all ones); the trailing partial example is dropped. The held-out split is the last
`heldout_fraction` of the examples (at least one).

Batches: `BatchIterator` reads the infinite stream perm(seed, 0) ++ perm(seed, 1) ++ ... where
perm(seed, epoch) is a torch.randperm seeded from (seed, epoch). Global batch k is stream items
[k*B*W, (k+1)*B*W) (B = batch_size per rank, W = world_size); rank r takes its r-th slice of B. The
position is the number of global batches consumed, so a run resumed with the same position continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lab.synthetic import GENERATOR_VERSION, SyntheticLanguage, parse_synthetic
from lab.tokenizer import Tokenizer, train_tokenizer
from lab.util import atomic_write_json, cache_dir, sha256_file

CACHE_VERSION = 1  # bump when the token file layout or document reading changes
TOKENIZER_SAMPLE_CHARS = 20_000_000  # a trained tokenizer sees at most this many characters
ENCODE_CHUNK = 512  # documents encoded per call, so memory stays bounded
FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
WIKITEXT_FILE = re.compile(r"^wiki\..+\.(tokens|raw)$")
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # top-level heading; subsections are " = = X = = "
WIKITEXT_SPLIT = re.compile(r" @([-,.])@ ")
SOURCES_HELP = (
    "'synthetic', a .txt/.jsonl/wiki.*.tokens file, a folder or glob of them, or 'hf:NAME[:CONFIG]'"
)


@dataclass(frozen=True)
class CorpusSpec:
    source: str = "synthetic"  # see the module docstring for the accepted forms
    txt_documents: str = "blank"  # .txt files: "blank" = blank-line-separated blocks, "line" = one per line
    text_field: str = "text"  # .jsonl and hf: the field that holds the text
    hf_split: str = "train"  # hf: the split to stream
    max_documents: int | None = None  # read at most this many documents (None: all)

    def __post_init__(self):
        if self.txt_documents not in ("blank", "line"):
            raise ValueError(f"txt_documents={self.txt_documents!r}: use 'blank' or 'line'")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents={self.max_documents}: use a positive count or None")


@dataclass
class Corpus:
    """An opened corpus: `documents()` streams it again on each call and fills `issues` as it reads."""

    name: str  # the source as given
    identity: dict  # what the cache key hashes: changes whenever the text may change
    read: Callable[[dict], Iterator[str]]  # read(issues) -> documents
    max_documents: int | None = None
    language: SyntheticLanguage | None = None  # synthetic corpora only
    issues: dict = field(default_factory=dict)  # e.g. {"undecodable_bytes": 3, "bad_json_lines": 1}

    def documents(self) -> Iterator[str]:
        self.issues.clear()
        for i, doc in enumerate(self.read(self.issues)):
            if self.max_documents is not None and i >= self.max_documents:
                return
            yield doc


# --- sources ---------------------------------------------------------------------------------------


def open_corpus(spec: str | CorpusSpec) -> Corpus:
    """Resolve a corpus spec (or source string) to a `Corpus`; raises ValueError for a bad source."""
    spec = CorpusSpec(source=spec) if isinstance(spec, str) else spec
    source = spec.source.strip()
    if source == "synthetic" or source.startswith("synthetic:"):
        seed, words = parse_synthetic(source)
        lang = SyntheticLanguage(seed)
        identity = {"synthetic": seed, "words": words, "version": GENERATOR_VERSION}
        return Corpus(source, identity, lambda issues: lang.documents(words), spec.max_documents, lang)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise ValueError(f"corpus {source!r} names no dataset; use hf:NAME or hf:NAME:CONFIG")
        identity = {"hf": name, "config": config or None, "split": spec.hf_split, "field": spec.text_field}
        return Corpus(
            source, identity, lambda issues: _read_hf(name, config or None, spec), spec.max_documents
        )
    files = _find_files(source)
    identity = {
        # the files' content, not their paths or times: a copy elsewhere (a GPU machine's checkout, a
        # benchmark's scratch folder) finds the tokenizer and tokens already made from the same text
        "files": [sha256_file(p) for p in files],
        "txt_documents": spec.txt_documents,
        "text_field": spec.text_field,
    }

    def read(issues: dict) -> Iterator[str]:
        for path in files:
            yield from _read_file(path, spec, issues)

    return Corpus(source, identity, read, spec.max_documents)


def _find_files(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise ValueError(f"corpus glob {source!r} matches no file; pass {SOURCES_HELP}")
        return [p.resolve() for p in files]
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"corpus path {source!r} does not exist; pass {SOURCES_HELP}")
    if path.is_file():
        return [path.resolve()]
    files = sorted(p.resolve() for p in path.rglob("*") if p.is_file() and _format(p) != "unknown")
    if not files:
        raise ValueError(f"corpus folder {source!r} holds no .txt, .jsonl or wiki.*.tokens/.raw file")
    return files


def _format(path: Path) -> str:
    if WIKITEXT_FILE.match(path.name):
        return "wikitext"
    return FORMATS.get(path.suffix.lower(), "unknown")


def _decode(line: bytes) -> tuple[str, int]:
    """UTF-8 text of `line` with undecodable bytes replaced by U+FFFD, and how many bytes were bad."""
    try:
        return line.decode("utf-8"), 0
    except UnicodeDecodeError:
        parts, bad, pos = [], 0, 0
        while True:
            try:
                parts.append(line[pos:].decode("utf-8"))
                return "".join(parts), bad
            except UnicodeDecodeError as err:
                parts += [line[pos : pos + err.start].decode("utf-8"), "\ufffd"]
                bad += err.end - err.start
                pos += err.end


def _lines(path: Path, issues: dict) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) of a file read in binary, counting undecodable bytes."""
    bad_bytes, first_bad = 0, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text, bad = _decode(raw)
            if bad:
                bad_bytes += bad
                first_bad = first_bad or number
            yield number, text.rstrip("\r\n")
    if bad_bytes:
        issues["undecodable_bytes"] = issues.get("undecodable_bytes", 0) + bad_bytes
        warnings.warn(
            f"{path}: {bad_bytes} undecodable byte(s) replaced by U+FFFD (first on line {first_bad})",
            stacklevel=2,
        )


def _read_file(path: Path, spec: CorpusSpec, issues: dict) -> Iterator[str]:
    kind = _format(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, spec.text_field, issues)
    elif kind == "wikitext":
        yield from _read_wikitext(path, issues)
    elif spec.txt_documents == "line":
        yield from (text.strip() for _, text in _lines(path, issues) if text.strip())
    else:
        block: list[str] = []
        for _, text in _lines(path, issues):
            if text.strip():
                block.append(text.strip())
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _read_jsonl(path: Path, text_field: str, issues: dict) -> Iterator[str]:
    bad: list[int] = []
    for number, line in _lines(path, issues):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[text_field]
            if not isinstance(text, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(number)
            continue
        if text.strip():
            yield text
    if bad:
        issues["bad_json_lines"] = issues.get("bad_json_lines", 0) + len(bad)
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warnings.warn(
            f"{path}: skipped {len(bad)} line(s) that are not JSON objects with a string {text_field!r} "
            f"field (line {shown})",
            stacklevel=2,
        )


def _read_wikitext(path: Path, issues: dict) -> Iterator[str]:
    doc: list[str] = []
    for _, line in _lines(path, issues):
        if WIKITEXT_TITLE.match(line) and doc:
            yield "\n".join(doc)
            doc = []
        text = WIKITEXT_SPLIT.sub(r"\1", line).strip()
        if text.startswith("= ") and text.endswith(" ="):
            text = text.strip("= ")  # a heading keeps its words, not its markup
        if text:
            doc.append(text)
    if doc:
        yield "\n".join(doc)


def _read_hf(name: str, config: str | None, spec: CorpusSpec) -> Iterator[str]:
    try:
        import datasets  # optional (the dev extra): only an hf: corpus needs it
    except ImportError:
        raise ValueError(
            f"corpus hf:{name} needs the `datasets` package: pip install datasets (or pass local files)"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=spec.hf_split, streaming=True)
    except Exception as err:  # network, unknown name, missing config: one clear message
        raise ValueError(
            f"could not load hf:{name}{':' + config if config else ''} split {spec.hf_split!r} ({err}); "
            "check the name and network access, or download the text and pass local files"
        ) from None
    for row in rows:
        text = row.get(spec.text_field)
        if isinstance(text, str) and text.strip():
            yield text


# --- tokenisation and the token cache --------------------------------------------------------------


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def corpus_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """A unigram tokenizer trained on the first TOKENIZER_SAMPLE_CHARS characters of `corpus`, cached."""
    folder = (
        cache_dir()
        / "tokenizers"
        / _key(
            {
                "corpus": corpus.identity,
                "max_documents": corpus.max_documents,
                "vocab_size": vocab_size,
                "sample": TOKENIZER_SAMPLE_CHARS,
                "version": CACHE_VERSION,
            }
        )
    )
    if (folder / "spm.model").is_file():
        return Tokenizer.load(folder)
    try:
        return train_tokenizer(corpus.documents(), vocab_size, folder, max_chars=TOKENIZER_SAMPLE_CHARS)
    except ValueError as err:
        raise ValueError(
            f"corpus {corpus.name!r} has no text to train a tokenizer on ({err}); check the files"
        ) from None


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer) -> tuple[np.ndarray, dict, bool]:
    """The corpus as one memory-mapped array of token ids, its meta.json contents, and whether the
    token file came from the cache."""
    root = cache_dir() / "tokens"
    key = _key(
        {
            "corpus": corpus.identity,
            "max_documents": corpus.max_documents,
            "tokenizer": tokenizer.fingerprint,
            "version": CACHE_VERSION,
        }
    )
    folder = root / key
    from_cache = (folder / "meta.json").is_file()
    if not from_cache:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            meta = _write_tokens(corpus, tokenizer, tmp / "tokens.bin")
            atomic_write_json(tmp / "meta.json", meta)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same cache first: keep theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    meta["cache"] = str(folder)
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    return tokens, meta, from_cache


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, path: Path) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    num_tokens = num_documents = 0
    separator = np.array([tokenizer.sep_id], dtype=dtype)

    def flush(chunk: list[str], f) -> None:
        nonlocal num_tokens, num_documents
        for ids in tokenizer.encode_batch(chunk):
            if not ids:
                continue
            if num_documents:
                f.write(separator.tobytes())
                num_tokens += 1
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            num_tokens += len(ids)
            num_documents += 1

    with open(path, "wb") as f:
        chunk: list[str] = []
        for doc in corpus.documents():
            chunk.append(doc)
            if len(chunk) == ENCODE_CHUNK:
                flush(chunk, f)
                chunk = []
        flush(chunk, f)
    if num_tokens == 0:
        raise ValueError(f"corpus {corpus.name!r} has no text; check the files (or the jsonl text field)")
    return {
        "corpus": corpus.name,
        "identity": corpus.identity,
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "issues": dict(corpus.issues),
    }


# --- packed examples and batches -------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Examples [CLS] + (seq_len - 2) corpus tokens + [SEP], numbered from `start` in the token file."""

    def __init__(self, tokens: np.ndarray, seq_len: int, start: int, length: int, cls_id: int, sep_id: int):
        self.tokens, self.seq_len, self.start, self.length = tokens, seq_len, start, length
        self.cls_id, self.sep_id = cls_id, sep_id

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.length <= i < self.length:
            raise IndexError(f"example {i} is outside a dataset of {self.length}")
        return self.batch([i % self.length])[0]

    def batch(self, indices) -> torch.Tensor:
        """LongTensor[B, seq_len] of the examples at `indices`."""
        body = self.seq_len - 2
        rows = np.asarray(indices, dtype=np.int64) + self.start
        ids = self.tokens[rows[:, None] * body + np.arange(body)]  # [B, L-2]
        out = torch.empty(len(rows), self.seq_len, dtype=torch.long)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        out[:, 1:-1] = torch.from_numpy(ids.astype(np.int64))
        return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class BatchIterator:
    """Infinite batches LongTensor[batch_size, seq_len] for one rank; see the module docstring."""

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or position < 0:
            raise ValueError(
                f"BatchIterator(batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                f"position={position}): need batch_size >= 1, 0 <= rank < world_size, position >= 0"
            )
        if len(dataset) == 0:
            raise ValueError("BatchIterator needs a dataset with at least one example")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._epoch, self._perm = -1, None

    def _items(self, begin: int, end: int) -> np.ndarray:
        """Stream items [begin, end) of perm(seed, 0) ++ perm(seed, 1) ++ ..."""
        n, parts = len(self.dataset), []
        while begin < end:
            epoch, offset = divmod(begin, n)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                self._epoch, self._perm = epoch, torch.randperm(n, generator=generator)
            take = min(end - begin, n - offset)
            parts.append(self._perm[offset : offset + take])
            begin += take
        return torch.cat(parts).numpy()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        begin = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        return self.dataset.batch(self._items(begin, begin + self.batch_size))

    def state(self) -> dict:
        """What a checkpoint needs to resume: pass `position` back to a new BatchIterator."""
        return {
            "seed": self.seed,
            "position": self.position,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "examples_consumed": self.position * self.batch_size * self.world_size,
        }


# --- the whole pipeline ----------------------------------------------------------------------------


@dataclass
class PreparedCorpus:
    tokenizer: Tokenizer
    train: PackedDataset
    heldout: PackedDataset
    token_counts: np.ndarray  # [vocab_size] int64 counts over the train split, [CLS]/[SEP] included
    token_classes: dict[int, str] | None  # synthetic only: token id -> word class
    meta: dict  # the token cache's meta.json plus the cache folder
    from_cache: bool  # True when the token file already existed

    def describe(self) -> str:
        m = self.meta
        lines = [
            f"corpus {m['corpus']}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, "
            f"vocab {self.tokenizer.vocab_size:,}",
            f"examples of {self.train.seq_len} tokens: {len(self.train):,} train, {len(self.heldout):,} held out",
            f"token cache {m['cache']}" + (" (reused)" if self.from_cache else ""),
        ]
        if m["issues"]:
            lines.append("reading issues: " + ", ".join(f"{k}={v}" for k, v in sorted(m["issues"].items())))
        if self.token_classes is not None:
            lines.append(f"token classes: {len(self.token_classes):,} tokens with a known word class")
        return "\n".join(lines)


def prepare_corpus(
    corpus: str | CorpusSpec | Corpus,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    vocab_size: int = 4000,
    seq_len: int = 128,
    heldout_fraction: float = 0.05,
) -> PreparedCorpus:
    """Open, tokenise (cached) and pack a corpus. Without `tokenizer`, one with at most `vocab_size`
    pieces is trained on the corpus (cached by corpus and vocab_size)."""
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len} leaves no room between [CLS] and [SEP]; use e.g. 128")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.05")
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    if tokenizer is None:
        tokenizer = corpus_tokenizer(corpus, vocab_size)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    tokens, meta, from_cache = tokenize_corpus(corpus, tokenizer)
    examples = len(tokens) // (seq_len - 2)
    if examples < 2:
        raise ValueError(
            f"corpus {corpus.name!r} has {len(tokens)} tokens, fewer than two examples of seq_len={seq_len} "
            f"({2 * (seq_len - 2)} tokens); use more text or a smaller seq_len"
        )
    heldout = max(1, round(examples * heldout_fraction))
    train = examples - heldout
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    body = train * (seq_len - 2)
    for begin in range(0, body, 1 << 24):  # chunks keep memory bounded on a large corpus
        counts += np.bincount(tokens[begin : min(body, begin + (1 << 24))], minlength=tokenizer.vocab_size)
    counts[tokenizer.cls_id] += train
    counts[tokenizer.sep_id] += train
    classes = corpus.language.token_classes(tokenizer).classes if corpus.language is not None else None

    def make(start, n):
        return PackedDataset(tokens, seq_len, start, n, tokenizer.cls_id, tokenizer.sep_id)

    return PreparedCorpus(tokenizer, make(0, train), make(train, heldout), counts, classes, meta, from_cache)
