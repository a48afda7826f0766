"""The corpus: the documents a token cache is built from, streamed in a fixed order, each
assigned to the train or the eval split.

Sources share one protocol: `describe()` (what meta.json records), `fingerprint()` (identifies
the content, so an unchanged corpus reuses its cache) and `documents(split=None)` (an iterator of
`Document`s, of one split or all, in the same order on every call, never holding the corpus in
memory).

- `DefaultCorpus`: the running Python's standard-library sources (test suites excluded), a file
  a document, so nothing is downloaded.
- `LocalText`: files and folders, read in sorted order. `.jsonl` files hold a document per line
  (its `text_key` field); `.txt` files a document per paragraph (blank-line separated, cut at
  64 KiB); any other text file is one document; `.gz` forms of each are read compressed.
- `TfdsSource` (data/tfds.py): a TFDS dataset on disk, read through seqio.

Local documents go to eval by a hash of their name (deterministic, independent of order), so with
many small documents the eval split holds about `eval_fraction` of the tokens; at least one
document lands on each side. A corpus of one document is cut on a line near (1 - eval_fraction).
"""

import gzip
import hashlib
import io
import json
import logging
import os
import pathlib
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "default"
PARAGRAPH_CHARS = 1 << 16  # a longer .txt paragraph is cut at a line boundary into pieces
READ_BYTES = 1 << 20


class Document(NamedTuple):
    split: str  # "train" or "eval"
    name: str  # stable: a file's relative path, "path:line" for .jsonl, "path#paragraph" for .txt
    text: str
    ends: bool = True  # an end-of-document token follows the text


