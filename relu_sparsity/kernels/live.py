"""`live` for backends whose kernel computes dense columns: gather the live columns of w1 and b1,
run the kernel at width F_live, then put the statistics back in the caller's unit ids (dead units
zero). The scatter works on the small outputs ([n_seq, F] counts, [T, W] mask words): no [T, F]
temporary."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels.bits import BITS_PER_WORD, num_words, pack_bits
from relu_sparsity.kernels.reference import SparsityStats


def expand_live_stats(stats: SparsityStats, live: tuple[int, ...], num_units: int
                      ) -> SparsityStats:
    idx = jnp.asarray(live)
    seq_count = jnp.zeros((stats.seq_count.shape[0], num_units), jnp.int32).at[:, idx].set(
        stats.seq_count)
    token_mask = None
    if stats.token_mask is not None:
        token_mask = scatter_token_mask(stats.token_mask, live, num_units)
    return SparsityStats(stats.token_count, seq_count, pack_bits(seq_count > 0), token_mask)


def scatter_token_mask(words: jax.Array, live: tuple[int, ...], num_units: int) -> jax.Array:
    """uint32 [T, ceil(F_live / 32)] over the live units -> [T, ceil(F / 32)] over all units.

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


def padded_width(num_live: int, multiple: int, limit: int) -> int:
    """The width live units are computed at: num_live rounded up to `multiple` (zero units after
    them), but never past `limit` (the layer's full width) unless num_live is already there."""
    return max(num_live, min(-(-num_live // multiple) * multiple, limit))


def with_live_columns(dense_forward: Callable) -> Callable:
    """A backend forward that supports `live`, from one that computes every column."""
    @functools.wraps(dense_forward)
    def forward(x, w1, b1, *, seq_len, live, with_stats, with_token_mask, **options):
        if live is None:
            return dense_forward(x, w1, b1, seq_len=seq_len, live=None, with_stats=with_stats,
                                 with_token_mask=with_token_mask, **options)
        idx = jnp.asarray(live)
        h, stats = dense_forward(x, w1[:, idx], b1[idx], seq_len=seq_len, live=None,
                                 with_stats=with_stats, with_token_mask=with_token_mask,
                                 **options)
        if stats is not None:
            stats = expand_live_stats(stats, live, w1.shape[1])
        return h, stats

    return forward
