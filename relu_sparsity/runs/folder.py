"""A run's folder: config.json, metrics.jsonl, masks/, TensorBoard events and checkpoints/.

Everything a later look needs is written here, and everything a resume needs is read back from
here. Writes that a crash could tear (checkpoints, config) go through a temporary file and
`os.replace`. Reading metrics and config goes through `runs.reader`, which reports share.
"""

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization

from relu_sparsity.runs.reader import CONFIG_FILE, METRICS_FILE, read_config, read_metrics

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"ckpt_(\d{8})\.msgpack$")
MASK_RE = re.compile(r"step_(\d{8})\.npz$")


def _atomic_write(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write through a temporary file and rename. `durable` also fsyncs the file and its folder,
    so that after a power loss the name points at complete data (checkpoints)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinity (in nested dicts and lists) replaced by None."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.masks = self.path / "masks"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / METRICS_FILE
        self.config_file = self.path / CONFIG_FILE

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
        """layer_masks[i]: uint32 [n_devices, W] batch masks of layer i, original unit ids."""
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
        """Forgets the run: checkpoints, metrics, masks and TensorBoard events."""
        for path in [*self.checkpoints.glob("ckpt_*"), *self.masks.glob("step_*"),
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
        return sorted(int(m.group(1)) for p in self.checkpoints.glob("ckpt_*.msgpack")
                      if (m := CHECKPOINT_RE.search(p.name)))

    def save_checkpoint(self, step: int, state: Any, keep: int) -> Path:
        path = self.checkpoints / f"ckpt_{step:08d}.msgpack"
        _atomic_write(path, serialization.to_bytes(state), durable=True)
        for old in self.checkpoint_steps()[:-keep]:
            (self.checkpoints / f"ckpt_{old:08d}.msgpack").unlink()
        return path

    def load_checkpoint(self, step: int) -> dict:
        """The checkpoint's state dict (nested dicts of arrays); the caller restores it into
        its own structures, whose shapes may depend on what the checkpoint says (pruning)."""
        data = (self.checkpoints / f"ckpt_{step:08d}.msgpack").read_bytes()
        return serialization.msgpack_restore(data)

    def load_latest_checkpoint(self) -> tuple[int, dict] | None:
        """The newest checkpoint that reads back, as (step, state dict); an unreadable one (a
        torn or corrupted file) is reported and the one before it is taken."""
        for step in reversed(self.checkpoint_steps()):
            try:
                return step, self.load_checkpoint(step)
            except Exception as err:  # msgpack raises several types on corrupted data
                log.warning("checkpoint %d cannot be read (%s: %s); trying the one before",
                            step, type(err).__name__, err)
        return None
