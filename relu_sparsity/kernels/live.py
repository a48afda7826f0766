"""`live` for backends whose kernel computes dense columns: gather the live columns of w1 and b1,
run the kernel at width F_live, then put the statistics back in the caller's unit ids (dead units
zero). The scatter works on the small outputs ([T], [n_seq, F]); only `token_mask`, when asked
for, is unpacked at [T, F_live]."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.bits import pack_bits, unpack_bits
from relu_sparsity.kernels.reference import SparsityStats


def expand_live_stats(stats: SparsityStats, live: tuple[int, ...], num_units: int
                      ) -> SparsityStats:
    idx = jnp.asarray(live)
    seq_count = jnp.zeros((stats.seq_count.shape[0], num_units), jnp.int32).at[:, idx].set(
        stats.seq_count)
    token_mask = None
    if stats.token_mask is not None:
        used = unpack_bits(stats.token_mask, len(live))
        token_mask = pack_bits(jnp.zeros((used.shape[0], num_units), bool).at[:, idx].set(used))
    return SparsityStats(stats.token_count, seq_count, pack_bits(seq_count > 0), token_mask)


def with_live_columns(dense_forward: Callable) -> Callable:
    """A backend forward that supports `live`, from one that computes every column."""
    def forward(x, w1, b1, *, seq_len, live, with_stats, with_token_mask):
        if live is None:
            return dense_forward(x, w1, b1, seq_len=seq_len, live=None, with_stats=with_stats,
                                 with_token_mask=with_token_mask)
        idx = jnp.asarray(live)
        h, stats = dense_forward(x, w1[:, idx], b1[idx], seq_len=seq_len, live=None,
                                 with_stats=with_stats, with_token_mask=with_token_mask)
        if stats is not None:
            stats = expand_live_stats(stats, live, w1.shape[1])
        return h, stats

    return forward
