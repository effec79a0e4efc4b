"""The corpus (stdlib by default, or the user's text) and the byte-level BPE trained on it."""

import hashlib
from pathlib import Path

import pytest

from model.corpus import SPLITS, STDLIB_EXCLUDED_DIRS, CorpusError, load_corpus, split_of
from model.tokenizer import (BOS_TEXT, EOS_TEXT, PAD_TEXT, UNK_TEXT, HFTokenizer, encode_documents,
                             load_tokenizer, train_bpe)

PYTHON_TEXT = '''def greet(name: str) -> str:
    """Say hello."""
    return f"hello, {name}!"  # é, ü, 漢字


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, by=1):
        self.count += by
        return self.count
'''


@pytest.fixture(scope="module")
def stdlib_small():
    return load_corpus(max_bytes=150_000)


def test_stdlib_corpus_is_deterministic_bounded_and_split_by_path(stdlib_small):
    again = load_corpus(max_bytes=150_000)
    assert again.digest == stdlib_small.digest and again.files == stdlib_small.files
    assert stdlib_small.source == "stdlib"
    assert stdlib_small.n_bytes() <= 150_000
    for f in stdlib_small.files:
        assert f.path.endswith(".py")
        assert not STDLIB_EXCLUDED_DIRS.intersection(f.path.split("/")[:-1])
        assert f.split == split_of(f.path)
    assert all(stdlib_small.documents(s) for s in SPLITS), "every split has documents"


def test_manifest_lists_every_file_with_its_content_hash(stdlib_small):
    m = stdlib_small.manifest()
    root = Path(m["root"])
    assert m["digest"] == stdlib_small.digest and len(m["files"]) == len(stdlib_small.files)
    for entry in m["files"][:20]:
        data = (root / entry["path"]).read_bytes()
        assert entry["n_bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(m["splits"][s]["n_bytes"] for s in SPLITS) == stdlib_small.n_bytes()
    assert len({m["splits"][s]["digest"] for s in SPLITS}) == 3


def test_a_files_split_does_not_depend_on_other_files(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 5)
    before = {f.path: f.split for f in load_corpus(tmp_path).files}
    (tmp_path / "new.txt").write_text("a new document\n")
    after = {f.path: f.split for f in load_corpus(tmp_path).files}
    assert all(after[p] == s for p, s in before.items())
    assert set(before.values()) == set(SPLITS), "40 documents reach every split at 90/5/5"


def test_a_directory_skips_hidden_and_binary_files(tmp_path):
    (tmp_path / "a.txt").write_text("text one\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("text two\n")
    (tmp_path / ".hidden").write_text("secret\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    corpus = load_corpus(tmp_path)
    assert [f.path for f in corpus.files] == ["a.txt", "sub/b.md"]
    assert corpus.skipped == 2 and corpus.source == "dir"


def test_a_single_file_is_cut_into_consecutive_pieces_at_line_boundaries(tmp_path):
    text = "".join(f"line {i}: some text ü\n" for i in range(200))
    path = tmp_path / "book.txt"
    path.write_text(text)
    corpus = load_corpus(path)
    assert [f.split for f in corpus.files] == list(SPLITS)
    assert "".join(corpus.texts) == text
    assert all(t.endswith("\n") for t in corpus.texts)
    assert 0.85 < corpus.n_bytes("train") / corpus.n_bytes() < 0.95
    bounded = load_corpus(path, max_bytes=1000)
    assert bounded.n_bytes() <= 1000 and "".join(bounded.texts) == text.encode()[:bounded.n_bytes()].decode()


@pytest.mark.parametrize("make", ["missing", "empty_dir", "empty_file", "binary_only"])
def test_a_missing_or_empty_corpus_is_a_clear_error_naming_the_path(tmp_path, make):
    path = tmp_path / "corpus"
    if make == "empty_dir":
        path.mkdir()
    elif make == "empty_file":
        path.write_text("  \n")
    elif make == "binary_only":
        path.mkdir()
        (path / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(CorpusError, match=str(path)):
        load_corpus(path)
    assert issubclass(CorpusError, ValueError)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([PYTHON_TEXT] * 20, vocab_size=300)


def test_bpe_has_the_special_tokens_first_and_fits_the_vocabulary(bpe):
    assert 260 < bpe.vocab_size <= 300
    assert [bpe.tokenizer.token_to_id(t) for t in (PAD_TEXT, BOS_TEXT, EOS_TEXT, UNK_TEXT)] == [0, 1, 2, 3]
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id) == (0, 1, 2)


def test_bpe_round_trips_any_text_without_adding_special_tokens(bpe):
    for text in (PYTHON_TEXT, "never seen: ∑ 🙂 \t\r\n", ""):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert not set(ids) & {0, 1, 2, 3}
    assert len(bpe.encode(PYTHON_TEXT)) < len(PYTHON_TEXT.encode()) / 2, "merges were learned"


def test_bpe_training_is_deterministic(bpe):
    assert train_bpe([PYTHON_TEXT] * 20, vocab_size=300).tokenizer.to_str() == bpe.tokenizer.to_str()


def test_a_saved_bpe_is_what_load_tokenizer_finds(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path, vocab_size=300)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode(PYTHON_TEXT) == bpe.encode(PYTHON_TEXT)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_bpe_refuses_a_vocabulary_smaller_than_bytes_and_specials():
    with pytest.raises(ValueError, match="vocab_size=200"):
        train_bpe(["x"], vocab_size=200)


def test_documents_are_joined_by_end_of_text(bpe):
    ids = encode_documents(bpe, ["a = 1\n", "b = 2\n"])
    eos = bpe.eos_token_id
    assert ids.tolist() == bpe.encode("a = 1\n") + [eos] + bpe.encode("b = 2\n") + [eos]
