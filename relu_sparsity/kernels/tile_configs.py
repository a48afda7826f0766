"""Tuned tile configurations are data: `configs/<backend>.json`, keyed by device kind (or "tpu")
and then by "TxDxF:dtype", each entry the keyword arguments of that backend's TileConfig."""

import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@functools.cache
def tuned_configs(backend: str) -> dict:
    path = CONFIG_DIR / f"{backend}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def tuned_entry(backend: str, device_kind: str, shape: tuple[int, int, int], dtype: str
                ) -> dict | None:
    """The committed configuration of `backend` for this device and shape (T, D, F), or None."""
    T, D, F = shape
    return tuned_configs(backend).get(device_kind, {}).get(f"{T}x{D}x{F}:{dtype}")
