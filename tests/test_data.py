import json
import os
import sys

import numpy as np
import pytest
import torch

from lab.pretrain.data import BatchIterator, CorpusSpec, PackedDataset, open_corpus, prepare_corpus
from lab.synthetic import SyntheticLanguage

SMALL_SYNTHETIC = "synthetic:seed=1,words=20000"


@pytest.fixture
def synthetic():  # function scope: the cache folder of conftest's autouse fixture must be set first
    return prepare_corpus(SMALL_SYNTHETIC, vocab_size=2000, seq_len=32)


def test_synthetic_corpus_is_deterministic_with_classes(synthetic):
    docs = list(open_corpus(SMALL_SYNTHETIC).documents())
    assert docs == list(SyntheticLanguage(1).documents(20_000))
    assert synthetic.token_classes and len(synthetic.token_classes) > 800
    lang = SyntheticLanguage(1)
    for token_id, cls in synthetic.token_classes.items():
        assert lang.word_class[synthetic.tokenizer.id_to_piece(token_id).lstrip("▁")] == cls
    assert synthetic.token_counts.shape == (synthetic.tokenizer.vocab_size,)
    assert synthetic.token_counts.sum() == len(synthetic.train) * 32
    assert "token classes" in synthetic.describe()


def test_packing_layout(synthetic):
    tok, train, heldout = synthetic.tokenizer, synthetic.train, synthetic.heldout
    examples = torch.stack([train[i] for i in range(len(train))] + [heldout[i] for i in range(len(heldout))])
    assert examples.shape[1] == 32 and examples.dtype == torch.long
    assert (examples[:, 0] == tok.cls_id).all() and (examples[:, -1] == tok.sep_id).all()
    inner = examples[:, 1:-1]
    others = set(inner.unique().tolist()) & tok.special_ids
    assert others == {tok.sep_id}  # only the separators between documents
    body = inner.reshape(-1).numpy()  # examples tile the token file with no gap or overlap
    tokens = np.memmap(
        os.path.join(synthetic.meta["cache"], "tokens.bin"), dtype=synthetic.meta["dtype"], mode="r"
    )
    assert np.array_equal(body, tokens[: len(body)])
    assert len(heldout) == max(1, round((len(train) + len(heldout)) * 0.05))
    assert torch.equal(train.batch([3, 0]), torch.stack([train[3], train[0]]))


def test_second_prepare_reuses_the_token_cache():
    source = "synthetic:seed=2,words=10000"  # used by no other test, so the first prepare is a miss
    first = prepare_corpus(source, vocab_size=2000, seq_len=32)
    tokens_file = os.path.join(first.meta["cache"], "tokens.bin")
    before = os.stat(tokens_file).st_mtime_ns
    again = prepare_corpus(source, vocab_size=2000, seq_len=32)
    assert again.from_cache and not first.from_cache
    assert os.stat(tokens_file).st_mtime_ns == before
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert torch.equal(again.train[5], first.train[5])
    other_length = prepare_corpus(source, tokenizer=first.tokenizer, seq_len=16)
    assert other_length.from_cache  # seq_len only changes the packing, not the token file


def test_file_caches_are_keyed_by_content_not_path_or_time(tmp_path, monkeypatch):
    """A copy of a corpus elsewhere, with another mtime, finds its tokenizer and token file (what a GPU
    machine's copy of prepared data relies on); one changed byte does not."""
    import lab.pretrain.data as data

    text = "\n\n".join(" ".join(f"w{(7 * i + j) % 300}" for j in range(60)) for i in range(80)) + "\n"
    first = tmp_path / "a" / "corpus.txt"
    first.parent.mkdir()
    first.write_text(text)
    prepared = prepare_corpus(str(first), vocab_size=200, seq_len=32)
    copy = tmp_path / "b" / "renamed.txt"
    copy.parent.mkdir()
    copy.write_text(text)
    os.utime(copy, ns=(1, 1))
    monkeypatch.setattr(
        data, "train_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was trained again")
    )
    again = prepare_corpus(str(copy), vocab_size=200, seq_len=32)
    assert again.from_cache and again.tokenizer.fingerprint == prepared.tokenizer.fingerprint
    assert open_corpus(str(copy)).identity == open_corpus(str(first)).identity
    copy.write_text(text.replace("w1 ", "w2 ", 1))
    assert open_corpus(str(copy)).identity != open_corpus(str(first)).identity


