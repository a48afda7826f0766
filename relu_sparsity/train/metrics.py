"""The paper's per-layer sparsity figures (section 2.1, appendix A.6; docs/design.md §5-6) from
one batch's kernel statistics, and the layer records of a logged step.

Everything here runs on the host, on statistics fetched at logged steps: a few [n_seq, F] arrays.
"""

import numpy as np

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.kernels.bits import np_or_rows, np_popcount, np_unpack_bits
from relu_sparsity.train.pruning import Pruning, to_original_ids

PERCENTILES = (50, 65, 75, 90)
METRIC_KEYS = ("token_use", "seq_use", "batch_use", "token_per_seq", "seq_per_batch",
               *(f"p{p}" for p in PERCENTILES))
UNIT_STATE_KEYS = ("on0", "turned_on", "turned_off", "final", "never_on")


def get_rescaled_percentile(fract_nonzero: np.ndarray, desired_percentile: float) -> np.ndarray:
    """A.6.1: the percentile over all units that lands on `desired_percentile` of the used ones."""
    return desired_percentile * fract_nonzero + 100.0 * (1.0 - fract_nonzero)


def percentile_used_dimension_count(seq_count: np.ndarray, seq_len: int,
                                    percentile: float) -> np.ndarray:
    """A.6.1 applied to the 0/1 use indicator, for every sequence at once.

    seq_count: [n_seq, F] tokens of each sequence on which each unit is used. Returns [n_seq]: the
    fraction of the sequence's tokens on which the `percentile`-th most used unit (among units used
    at all) is used; numpy's linear percentile, as the paper's pseudocode.
    """
    counts = np.asarray(seq_count, dtype=np.float64)
    fract_nonzero = np.mean(counts > 0, axis=1)
    rescaled = get_rescaled_percentile(fract_nonzero, percentile)
    values = [np.percentile(row, q) for row, q in zip(counts, rescaled)]
    return np.asarray(values) / seq_len


def sparsity_metrics(stats, num_units: int, units: np.ndarray | None = None) -> dict[str, float]:
    """One layer's figures for one device batch, as fractions of the layer's current width.

    stats: `SparsityStats` (device or host arrays). num_units: the current width F. units: the
    ids of the current units when the stats index more (mask mode: the live units), else None.
    """
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    token_count = np.asarray(stats.token_count, dtype=np.int64)
    seq_count = np.asarray(stats.seq_count)
    seq_mask = np.asarray(stats.seq_mask)
    if units is not None:
        seq_count = seq_count[:, np.asarray(units)]
    n_seq = seq_count.shape[0]
    seq_len = token_count.shape[0] // n_seq

    token_dims = token_count.reshape(n_seq, seq_len).mean(axis=1)  # mean units per token, per seq
    seq_dims = np_popcount(seq_mask).astype(np.float64)  # dead units are zero bits
    batch_dims = float(np_popcount(np_or_rows(seq_mask)))
    has_seq = seq_dims > 0
    metrics = {
        "token_use": float(token_count.mean() / num_units),
        "seq_use": float(seq_dims.mean() / num_units),
        "batch_use": batch_dims / num_units,
        "token_per_seq": float(np.mean(token_dims[has_seq] / seq_dims[has_seq])) if has_seq.any()
        else 0.0,
        "seq_per_batch": float(seq_dims.mean() / batch_dims) if batch_dims > 0 else 0.0,
    }
    for p in PERCENTILES:
        metrics[f"p{p}"] = float(percentile_used_dimension_count(seq_count, seq_len, p).mean())
    return metrics


def batch_mask(stats) -> np.ndarray:
    """uint32 [W]: the OR of the sequence masks, i.e. the units the batch used at all."""
    return np_or_rows(np.asarray(stats.seq_mask))


