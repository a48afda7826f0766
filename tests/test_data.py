"""Tests for relu_sparsity.data: corpus listing, tokenizer round trip, cache build/reuse, batches."""

import json
import logging
import math
import os
import pathlib
import shutil
import sys
import sysconfig

import numpy as np
import pytest

from relu_sparsity import data
from relu_sparsity.data.prepare import FORMAT

VOCAB = 512

# Text the tokenizer must reproduce exactly; parts of it never occur in the training corpus.
ROUND_TRIP = [
    "    leading spaces\n",
    "\tdef f(x):\n\t\treturn x  \n",
    "\n\n\nblank lines above and below\n\n",
    "trailing spaces   \nand tabs\t\t\n",
    "  mixed \t indentation\n        deeper\n",
    "unicode: héllo wörld ✓ 日本語 🐍 λx. x\n",
    "windows\r\nline\r\nendings\r\n",
    "no newline at end",
    " ",
    "",
]


def _python_like(i: int) -> str:
    """A small Python-ish file with indentation, tabs, blank lines, trailing spaces and non-ASCII text."""
    lines = [f'"""Module number {i}: ünïcode ✓ 数字 {i}."""', "", "import os", ""]
    for j in range(12):
        lines += [
            f"def function_{i}_{j}(value, other=None):  ",
            f"    # comment {j} for module {i}",
            f"    if value > {j * i}:",
            f"        return value * {j} + len(os.sep)",
            "\t# a tab-indented comment",
            "",
            f"    result = [item for item in range({j})]",
            "    return result",
            "",
        ]
    lines += ["class Thing:", "    pass", ""]
    return "\n".join(lines)


