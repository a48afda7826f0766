"""Streaming corpora (data/corpus.py, data/prepare.py): local .txt / .jsonl / .gz documents in a
fixed order, an eval split of the asked share of tokens, existing SentencePiece vocabularies,
token prefixes, bounded memory, and one-line errors."""

import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from relu_sparsity import cli, data
from relu_sparsity.data.corpus import LocalText

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "."
            for _ in range(count)]


def tokens(cache: Path, split: str) -> np.ndarray:
    meta = json.loads((cache / "meta.json").read_text())
    return np.fromfile(cache / f"{split}.bin", dtype=meta["dtype"])


def documents_of(cache: Path, split: str) -> list[str]:
    """The texts of a split, cut at the eos ids and decoded."""
    sp = data.TokenCache(cache).tokenizer()
    ids, out, current = tokens(cache, split).tolist(), [], []
    for i in ids:
        if i == sp.eos_id():
            out.append(sp.decode(current))
            current = []
        else:
            current.append(i)
    return out


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory) -> Path:
    """A small SentencePiece model (with an eos piece) trained in the test."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(2000, 1)),
                                   model_writer=writer, vocab_size=300, byte_fallback=True,
                                   model_type="bpe", minloglevel=2)
    path = tmp_path_factory.mktemp("vocab") / "small.model"
    path.write_bytes(writer.getvalue())
    return path


def test_local_documents_stream_in_a_fixed_order(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "b.txt").write_text("first paragraph\nstill first\n\n\nsecond\n")
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "line one"}) + "\n\n" + json.dumps({"text": "line two"}) + "\n")
    (root / "c.py").write_text("x = 1\n")
    source = LocalText([root], eval_fraction=0.5, seed=0)
    docs = list(source.documents())
    assert [(d.name, d.text) for d in docs] == [
        ("corpus/a.jsonl.gz:1", "line one"), ("corpus/a.jsonl.gz:3", "line two"),
        ("corpus/b.txt#0", "first paragraph\nstill first\n"), ("corpus/b.txt#1", "second\n"),
        ("corpus/c.py", "x = 1\n")]
    assert docs == list(source.documents())  # re-iterable, the same every time
    assert {d.split for d in docs} == {"train", "eval"}


def test_eval_split_is_the_asked_share_of_tokens(tmp_path, vocab_model):
    # Two files of very different sizes: the split is by paragraph, not by file.
    root = tmp_path / "corpus"
    root.mkdir()
    for name, count, seed in (("big.txt", 19000, 2), ("small.txt", 1000, 3)):
        (root / name).write_text("\n\n".join(sentences(count, seed)) + "\n")
    cache = data.prepare(tmp_path / "cache", [root], eval_fraction=0.1, vocab=vocab_model,
                         progress=False)
    meta = data.TokenCache(cache).meta
    share = meta["eval_tokens"] / (meta["train_tokens"] + meta["eval_tokens"])
    assert abs(share - 0.1) < 0.01, share


def test_existing_vocabulary_round_trips_and_max_tokens_takes_a_prefix(tmp_path, vocab_model):
    corpus = tmp_path / "docs.jsonl"
    texts = sentences(400, 4)
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    full = data.prepare(tmp_path / "full", [corpus], vocab=vocab_model, text_key="body",
                        eval_fraction=0.2, progress=False)
    meta = data.TokenCache(full).meta
    assert meta["vocab_size"] == 300 and meta["tokenizer"] == {"file": str(vocab_model)}
    assert (full / "tokenizer.model").read_bytes() == vocab_model.read_bytes()
    got = documents_of(full, "train") + documents_of(full, "eval")
    assert sorted(got) == sorted(texts)  # every document, exactly
    prefix = data.prepare(tmp_path / "prefix", [corpus], vocab=vocab_model, text_key="body",
                          eval_fraction=0.2, max_tokens=50, progress=False)
    head = tokens(prefix, "train")
    assert 0 < head.size < tokens(full, "train").size
    np.testing.assert_array_equal(head, tokens(full, "train")[:head.size])


def test_vocabulary_past_65535_pieces_gives_a_uint32_cache(tmp_path, vocab_model):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(vocab_model.read_bytes())
    for i in range(70_000 - len(proto.pieces)):
        proto.pieces.add(piece=f"<extra_{i}>", score=0.0,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    corpus = tmp_path / "docs.jsonl"
    texts = sentences(50, 5) + ["uses <extra_69000> once."]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cache = data.prepare(tmp_path / "cache", [corpus], vocab=big, eval_fraction=0.2,
                         progress=False)
    assert data.TokenCache(cache).meta["dtype"] == "uint32"
    assert sorted(documents_of(cache, "train") + documents_of(cache, "eval")) == sorted(texts)
    assert int(max(tokens(cache, "train").max(), tokens(cache, "eval").max())) > 65535


@pytest.mark.parametrize("args, message", [
    (["--text-key", "body"], "no string field 'body'"),
    (["--vocab", "VOCAB_IS_TEXT"], "is not a SentencePiece model"),
    (["--tfds", "c4/en:3.1.0"], "--data-dir"),
])
def test_prepare_errors_are_one_line(tmp_path, capsys, args, message):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"text": "d"}) + "\n")
    (tmp_path / "not.model").write_text("not a model")
    args = [str(tmp_path / "not.model") if a == "VOCAB_IS_TEXT" else a for a in args]
    sources = [] if "--tfds" in args else [str(corpus)]
    status = cli.main(["prepare", *sources, "--out", str(tmp_path / "cache"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "cache").exists()


PREPARE = """
import resource, sys
from relu_sparsity import data
data.prepare(sys.argv[1], [sys.argv[2]], vocab=sys.argv[3], progress=False,
             tokenizer_sample_chars=1_000_000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(tmp_path: Path, vocab_model: Path, lines: int) -> int:
    corpus = tmp_path / f"corpus_{lines}.jsonl.gz"
    rng = random.Random(lines)
    with gzip.open(corpus, "wt", compresslevel=1) as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=60))}) + "\n")
    done = subprocess.run([sys.executable, "-c", PREPARE, str(tmp_path / f"cache_{lines}"),
                           str(corpus), str(vocab_model)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_corpus_larger_than_the_memory_it_uses(tmp_path, vocab_model):
    # 8,000 and 80,000 lines (~3 MB and ~30 MB of text): the peak memory of the bigger build
    # exceeds the smaller's by far less than the text it added.
    small = peak_rss_kib(tmp_path, vocab_model, 8_000)
    large = peak_rss_kib(tmp_path, vocab_model, 80_000)
    assert large - small < 12 * 1024, (small, large)


def test_training_code_never_imports_tensorflow():
    code = ("import sys\n"
            "import relu_sparsity.cli, relu_sparsity.train.trainer, relu_sparsity.report\n"
            "import relu_sparsity.bench.kernels, relu_sparsity.data, relu_sparsity.data.tfds\n"
            "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
