"""A run's checkpoints on orbax-checkpoint: the train state's arrays (possibly sharded over the
devices of several processes) and the host-side meta (unit states, the pruning decision).

Each checkpoint is one orbax step folder `<directory>/<step, 8 digits>/` with two items:
`state`, the state's arrays (orbax's StandardSave: tensorstore OCDBT, every process writes the
shards it holds), and `meta`, a JSON file that process 0 writes (numpy arrays encoded with their
dtype and shape, so that they come back equal). The meta reads on its own, before any array:
it says the shapes of the state (a compacted checkpoint has other widths than the configuration).

Every process makes the same calls in the same order (orbax synchronizes the processes inside
them). A save writes under a temporary name that orbax renames when every process is done, so a
crash mid-save leaves the checkpoints before it readable; the oldest beyond `keep` is deleted
only after the new one is complete.

Once a save is complete, process 0 writes `checksums.json` into its step folder: the SHA-256 of
every file. Orbax and TensorStore do not notice bytes changed in place in an uncompressed chunk,
so a restore checks the files against it first and treats a mismatch as an unreadable
checkpoint.
"""

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from relu_sparsity.runs.folder import STEP_DIGITS

log = logging.getLogger(__name__)

LEGACY_GLOB = "ckpt_*.msgpack"
ARRAY_TAG = "__ndarray__"
CHECKSUMS_FILE = "checksums.json"
# A read's outcome; the processes take the largest.
READ, UNREADABLE, MISMATCH, DENIED = 0, 1, 2, 3


class CheckpointMismatch(ValueError):
    """The checkpoint reads, but its arrays do not have the template's names or shapes."""


class NoReadableCheckpoint(ValueError):
    """Checkpoints exist, but none reads back."""


class CheckpointDamaged(ValueError):
    """A checkpoint's file does not match the checksum written when it was saved."""


class CheckpointDenied(ValueError):
    """A checkpoint's file or folder cannot be read for lack of permission: a fallback to an
    older checkpoint would train on and fail later when orbax cleans up the folder."""


def check_not_legacy(directory: str | Path) -> None:
    """Refuse a folder that holds msgpack checkpoints of the previous format: resuming it from
    scratch would silently drop its progress."""
    found = sorted(p.name for p in Path(directory).glob(LEGACY_GLOB))
    if found:
        raise ValueError(
            f"{directory} holds checkpoints written by an earlier version of relu-sparsity "
            f"(msgpack: {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); train it to "
            "the end with that version, or pass --start-over to discard them")