# Directory names that hold test suites or third-party code inside the stdlib tree. `tests` also covers
# lib2to3/tests.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files() -> list[pathlib.Path]:
    """Every stdlib `*.py` outside site-/dist-packages and test suites, sorted by relative POSIX path."""
    root = _stdlib_root()
    found: list[tuple[str, pathlib.Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def eval_score(name: str, seed: int) -> float:
    """Deterministic uniform number in [0, 1) for a document name; < eval_fraction puts it in eval."""
    h = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _decode(data: bytes, path: pathlib.Path, strict: bool) -> str | None:
    """UTF-8 text; with `strict`, None (and a warning) for binary or non-UTF-8 data."""
    if not strict:
        return data.decode("utf-8", errors="replace")
    if b"\x00" not in data:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    log.warning("skipping %s: not UTF-8 text", path)
    return None


def _open_binary(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _kind(path: pathlib.Path) -> str:
    """How a file holds documents: "jsonl", "txt" or "file" (the `.gz` suffix looked through)."""
    suffix = pathlib.Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    return {".jsonl": "jsonl", ".txt": "txt"}.get(suffix, "file")


def _file_hash(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blank-line separated blocks of `lines` (kept with their newlines), cut at line boundaries
    where they pass PARAGRAPH_CHARS."""
    block, size = [], 0
    for line in lines:
        if not line.strip():
            if block:
                yield "".join(block)
            block, size = [], 0
            continue
        block.append(line)
        size += len(line)
        if size >= PARAGRAPH_CHARS:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def file_documents(rel: str, path: pathlib.Path, text_key: str, strict: bool
                   ) -> Iterator[tuple[str, str]]:
    """(name, text) of every document in one file, streamed."""
    kind = _kind(path)
    if kind == "file":
        with _open_binary(path) as f:
            text = _decode(f.read(), path, strict)
        if text is not None:
            yield rel, text
        return
    with _open_binary(path) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        try:
            if kind == "txt":
                for i, paragraph in enumerate(_paragraphs(lines)):
                    yield f"{rel}#{i}", paragraph
                return
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{rel}:{number}", _jsonl_text(line, text_key, path, number)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err})") from None


def _jsonl_text(line: str, text_key: str, path: pathlib.Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number} is not a JSON line ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise ValueError(f"{path}:{number} has no string field {text_key!r} (--text-key)")
    return record[text_key]


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


class _Split:
    """The hash rule over a source's document names, with the one-document fix-ups found by a
    scan of every name: the eval document closest to the threshold moves to train when every
    document would be eval, and the train one closest moves to eval when none would."""

    def __init__(self, names: Iterator[str], eval_fraction: float, seed: int):
        self.eval_fraction, self.seed, self.overrides = eval_fraction, seed, {}
        lowest_train, highest_eval, count = None, None, 0
        for name in names:
            count += 1
            score = eval_score(name, seed)
            if score < eval_fraction:
                if highest_eval is None or score > highest_eval[0]:
                    highest_eval = (score, name)
            elif lowest_train is None or score < lowest_train[0]:
                lowest_train = (score, name)
        self.count = count
        if count > 1 and highest_eval is None:
            self.overrides[lowest_train[1]] = "eval"
        if count > 1 and lowest_train is None:
            self.overrides[highest_eval[1]] = "train"

    def __call__(self, name: str) -> str:
        if name in self.overrides:
            return self.overrides[name]
        return "eval" if eval_score(name, self.seed) < self.eval_fraction else "train"


def cut_one_document(name: str, text: str, eval_fraction: float) -> Iterator[Document]:
    """A corpus of one document: the text cut on a line boundary near (1 - eval_fraction); the
    train part is an unfinished document (no end-of-document token), the eval part ends it."""
    cut = int(len(text) * (1.0 - eval_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else max(cut, 1)
    if cut >= len(text):  # tiny document: keep at least one character for eval
        cut = len(text) - 1
    yield Document("train", name, text[:cut], ends=False)
    yield Document("eval", name, text[cut:])


class LocalText:
    """Text files and folders (module docstring), split by the hash of document names."""
    kind = "files"

    def __init__(self, paths: Sequence[str | os.PathLike], *, eval_fraction: float = 0.02,
                 seed: int = 0, text_key: str = "text"):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ValueError("empty corpus: no source paths given")
        self.paths = [str(p) for p in paths]
        self.files = _local_files(paths)
        self.text_key, self.eval_fraction = text_key, eval_fraction
        self.strict = True
        self._scan(seed)

    def _named_documents(self) -> Iterator[tuple[str, str]]:
        for rel, path in self.files:
            yield from file_documents(rel, path, self.text_key, self.strict)

    def _scan(self, seed: int) -> None:
        """One pass over the corpus: the content hash, sizes, the documents' names (for the
        split) and a one-line error for a corpus with no text."""
        digest, sizes = hashlib.sha256(), 0
        for rel, path in self.files:
            # The hash covers names and contents: a changed, added, removed or renamed file
            # changes it.
            digest.update(f"{rel}\0{_file_hash(path)}\n".encode())
            sizes += path.stat().st_size
        self._fingerprint, self.bytes = digest.hexdigest(), sizes
        nonempty = [0]

        def names():
            for name, text in self._named_documents():
                nonempty[0] += bool(text)
                yield name

        self.split = _Split(names(), self.eval_fraction, seed)
        if not nonempty[0]:
            raise ValueError(f"empty corpus: no non-empty text in {', '.join(self.paths)}")

    def describe(self) -> dict:
        return {"source": self.kind, "files": len(self.files), "bytes": self.bytes,
                "documents": self.split.count, "paths": self.paths,
                "python_version": platform.python_version()}

    def fingerprint(self) -> str:
        return self._fingerprint

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """Every document in corpus order; with `split`, only that split's."""
        for document in self._documents():
            if split is None or document.split == split:
                yield document

    def _documents(self) -> Iterator[Document]:
        if self.split.count == 1:
            for name, text in self._named_documents():
                yield from cut_one_document(name, text, self.eval_fraction)
            return
        for name, text in self._named_documents():
            yield Document(self.split(name), name, text)


class DefaultCorpus(LocalText):
    """The running Python's standard-library sources: every `*.py` outside test suites and
    installed packages, a file a document, sorted by relative path."""
    kind = "default"

    def __init__(self, *, eval_fraction: float = 0.02, seed: int = 0):
        root = _stdlib_root()
        self.paths = [str(root)]
        self.files = [(path.relative_to(root).as_posix(), path)
                      for path in default_corpus_files()]
        self.text_key, self.eval_fraction = "text", eval_fraction
        self.strict = False  # undecodable bytes become U+FFFD: every stdlib file counts
        self._scan(seed)

    def describe(self) -> dict:
        return {**super().describe(), "paths": None}


def open_source(source, *, eval_fraction: float, seed: int, text_key: str = "text"):
    """"default" -> DefaultCorpus; paths -> LocalText; a source object passes through."""
    if isinstance(source, str) and source == DEFAULT_CORPUS:
        return DefaultCorpus(eval_fraction=eval_fraction, seed=seed)
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return LocalText(source, eval_fraction=eval_fraction, seed=seed, text_key=text_key)
    return source
