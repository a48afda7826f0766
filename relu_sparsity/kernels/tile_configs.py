"""Tuned tile configurations are data: `configs/<backend>.json`, keyed by device kind (or "tpu")
and then by "TxDxF:dtype", each entry the keyword arguments of that backend's TileConfig.

A shape without an entry gets the entry of the nearest tuned shape of its dtype on that device
(`nearest_key`): tiles tuned for a similar problem, rather than one default for every shape.
"""

import functools
import json
import logging
import math
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

log = logging.getLogger(__name__)


@functools.cache
def tuned_configs(backend: str) -> dict:
    path = CONFIG_DIR / f"{backend}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def shape_key(shape: tuple[int, int, int], dtype: str) -> str:
    T, D, F = shape
    return f"{T}x{D}x{F}:{dtype}"


def parse_key(key: str) -> tuple[tuple[int, int, int], str]:
    dims, dtype = key.split(":")
    T, D, F = (int(n) for n in dims.split("x"))
    return (T, D, F), dtype


def nearest_key(keys, shape: tuple[int, int, int], dtype: str) -> str | None:
    """Among `keys` ("TxDxF:dtype") of this dtype, the one whose shape is nearest to `shape`:
    the least sum over T, D and F of |log2(tuned / wanted)| (a factor of two in any dimension
    counts one); ties go to the first in sorted order. None if no key has this dtype."""
    def distance(key: str) -> float:
        tuned, _ = parse_key(key)
        return sum(abs(math.log2(a / b)) for a, b in zip(tuned, shape))

    same_dtype = sorted(k for k in keys if parse_key(k)[1] == dtype)
    return min(same_dtype, key=distance) if same_dtype else None


def tiles_source(backend: str, device_kind: str, shape: tuple[int, int, int], dtype: str
                 ) -> str:
    """Which tiles a call at this shape runs with: "tuned", "nearest TxDxF" or "default"."""
    key = nearest_key(tuned_configs(backend).get(device_kind, {}), shape, dtype)
    if key is None:
        return "default"
    return "tuned" if key == shape_key(shape, dtype) else f"nearest {key.split(':')[0]}"


def tuned_entry(backend: str, device_kind: str, shape: tuple[int, int, int], dtype: str
                ) -> dict | None:
    """The committed configuration of `backend` for this device, shape (T, D, F) and dtype; for
    an untuned shape, that of the nearest tuned one (logged once per shape); None where the
    device has no configuration of this dtype."""
    entries = tuned_configs(backend).get(device_kind, {})
    key = nearest_key(entries, shape, dtype)
    if key is not None and key != shape_key(shape, dtype):
        _log_nearest(backend, device_kind, shape_key(shape, dtype), key)
    return entries.get(key) if key is not None else None


@functools.cache
def _log_nearest(backend: str, device_kind: str, wanted: str, used: str) -> None:
    log.info("%s: no tuned tiles for %s on %s; using those of the nearest tuned shape %s "
             "(relu-sparsity tune --backend %s --shapes ... tunes it)",
             backend, wanted, device_kind, used, backend)