class Checkpoints:
    """The checkpoints of one run folder. Every process constructs it and calls its methods in
    the same order; call `close()` (or use `with`) before the process exits, so that the
    asynchronous save in flight completes."""

    def __init__(self, directory: str | Path, keep: int, *, start_over: bool = False):
        """`keep`: how many checkpoints to keep (the newest). `start_over` deletes the folder's
        checkpoints, of either format, instead of refusing a legacy folder."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.directory = Path(directory).absolute()  # orbax takes absolute paths only
        if start_over:
            _delete_legacy(self.directory)
        check_not_legacy(self.directory)
        self._names = ocp.step.standard_name_format(step_format_fixed_length=STEP_DIGITS)
        self._manager = ocp.CheckpointManager(
            epath.Path(self.directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, step_name_format=self._names, create=True,
                cleanup_tmp_directories=True, enable_async_checkpointing=True))
        self._unsealed: int | None = None  # the step saved without its checksums yet
        if start_over:
            self.delete_all()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        """The saved steps, ascending; a save still in flight counts (it completes unless the
        process dies first)."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving `state` (a pytree of jax.Arrays) and `meta` (JSON-like: dicts with
        string keys, lists, numbers, strings, numpy arrays and scalars, which come back with
        their dtype and shape; tuples come back as lists) as checkpoint `step`, and return
        once the arrays are copied off the devices: the caller may then donate or overwrite
        them. The files are written in the background; the previous save is waited for first.
        A checkpoint already at `step` (one that did not read back, when an older one was
        resumed) is replaced."""
        encoded = _encode(meta, "meta")  # now: the caller may change its arrays afterwards
        self.wait()
        if step in self._manager.all_steps():
            log.info("replacing checkpoint %d", step)
            self._manager.delete(step)
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(encoded)))
        self._unsealed = step

    def restore_latest(self, template: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that reads back, as (step, state, meta), or None when there is
        none. `template(meta)` gives the abstract state (jax.ShapeDtypeStruct leaves with their
        sharding) that the arrays are read into. A checkpoint that does not read (torn or
        corrupted files) is reported and the one before it tried, on every process alike; one
        whose arrays do not fit the template raises CheckpointMismatch (an older one would not
        fit either). Raises ValueError when checkpoints exist but none reads."""
        self.wait()
        steps = self.steps()
        for step in reversed(steps):
            read, error = None, None
            try:
                read = self._read(step, template)
            except Exception as err:  # tensorstore, JSON and orbax raise various types
                error = err
            outcome = _worst(_outcome(error))
            if outcome == READ:
                return step, *read
            if outcome == MISMATCH:
                raise error if isinstance(error, CheckpointMismatch) else CheckpointMismatch(
                    f"checkpoint {step} does not fit this model (on another process)")
            if outcome == DENIED:
                raise error if isinstance(error, CheckpointDenied) else CheckpointDenied(
                    f"checkpoint {step} cannot be read for lack of permission (on another "
                    "process)")
            log.warning("checkpoint %d cannot be read (%s); trying the one before", step,
                        first_line(error) if error else "on another process")
        if steps:
            raise NoReadableCheckpoint(f"no checkpoint in {self.directory} can be read (tried "
                                       f"steps {steps}; the log says why)")
        return None

    def wait(self) -> None:
        """Block until the save in flight is written (and raise its error, if it failed), then
        record its checksums."""
        self._manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self._manager.close()
        self._seal()

    def _seal(self) -> None:
        """Process 0 writes the checksums of the save just completed."""
        step, self._unsealed = self._unsealed, None
        if step is None or jax.process_index() != 0 or step not in self._manager.all_steps():
            return
        folder = Path(self._names.find_step(epath.Path(self.directory), step).path)
        write_checksums(folder)

    def delete_all(self) -> None:
        """Delete every checkpoint (--start-over)."""
        self.wait()
        for step in self.steps():
            self._manager.delete(step)

    def _read(self, step: int, template: Callable[[dict], Any]) -> tuple[Any, dict]:
        """Checkpoint `step`'s (state, meta). Orbax's handlers are called directly, not the
        manager's restore: that one ends at a barrier that a process whose read failed would
        never reach, while the others wait there; `restore_latest` agrees on the outcome
        instead."""
        folder = self._names.find_step(epath.Path(self.directory), step).path
        check_permissions(step, Path(folder))
        check_checksums(step, Path(folder))
        meta = _decode(ocp.JsonCheckpointHandler().restore(folder / "meta"))
        abstract = template(meta)
        handler = ocp.StandardCheckpointHandler()
        try:
            _check_fits(step, handler.metadata(folder / "state").tree, abstract)
            state = handler.restore(folder / "state", args=ocp.args.StandardRestore(abstract))
        finally:
            handler.close()
        return state, meta