def test_batch_iterator_deterministic_resumable_and_sharded(synthetic):
    train = synthetic.train
    first = [next(BatchIterator(train, 4, seed=7)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    run = BatchIterator(train, 4, seed=7)
    batches = [next(run) for _ in range(len(train))]  # crosses several epoch boundaries
    assert run.state()["position"] == len(train)
    resumed = BatchIterator(train, 4, seed=7, position=5)
    assert all(torch.equal(next(resumed), b) for b in batches[5:12])
    assert not torch.equal(next(BatchIterator(train, 4, seed=8)), batches[0])
    global_run = BatchIterator(train, 6, seed=3)
    ranks = [BatchIterator(train, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(len(train) // 6 + 3):
        assert torch.equal(torch.cat([next(r) for r in ranks]), next(global_run))
    # One epoch sees every example exactly once.
    one = BatchIterator(PackedDataset(np.arange(12 * 8, dtype=np.uint16), 10, 0, 12, 1, 2), 4, seed=0)
    seen = torch.cat([next(one) for _ in range(3)])[:, 1:-1]
    assert sorted((seen[:, 0] // 8).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="rank"):
        BatchIterator(train, 4, seed=0, rank=2, world_size=2)


def test_txt_folder_glob_and_undecodable_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\nsecond doc\n")
    (tmp_path / "b.txt").write_bytes(b"third \xff\xfe doc\n")
    (tmp_path / "skip.csv").write_text("not,read\n")
    with pytest.warns(UserWarning, match=r"b\.txt: 2 undecodable byte"):
        corpus = open_corpus(str(tmp_path))
        docs = list(corpus.documents())
    assert docs == ["first doc line one\nline two", "second doc", "third \ufffd\ufffd doc"]
    assert corpus.issues == {"undecodable_bytes": 2}
    lines = open_corpus(CorpusSpec(str(tmp_path / "a.txt"), txt_documents="line"))
    assert list(lines.documents()) == ["first doc line one", "line two", "second doc"]
    with pytest.warns(UserWarning, match="undecodable"):
        assert len(list(open_corpus(str(tmp_path / "*.txt")).documents())) == 3


def test_jsonl_with_a_corrupt_line(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        json.dumps({"text": "alpha beta"}),
        "{not json",
        json.dumps({"other": 1}),
        json.dumps({"text": "gamma"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    corpus = open_corpus(str(path))
    with pytest.warns(UserWarning, match=r"skipped 2 line\(s\).*line 2, 3"):
        assert list(corpus.documents()) == ["alpha beta", "gamma"]
    assert corpus.issues == {"bad_json_lines": 2}


def test_wikitext_documents_and_number_splits(tmp_path):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(
        " \n = First Title = \n \n It cost 1 @,@ 000 dollars in a long @-@ running 3 @.@ 5 hour game . \n"
        " \n = = Section = = \n Text in the section . \n \n = Second Title = \n Other text . \n"
    )
    docs = list(open_corpus(str(path)).documents())
    assert docs == [
        "First Title\nIt cost 1,000 dollars in a long-running 3.5 hour game .\nSection\nText in the section .",
        "Second Title\nOther text .",
    ]


def test_bad_inputs_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        open_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="matches no file"):
        open_corpus(str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="holds no .txt"):
        open_corpus(str(tmp_path))
    with pytest.raises(ValueError, match="synthetic:SEED"):
        open_corpus("synthetic:seed=x")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="has no text"):
        prepare_corpus(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n")
    with pytest.raises(ValueError, match="fewer than two examples"):
        prepare_corpus(str(short), vocab_size=30, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        prepare_corpus(str(short), seq_len=2)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the package were not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        list(open_corpus("hf:wikitext:wikitext-2-raw-v1").documents())


def test_real_wikitext2_train_file(data_root):
    path = data_root / "wikitext-2" / "wiki.train.tokens"
    corpus = open_corpus(CorpusSpec(str(path), max_documents=40))
    docs = list(corpus.documents())
    assert len(docs) == 40 and docs[0].startswith("Valkyria Chronicles III\nSenjō no Valkyria 3")
    assert not any("@-@" in d or "@,@" in d for d in docs) and corpus.issues == {}
    prepared = prepare_corpus(corpus, vocab_size=1000, seq_len=128)
    assert prepared.token_classes is None and len(prepared.train) > 100
    assert prepared.tokenizer.decode(prepared.train[0]).startswith("Valkyria Chronicles III")
