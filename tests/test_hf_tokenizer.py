"""`prepare --hf-tokenizer`: a token cache in a Hugging Face checkpoint's own tokens. The oracle is
the `tokenizers` library itself, encoding each document apart: the cache's stream must be those
ids, each document followed by the checkpoint's eos id."""

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from relu_sparsity import data
from tests.test_data import _split_at, _write_corpus

EXTRA_EMBEDDINGS = 7  # the model's table is larger than the tokenizer, as OPT's is


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def write_tokenizer(corpus, folder, vocab_size: int = 300):
    """A checkpoint folder's tokenizer files: a byte-level BPE trained on `corpus`, its eos
    `</s>` (id 2), the model's vocabulary EXTRA_EMBEDDINGS larger than the tokenizer's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<s>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in sorted(corpus.rglob("*.py"))], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(
        {"eos_token_id": 2, "vocab_size": tokenizer.get_vocab_size() + EXTRA_EMBEDDINGS}))
    return folder


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory):
    return write_tokenizer(corpus, tmp_path_factory.mktemp("hf"))


def test_the_cache_holds_the_tokenizers_own_ids_joined_by_eos(corpus, hf_dir, tmp_path):
    cache_dir = data.prepare(tmp_path / "cache", [corpus], hf_tokenizer=hf_dir, progress=False)
    cache = data.TokenCache(cache_dir)
    own = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert cache.vocab_size == own.get_vocab_size() + EXTRA_EMBEDDINGS
    assert cache.meta["eos_id"] == 2 == own.token_to_id("</s>")
    files = sorted(corpus.rglob("*.py"))
    want = {tuple(own.encode(f.read_text(encoding="utf-8"), add_special_tokens=False).ids)
            for f in files}
    got = [tuple(doc) for split in ("train", "eval")
           for doc in _split_at(np.fromfile(cache_dir / f"{split}.bin", cache.meta["dtype"]), 2)]
    assert len(got) == len(files) and set(got) == want
    text = files[0].read_text(encoding="utf-8")
    tokenizer = cache.tokenizer()
    assert tokenizer.decode(tokenizer.encode([text])[0]) == text


def test_the_same_corpus_and_tokenizer_reuse_the_cache(corpus, hf_dir, tmp_path, caplog):
    data.prepare(tmp_path / "cache", [corpus], hf_tokenizer=hf_dir, progress=False)
    with caplog.at_level("INFO"):
        data.prepare(tmp_path / "cache", [corpus], hf_tokenizer=hf_dir, progress=False)
    assert "reusing token cache" in caplog.text


def test_a_folder_without_tokenizer_json_is_refused_before_any_work(corpus, tmp_path):
    (tmp_path / "hf").mkdir()
    done = subprocess.run([sys.executable, "-m", "relu_sparsity.cli", "prepare", str(corpus),
                           "--out", str(tmp_path / "cache"), "--hf-tokenizer",
                           str(tmp_path / "hf")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    said = done.stderr.strip().splitlines()
    assert said[-1].startswith("relu-sparsity prepare: error:") and "tokenizer.json" in said[-1]
    assert not (tmp_path / "cache").exists()