def read_on_host(directory: str | Path, step: int) -> tuple[dict, dict]:
    """Checkpoint `step`'s (state, meta) as host numpy arrays, in the structure it was saved
    with (the state as nested dicts): for looking into a checkpoint from one process."""
    folder = Path(directory).absolute() / f"{step:0{STEP_DIGITS}d}"
    meta = _decode(ocp.JsonCheckpointHandler().restore(epath.Path(folder / "meta")))
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(folder / "state")).tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = handler.restore(epath.Path(folder / "state"),
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()
    return state, meta


def _outcome(error: Exception | None) -> int:
    if error is None:
        return READ
    if isinstance(error, CheckpointDenied):
        return DENIED
    return MISMATCH if isinstance(error, CheckpointMismatch) else UNREADABLE


def first_line(error: Exception) -> str:
    """An error as one line: TensorStore's messages go on with the whole array spec."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    for spec in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(spec)[0]
    return f"{type(error).__name__}: {text}"


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the checksums, by relative path."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            with path.open("rb") as f:
                digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(
                    f, "sha256").hexdigest()
    return digests


def write_checksums(folder: Path) -> None:
    tmp = folder / f"{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(file_digests(folder), indent=1) + "\n")
    os.replace(tmp, folder / CHECKSUMS_FILE)


def check_checksums(step: int, folder: Path) -> None:
    """Raises CheckpointDamaged where a file differs from its checksum or is missing. A
    checkpoint without checksums (its process stopped right after the save) is read as is."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        log.debug("checkpoint %d has no checksums", step)
        return
    try:
        expected = json.loads(path.read_text())
    except ValueError:
        raise CheckpointDamaged(f"checkpoint {step}: {CHECKSUMS_FILE} is not valid JSON") from None
    found = file_digests(folder)
    for name, digest in expected.items():
        if found.get(name) != digest:
            what = "is missing" if name not in found else "does not match its checksum"
            raise CheckpointDamaged(f"checkpoint {step}: {name} {what}")


def check_permissions(step: int, folder: Path) -> None:
    """Raises CheckpointDenied naming the first file or folder this process may not read."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CheckpointDenied(f"checkpoint {step} cannot be read: no permission to read "
                               f"{folder}; fix its permissions")
    for path in sorted(folder.rglob("*")):
        mode = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
        if not os.access(path, mode):
            raise CheckpointDenied(f"checkpoint {step} cannot be read: no permission to read "
                                   f"{path}; fix its permissions")


def _worst(outcome: int) -> int:
    """The largest of every process's `outcome`, so that all take the same branch."""
    if jax.process_count() == 1:
        return outcome
    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _delete_legacy(directory: Path) -> None:
    """Process 0 deletes the msgpack checkpoints; the others wait for it before they look."""
    if jax.process_index() == 0:
        for path in directory.glob(LEGACY_GLOB):
            path.unlink(missing_ok=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"relu_sparsity.checkpoints.legacy:{directory}")


# The state's shapes ----------------------------------------------------------------------------
def _key_name(entry: Any) -> str:
    """A pytree path entry as orbax names it in the checkpoint's tree (attributes and dict keys
    by name, sequence items by index)."""
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
    return {tuple(_key_name(e) for e in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves if leaf is not None}


def _check_fits(step: int, saved: Any, abstract: Any) -> None:
    """Compare names and shapes with the checkpoint's metadata before any array is read: a model
    of another size is an error to report, not a corrupted checkpoint to skip."""
    have, want = _shapes(saved), _shapes(abstract)
    problems = [f"{'/'.join(k)}: missing" for k in want if k not in have]
    problems += [f"{'/'.join(k)}: not in the template" for k in have if k not in want]
    problems += [f"{'/'.join(k)}: template {want[k]}, checkpoint {have[k]}"
                 for k in want if k in have and want[k] != have[k]]
    if problems:
        more = " ..." if len(problems) > 3 else ""
        raise CheckpointMismatch(
            f"checkpoint {step} does not fit this model: {'; '.join(problems[:3])}{more}")


# The meta as JSON ------------------------------------------------------------------------------
def _encode(value: Any, where: str) -> Any:
    """`value` as JSON values; a numpy array or scalar becomes {ARRAY_TAG: dtype, shape,
    base64 bytes}. Refuses what JSON would change silently (non-string keys, objects)."""
    if isinstance(value, dict):
        if ARRAY_TAG in value or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: a meta dict needs string keys other than {ARRAY_TAG!r}")
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{where}: an object array cannot be stored")
        return {ARRAY_TAG: {"dtype": array.dtype.str, "shape": list(array.shape),
                            "scalar": isinstance(value, np.generic),
                            "data": base64.b64encode(array.tobytes()).decode("ascii")}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in the meta")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and ARRAY_TAG in value:
        spec = value[ARRAY_TAG]
        array = np.frombuffer(base64.b64decode(spec["data"]), np.dtype(spec["dtype"]))
        array = array.reshape(tuple(spec["shape"])).copy()
        return array[()] if spec["scalar"] else array
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
