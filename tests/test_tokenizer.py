import io
from pathlib import Path

import pytest
import sentencepiece as spm

from lab.tokenizer import Tokenizer, train_tokenizer

TEXT = """the quick brown fox jumps over the lazy dog .
a stitch in time saves nine , and the early bird catches the worm .
all that glitters is not gold ; the pen is mightier than the sword .
"""


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text(TEXT * 200)
    return path


def test_special_ids_and_round_trip(corpus_file, tmp_path):
    tok = train_tokenizer([corpus_file], vocab_size=48, out_dir=tmp_path)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert tok.vocab_size == 48 and tok.mask_id == 47 and tok.num_pieces == 47
    assert tok.id_to_piece(tok.mask_id) == "[MASK]" and tok.piece_to_id("[MASK]") == tok.mask_id
    assert tok.special_ids == {0, 1, 2, 3, 47}
    for line in TEXT.splitlines():
        ids = tok.encode(line)
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == line
    assert (
        tok.decode([tok.cls_id, *tok.encode("the dog"), tok.mask_id, tok.sep_id, tok.pad_id])
        == "the dog [MASK]"
    )
    assert tok.encode_batch(["the dog", "a fox"]) == [tok.encode("the dog"), tok.encode("a fox")]
    loaded = Tokenizer.load(tmp_path)  # a folder with spm.model
    assert loaded.encode(TEXT) == tok.encode(TEXT) and loaded.mask_id == tok.mask_id


def test_vocab_size_is_an_upper_bound_by_default(corpus_file):
    tok = train_tokenizer([corpus_file], vocab_size=5000)
    assert 40 < tok.vocab_size < 5000 and tok.mask_id == tok.vocab_size - 1
    for word in {w for w in TEXT.split() if w.isalpha()}:  # whole words are seeded as candidates
        assert len(tok.encode(word)) == 1


def test_training_is_deterministic(corpus_file, tmp_path):
    first = train_tokenizer([corpus_file], vocab_size=48)
    second = train_tokenizer([TEXT * 200], vocab_size=48)  # same lines given as a string
    assert first.model_proto == second.model_proto
    assert first.fingerprint == second.fingerprint


def test_model_with_its_own_mask_piece_keeps_that_id(tmp_path):
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 50),
        model_writer=writer,
        vocab_size=50,
        pad_id=0,
        pad_piece="[PAD]",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        unk_id=3,
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )
    tok = Tokenizer(writer.getvalue())
    assert tok.mask_id == 4 and tok.vocab_size == 50 and tok.id_to_piece(4) == "[MASK]"


def test_bad_inputs_raise_clear_errors(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(junk)
    with pytest.raises(ValueError, match="lower vocab_size"):
        train_tokenizer([corpus_file], vocab_size=5000, hard_vocab_limit=True)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  \n"], vocab_size=100)
