"""The tokenizer: a SentencePiece BPE model trained on the corpus that keeps every character,
whitespace included (indentation is content), so decode(encode(s)) == s."""

import io
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm

# Training "sentences" are multi-line chunks of about this many characters: SentencePiece trains sentence
# by sentence, and chunks keep newlines and indentation inside them as content.
_TRAIN_CHUNK_CHARS = 2048
MAX_SENTENCE_BYTES = 1 << 16  # > 4 * _TRAIN_CHUNK_CHARS: every chunk fits even if all 4-byte UTF-8
# SentencePiece samples this many of the training chunks (shuffle_input_sentence).
MAX_TOKENIZER_SENTENCES = 200_000


def line_chunks(text: str, max_chars: int, split_long_lines: bool) -> Iterator[str]:
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
        max_sentence_length=MAX_SENTENCE_BYTES,
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
RESERVED_PIECES = 3 + 256 + 1
MIN_VOCAB_SIZE = RESERVED_PIECES + 16


def rare_characters(texts: Sequence[str], vocab_size: int, coverage: float) -> str:
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
    slots = vocab_size - RESERVED_PIECES
    if needed <= slots - 16:
        return ""
    keep = max(1, slots // 2)
    return "".join(chr(c) for c in order[keep:])


def _hide(text: str, table: dict[int, str] | None) -> str:
    # Rare characters become '\n', an atomic piece, so no merge is learned across the gap they leave.
    return text.translate(table) if table else text


def train_tokenizer(texts: Sequence[str], options: dict, seed: int, hidden_chars: str = "") -> bytes:
    """Trains SentencePiece from memory on multi-line chunks of `texts`; returns the model bytes.

    `hidden_chars` are replaced by newlines in the training text only (see `rare_characters`).
    """
    table = {ord(c): "\n" for c in hidden_chars} or None
    sentences = [
        _hide(chunk, table)
        for text in texts
        for chunk in line_chunks(text, _TRAIN_CHUNK_CHARS, split_long_lines=True)
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


def tokenizer_sample(documents, max_chars: int) -> list[str]:
    """The train documents' texts, in corpus order, up to about `max_chars` characters: what
    the tokenizer trains on, so a corpus of any size trains it in bounded memory."""
    sample, chars = [], 0
    for document in documents:
        if document.split != "train":
            continue
        sample.append(document.text)
        chars += len(document.text)
        if chars >= max_chars:
            break
    return sample


def load_vocabulary(path: str | os.PathLike) -> bytes:
    """An existing SentencePiece model's bytes (e.g. T5's C4 vocabulary), checked: it loads, and
    it has an end-of-document id to join documents with."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--vocab: no file {path}")
    model = path.read_bytes()
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--vocab: {path} is not a SentencePiece model ({err})") from None
    if processor.eos_id() < 0:
        raise ValueError(f"--vocab: {path} has no end-of-sequence piece (eos_id), which joins "
                         "documents in the cache")
    return model
