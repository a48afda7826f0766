"""Token data: `prepare` builds a packed token cache (train/eval memmaps + tokenizer), `TokenCache` reads it.

Cache layout (one directory):
    train.bin, eval.bin   flat token ids (uint16 when the vocabulary fits, else uint32); documents are
                          joined with the tokenizer's end-of-document (eos) id
    tokenizer.model       SentencePiece BPE model that keeps whitespace exactly (decode(encode(s)) == s)
    meta.json             what was built from what (see `prepare`)

The default corpus is the running Python's standard-library sources, so nothing is downloaded.
"""

import hashlib
import io
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tqdm

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "default"
FORMAT = 1
SPLITS = ("train", "eval")
_SPLIT_IDS = {"train": 0, "eval": 1}
_CACHE_FILES = ("train.bin", "eval.bin", "tokenizer.model", "meta.json")

# Directory names that hold test suites or third-party code inside the stdlib tree. `tests` also covers
# lib2to3/tests.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

# Training "sentences" are multi-line chunks of about this many characters: SentencePiece trains sentence
# by sentence, and chunks keep newlines and indentation inside them as content.
_TRAIN_CHUNK_CHARS = 2048
_MAX_SENTENCE_BYTES = 1 << 16  # > 4 * _TRAIN_CHUNK_CHARS: every chunk fits even if all 4-byte UTF-8
# Encoding works on line-aligned chunks of about this many characters so the batch API can spread a big
# document over threads; '\n' is an atomic piece, so cutting after a newline does not change the tokens.
_ENCODE_CHUNK_CHARS = 1 << 16
_ENCODE_BATCH_CHARS = 1 << 21  # characters per encode call (one progress-bar step)


# ----------------------------------------------------------------------------------------------------
# Corpus


