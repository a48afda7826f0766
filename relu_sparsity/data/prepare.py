"""Writing a token cache (`relu-sparsity prepare`): train the tokenizer, encode the splits into
flat memmaps, and install the finished folder in one rename.

Cache layout (one directory):
    train.bin, eval.bin   flat token ids (uint16 when the vocabulary fits, else uint32); documents
                          are joined with the tokenizer's end-of-document (eos) id
    tokenizer.model       SentencePiece BPE model (data/tokenizer.py)
    meta.json             what was built from what (see `prepare`); written last, so its
                          presence marks a complete build
"""

import json
import logging
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
import tqdm

from relu_sparsity.data.corpus import DEFAULT_CORPUS, read_corpus, split_documents
from relu_sparsity.data.tokenizer import (
    MIN_VOCAB_SIZE,
    RESERVED_PIECES,
    line_chunks,
    rare_characters,
    tokenizer_options,
    train_tokenizer,
)

log = logging.getLogger(__name__)

FORMAT = 1
CACHE_FILES = ("train.bin", "eval.bin", "tokenizer.model", "meta.json")
# Encoding works on line-aligned chunks of about this many characters so the batch API can spread a big
# document over threads; '\n' is an atomic piece, so cutting after a newline does not change the tokens.
_ENCODE_CHUNK_CHARS = 1 << 16
_ENCODE_BATCH_CHARS = 1 << 21  # characters per encode call (one progress-bar step)



def _encode_split(
    sp: spm.SentencePieceProcessor,
    texts: Sequence[str],
    out_path: pathlib.Path,
    dtype: np.dtype,
    eos_id: int,
    final_eos: bool,
    desc: str,
    vocab_size: int,
) -> tuple[int, np.ndarray]:
    """Encodes documents into `out_path` as one flat stream with eos after each; returns (count, bincount)."""
    num_threads = os.cpu_count() or 1
    counts = np.zeros(vocab_size, dtype=np.int64)
    total = 0
    eos = np.array([eos_id], dtype=dtype)
    # Work list: (chunk, does a document end after it?)
    work: list[tuple[str, bool]] = []
    for i, text in enumerate(texts):
        pieces = list(line_chunks(text, _ENCODE_CHUNK_CHARS, split_long_lines=False))
        ends = final_eos or i < len(texts) - 1
        if not pieces:  # empty document: just its eos
            if ends:
                work.append(("", True))
            continue
        work.extend((piece, ends and j == len(pieces) - 1) for j, piece in enumerate(pieces))

    with open(out_path, "wb") as f, tqdm.tqdm(
        total=sum(len(t) for t in texts), unit="char", unit_scale=True, desc=desc, file=sys.stderr,
        leave=False,
    ) as bar:
        start = 0
        while start < len(work):
            end, chars = start, 0
            while end < len(work) and (end == start or chars < _ENCODE_BATCH_CHARS):
                chars += len(work[end][0])
                end += 1
            batch = work[start:end]
            ids = sp.encode([chunk for chunk, _ in batch], num_threads=num_threads)
            arrays = []
            for piece_ids, (_, ends) in zip(ids, batch):
                arrays.append(np.asarray(piece_ids, dtype=dtype))
                if ends:
                    arrays.append(eos)
            if arrays:
                block = np.concatenate(arrays)
                block.tofile(f)
                counts += np.bincount(block, minlength=vocab_size)[:vocab_size]
                total += block.size
            bar.update(chars)
            start = end
    return total, counts


