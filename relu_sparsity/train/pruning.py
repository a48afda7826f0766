"""Dead-unit pruning (section 4.1 of the paper): after step N, the units a batch did not use are
forced to zero (`mask`), physically removed (`compact`), or, as the control, the same number of
units per layer is kept at random (`random`).

Unit ids stay those of the original width: `Pruning.keep[i]` lists, per layer, the original ids of
the units that remain, and statistics are mapped back through it.
"""

import dataclasses
import logging

import jax
import numpy as np

from relu_sparsity.kernels.bits import np_pack_bits, np_unpack_bits
from relu_sparsity.model.live import padded_width

log = logging.getLogger(__name__)

PRUNE_MODES = ("none", "mask", "compact", "random")
# MLP parameter -> its hidden-unit axis: ReluMLP's wi [D, F], bi [F], wo [F, D] and
# GatedReluMLP's wg, wu [D, F], bg [F], wd [F, D].
MLP_LEAVES = {"wi": 1, "bi": 0, "wo": 0, "wg": 1, "wu": 1, "bg": 0, "wd": 0}


@dataclasses.dataclass(frozen=True)
class Pruning:
    mode: str  # mask | compact | random
    step: int  # the step whose batch mask decided
    keep: tuple[np.ndarray, ...]  # per layer: sorted original ids of the units that remain
    original_widths: tuple[int, ...]
    multiple: int = 1  # compact: parameter widths round up to this, padding held dead

    @property
    def widths(self) -> tuple[int, ...]:
        """The layers' current widths: the kept units (mask and random keep the shapes, but the
        metrics count the live units only, docs/design.md §7)."""
        return tuple(len(k) for k in self.keep)

    @property
    def padded_widths(self) -> tuple[int, ...]:
        """compact: the parameters' widths, the kept units first, then zero units that stay
        dead (zero weights give h = 0, which passes no gradient), up to a multiple of
        `multiple` but not past the original width."""
        return tuple(padded_width(len(k), self.multiple, w)
                     for k, w in zip(self.keep, self.original_widths, strict=True))

    def compacted_ids(self) -> tuple[np.ndarray, ...] | None:
        """compact: per layer the original ids of the computed columns (the kept units, then
        padding); None for mask and random, whose columns are the original units."""
        return tuple(np.asarray(k) for k in self.keep) if self.mode == "compact" else None

    def state_dict(self) -> dict:
        return {"mode": self.mode, "step": self.step,
                "keep": {str(i): np.asarray(k, np.int32) for i, k in enumerate(self.keep)},
                "original_widths": np.asarray(self.original_widths, np.int32),
                "multiple": self.multiple}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Pruning":
        keep = state["keep"]
        return cls(str(state["mode"]), int(state["step"]),
                   tuple(np.asarray(keep[str(i)], np.int64) for i in range(len(keep))),
                   tuple(int(w) for w in np.asarray(state["original_widths"])),
                   int(state.get("multiple", 1)))


def choose_units(mode: str, batch_masks: list[np.ndarray], widths: tuple[int, ...], step: int,
                 seed: int, multiple: int = 1) -> Pruning:
    """The units to keep, from each layer's batch mask (uint32 words, original ids; with several
    devices the caller ORs them first: a unit used anywhere is kept)."""
    if mode not in PRUNE_MODES[1:]:
        raise ValueError(f"prune mode must be one of {PRUNE_MODES[1:]}, got {mode!r}")
    rng = np.random.default_rng([seed, step, 7])
    keep = []
    for layer, (words, width) in enumerate(zip(batch_masks, widths)):
        used = np.flatnonzero(np_unpack_bits(words, width))
        if used.size == 0:  # a layer must keep one unit to stay a layer
            log.warning("layer %d used no unit at step %d; keeping unit 0", layer, step)
            used = np.zeros(1, np.int64)
        if mode == "random":
            used = np.sort(rng.choice(width, size=used.size, replace=False))
        keep.append(used.astype(np.int64))
    return Pruning(mode, step, tuple(keep), tuple(widths), multiple)


def mlp_leaf(path) -> tuple[int, str] | None:
    """(layer, leaf name) when `path` ends in block_<i>/mlp/<name> for a name of MLP_LEAVES,
    else None."""
    keys = [getattr(k, "key", None) for k in path]
    if len(keys) >= 3 and keys[-2] == "mlp" and keys[-1] in MLP_LEAVES and \
            isinstance(keys[-3], str) and keys[-3].startswith("block_"):
        return int(keys[-3].split("_")[1]), keys[-1]
    return None


def compact_tree(tree, keep: tuple[np.ndarray, ...], widths: tuple[int, ...] | None = None):
    """Keep only `keep[i]`'s hidden units in every MLP parameter of layer i found in `tree`: the
    parameters themselves, and the same entries of any optimizer state shaped like them (Adam's
    moments). With `widths`, layer i is then zero-padded to widths[i] units (dead padding).
    Leaves that are not MLP weights pass through."""
    def cut(path, leaf):
        found = mlp_leaf(path)
        if found is None or np.ndim(leaf) == 0:
            return leaf
        layer, name = found
        axis = MLP_LEAVES[name]
        xp = np if isinstance(leaf, np.ndarray) else jax.numpy  # host leaves stay on the host
        out = xp.take(leaf, xp.asarray(keep[layer]), axis=axis)
        pad = 0 if widths is None else widths[layer] - len(keep[layer])
        if pad:
            out = xp.pad(out, [(0, pad if a == axis else 0) for a in range(out.ndim)])
        return out

    return jax.tree_util.tree_map_with_path(cut, tree)


def to_original_ids(mask_words: np.ndarray, keep: np.ndarray, original_width: int) -> np.ndarray:
    """A compacted layer's bit mask (bit j = compact unit j) in original unit ids."""
    used = np.zeros(original_width, bool)
    used[keep] = np_unpack_bits(mask_words, len(keep))
    return np_pack_bits(used)
