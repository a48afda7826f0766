"""The TFDS source (relu_sparsity/data/tfds.py) on a tiny TFDS dataset built here, offline: its
documents through seqio in order, its description and fingerprint, its one-line errors, and a
token cache from it equal to one from the same documents as local text. Runs in the seqio side
environment (.venv-seqio), launched by tests/test_seqio.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from relu_sparsity import data  # noqa: E402
from relu_sparsity.data.corpus import Document  # noqa: E402
from relu_sparsity.data.tfds import TfdsSource  # noqa: E402

TRAIN_DOCS = [
    "def double(x):\n    return 2 * x\n",
    "Ünïcödé — 日本語 and an emoji 🙂.\n",
    "three\nshort\nlines\n\n",
    "  leading spaces and a\ttab",
    "the quick brown fox jumps over the lazy dog",
]
EVAL_DOCS = [
    "an eval document\nwith two lines\n",
    "the last one 🙂 ends without a newline",
]


class TinyText(tfds.core.GeneratorBasedBuilder):
    """TRAIN_DOCS and EVAL_DOCS as the train and validation splits, in this order."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"id": tfds.features.Scalar(np.int64),
                                               "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN_DOCS),
                "validation": self._generate_examples(EVAL_DOCS)}

    def _generate_examples(self, texts):
        for index, text in enumerate(texts):
            yield index, {"id": index, "text": text}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection fails the test: the source reads from disk only."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A TFDS data dir holding tiny_text:1.0.0, prepared with nothing to download."""
    folder = tmp_path_factory.mktemp("tfds")
    builder = TinyText(data_dir=str(folder))
    builder.download_and_prepare(
        download_dir=str(folder / "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assert (folder / "tiny_text" / "1.0.0" / "dataset_info.json").is_file()
    return folder


def copy_of(data_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data_dir, tmp_path / "copy"))


def expected_documents() -> list[Document]:
    return ([Document("train", f"train/{i:09d}", text) for i, text in enumerate(TRAIN_DOCS)]
            + [Document("eval", f"validation/{i:09d}", text) for i, text in enumerate(EVAL_DOCS)])


def test_documents_come_through_seqio_in_order(data_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("TfdsSource must open the dataset read-only, never build or load it")

    monkeypatch.setattr(tfds, "load", refuse)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    source = TfdsSource("tiny_text:1.0.0", str(data_dir))
    assert list(source.documents()) == expected_documents()
    assert list(source.documents()) == expected_documents()  # each call starts over
    assert list(source.documents("train")) == expected_documents()[:len(TRAIN_DOCS)]
    assert list(source.documents("eval")) == expected_documents()[len(TRAIN_DOCS):]


def test_documents_stream(data_dir):
    documents = TfdsSource("tiny_text:1.0.0", data_dir).documents()
    assert not isinstance(documents, (list, tuple))
    assert next(documents) == expected_documents()[0]


def test_swapped_splits(data_dir):
    source = TfdsSource("tiny_text", data_dir, split="validation", eval_split="train")
    assert [(d.split, d.text) for d in source.documents()] == (
        [("train", text) for text in EVAL_DOCS] + [("eval", text) for text in TRAIN_DOCS])


def test_describe(data_dir):
    source = TfdsSource("tiny_text", str(data_dir))
    assert source.describe() == {
        "source": "tfds", "tfds": "tiny_text:1.0.0", "data_dir": str(data_dir.resolve()),
        "splits": {"train": "train", "eval": "validation"}, "text_key": "text",
        "examples": {"train": len(TRAIN_DOCS), "eval": len(EVAL_DOCS)}}
    assert json.loads(json.dumps(source.describe())) == source.describe()


def test_fingerprint_names_the_content_not_the_place(data_dir, tmp_path):
    first = TfdsSource("tiny_text:1.0.0", data_dir).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    assert TfdsSource("tiny_text", data_dir).fingerprint() == first
    assert TfdsSource("tiny_text", copy_of(data_dir, tmp_path)).fingerprint() == first
    swapped = TfdsSource("tiny_text", data_dir, split="validation", eval_split="train")
    assert swapped.fingerprint() != first


def test_fingerprint_follows_the_recorded_shards(data_dir, tmp_path):
    copy = copy_of(data_dir, tmp_path)
    info_path = copy / "tiny_text" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["splits"][0]["numBytes"] = str(int(info["splits"][0]["numBytes"]) + 1)
    info_path.write_text(json.dumps(info))
    assert (TfdsSource("tiny_text", copy).fingerprint()
            != TfdsSource("tiny_text", data_dir).fingerprint())


def test_newest_version_when_none_is_named(data_dir, tmp_path):
    copy = copy_of(data_dir, tmp_path)
    for version in ("1.9.0", "1.10.0"):
        shutil.copytree(copy / "tiny_text" / "1.0.0", copy / "tiny_text" / version)
    assert TfdsSource("tiny_text", copy).name == "tiny_text:1.10.0"
    assert TfdsSource("tiny_text:1.9.0", copy).name == "tiny_text:1.9.0"


def test_a_config_is_found(data_dir, tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(data_dir / "tiny_text" / "1.0.0", root / "multi" / "en" / "2.0.0")
    source = TfdsSource("multi/en", root)
    assert source.name == "multi/en:2.0.0"
    assert source.describe()["examples"] == {"train": len(TRAIN_DOCS), "eval": len(EVAL_DOCS)}
    with pytest.raises(ValueError, match=r"has configs \(en\): name one, e.g. 'multi/en'"):
        TfdsSource("multi", root)


def one_line_error(kind, call):
    with pytest.raises(kind) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def test_missing_dataset(data_dir):
    message = one_line_error(FileNotFoundError, lambda: TfdsSource("c4/en:3.1.0", data_dir))
    assert str(data_dir / "c4" / "en" / "3.1.0" / "dataset_info.json") in message
    assert "<data_dir>/<name>[/<config>]/<version>/dataset_info.json" in message
    assert "nothing is downloaded" in message


def test_missing_version(data_dir):
    message = one_line_error(FileNotFoundError, lambda: TfdsSource("tiny_text:2.0.0", data_dir))
    assert "tiny_text/2.0.0/dataset_info.json" in message and "versions there: 1.0.0" in message


def test_missing_data_dir(tmp_path):
    message = one_line_error(FileNotFoundError, lambda: TfdsSource("tiny_text", tmp_path / "no"))
    assert str(tmp_path / "no") in message and "nothing is downloaded" in message


def test_remote_data_dir():
    message = one_line_error(ValueError, lambda: TfdsSource("c4/en:3.1.0", "gs://tfds-data"))
    assert "gs://tfds-data" in message and "downloads nothing" in message


def test_unknown_text_key(data_dir):
    message = one_line_error(ValueError,
                             lambda: TfdsSource("tiny_text", data_dir, text_key="body"))
    assert "no feature 'body'" in message and "features: id, text" in message


def test_text_key_that_is_not_text(data_dir):
    message = one_line_error(ValueError, lambda: TfdsSource("tiny_text", data_dir, text_key="id"))
    assert "feature 'id'" in message and "is not text" in message


def test_unknown_split(data_dir):
    message = one_line_error(ValueError,
                             lambda: TfdsSource("tiny_text", data_dir, eval_split="test"))
    assert "no split 'test' (splits: train, validation)" in message
    assert "dataset_info.json" in message


def test_empty_split(data_dir, tmp_path):
    copy = copy_of(data_dir, tmp_path)
    info_path = copy / "tiny_text" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    for split in info["splits"]:
        if split["name"] == "validation":
            split["shardLengths"] = []
    info_path.write_text(json.dumps(info))
    message = one_line_error(ValueError, lambda: TfdsSource("tiny_text", copy))
    assert "split 'validation' of TFDS dataset tiny_text:1.0.0 is empty" in message


def test_one_split_for_both(data_dir):
    message = one_line_error(ValueError, lambda: TfdsSource("tiny_text", data_dir,
                                                            eval_split="train"))
    assert "both 'train'" in message


@pytest.mark.parametrize("name", ["tiny_text:1.0", "tiny_text:1.0.0:2", ":1.0.0", "/x"])
def test_malformed_name(data_dir, name):
    one_line_error(ValueError, lambda: TfdsSource(name, data_dir))


def test_tensorflow_is_imported_only_to_read(data_dir):
    """Importing relu_sparsity.data and data.tfds, and constructing, describing and
    fingerprinting a source, import neither TensorFlow nor seqio; reading documents does."""
    script = f"""
import sys
import relu_sparsity.data, relu_sparsity.data.tfds
heavy = ("tensorflow", "seqio", "tensorflow_datasets")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
source = relu_sparsity.data.tfds.TfdsSource("tiny_text", {str(data_dir)!r})
source.describe(), source.fingerprint()
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
next(source.documents())
assert all(m in sys.modules for m in heavy)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# The end-to-end path: a token cache from TFDS equals one from the same documents as local text.

@pytest.fixture(scope="session")
def vocab(tmp_path_factory) -> Path:
    """A small lossless SentencePiece model of the documents (byte fallback, no normalization,
    eos id 2), as `prepare(vocab=...)` takes."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_DOCS + EVAL_DOCS), model_prefix=str(path.with_suffix("")),
        model_type="bpe", vocab_size=400, hard_vocab_limit=False, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_by_whitespace=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return path


def segments(cache: Path, split: str) -> list[list[int]]:
    """A split's token ids cut after each eos id; the stream must end with one."""
    meta = data.TokenCache(cache).meta
    ids = np.fromfile(cache / f"{split}.bin", dtype=meta["dtype"]).tolist()
    assert ids and ids[-1] == meta["eos_id"], f"{split}.bin does not end with the eos id"
    out, current = [], []
    for token in ids:
        if token == meta["eos_id"]:
            out.append(current)
            current = []
        else:
            current.append(token)
    return out


def texts(cache: Path, split: str) -> list[str]:
    tokenizer = data.TokenCache(cache).tokenizer()
    return [tokenizer.decode(ids) for ids in segments(cache, split)]


def test_tfds_cache_equals_the_local_text_cache(data_dir, vocab, tmp_path):
    local = tmp_path / "docs.jsonl"
    local.write_text("".join(json.dumps({"text": text}) + "\n"
                             for text in TRAIN_DOCS + EVAL_DOCS))
    source = TfdsSource("tiny_text", data_dir)
    from_tfds = data.prepare(tmp_path / "tfds-cache", source, vocab=vocab)
    from_local = data.prepare(tmp_path / "local-cache", [str(local)], vocab=vocab,
                              eval_fraction=0.3)

    assert texts(from_tfds, "train") == TRAIN_DOCS
    assert texts(from_tfds, "eval") == EVAL_DOCS
    assert sorted(texts(from_local, "train") + texts(from_local, "eval")) == sorted(
        TRAIN_DOCS + EVAL_DOCS)
    # The same vocabulary encodes every document to the same ids in both caches.
    token_lists = {name: sorted(map(tuple, segments(cache, "train") + segments(cache, "eval")))
                   for name, cache in (("tfds", from_tfds), ("local", from_local))}
    assert token_lists["tfds"] == token_lists["local"]
    for cache in (from_tfds, from_local):
        assert (cache / "tokenizer.model").read_bytes() == vocab.read_bytes()

    meta = json.loads((from_tfds / "meta.json").read_text())
    assert meta["source"] == "tfds" and meta["tfds"] == "tiny_text:1.0.0"
    assert meta["corpus_hash"] == source.fingerprint()
    assert (meta["train_documents"], meta["eval_documents"]) == (len(TRAIN_DOCS), len(EVAL_DOCS))
    assert data.TokenCache(from_tfds).num_tokens("train") == sum(map(len, segments(
        from_tfds, "train"))) + len(TRAIN_DOCS)


def test_tfds_cache_is_reused(data_dir, vocab, tmp_path):
    cache = data.prepare(tmp_path / "cache", TfdsSource("tiny_text", data_dir), vocab=vocab)
    written = (cache / "meta.json").stat().st_mtime_ns
    again = data.prepare(tmp_path / "cache", TfdsSource("tiny_text:1.0.0", data_dir), vocab=vocab)
    assert again == cache and (cache / "meta.json").stat().st_mtime_ns == written


def test_tfds_cache_with_a_token_budget(data_dir, vocab, tmp_path):
    cache = data.prepare(tmp_path / "cache", TfdsSource("tiny_text", data_dir), vocab=vocab,
                         max_tokens=40, eval_fraction=0.25)
    train, eval_ = texts(cache, "train"), texts(cache, "eval")
    assert 0 < len(train) < len(TRAIN_DOCS) and train == TRAIN_DOCS[:len(train)]
    assert 0 < len(eval_) <= len(EVAL_DOCS) and eval_ == EVAL_DOCS[:len(eval_)]


def test_tfds_cache_with_a_trained_tokenizer(data_dir, tmp_path):
    cache = data.prepare(tmp_path / "cache", TfdsSource("tiny_text", data_dir), vocab_size=300)
    assert texts(cache, "train") == TRAIN_DOCS and texts(cache, "eval") == EVAL_DOCS
