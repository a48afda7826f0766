"""Writing a token cache (`relu-sparsity prepare`): train the tokenizer on a bounded sample of the
corpus (or take an existing SentencePiece model, or a Hugging Face checkpoint's own tokenizer),
stream every document through it into the split files, and install the finished folder in one
rename, so an interrupted prepare leaves no half-written cache. Memory stays bounded whatever the
corpus size.

Cache layout (one directory):
    train.bin, eval.bin   flat token ids (uint16 when the vocabulary fits, else uint32); documents
                          are joined with the tokenizer's end-of-document (eos) id
    tokenizer.model       the SentencePiece model (data/tokenizer.py, or the one given); or
    tokenizer.json        a Hugging Face checkpoint's tokenizer (data/hf_tokenizer.py)
    meta.json             what was built from what (see `prepare`); written last, so its
                          presence marks a complete build
"""

import contextlib
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np
import sentencepiece as spm
import tqdm

from relu_sparsity.data.corpus import DEFAULT_CORPUS, Document, open_source
from relu_sparsity.data.hf_tokenizer import TOKENIZER_FILE, HfTokenizer
from relu_sparsity.data.tokenizer import (
    MAX_TOKENIZER_SENTENCES,
    MIN_VOCAB_SIZE,
    RESERVED_PIECES,
    line_chunks,
    load_vocabulary,
    rare_characters,
    tokenizer_options,
    tokenizer_sample,
    train_tokenizer,
)
from relu_sparsity.runs import lock
from relu_sparsity.runs.folder import check_writable_folder

log = logging.getLogger(__name__)

FORMAT = 2
CACHE_FILES = ("train.bin", "eval.bin", "meta.json")  # and one of TOKENIZER_FILES
TOKENIZER_FILES = ("tokenizer.model", TOKENIZER_FILE)
SPLITS = ("train", "eval")
TOKENIZER_SAMPLE_CHARS = 100_000_000  # the tokenizer trains on at most about this much text
# Encoding works on line-aligned chunks of about this many characters so the batch API can spread a
# big document over threads; '\n' is an atomic piece, so cutting after a newline does not change the
# tokens.
ENCODE_CHUNK_CHARS = 1 << 16
ENCODE_BATCH_CHARS = 1 << 21  # characters per encode call


