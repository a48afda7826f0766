"""One writer per folder: a lock file holding the writer's pid and host, made with an atomic
link (so that it is never seen half-written) and removed when the writer is done. A lock left
by a process that no longer runs on this host is stale and is taken over; a lock of a live
process, or of another host (whose processes cannot be checked from here), refuses the second
writer."""

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

_held: set[Path] = set()  # the locks this process holds, for `release_all`


class FolderLocked(ValueError):
    """Another process writes the folder."""


def read_holder(lock_file: Path) -> dict | None:
    """The lock's {"pid", "host"}, or None when there is no lock (or one removed meanwhile)."""
    try:
        holder = json.loads(lock_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None}
    return holder if isinstance(holder, dict) else {"pid": None, "host": None}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(holder: dict) -> bool:
    """A lock of this host whose process is gone."""
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid() and not process_alive(pid))


def _try_create(lock_file: Path, content: str) -> bool:
    """Creates the lock with `content`, or returns False when one exists."""
    tmp = lock_file.with_name(f"{lock_file.name}.tmp-{os.getpid()}")
    tmp.write_text(content)
    try:
        os.link(tmp, lock_file)  # atomic, and fails where the lock exists
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        return _try_create_exclusive(lock_file, content)
    finally:
        tmp.unlink(missing_ok=True)


def _try_create_exclusive(lock_file: Path, content: str) -> bool:
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


def _remove_if_unchanged(lock_file: Path, holder: dict) -> None:
    """Removes the stale lock `holder`, but not a lock another process made in its place after
    taking it over first."""
    moved = lock_file.with_name(f"{lock_file.name}.stale-{os.getpid()}")
    try:
        os.rename(lock_file, moved)
    except FileNotFoundError:
        return
    if read_holder(moved) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(moved, lock_file)
    moved.unlink(missing_ok=True)


def acquire(lock_file: Path, what: str) -> None:
    """Takes the lock of `what` (a folder, for messages), taking over a stale one; raises
    FolderLocked naming the holder otherwise."""
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(3):  # a stale lock is removed, then the creation tried again
        if _try_create(lock_file, content):
            _held.add(lock_file)
            return
        holder = read_holder(lock_file)
        if holder is None:
            continue
        if not is_stale(holder):
            who = (f"process {holder.get('pid')} on host {holder.get('host')}"
                   if holder.get("pid") is not None else "a process that left no readable pid")
            raise FolderLocked(
                f"{what} is in use by {who} (lock file {lock_file}); wait for it to finish, "
                "or remove the lock file if that process is gone")
        log.warning("%s: taking over the lock of process %s on %s, which no longer runs",
                    what, holder["pid"], holder["host"])
        _remove_if_unchanged(lock_file, holder)
    raise FolderLocked(f"{what}: cannot take the lock {lock_file}")


def release(lock_file: Path) -> None:
    """Removes the lock if this process holds it."""
    _held.discard(lock_file)
    holder = read_holder(lock_file)
    if holder is not None and holder.get("pid") == os.getpid() \
            and holder.get("host") == socket.gethostname():
        lock_file.unlink(missing_ok=True)


def release_all() -> None:
    """Releases every lock this process holds: for a process about to end abruptly
    (os._exit), whose `held` blocks never finish."""
    for lock_file in list(_held):
        release(lock_file)


@contextlib.contextmanager
def held(lock_file: str | Path, what: str, *, take: bool = True):
    """The lock held for the block; with `take` False (processes other than 0 of a run) a
    no-op."""
    lock_file = Path(lock_file)
    if not take:
        yield
        return
    acquire(lock_file, what)
    try:
        yield
    finally:
        release(lock_file)


@contextlib.contextmanager
def folder_held(folder: str | Path, what: str):
    """`folder`, created, with its lock file `.lock` held for the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with held(folder / ".lock", f"{what} {folder}"):
        yield
