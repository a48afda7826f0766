"""Live units: an MLP that computes only some of its hidden units (docs/design.md §4).

The kernel always computes every column of the w1 it is given; the model gathers the live
columns of wi and bi and the live rows of wo, zero-pads them to a width that GEMMs run well at,
and puts the kernel's statistics back in the layer's unit ids, the dead units counting zero. A
zero padding unit has h = 0, so it passes no gradient and counts nowhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.kernels.bits import BITS_PER_WORD, num_words, pack_bits


def padded_width(num_live: int, multiple: int, limit: int) -> int:
    """The width live units are computed at: num_live rounded up to `multiple` (zero units after
    them), but never past `limit` (the layer's full width) unless num_live is already there.
    GEMMs at a ragged width (rows not 16-byte aligned) run far below peak on GPUs."""
    return max(num_live, min(-(-num_live // multiple) * multiple, limit))


def check_live(live, num_units: int) -> tuple[int, ...]:
    """`live` as a tuple of ints; a ValueError unless it is a non-empty, strictly increasing
    sequence of unit ids in [0, num_units)."""
    arr = np.asarray(live)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"live must be a non-empty 1-D sequence of unit ids, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    if np.any(np.diff(arr.astype(np.int64)) <= 0):  # int64: unsigned differences wrap
        raise ValueError("live must be strictly increasing (sorted, no repeats)")
    if arr[0] < 0 or arr[-1] >= num_units:
        raise ValueError(f"live must lie in [0, {num_units}), got [{arr[0]}, {arr[-1]}]")
    return tuple(int(i) for i in arr)


def live_weights(wi: jax.Array, bi: jax.Array, wo: jax.Array, live: tuple[int, ...],
                 width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """wi [D, F], bi [F], wo [F, D] -> the live units' wi [D, width], bi [width], wo [width, D],
    zero units after the len(live) live ones (`live_units` with the units on axes 1, 0, 0)."""
    return live_units((wi, bi, wo), (1, 0, 0), live, width)


def live_units(weights: tuple[jax.Array, ...], axes: tuple[int, ...], live: tuple[int, ...],
               width: int) -> tuple[jax.Array, ...]:
    """Each weight's live units along its unit axis (F there -> width), zero units after the
    len(live) live ones; weights[i]'s units lie on axes[i] (`gather_units`)."""
    if len(weights) != len(axes):
        raise ValueError(f"axes must name one unit axis per weight: {len(weights)} weights, "
                         f"{len(axes)} axes")
    return tuple(gather_units(w, live, axis, width, w.shape[axis])
                 for w, axis in zip(weights, axes, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def gather_units(w: jax.Array, live: tuple[int, ...], axis: int, width: int,
                 num_units: int) -> jax.Array:
    """w's units `live` along `axis` (num_units there) -> width units: the live ones, then zero
    units.

    One gather at the padded width, the padding positions (which read unit 0) zeroed by a
    select that XLA fuses into it: a gather at len(live) followed by a pad would write the
    weights twice. The gradient is a gather too, of each unit's position among the live ones,
    dead units reading zero (`mode="fill"`): the gather's own transpose, a scatter-add into
    the full width, runs several times slower on GPUs, and each unit has one position."""
    del num_units  # the backward's
    ids = np.zeros(width, np.int32)
    ids[:len(live)] = live
    return jnp.where(unit_axis(np.arange(width) < len(live), w.ndim, axis),
                     take_units(w, jnp.asarray(ids), axis), 0)


def _gather_units_fwd(w, live, axis, width, num_units):
    return gather_units(w, live, axis, width, num_units), None


def _gather_units_bwd(live, axis, width, num_units, _, grad):
    position = np.full(num_units, width, np.int32)  # out of range: dead units read zero
    position[list(live)] = np.arange(len(live))
    index = (slice(None),) * axis + (jnp.asarray(position),)
    return (grad.at[index].get(mode="fill", fill_value=0),)


gather_units.defvjp(_gather_units_fwd, _gather_units_bwd)


def unit_axis(values: np.ndarray, ndim: int, axis: int) -> jax.Array:
    """values [F] shaped to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return jnp.asarray(values.reshape(shape))


def take_units(a: jax.Array, ids: jax.Array, axis: int) -> jax.Array:
    """a's entries at the unit ids along axis, in range by construction (`check_live`)."""
    index = (slice(None),) * axis + (ids,)
    return a.at[index].get(mode="promise_in_bounds")


def stats_in_unit_ids(stats: SparsityStats, live: tuple[int, ...], num_units: int
                      ) -> SparsityStats:
    """Statistics over the computed columns (the live units, then padding) -> over the layer's
    units 0..num_units-1, dead units zero. Scatters only the small outputs ([n_seq, F] counts,
    [T, W] mask words): no [T, F] temporary."""
    idx = jnp.asarray(live)
    seq_count = jnp.zeros((stats.seq_count.shape[0], num_units), jnp.int32).at[:, idx].set(
        stats.seq_count[:, :len(live)], indices_are_sorted=True, unique_indices=True,
        mode="promise_in_bounds")
    token_mask = None
    if stats.token_mask is not None:
        token_mask = scatter_token_mask(stats.token_mask, live, num_units)
    return SparsityStats(stats.token_count, seq_count, pack_bits(seq_count > 0), token_mask)


def scatter_token_mask(words: jax.Array, live: tuple[int, ...], num_units: int) -> jax.Array:
    """uint32 [T, >= ceil(len(live) / 32)] whose bit p is live unit live[p] -> [T, ceil(F / 32)]
    over all units (bits past len(live), the padding units, are dropped).

    Output bit b of word w is unit u = 32 w + b; if u is live at position p, it is bit p % 32 of
    input word p // 32. 32 gathers of [T, W] columns that XLA fuses into one pass."""
    W = num_words(num_units)
    src = np.full(W * BITS_PER_WORD, -1, np.int64)
    src[np.asarray(live)] = np.arange(len(live))
    src = src.reshape(W, BITS_PER_WORD)
    out = jnp.zeros((words.shape[0], W), jnp.uint32)
    for b in range(BITS_PER_WORD):
        valid = src[:, b] >= 0
        if not valid.any():
            continue
        pos = np.where(valid, src[:, b], 0)
        bits = (words[:, pos // BITS_PER_WORD] >> (pos % BITS_PER_WORD).astype(np.uint32)) & 1
        out = out | (jnp.where(valid, bits, 0).astype(jnp.uint32) << np.uint32(b))
    return out