def prepare(
    cache_dir: str | os.PathLike,
    source=DEFAULT_CORPUS,
    *,
    vocab_size: int = 4096,
    eval_fraction: float = 0.02,
    seed: int = 0,
    vocab: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    text_key: str = "text",
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
    progress: bool = True,
    hf_tokenizer: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Builds (or reuses) the token cache of `source` in `cache_dir` and returns `cache_dir`.

    source: "default" (this Python's stdlib sources), text files / folders (data/corpus.py), or
    a source object such as data.tfds.TfdsSource. vocab: an existing SentencePiece model to use
    instead of training one (vocab_size is then the model's). max_tokens: stop after about this
    many tokens (a deterministic prefix). hf_tokenizer: a Hugging Face checkpoint folder whose
    tokenizer.json encodes the corpus (vocab_size is then the model's). The cache is reused when
    its meta.json records the
    same corpus fingerprint and settings; otherwise it is built in `<cache_dir>.tmp-<pid>` and
    moved into place.
    """
    _check_arguments(vocab_size, eval_fraction, max_tokens, tokenizer_sample_chars)
    cache_dir = pathlib.Path(cache_dir).expanduser()
    if not (cache_dir / "meta.json").is_file():  # a finished cache may be reused read-only
        check_writable_folder(cache_dir, "token cache folder", replaced=True)
        _check_replaceable(cache_dir)
    if vocab is not None and hf_tokenizer is not None:
        raise ValueError("give a SentencePiece --vocab or --hf-tokenizer, not both")
    vocab_model = load_vocabulary(vocab) if vocab is not None else None
    hf = HfTokenizer(hf_tokenizer) if hf_tokenizer is not None else None
    source = open_source(source, eval_fraction=eval_fraction, seed=seed, text_key=text_key)
    settings = {
        "format": FORMAT, "source": source.kind, "requested_vocab_size": vocab_size,
        "eval_fraction": eval_fraction, "seed": seed, "max_tokens": max_tokens,
        "tokenizer_sample_chars": tokenizer_sample_chars,
        "vocab_file_sha256": hashlib.sha256(vocab_model).hexdigest() if vocab_model else None,
    }
    if hf is not None:
        settings["hf_tokenizer_sha256"] = hf.fingerprint()
    if _reusable(cache_dir, settings, source.fingerprint()):
        log.info("reusing token cache %s (corpus %s)", cache_dir, source.fingerprint()[:12])
        return cache_dir
    check_writable_folder(cache_dir, "token cache folder", replaced=True)
    log.info("preparing token cache %s from %s", cache_dir,
             json.dumps({k: v for k, v in source.describe().items() if v is not None}))
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_file = cache_dir.with_name(f"{cache_dir.name}.lock")
    with lock.held(lock_file, f"token cache folder {cache_dir}"), terminate_as_interrupt():
        remove_stale_builds(cache_dir)
        meta = _build(cache_dir, source, settings, vocab, vocab_model, vocab_size, seed,
                      tokenizer_sample_chars, max_tokens, eval_fraction, progress, hf)
    if meta is None:
        return cache_dir
    total = meta["train_tokens"] + meta["eval_tokens"]
    asked = f", asked {100 * eval_fraction:.2f}%" if source.kind != "tfds" else ""
    log.info("prepared %s: %d train + %d eval tokens (eval %.2f%% of the tokens%s), vocab %d, "
             "unigram entropy %.3f nats", cache_dir, meta["train_tokens"], meta["eval_tokens"],
             100 * meta["eval_tokens"] / total, asked, meta["vocab_size"],
             meta["unigram_entropy_nats"])
    return cache_dir


def _build(cache_dir, source, settings, vocab, vocab_model, vocab_size, seed,
           tokenizer_sample_chars, max_tokens, eval_fraction, progress,
           hf: HfTokenizer | None) -> dict | None:
    """Builds the cache in `<cache_dir>.tmp-<pid>` and moves it into place; its meta, or None
    where another process installed the same cache meanwhile."""
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if hf is not None:
            encoder, tokenizer = hf, {"hf": str(hf.file.parent.resolve()), "eos_id": hf.eos_id()}
            shutil.copyfile(hf.file, tmp / TOKENIZER_FILE)
        else:
            if vocab_model is not None:
                model, tokenizer = vocab_model, {"file": str(vocab)}
            else:
                model, tokenizer = _train_tokenizer(source, vocab_size, seed,
                                                    tokenizer_sample_chars)
            (tmp / "tokenizer.model").write_bytes(model)
            encoder = spm.SentencePieceProcessor(model_proto=model)
        meta = {**settings, **source.describe(), "corpus_hash": source.fingerprint(),
                **encode_corpus(tmp, source, encoder, max_tokens, eval_fraction, progress),
                "tokenizer": tokenizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            _install(tmp, cache_dir)
        except OSError:
            # Another process may have installed the same cache meanwhile; use it if it matches.
            if _reusable(cache_dir, settings, source.fingerprint()):
                log.info("another process built %s meanwhile; using it", cache_dir)
                return None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as SIGINT does, so that the temporary build is
    removed on either."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def remove_stale_builds(cache_dir: pathlib.Path) -> None:
    """Removes the temporary folders that stopped builds of `cache_dir` left: with its lock
    held, no other build of it runs."""
    for path in cache_dir.parent.glob(f"{glob.escape(cache_dir.name)}.*-*"):
        if path.is_dir() and re.fullmatch(r"(tmp|old)-\d+", path.name[len(cache_dir.name) + 1:]):
            log.warning("removing %s, left by a build that stopped", path)
            shutil.rmtree(path, ignore_errors=True)


def _check_arguments(vocab_size, eval_fraction, max_tokens, tokenizer_sample_chars) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} ({RESERVED_PIECES} pieces are reserved "
            f"for special tokens, bytes and newline), got {vocab_size}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if tokenizer_sample_chars < 1:
        raise ValueError(f"tokenizer_sample_chars must be positive, got {tokenizer_sample_chars}")


def _train_tokenizer(source, vocab_size: int, seed: int, sample_chars: int
                     ) -> tuple[bytes, dict]:
    """A SentencePiece model trained on the first `sample_chars` characters of the train split,
    and the options it was trained with (for meta.json)."""
    started = time.perf_counter()
    sample = tokenizer_sample(source.documents(), sample_chars)
    options = tokenizer_options(vocab_size, MAX_TOKENIZER_SENTENCES, os.cpu_count() or 1)
    hidden = rare_characters(sample, vocab_size, options["character_coverage"])
    if hidden:
        log.info("vocab %d is small: %d rare characters left to byte fallback", vocab_size,
                 len(hidden))
    if any("\u2581" in text for text in sample):
        # SentencePiece writes spaces as U+2581, so a literal U+2581 decodes back as a space.
        log.warning("corpus contains U+2581 ('\u2581'); it will decode as a plain space")
    model = train_tokenizer(sample, options, seed, hidden)
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if pieces < vocab_size:
        log.warning("corpus too small for vocab_size=%d: tokenizer has %d pieces", vocab_size,
                    pieces)
    log.info("tokenizer trained on %d characters in %.1fs", sum(map(len, sample)),
             time.perf_counter() - started)
    options = {k: v for k, v in options.items() if k not in ("minloglevel", "num_threads")}
    return model, {**options, "hidden_training_chars": len(hidden),
                   "sample_chars": sum(map(len, sample))}


class SplitWriter:
    """One split's token file: documents queued as line-aligned chunks, encoded a batch at a
    time (SentencePiece's batch API spreads it over threads), each followed by its eos."""

    def __init__(self, path: pathlib.Path, sp, dtype, vocab_size: int):
        self.file = path.open("wb")
        self.sp, self.dtype = sp, dtype
        self.eos = np.array([sp.eos_id()], dtype=dtype)
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.tokens, self.documents = 0, 0
        self.queue: list[tuple[str, bool]] = []  # (chunk, does a document end after it?)
        self.queued_chars = 0

    def add(self, document: Document) -> None:
        pieces = list(line_chunks(document.text, ENCODE_CHUNK_CHARS, split_long_lines=False))
        if not pieces:  # an empty document: just its eos
            pieces = [""]
        for j, piece in enumerate(pieces):
            self.queue.append((piece, document.ends and j == len(pieces) - 1))
            self.queued_chars += len(piece)
        self.documents += 1
        if self.queued_chars >= ENCODE_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.queue:
            return
        ids = self.sp.encode([chunk for chunk, _ in self.queue], num_threads=os.cpu_count() or 1)
        arrays = []
        for piece_ids, (_, ends) in zip(ids, self.queue, strict=True):
            arrays.append(np.asarray(piece_ids, dtype=self.dtype))
            if ends:
                arrays.append(self.eos)
        block = np.concatenate(arrays)
        block.tofile(self.file)
        self.counts += np.bincount(block, minlength=len(self.counts))[:len(self.counts)]
        self.tokens += block.size
        self.queue, self.queued_chars = [], 0

    def close(self) -> None:
        self.flush()
        self.file.close()


def encode_corpus(folder: pathlib.Path, source, sp, max_tokens: int | None,
                  eval_fraction: float, progress: bool) -> dict:
    """Streams the source's documents into folder/train.bin and folder/eval.bin; returns what
    meta.json records of them. With max_tokens, each split is a prefix of itself: the eval split
    of about eval_fraction of max_tokens, the train split of the rest, each ending with the
    first document that reaches its share. `sp` encodes: a SentencePiece processor, or an
    HfTokenizer, which offers the same methods."""
    vocab = sp.get_piece_size()
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    writers = {split: SplitWriter(folder / f"{split}.bin", sp, dtype, vocab) for split in SPLITS}
    bar = tqdm.tqdm(unit=" docs", desc="encode", file=sys.stderr, disable=not progress,
                    leave=False)
    started = time.perf_counter()

    def write(documents, quota=None):
        for document in documents:
            writer = writers[document.split]
            writer.add(document)
            if quota is not None:  # counted per document: the prefix ends on one
                writer.flush()
            bar.update(1)
            if bar.n % 256 == 0:
                done = sum(w.tokens for w in writers.values())
                bar.set_postfix(tokens=done,
                                tok_s=f"{done / (time.perf_counter() - started):.0f}")
            if quota is not None and writer.tokens >= quota:
                return

    try:
        if max_tokens is None:
            write(source.documents())
        else:
            eval_quota = max(1, round(max_tokens * eval_fraction))
            write(source.documents("train"), max_tokens - eval_quota)
            write(source.documents("eval"), eval_quota)
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    for split, writer in writers.items():
        if writer.tokens == 0:
            raise ValueError(f"the {split} split is empty: no document of the corpus went to it")
    train, eval_ = writers["train"], writers["eval"]
    return {"vocab_size": vocab, "dtype": dtype.name, "eos_id": sp.eos_id(),
            "train_tokens": train.tokens, "eval_tokens": eval_.tokens,
            "train_documents": train.documents, "eval_documents": eval_.documents,
            "unigram_entropy_nats": _entropy_nats(train.counts)}


def _entropy_nats(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _reusable(cache_dir: pathlib.Path, settings: dict, corpus_hash: str) -> bool:
    if not all((cache_dir / name).is_file() for name in CACHE_FILES) or \
            not any((cache_dir / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("corpus_hash") == corpus_hash and all(
        meta.get(k) == v for k, v in settings.items())


def _check_replaceable(cache_dir: pathlib.Path) -> None:
    """Only ever replace an empty folder or an old cache, never a folder of someone's files."""
    if cache_dir.is_dir() and any(cache_dir.iterdir()) and not (cache_dir / "meta.json").exists():
        raise FileExistsError(f"{cache_dir} exists and is not a token cache; pick another "
                              "cache folder")


def _install(tmp: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Moves the finished `tmp` build to `cache_dir`, replacing an old cache there."""
    if cache_dir.exists():
        _check_replaceable(cache_dir)
        old = cache_dir.with_name(f"{cache_dir.name}.old-{os.getpid()}")
        os.replace(cache_dir, old)
        os.replace(tmp, cache_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, cache_dir)