def _entropy_nats(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _settings(kind: str, vocab_size: int, eval_fraction: float, seed: int, max_sentences: int) -> dict:
    """What a cache must have been built with to be reused (besides the corpus hash)."""
    return {
        "format": FORMAT,
        "source": kind,
        "requested_vocab_size": vocab_size,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "max_tokenizer_sentences": max_sentences,
    }


def _reusable(cache_dir: pathlib.Path, settings: dict, corpus_hash: str) -> bool:
    meta_path = cache_dir / "meta.json"
    if not all((cache_dir / name).is_file() for name in CACHE_FILES):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("corpus_hash") == corpus_hash and all(meta.get(k) == v for k, v in settings.items())


def _install(tmp: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Moves the finished `tmp` build to `cache_dir`, replacing an old cache there."""
    if cache_dir.exists():
        contents = {p.name for p in cache_dir.iterdir()}
        # Only ever replace an empty folder or an old cache, never a folder of someone's files.
        if contents and "meta.json" not in contents:
            raise FileExistsError(f"{cache_dir} exists and is not a token cache; pick another cache folder")
        old = cache_dir.with_name(f"{cache_dir.name}.old-{os.getpid()}")
        os.replace(cache_dir, old)
        os.replace(tmp, cache_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, cache_dir)


def prepare(
    cache_dir: str | os.PathLike,
    source: str | Sequence[str | os.PathLike] = DEFAULT_CORPUS,
    *,
    vocab_size: int = 4096,
    eval_fraction: float = 0.02,
    seed: int = 0,
    max_tokenizer_sentences: int = 200_000,
) -> pathlib.Path:
    """Builds (or reuses) the token cache for `source` in `cache_dir` and returns `cache_dir`.

    source: "default" (this Python's stdlib sources) or a list of text files / directories.
    The cache is reused when its meta.json records the same source kind, corpus hash, requested vocab size,
    eval fraction, seed and tokenizer sentence budget; otherwise it is rebuilt in `<cache_dir>.tmp-<pid>`
    and moved into place, so an interrupted prepare leaves no half-written cache.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} ({RESERVED_PIECES} pieces are reserved for "
            f"special tokens, bytes and newline), got {vocab_size}"
        )
    if max_tokenizer_sentences < 1:
        raise ValueError(f"max_tokenizer_sentences must be positive, got {max_tokenizer_sentences}")
    started = time.perf_counter()
    cache_dir = pathlib.Path(cache_dir).expanduser()

    kind, docs, corpus = read_corpus(source)
    settings = _settings(kind, vocab_size, eval_fraction, seed, max_tokenizer_sentences)
    if _reusable(cache_dir, settings, corpus["corpus_hash"]):
        log.info(
            "reusing token cache %s (corpus %s, vocab %d)", cache_dir, corpus["corpus_hash"][:12], vocab_size
        )
        return cache_dir
    log.info(
        "preparing token cache %s from %s corpus: %d files, %.1f MB, vocab %d",
        cache_dir, kind, corpus["files"], corpus["bytes"] / 1e6, vocab_size,
    )
    if any("\u2581" in text for _, text in docs):
        # SentencePiece writes spaces as U+2581, so a literal U+2581 decodes back as a space.
        log.warning("corpus contains U+2581 ('\u2581'); it will decode as a plain space")

    train_texts, eval_texts, single = split_documents(docs, eval_fraction, seed)
    del docs

    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = {**settings, **corpus, **_build(tmp, train_texts, eval_texts, single, vocab_size,
                                              seed, max_tokenizer_sentences)}
        # meta.json last: its presence marks a complete build.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            _install(tmp, cache_dir)
        except OSError:
            # Another process may have installed the same cache meanwhile; use it if it matches.
            if _reusable(cache_dir, settings, corpus["corpus_hash"]):
                log.info("another process built %s meanwhile; using it", cache_dir)
                return cache_dir
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    log.info(
        "prepared %s in %.1fs: %d train + %d eval tokens (%.2f chars/token), vocab %d, unigram "
        "entropy %.3f nats", cache_dir, time.perf_counter() - started, meta["train_tokens"],
        meta["eval_tokens"], sum(map(len, train_texts)) / max(meta["train_tokens"], 1),
        meta["vocab_size"], meta["unigram_entropy_nats"],
    )
    return cache_dir


def _build(tmp: pathlib.Path, train_texts: list[str], eval_texts: list[str], single: bool,
           vocab_size: int, seed: int, max_tokenizer_sentences: int) -> dict:
    """Trains the tokenizer on the train split and encodes both splits into `tmp`; returns what
    meta.json records of them."""
    t0 = time.perf_counter()
    options = tokenizer_options(vocab_size, max_tokenizer_sentences, os.cpu_count() or 1)
    hidden = rare_characters(train_texts, vocab_size, options["character_coverage"])
    if hidden:
        log.info("vocab %d is small: %d rare characters left to byte fallback", vocab_size, len(hidden))
    model = train_tokenizer(train_texts, options, seed, hidden)
    (tmp / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    actual_vocab = sp.get_piece_size()
    eos_id = sp.eos_id()
    t_tok = time.perf_counter() - t0
    if actual_vocab < vocab_size:
        log.warning(
            "corpus too small for vocab_size=%d: tokenizer has %d pieces (ids < %d)",
            vocab_size, actual_vocab, actual_vocab,
        )

    t0 = time.perf_counter()
    dtype = np.dtype(np.uint16 if actual_vocab <= 65535 else np.uint32)
    train_tokens, train_counts = _encode_split(
        sp, train_texts, tmp / "train.bin", dtype, eos_id, not single, "encode train", actual_vocab
    )
    eval_tokens, _ = _encode_split(
        sp, eval_texts, tmp / "eval.bin", dtype, eos_id, True, "encode eval", actual_vocab
    )
    log.info("tokenizer trained in %.1fs, corpus encoded in %.1fs", t_tok, time.perf_counter() - t0)
    options = {k: v for k, v in options.items() if k != "minloglevel"}
    options["hidden_training_chars"] = len(hidden)  # ours, not SentencePiece's
    return {
        "vocab_size": actual_vocab,
        "dtype": dtype.name,
        "train_tokens": train_tokens,
        "eval_tokens": eval_tokens,
        "train_documents": len(train_texts),
        "eval_documents": len(eval_texts),
        "eos_id": eos_id,
        "unigram_entropy_nats": _entropy_nats(train_counts),
        "tokenizer": options,
    }