def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files() -> list[pathlib.Path]:
    """Every stdlib `*.py` outside site-/dist-packages and test suites, sorted by relative POSIX path."""
    root = _stdlib_root()
    found: list[tuple[str, pathlib.Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _is_text(data: bytes) -> str | None:
    """The decoded text, or None for files that are not UTF-8 text (NUL bytes count as binary)."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _local_files(paths: Sequence[str | os.PathLike]) -> list[tuple[str, pathlib.Path]]:
    """(relative name, absolute path) for every file named or under a named directory, sorted by name.

    A file's name is its basename; a file under directory D is named D.name/<path relative to D>, so the
    names (and with them the split and the corpus hash) do not depend on where the corpus lives.
    """
    entries: dict[pathlib.Path, str] = {}
    for raw in paths:
        path = pathlib.Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus path not found: {str(raw)!r}")
        path = path.resolve()
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in filenames:
                    file = pathlib.Path(dirpath, name)
                    if file.is_file():
                        rel = (pathlib.Path(path.name) / file.relative_to(path)).as_posix()
                        entries.setdefault(file, rel)
        elif path.is_file():
            entries.setdefault(path, path.name)
        else:
            raise FileNotFoundError(f"corpus path is neither a regular file nor a directory: {str(raw)!r}")
    return sorted(((rel, path) for path, rel in entries.items()), key=lambda item: (item[0], str(item[1])))


def _read_corpus(source: str | Sequence[str | os.PathLike]) -> tuple[str, list[tuple[str, str]], dict]:
    """Returns (source kind, [(relative name, text)] in fixed order, corpus metadata)."""
    if isinstance(source, str) and source == DEFAULT_CORPUS:
        kind = "default"
        root = _stdlib_root()
        named = [(path.relative_to(root).as_posix(), path) for path in default_corpus_files()]
    else:
        kind = "files"
        if isinstance(source, (str, os.PathLike)):
            source = [source]  # one path given on its own
        if not source:
            raise ValueError("empty corpus: no source paths given")
        named = _local_files(source)

    docs: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    num_bytes = 0
    skipped = 0
    for rel, path in named:
        data = path.read_bytes()
        if kind == "default":
            text = data.decode("utf-8", errors="replace")
        else:
            text = _is_text(data)
            if text is None:
                log.warning("skipping %s: not UTF-8 text", path)
                skipped += 1
                continue
        docs.append((rel, text))
        num_bytes += len(data)
        # The hash covers names and contents, so a changed, added, removed or renamed file changes it.
        digest.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())

    if not docs or not any(text for _, text in docs):
        where = "the standard library" if kind == "default" else ", ".join(map(str, source))
        raise ValueError(f"empty corpus: no non-empty text files found in {where}")
    corpus = {
        "source": kind,
        "files": len(docs),
        "bytes": num_bytes,
        "corpus_hash": digest.hexdigest(),
        "python_version": platform.python_version(),
    }
    if kind == "files":
        corpus["paths"] = [str(p) for p in source]
        corpus["skipped_files"] = skipped
    return kind, docs, corpus


def _eval_score(rel: str, seed: int) -> float:
    """Deterministic uniform number in [0, 1) for a document name; < eval_fraction puts it in eval."""
    h = hashlib.sha256(f"{seed}\0{rel}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _split_documents(
    docs: list[tuple[str, str]], eval_fraction: float, seed: int
) -> tuple[list[str], list[str], bool]:
    """Texts of the (train, eval) documents, and whether the final train text lacks its eos.

    With one document, its text is cut on a line boundary near (1 - eval_fraction) of its length: the train
    part is an unfinished document (no eos), the eval part ends the document.
    """
    if len(docs) == 1:
        text = docs[0][1]
        cut = int(len(text) * (1.0 - eval_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else max(cut, 1)
        if cut >= len(text):  # tiny document: keep at least one character for eval
            cut = len(text) - 1
        return [text[:cut]], [text[cut:]], True

    scores = [_eval_score(rel, seed) for rel, _ in docs]
    is_eval = [s < eval_fraction for s in scores]
    # At least one document on each side: move the one whose score is closest to the threshold.
    if not any(is_eval):
        is_eval[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_eval):
        is_eval[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [text for (_, text), e in zip(docs, is_eval) if not e]
    evals = [text for (_, text), e in zip(docs, is_eval) if e]
    return train, evals, False


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _line_chunks(text: str, max_chars: int, split_long_lines: bool) -> Iterator[str]:
    """Consecutive pieces of `text`, cut after newlines, about `max_chars` each; they join back to `text`."""
    start = 0
    n = len(text)
    while start < n:
        end = start + max_chars
        if end >= n:
            yield text[start:]
            return
        newline = text.rfind("\n", start, end)
        if newline >= start:
            end = newline + 1
        elif not split_long_lines:
            newline = text.find("\n", end)
            end = n if newline < 0 else newline + 1
        yield text[start:end]
        start = end


def tokenizer_options(vocab_size: int, max_sentences: int, num_threads: int) -> dict:
    """SentencePiece BPE options that keep every character of source code, whitespace included."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        # No normalization: whitespace runs, tabs and newlines are content in code.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        # Characters outside the learned vocabulary become UTF-8 byte pieces instead of <unk>.
        byte_fallback=True,
        character_coverage=0.9995,
        # Pieces start at a space; runs of spaces (indentation) may become their own pieces.
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        split_digits=False,
        # '\n' is one atomic piece: lines never merge, and cutting text after a newline leaves tokens alone.
        user_defined_symbols=["\n"],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        # A small corpus cannot fill a big vocabulary; stop early instead of failing.
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )


# Pieces every model has besides learned ones: <unk>, <s>, </s>, 256 byte pieces and the '\n' symbol.
_RESERVED_PIECES = 3 + 256 + 1
MIN_VOCAB_SIZE = _RESERVED_PIECES + 16


def _rare_characters(texts: Sequence[str], vocab_size: int, coverage: float) -> str:
    """Characters to hide from tokenizer training because a small vocabulary cannot hold them ("" if none).

    SentencePiece refuses to train when the characters needed for `character_coverage` (which it keeps
    >= 0.98) plus the reserved pieces exceed vocab_size. With byte fallback, rare characters can live as
    bytes, so for a small vocabulary train on the most frequent characters only, leaving about half the
    learnable slots for merges.
    """
    counts = np.zeros(0x110000, dtype=np.int64)
    for text in texts:
        codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        found = np.bincount(codepoints)
        counts[: found.size] += found
    counts[ord("\n")] = 0  # '\n' is a reserved piece already
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]  # characters present, most frequent first
    covered = np.cumsum(counts[order]) / max(counts.sum(), 1)
    needed = int(np.searchsorted(covered, coverage)) + 1
    slots = vocab_size - _RESERVED_PIECES
    if needed <= slots - 16:
        return ""
    keep = max(1, slots // 2)
    return "".join(chr(c) for c in order[keep:])


def _hide(text: str, table: dict[int, str] | None) -> str:
    # Rare characters become '\n', an atomic piece, so no merge is learned across the gap they leave.
    return text.translate(table) if table else text


def train_tokenizer(texts: Sequence[str], options: dict, seed: int, hidden_chars: str = "") -> bytes:
    """Trains SentencePiece from memory on multi-line chunks of `texts`; returns the model bytes.

    `hidden_chars` are replaced by newlines in the training text only (see `_rare_characters`).
    """
    table = {ord(c): "\n" for c in hidden_chars} or None
    sentences = [
        _hide(chunk, table)
        for text in texts
        for chunk in _line_chunks(text, _TRAIN_CHUNK_CHARS, split_long_lines=True)
    ]
    if not sentences:
        raise ValueError("empty corpus: the train split has no text to train a tokenizer on")
    spm.set_random_generator_seed(seed)  # the sentence sampling is random otherwise
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **options)
    except RuntimeError as err:
        raise RuntimeError(
            f"SentencePiece training failed (vocab_size={options['vocab_size']}, "
            f"{len(sentences)} sentences): {err}"
        ) from err
    return writer.getvalue()


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
        pieces = list(_line_chunks(text, _ENCODE_CHUNK_CHARS, split_long_lines=False))
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


