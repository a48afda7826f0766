"""Reading a token cache: where a batch comes from. `TokenCache.batch(split, step, ...)` is a
deterministic function of the step (so a resumed run sees exactly the batches it would have
seen); `open_cache` finds or builds the cache a configuration asks for."""

import hashlib
import json
import logging
import os
import pathlib
import platform
from collections.abc import Iterator

import numpy as np
import sentencepiece as spm

from relu_sparsity.data.corpus import DEFAULT_CORPUS
from relu_sparsity.data.hf_tokenizer import TOKENIZER_FILE, HfTokenizer
from relu_sparsity.data.prepare import CACHE_FILES, TOKENIZER_FILES, prepare

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
_SPLIT_IDS = {"train": 0, "eval": 1}


class TokenCache:
    """Read-only view of a prepared cache: deterministic training batches by step, fixed eval windows."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = pathlib.Path(cache_dir).expanduser()
        missing = [name for name in CACHE_FILES if not (self.path / name).is_file()]
        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            missing.append(" or ".join(TOKENIZER_FILES))
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

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, *, seed: int = 0,
              rows: slice = slice(None)) -> np.ndarray:
        """int32 [batch_size, seq_len + 1] windows of consecutive tokens at random offsets, or
        only the `rows` of them (one process's part of a global batch).

        inputs = out[:, :-1], targets = out[:, 1:]. Depends only on (split, step, batch_size, seq_len,
        seed), so a resumed run sees exactly the batches it would have seen, and the processes of a
        multi-process run read disjoint rows of the same global batch.
        """
        tokens = self._check_window(split, batch_size, seq_len)
        rng = np.random.default_rng([seed, step, _SPLIT_IDS[split]])
        starts = rng.integers(0, tokens.shape[0] - seq_len - 1, batch_size)[rows]  # [rows]
        index = starts[:, None] + np.arange(seq_len + 1)  # [rows, seq_len + 1]
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

    def tokenizer(self) -> spm.SentencePieceProcessor | HfTokenizer:
        """The cache's tokenizer: its SentencePiece model, or a Hugging Face tokenizer.json."""
        if (self.path / TOKENIZER_FILE).is_file():
            return HfTokenizer(self.path, eos=int(self.meta["eos_id"]), vocab=self.vocab_size)
        return spm.SentencePieceProcessor(model_file=str(self.path / "tokenizer.model"))

    def __repr__(self) -> str:
        return (
            f"TokenCache({str(self.path)!r}, vocab={self.vocab_size}, "
            f"train={self.num_tokens('train')}, eval={self.num_tokens('eval')})"
        )


def default_cache_dir(source, vocab_size: int) -> pathlib.Path:
    """The per-user cache folder of a corpus source and vocabulary size (`$RELU_SPARSITY_CACHE`,
    else ~/.cache/relu-sparsity)."""
    root = pathlib.Path(os.environ.get("RELU_SPARSITY_CACHE",
                                       pathlib.Path.home() / ".cache" / "relu-sparsity"))
    if source == DEFAULT_CORPUS:
        tag = f"stdlib-py{platform.python_version()}"
    else:
        paths = [source] if isinstance(source, str) else list(source)
        tag = "files-" + hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    return root / f"{tag}-v{vocab_size}"


def open_cache(source, vocab_size: int, cache: str | None = None) -> TokenCache:
    """The token cache at `cache`, which must exist; or, with none given, the per-user cache of
    `source`, prepared on first use."""
    cache_dir = pathlib.Path(cache) if cache else default_cache_dir(source, vocab_size)
    if not (cache_dir / "meta.json").exists():
        if cache:
            raise FileNotFoundError(f"no token cache at {cache_dir}; build it with "
                                    "`relu-sparsity prepare`")
        log.info("preparing the token cache at %s", cache_dir)
        paths = source if source == DEFAULT_CORPUS else (
            [source] if isinstance(source, str) else source)
        prepare(cache_dir, paths, vocab_size=vocab_size)
    token_cache = TokenCache(cache_dir)
    if token_cache.vocab_size != vocab_size:
        log.warning("token cache %s has vocabulary %d, the config asks %d: using the cache's",
                    cache_dir, token_cache.vocab_size, vocab_size)
    return token_cache
