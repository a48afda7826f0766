"""The corpus: which documents a token cache is built from, in a fixed order, and how they split
into train and eval.

The default corpus is the running Python's standard-library sources (test suites excluded), so
nothing is downloaded; otherwise text files and folders. Documents are read in sorted order and
hashed (names and contents), so the same corpus always gives the same cache.
"""

import hashlib
import logging
import os
import pathlib
import platform
import sysconfig
from collections.abc import Sequence

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "default"

# Directory names that hold test suites or third-party code inside the stdlib tree. `tests` also covers
# lib2to3/tests.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

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


def read_corpus(source: str | Sequence[str | os.PathLike]) -> tuple[str, list[tuple[str, str]], dict]:
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


def split_documents(
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
