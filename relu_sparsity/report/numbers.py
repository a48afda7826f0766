"""The numbers the tables print: per-layer means over the last logged steps, units used per
batch, and Table 5's width-weighted total. Every one is a mean of metrics.jsonl values. Also
`Timing`, a spread of milliseconds per call, which the benchmarks and the experiments' step-time
tables share."""

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def number(value: Any) -> float | None:
    """A finite float, or None for missing / null / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean(values: Iterable[Any]) -> float:
    """Mean of the finite values; NaN when there are none (printed as 'n/a')."""
    kept = [v for v in (number(x) for x in values) if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def with_layers(records: Iterable[dict]) -> list[dict]:
    """Records that carry per-layer metrics (instrumentation off leaves `layers` absent/empty)."""
    return [r for r in records if r.get("layers")]


def last_layer_records(records: Sequence[dict], last_k: int) -> list[dict]:
    """The last `last_k` records that have per-layer metrics: the window the tables average. It
    never straddles a prune step: after one, only records after it (one width, one base for the
    percentages), unless none is logged yet."""
    if last_k < 1:
        raise ValueError(f"last_k must be >= 1, got {last_k}")
    layered = with_layers(records)
    pruned = prune_step(records)
    if pruned is not None:
        after = [r for r in layered if r["step"] > pruned]
        layered = after or [r for r in layered if r["step"] <= pruned]
    return layered[-last_k:]


def prune_step(records: Sequence[dict]) -> int | None:
    """The step whose batch decided a prune (its record has `pruned`), or None."""
    steps = [r["step"] for r in records if "pruned" in r]
    return steps[-1] if steps else None


def diverged_step(records: Sequence[dict]) -> int | None:
    """The step at which the run diverged (its `diverged` entry), or None."""
    steps = [r.get("step") for r in records if "diverged" in r]
    return steps[-1] if steps else None


def final_means(records: list[dict], last_k: int) -> list[dict]:
    """Per layer: the mean of each numeric key over the last `last_k` records that have layers.

    A key missing (or NaN) in some of those records is averaged over the records that have it,
    so one bad step does not blank a cell.
    """
    window = last_layer_records(records, last_k)
    num_layers = max((len(r["layers"]) for r in window), default=0)
    means: list[dict] = []
    for layer in range(num_layers):
        rows = [r["layers"][layer] for r in window if layer < len(r["layers"])]
        keys = dict.fromkeys(k for row in rows for k in row)  # first-seen order, no duplicates
        means.append({k: mean(row.get(k) for row in rows) for k in keys})
    return means


def used_units(records: list[dict], last_k: int) -> list[float]:
    """Per layer: mean over the window of batch_use * d_ff, the count of units used per batch."""
    window = last_layer_records(records, last_k)
    num_layers = max((len(r["layers"]) for r in window), default=0)
    out = []
    for layer in range(num_layers):
        products = []
        for r in window:
            if layer < len(r["layers"]):
                use = number(r["layers"][layer].get("batch_use"))
                width = number(r["layers"][layer].get("d_ff"))
                if use is not None and width is not None:
                    products.append(use * width)
        out.append(mean(products))
    return out


def total_batch_use(records: list[dict], last_k: int) -> float:
    """Table 5's Total: units used over all layers / width over all layers (width-weighted)."""
    used = used_units(records, last_k)
    widths = [m.get("d_ff", float("nan")) for m in final_means(records, last_k)]
    pairs = [(u, w) for u, w in zip(used, widths) if math.isfinite(u) and math.isfinite(w)]
    total_width = sum(w for _, w in pairs)
    return sum(u for u, _ in pairs) / total_width if total_width > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call over rounds."""
    min_ms: float
    median_ms: float
    iqr_ms: float  # interquartile range over rounds (0 with fewer than 2 rounds)
    rounds: int

    @classmethod
    def from_rounds(cls, per_call_ms: list[float]) -> "Timing":
        iqr = 0.0
        if len(per_call_ms) > 1:
            q1, _, q3 = statistics.quantiles(per_call_ms, n=4, method="inclusive")
            iqr = q3 - q1
        return cls(min(per_call_ms), statistics.median(per_call_ms), iqr, len(per_call_ms))