# ----------------------------------------------------------------------------------------------------
# prepare


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
    if not all((cache_dir / name).is_file() for name in _CACHE_FILES):
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
            f"vocab_size must be at least {MIN_VOCAB_SIZE} ({_RESERVED_PIECES} pieces are reserved for "
            f"special tokens, bytes and newline), got {vocab_size}"
        )
    if max_tokenizer_sentences < 1:
        raise ValueError(f"max_tokenizer_sentences must be positive, got {max_tokenizer_sentences}")
    started = time.perf_counter()
    cache_dir = pathlib.Path(cache_dir).expanduser()

    kind, docs, corpus = _read_corpus(source)
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

    train_texts, eval_texts, single = _split_documents(docs, eval_fraction, seed)
    del docs

    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        options = tokenizer_options(vocab_size, max_tokenizer_sentences, os.cpu_count() or 1)
        hidden = _rare_characters(train_texts, vocab_size, options["character_coverage"])
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
        t_enc = time.perf_counter() - t0
        options = {k: v for k, v in options.items() if k != "minloglevel"}
        options["hidden_training_chars"] = len(hidden)  # ours, not SentencePiece's

        meta = {
            **settings,
            **corpus,
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
        "prepared %s in %.1fs (tokenizer %.1fs, encode %.1fs): %d train + %d eval tokens "
        "(%.2f chars/token), vocab %d, unigram entropy %.3f nats",
        cache_dir, time.perf_counter() - started, t_tok, t_enc, train_tokens, eval_tokens,
        sum(map(len, train_texts)) / max(train_tokens, 1), actual_vocab, meta["unigram_entropy_nats"],
    )
    return cache_dir