class UnitStates:
    """Table 2's unit states of one layer, from the batch masks of logged steps.

    `on0` is the batch mask of the first training step (the forward pass at initialization);
    `never_on` is the units off in `on0` and in every batch since: every step's batch where the
    unit histories (train/history.py) are given, else every logged one. All fractions are of
    the layer's original width; masks are in original unit ids.
    """

    def __init__(self, num_units: int, on0: np.ndarray | None = None,
                 ever_on: np.ndarray | None = None):
        self.num_units = num_units
        self.on0 = on0
        self.ever_on = ever_on

    def update(self, mask_words: np.ndarray, ever_on: np.ndarray | None = None
               ) -> dict[str, float]:
        """The states at a logged batch; `ever_on` (bool [F], every step's use) replaces the
        union of the logged batches for `never_on`."""
        on_t = np_unpack_bits(mask_words, self.num_units)
        if self.on0 is None:
            self.on0 = on_t.copy()
            self.ever_on = on_t.copy()
        self.ever_on |= on_t
        if ever_on is not None:
            self.ever_on |= np.asarray(ever_on, bool)
        frac = lambda b: float(np.count_nonzero(b) / self.num_units)  # noqa: E731
        return {
            "on0": frac(self.on0),
            "turned_on": frac(~self.on0 & on_t),
            "turned_off": frac(self.on0 & ~on_t),
            "final": frac(on_t),
            "never_on": frac(~self.ever_on),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        empty = np.zeros(0, bool)
        return {"on0": empty if self.on0 is None else self.on0,
                "ever_on": empty if self.ever_on is None else self.ever_on}

    @classmethod
    def from_state_dict(cls, num_units: int, state: dict) -> "UnitStates":
        on0, ever_on = np.asarray(state["on0"], bool), np.asarray(state["ever_on"], bool)
        if on0.size == 0:
            return cls(num_units)
        return cls(num_units, on0.copy(), ever_on.copy())


def split_devices(stats: SparsityStats, num_devices: int) -> list[SparsityStats]:
    """One layer's host statistics of the global batch -> one per device (each device holds
    consecutive sequences)."""
    if num_devices == 1:
        return [stats]
    fields = [None if a is None else np.split(np.asarray(a), num_devices) for a in stats]
    return [SparsityStats(*(None if f is None else f[d] for f in fields))
            for d in range(num_devices)]


def current_units(layer: int, states: "UnitStates", pruning: Pruning | None
                  ) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """(current width, ids of the current units among the statistics' columns or None for all,
    original ids of the statistics' columns or None when they are the original ids)."""
    if pruning is None:
        return states.num_units, None, None
    width = len(pruning.keep[layer])
    if pruning.mode == "compact":  # the kept units first, then dead padding
        units = None if width == pruning.padded_widths[layer] else np.arange(width)
        return width, units, pruning.keep[layer]
    return width, pruning.keep[layer], None  # the stats index the original units


def layer_records(stats: list[SparsityStats], unit_states: list["UnitStates"],
                  pruning: Pruning | None, num_devices: int = 1,
                  ever_on: list[np.ndarray] | None = None
                  ) -> tuple[list[dict], list[np.ndarray]]:
    """Per layer: the metrics at the current width (each device's batch, averaged over devices;
    with several, `batch_use_all_devices` beside), unit states of the union of the devices' batch
    masks, and the batch masks [n_devices, W], in original unit ids. `ever_on`: per layer the
    units used at any step (the unit histories), which makes `never_on` exact."""
    records, masks = [], []
    for layer, (layer_stat, states) in enumerate(zip(stats, unit_states, strict=True)):
        width, units, to_original = current_units(layer, states, pruning)
        per_device = split_devices(layer_stat, num_devices)
        figures = [sparsity_metrics(s, num_units=width, units=units) for s in per_device]
        metrics = {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}
        device_masks = np.stack([batch_mask(s) for s in per_device])  # [n_devices, W]
        if to_original is not None:
            device_masks = np.stack([to_original_ids(m, to_original, states.num_units)
                                     for m in device_masks])
        union = np_or_rows(device_masks)
        if num_devices > 1:
            metrics["batch_use_all_devices"] = float(np_popcount(union)) / width
        masks.append(device_masks)
        exact = None if ever_on is None else ever_on[layer]
        records.append({"d_ff": width, **metrics, **states.update(union, exact)})
    return records, masks