def _write_corpus(root: pathlib.Path, count: int = 12) -> pathlib.Path:
    for i in range(count):
        sub = root / ("pkg" if i % 2 else "lib") / f"sub{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"module_{i}.py").write_text(_python_like(i), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_dir(corpus, tmp_path_factory) -> pathlib.Path:
    return data.prepare(tmp_path_factory.mktemp("caches") / "cache", [corpus], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def cache(cache_dir) -> data.TokenCache:
    return data.TokenCache(cache_dir)


def _stream(cache_dir: pathlib.Path, split: str) -> np.ndarray:
    meta = json.loads((cache_dir / "meta.json").read_text())
    return np.fromfile(cache_dir / f"{split}.bin", dtype=meta["dtype"])


def _split_at(tokens: np.ndarray, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "stream must end with eos"
    return docs


# ---------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip(cache):
    sp = cache.tokenizer()
    for text in ROUND_TRIP:
        assert sp.decode(sp.encode(text)) == text, repr(text)
    whole = "".join(ROUND_TRIP)
    assert sp.decode(sp.encode(whole)) == whole
    # Newline is one atomic piece, and whitespace runs are real pieces rather than dropped.
    assert sp.encode("\n") == [sp.piece_to_id("\n")]
    assert sp.piece_to_id("\n") != sp.unk_id()
    assert sp.encode("a\n\nb").count(sp.piece_to_id("\n")) == 2
    assert sp.unk_id() not in sp.encode(whole)  # byte fallback, no <unk>
    # Known SentencePiece limit: it writes spaces as U+2581, so a literal U+2581 comes back as a space.
    assert sp.decode(sp.encode("a\u2581b")) == "a b"


def test_default_corpus_files():
    files = data.default_corpus_files()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert rels == sorted(rels)
    assert all(f.is_absolute() and f.suffix == ".py" and f.is_file() for f in files)
    for rel in rels:
        parts = set(rel.split("/"))
        assert not parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}, rel
        assert not rel.startswith("lib2to3/tests")
    assert "os.py" in rels and "json/__init__.py" in rels


def test_prepare_meta_and_files(corpus, cache_dir, cache):
    meta = cache.meta
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    assert meta["format"] == FORMAT
    assert meta["source"] == "files"
    assert meta["files"] == len(files)
    assert meta["bytes"] == sum(p.stat().st_size for p in files)
    assert len(meta["corpus_hash"]) == 64
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == cache.vocab_size <= VOCAB
    assert meta["requested_vocab_size"] == VOCAB
    assert meta["tokenizer"]["model_type"] == "bpe"
    # By-document split: both sides get whole documents.
    assert meta["train_documents"] >= 1 and meta["eval_documents"] >= 1
    assert meta["train_documents"] + meta["eval_documents"] == len(files)
    for split in ("train", "eval"):
        size = (cache_dir / f"{split}.bin").stat().st_size
        assert size == meta[f"{split}_tokens"] * 2 == cache.num_tokens(split) * 2
    assert cache.num_tokens("eval") > 0
    sp = cache.tokenizer()
    assert meta["eos_id"] == sp.eos_id()
    assert sp.get_piece_size() == cache.vocab_size
    assert 0.0 < meta["unigram_entropy_nats"] < math.log(cache.vocab_size)
    # Nothing half-built is left next to the cache.
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["cache"]


def test_streams_are_the_documents(corpus, cache_dir, cache):
    # Splitting each stream at eos and decoding gives back exactly the corpus files, each once.
    sp = cache.tokenizer()
    texts = sorted(p.read_text(encoding="utf-8") for p in corpus.rglob("*") if p.is_file())
    decoded = []
    for split in ("train", "eval"):
        stream = _stream(cache_dir, split)
        assert stream.max() < cache.vocab_size
        docs = _split_at(stream, cache.meta["eos_id"])
        assert len(docs) == cache.meta[f"{split}_documents"]
        decoded += [sp.decode(d) for d in docs]
        # Chunked encoding inside prepare must equal encoding each document whole.
        assert all(d == sp.encode(sp.decode(d)) for d in docs)
    assert sorted(decoded) == texts


def test_prepare_is_deterministic(corpus, cache_dir, tmp_path):
    other = data.prepare(tmp_path / "again", [corpus], vocab_size=VOCAB)
    for name in ("tokenizer.model", "train.bin", "eval.bin"):
        assert (other / name).read_bytes() == (cache_dir / name).read_bytes(), name


def test_reuse_and_corpus_hash(tmp_path, caplog):
    corpus = _write_corpus(tmp_path / "corpus", count=4)
    out = tmp_path / "cache"
    assert data.prepare(out, [corpus], vocab_size=300) == out
    meta1 = json.loads((out / "meta.json").read_text())
    stamp = (out / "train.bin").stat().st_mtime_ns, (out / "train.bin").stat().st_ino

    with caplog.at_level(logging.INFO, logger=data.__name__):
        data.prepare(out, [corpus], vocab_size=300)
    assert "reusing" in caplog.text
    assert ((out / "train.bin").stat().st_mtime_ns, (out / "train.bin").stat().st_ino) == stamp

    # A changed file changes the hash and forces a rebuild.
    victim = next(corpus.rglob("*.py"))
    victim.write_text(victim.read_text() + "\nextra = 1\n")
    data.prepare(out, [corpus], vocab_size=300)
    meta2 = json.loads((out / "meta.json").read_text())
    assert meta2["corpus_hash"] != meta1["corpus_hash"]
    assert meta2["train_tokens"] + meta2["eval_tokens"] > meta1["train_tokens"] + meta1["eval_tokens"]

    # A different vocabulary is not reused either.
    data.prepare(out, [corpus], vocab_size=320)
    assert json.loads((out / "meta.json").read_text())["requested_vocab_size"] == 320
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus"]


def test_batch(cache_dir, cache):
    b, t = 4, 16
    x = cache.batch("train", 7, b, t)
    assert x.shape == (b, t + 1) and x.dtype == np.int32
    assert np.array_equal(x, cache.batch("train", 7, b, t))
    assert np.array_equal(x, data.TokenCache(cache_dir).batch("train", 7, b, t))  # a fresh reader agrees
    assert not np.array_equal(x, cache.batch("train", 8, b, t))
    assert not np.array_equal(x, cache.batch("train", 7, b, t, seed=1))
    assert not np.array_equal(x, cache.batch("eval", 7, b, t))
    assert x.min() >= 0 and x.max() < cache.vocab_size

    # Rows are consecutive slices of the stream, at the documented offsets.
    stream = _stream(cache_dir, "train")
    n = stream.shape[0]
    starts = np.random.default_rng([0, 7, 0]).integers(0, n - t - 1, b)
    for row, start in zip(x, starts):
        assert np.array_equal(row, stream[start : start + t + 1])
    ev = cache.batch("eval", 3, 2, 8)
    eval_stream = _stream(cache_dir, "eval")
    starts = np.random.default_rng([0, 3, 1]).integers(0, eval_stream.shape[0] - 9, 2)  # split id 1
    for row, start in zip(ev, starts):
        assert np.array_equal(row, eval_stream[start : start + 9])
    # A process of a multi-process run reads only its rows of the same global batch.
    assert np.array_equal(cache.batch("train", 7, b, t, rows=slice(1, 3)), x[1:3])
    assert np.array_equal(cache.batch("train", 7, b, t, rows=slice(2, 4)), x[2:4])


def test_batch_shortest_split(cache):
    # seq_len + 2 tokens is the smallest split that works; all windows then start at 0.
    n = cache.num_tokens("eval")
    x = cache.batch("eval", 0, 3, n - 2)
    assert x.shape == (3, n - 1)
    assert (x == x[0]).all()
    with pytest.raises(ValueError, match=rf"{n}.*{n + 1}"):
        cache.batch("eval", 0, 3, n - 1)


def test_eval_batches(cache_dir, cache):
    first = list(cache.eval_batches(3, 2, 8))
    second = list(data.TokenCache(cache_dir).eval_batches(3, 2, 8))
    assert len(first) == 3
    assert all(a.shape == (2, 9) and a.dtype == np.int32 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    # Evenly spaced and non-overlapping: 6 windows of 9 tokens fit in the eval split.
    stream = _stream(cache_dir, "eval")
    assert stream.shape[0] >= 6 * 9
    n = stream.shape[0]
    starts = [i * (n - 9) // 5 for i in range(6)]  # first to last possible offset, evenly spaced
    assert all(b - a >= 9 for a, b in zip(starts, starts[1:]))
    rows = [row for batch in first for row in batch]
    for row, start in zip(rows, starts):
        assert np.array_equal(row, stream[start : start + 9])


def test_eval_batches_overlap_when_needed(cache):
    n = cache.num_tokens("eval")
    seq = n // 2
    rows = [row for batch in cache.eval_batches(2, 2, seq) for row in batch]
    assert len(rows) == 4 and all(row.shape == (seq + 1,) for row in rows)
    assert not np.array_equal(rows[0], rows[-1])


def test_single_document(tmp_path):
    text = "".join(_python_like(i) for i in range(3))
    (tmp_path / "only.py").write_text(text)
    out = data.prepare(tmp_path / "cache", [tmp_path / "only.py"], vocab_size=300)
    cache = data.TokenCache(out)
    sp = cache.tokenizer()
    train, ev = _stream(out, "train"), _stream(out, "eval")
    eos = cache.meta["eos_id"]
    assert eos not in train and ev[-1] == eos and eos not in ev[:-1]
    assert 0.95 < len(train) / (len(train) + len(ev)) < 0.995
    assert sp.decode(train.tolist()) + sp.decode(ev[:-1].tolist()) == text


def test_large_vocab_on_small_corpus(tmp_path, corpus):
    out = data.prepare(tmp_path / "cache", [corpus], vocab_size=32768)
    cache = data.TokenCache(out)
    assert cache.meta["requested_vocab_size"] == 32768
    assert cache.vocab_size < 32768
    assert _stream(out, "train").max() < cache.vocab_size


def test_skips_binary_files(tmp_path, caplog):
    corpus = _write_corpus(tmp_path / "corpus", count=3)
    (corpus / "blob.bin").write_bytes(b"\xff\xfe\x00\x01binary")
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        out = data.prepare(tmp_path / "cache", [corpus], vocab_size=300)
    assert "blob.bin" in caplog.text
    meta = data.TokenCache(out).meta
    assert meta["files"] == 4 and meta["documents"] == 3  # the binary file is no document


def test_errors(tmp_path, cache_dir, cache):
    with pytest.raises(FileNotFoundError, match="relu-sparsity prepare"):
        data.TokenCache(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    (partial / "eval.bin").unlink()
    with pytest.raises(FileNotFoundError, match="eval.bin.*prepare"):
        data.TokenCache(partial)

    with pytest.raises(ValueError, match="'valid'"):
        cache.num_tokens("valid")
    with pytest.raises(ValueError, match="'test'"):
        cache.batch("test", 0, 2, 8)

    with pytest.raises(ValueError, match="vocab_size must be at least"):
        data.prepare(tmp_path / "c", [cache_dir], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing_file.py"):
        data.prepare(tmp_path / "c", [tmp_path / "missing_file.py"], vocab_size=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        data.prepare(tmp_path / "c", [empty], vocab_size=300)
    assert not (tmp_path / "c").exists()

    n = cache.num_tokens("train")
    with pytest.raises(ValueError, match=rf"{n}.*{n + 2}"):
        cache.batch("train", 0, 2, n)
    with pytest.raises(ValueError, match="seq_len"):
        cache.eval_batches(1, 1, cache.num_tokens("eval"))

    # Never replace a folder that is not a token cache.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    small = _write_corpus(tmp_path / "small", count=2)
    with pytest.raises(FileExistsError):
        data.prepare(foreign, [small], vocab_size=300)
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_default_corpus_prepare(tmp_path):
    # The one build from the real default corpus; the tokenizer sees few sentences to stay quick.
    out = data.prepare(
        tmp_path / "cache", data.DEFAULT_CORPUS, vocab_size=VOCAB, tokenizer_sample_chars=4_000_000
    )
    cache = data.TokenCache(out)
    meta = cache.meta
    files = data.default_corpus_files()
    assert meta["source"] == "default"
    assert meta["files"] == len(files)
    assert meta["bytes"] == sum(f.stat().st_size for f in files)
    assert meta["python_version"] == sys.version.split()[0]
    assert cache.num_tokens("train") > 1_000_000 and cache.num_tokens("eval") > 1000
    sp = cache.tokenizer()
    text = (pathlib.Path(os.__file__)).read_text(encoding="utf-8")
    assert sp.decode(sp.encode(text)) == text
    x = cache.batch("train", 0, 2, 64)
    assert x.shape == (2, 65) and x.max() < cache.vocab_size
