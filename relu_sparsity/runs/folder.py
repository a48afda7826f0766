"""A run's folder: config.json, metrics.jsonl, masks/, TensorBoard events and checkpoints/.

Everything a later look needs is written here, and everything a resume needs is read back from
here; the checkpoints themselves are orbax's (runs/checkpoints.py). Writes that a crash could
tear (config, rewritten logs, masks) go through a temporary file and `os.replace`. Reading metrics and config goes through `runs.reader`, which reports share.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from relu_sparsity.runs.reader import CONFIG_FILE, METRICS_FILE, read_config, read_metrics

# Checkpoint step folders: orbax's fixed-length names (runs/checkpoints.py names them so).
STEP_DIGITS = 8
CHECKPOINT_RE = re.compile(rf"\d{{{STEP_DIGITS}}}")
MASK_RE = re.compile(r"step_(\d{8})\.npz$")
LOCK_FILE = ".lock"  # runs/lock.py: the process writing the folder


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
    os.replace(tmp, path)


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinity (in nested dicts and lists) replaced by None."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def check_writable_folder(path: str | Path, what: str, *, replaced: bool = False) -> None:
    """Refuses a folder that cannot be written: a file in its place or above it, or no write
    permission where it is or would be created. `replaced`: it is written under another name
    and renamed into place, so its parent must be writable too."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file")
    for folder in {existing, path.parent if replaced and path.parent.exists() else existing}:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} cannot be written: no write permission on "
                             f"{folder}")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.masks = self.path / "masks"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / METRICS_FILE
        self.config_file = self.path / CONFIG_FILE

    def check_usable(self) -> None:
        """Refuses a folder this process cannot write, or whose checkpoints it cannot read."""
        check_writable_folder(self.path, "run folder")
        if self.checkpoints.exists() and not os.access(self.checkpoints, os.R_OK | os.X_OK):
            raise ValueError(f"{self.checkpoints} cannot be read: no read permission")

    def create(self) -> None:
        for folder in (self.path, self.masks, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)

    # config.json -------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        return read_config(self.path)

    def write_config(self, values: dict[str, Any]) -> None:
        _atomic_write(self.config_file, (json.dumps(values, indent=2) + "\n").encode())

    # metrics.jsonl and masks/ ------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line of strict JSON: a non-finite number is written as null."""
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path, missing_ok=True)

    def write_masks(self, step: int, layer_masks: list[np.ndarray]) -> None:
        """layer_masks[i]: uint32 [num_data, W] batch masks of layer i (one per data-parallel
        batch), original unit ids."""
        arrays = {f"layer_{i}": np.asarray(m, np.uint32) for i, m in enumerate(layer_masks)}
        tmp = self.masks / f"step_{step:08d}.tmp-{os.getpid()}.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, self.masks / f"step_{step:08d}.npz")

    def write_units(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        """units.npz: the unit histories (train/history.py) after `step`, replaced each logged
        step."""
        tmp = self.path / f"units.tmp-{os.getpid()}.npz"
        np.savez_compressed(tmp, step=np.int64(step), **arrays)
        os.replace(tmp, self.path / "units.npz")

    def mask_steps(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.masks.glob("step_*.npz")
                      if (m := MASK_RE.search(p.name)))

    def read_masks(self, step: int) -> list[np.ndarray]:
        with np.load(self.masks / f"step_{step:08d}.npz") as data:
            return [data[f"layer_{i}"] for i in range(len(data.files))]

    def clear(self) -> None:
        """Forgets the run's metrics, masks and TensorBoard events (runs/checkpoints.py deletes
        the checkpoints)."""
        for path in [*self.masks.glob("step_*"),
                     *self.path.glob("events.out.tfevents.*"), self.metrics_file,
                     self.path / "units.npz"]:
            path.unlink(missing_ok=True)

    def drop_after(self, step: int) -> int:
        """Forget everything logged at steps >= `step` (a resume redoes them). Returns the count
        of metric lines dropped."""
        records = self.read_metrics()
        kept = [r for r in records if r["step"] < step]
        _atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept).encode())
        for s in self.mask_steps():
            if s >= step:
                (self.masks / f"step_{s:08d}.npz").unlink()
        return len(records) - len(kept)

    # checkpoints/ ------------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """The steps of the complete checkpoints (runs/checkpoints.py writes them; one being
        written has a temporary name)."""
        return sorted(int(p.name) for p in self.checkpoints.glob("*")
                      if p.is_dir() and CHECKPOINT_RE.fullmatch(p.name))

class FollowerFolder(RunFolder):
    """The run folder as the other processes of a multi-process run see it: process 0 writes
    the config, metrics, masks and unit histories; the others read them and write nothing."""

    def create(self) -> None:
        pass

    def write_config(self, values: dict[str, Any]) -> None:
        pass

    def append_metrics(self, record: dict[str, Any]) -> None:
        pass

    def write_masks(self, step: int, layer_masks: list[np.ndarray]) -> None:
        pass

    def write_units(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        pass

    def clear(self) -> None:
        pass

    def drop_after(self, step: int) -> int:
        return 0
