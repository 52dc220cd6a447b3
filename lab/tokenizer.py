"""SentencePiece tokenizer with DeBERTa-v3's id layout.

The released DeBERTa-v3 `spm.model` is a unigram SentencePiece model whose first four pieces are the
specials, and `[MASK]` is appended after the last piece (the HF tokenizer adds it as id 128000):

    0 [PAD]   1 [CLS]   2 [SEP]   3 [UNK]   ...pieces...   N [MASK]   (N = number of pieces)

`Tokenizer` wraps any SentencePiece model with that layout (a model that already holds a `[MASK]` piece
keeps its id), and `train_tokenizer` trains a new one with the same layout. Training is deterministic:
one thread, no sentence shuffling, and the sample is bounded by us before SentencePiece sees it, so the
same texts give a byte-identical model.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from lab.util import atomic_write_bytes

SPECIALS = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}
MASK_PIECE = "[MASK]"
MODEL_FILENAME = "spm.model"


class Tokenizer:
    """A SentencePiece model plus the appended `[MASK]` id. `encode` never adds specials."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self.source = source  # where the model came from, for messages
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise ValueError(
                f"{source} is not a SentencePiece model ({err}); pass the path of an spm.model file"
            ) from None
        for piece, expected in SPECIALS.items():
            found = self.sp.piece_to_id(piece)
            if found != expected or self.sp.id_to_piece(expected) != piece:
                raise ValueError(
                    f"{source}: expected {piece} at id {expected} (DeBERTa-v3 layout PAD=0 CLS=1 SEP=2 UNK=3); "
                    f"train a model with lab.tokenizer.train_tokenizer or use DeBERTa-v3's spm.model"
                )
        self.num_pieces = self.sp.get_piece_size()
        in_model = self.sp.piece_to_id(MASK_PIECE)
        has_mask = self.sp.id_to_piece(in_model) == MASK_PIECE and in_model != self.sp.unk_id()
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = 0, 1, 2, 3
        self.mask_id = in_model if has_mask else self.num_pieces
        self.vocab_size = self.num_pieces if has_mask else self.num_pieces + 1  # embedding rows needed
        self.special_ids = frozenset({self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id})

    # --- loading and saving ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an `spm.model` file, or a folder holding one (a run's tokenizer/ or an HF export)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / MODEL_FILENAME
        if not path.is_file():
            raise ValueError(f"tokenizer model {path} does not exist; pass an spm.model file or its folder")
        return cls(path.read_bytes(), source=str(path))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `spm.model` into `out_dir` (atomically) and return its path."""
        path = Path(out_dir) / MODEL_FILENAME
        atomic_write_bytes(path, self.model_proto)
        return path

    @property
    def fingerprint(self) -> str:
        """sha256 of the model bytes: identifies the tokenizer in cache keys."""
        return hashlib.sha256(self.model_proto).hexdigest()

    # --- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; [PAD]/[CLS]/[SEP] are dropped and [MASK] is written as the string `[MASK]`."""
        words, run = [], []
        for i in (int(i) for i in ids):
            if i == self.mask_id:
                if run:
                    words.append(self.sp.decode(run))
                    run = []
                words.append(MASK_PIECE)
            elif i not in (self.pad_id, self.cls_id, self.sep_id):
                run.append(i)
        if run:
            words.append(self.sp.decode(run))
        return " ".join(w for w in words if w)

    def id_to_piece(self, i: int) -> str:
        if i == self.mask_id:
            return MASK_PIECE
        if not 0 <= i < self.num_pieces:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece` (e.g. '▁word'); unknown pieces give the [UNK] id, as in SentencePiece."""
        return self.mask_id if piece == MASK_PIECE else self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, source={self.source!r})"


def _lines(texts_or_files: Iterable[str | os.PathLike], max_chars: int) -> Iterator[str]:
    """Non-empty lines of the given texts (str) or files (Path), at most `max_chars` characters in all."""
    budget = max_chars
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise ValueError(f"tokenizer training file {path} does not exist")
            with open(path, encoding="utf-8", errors="replace") as f:
                source: Iterable[str] = f.readlines()
        else:
            source = str(item).splitlines()
        for line in source:
            line = line.strip()
            if not line:
                continue
            yield line
            budget -= len(line)
            if budget <= 0:
                return


def train_tokenizer(
    texts_or_files: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    model_type: str = "unigram",
    max_chars: int = 20_000_000,
    max_sentence_length: int = 1 << 15,
    character_coverage: float = 0.9995,
    seed: int = 0,
    hard_vocab_limit: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model with the DeBERTa-v3 id layout; `vocab_size` counts [MASK] too.

    `vocab_size` is an upper bound unless `hard_vocab_limit`: a corpus with few distinct words (the
    synthetic language has about 900) gives as many pieces as it supports.

    `texts_or_files` holds texts (str) and/or files (pathlib.Path); every non-empty line is one training
    sentence, and at most `max_chars` characters are used (the first ones, in order), which keeps
    training time and memory bounded and the result deterministic. The model is written to
    `out_dir/spm.model` when `out_dir` is given.
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least 16 (e.g. 4000)")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r} is not supported; use 'unigram' (DeBERTa-v3) or 'bpe'")
    if isinstance(texts_or_files, str | os.PathLike):
        texts_or_files = [texts_or_files]
    sentences = list(_lines(texts_or_files, max_chars))
    if not sentences:
        raise ValueError("no text to train a tokenizer on: every given text/file is empty")
    # SentencePiece seeds its unigram vocabulary with the maximal repeats of the text. A word that is
    # always followed by a space (common in synthetic text) is never a maximal repeat and so could never
    # become a piece; giving each distinct word once on its own line makes every word a candidate.
    sentences += dict.fromkeys(word for line in sentences for word in line.split())
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size - 1,  # [MASK] is appended after the pieces
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            pad_piece="[PAD]",
            bos_id=1,
            bos_piece="[CLS]",
            eos_id=2,
            eos_piece="[SEP]",
            unk_id=3,
            unk_piece="[UNK]",
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,  # we bounded the sample ourselves (max_chars)
            max_sentence_length=max_sentence_length,
            hard_vocab_limit=hard_vocab_limit,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training failed: {str(err).rstrip('.')}. With a small corpus, lower vocab_size"
        ) from None
    tokenizer = Tokenizer(model.getvalue(), source="trained")
    if out_dir is not None:
        tokenizer.source = str(tokenizer.save(out_dir))
    return tokenizer