# ----------------------------------------------------------------------------------------------------
# Reading


class TokenCache:
    """Read-only view of a prepared cache: deterministic training batches by step, fixed eval windows."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = pathlib.Path(cache_dir).expanduser()
        missing = [name for name in _CACHE_FILES if not (self.path / name).is_file()]
        if missing:
            if self.path.exists():
                what = f"is incomplete (missing {', '.join(missing)})"
            else:
                what = "does not exist"
            raise FileNotFoundError(
                f"token cache {self.path} {what}; run `relu-sparsity prepare` to build it"
            )
        self.meta: dict = json.loads((self.path / "meta.json").read_text())
        self.vocab_size: int = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self._tokens: dict[str, np.ndarray] = {}
        for split in SPLITS:
            count = int(self.meta[f"{split}_tokens"])
            file = self.path / f"{split}.bin"
            if file.stat().st_size != count * dtype.itemsize:
                raise ValueError(
                    f"token cache {self.path} is corrupt: {file.name} has {file.stat().st_size} bytes, "
                    f"meta.json says {count} {dtype.name} tokens; run `relu-sparsity prepare` again"
                )
            # np.memmap cannot map an empty file.
            self._tokens[split] = (
                np.memmap(file, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
            )

    def _split(self, split: str) -> np.ndarray:
        if split not in self._tokens:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._tokens[split]

    def num_tokens(self, split: str) -> int:
        return int(self._split(split).shape[0])

    def _check_window(self, split: str, batch_size: int, seq_len: int) -> np.ndarray:
        tokens = self._split(split)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if tokens.shape[0] < seq_len + 2:
            raise ValueError(
                f"the {split} split has {tokens.shape[0]} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                "use a shorter seq_len or a bigger corpus"
            )
        return tokens

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, *, seed: int = 0) -> np.ndarray:
        """int32 [batch_size, seq_len + 1] windows of consecutive tokens at random offsets.

        inputs = out[:, :-1], targets = out[:, 1:]. Depends only on (split, step, batch_size, seq_len,
        seed), so a resumed run sees exactly the batches it would have seen.
        """
        tokens = self._check_window(split, batch_size, seq_len)
        rng = np.random.default_rng([seed, step, _SPLIT_IDS[split]])
        starts = rng.integers(0, tokens.shape[0] - seq_len - 1, batch_size)  # [batch_size]
        index = starts[:, None] + np.arange(seq_len + 1)  # [batch_size, seq_len + 1]
        return np.asarray(tokens[index], dtype=np.int32)

    def eval_batches(self, num_batches: int, batch_size: int, seq_len: int) -> Iterator[np.ndarray]:
        """`num_batches` int32 [batch_size, seq_len + 1] eval-split windows, the same on every call.

        Window starts are evenly spaced from the first to the last possible offset; they do not overlap
        whenever the split holds num_batches * batch_size * (seq_len + 1) tokens.
        """
        tokens = self._check_window("eval", batch_size, seq_len)
        if num_batches < 1:
            raise ValueError(f"num_batches must be positive, got {num_batches}")
        window = seq_len + 1
        count = num_batches * batch_size
        last = tokens.shape[0] - window  # last valid start
        starts = (np.arange(count, dtype=np.int64) * last) // max(count - 1, 1)  # [count]
        # [num_batches, batch_size, window]
        index = starts.reshape(num_batches, batch_size, 1) + np.arange(window)
        # Checked above, not on the first next(): a bad seq_len fails where eval_batches is called.
        return (np.asarray(tokens[i], dtype=np.int32) for i in index)

    def tokenizer(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.path / "tokenizer.model"))

    def __repr__(self) -> str:
        return (
            f"TokenCache({str(self.path)!r}, vocab={self.vocab_size}, "
            f"train={self.num_tokens('train')}, eval={self.num_tokens('eval')})"
        )
