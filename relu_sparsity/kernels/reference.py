"""The reference backend: pure jax.numpy, runs anywhere, the oracle for every other backend.

XLA fuses the counting into the ReLU pass it already makes, so on CPUs this is also the fast path
(`--instrument xla`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.bits import pack_bits


class SparsityStats(NamedTuple):
    token_count: jax.Array  # [T] int32: units with h > 0, per token
    seq_count: jax.Array  # [n_seq, F] int32: tokens with h > 0, per sequence and unit
    seq_mask: jax.Array  # [n_seq, W] uint32: bit-packed seq_count > 0
    token_mask: jax.Array | None  # [T, W] uint32: bit-packed h > 0, only with with_token_mask


def stats_from_h(
    h: jax.Array,
    *,
    seq_len: int,
    num_units: int,
    live: tuple[int, ...] | None,
    with_token_mask: bool,
) -> SparsityStats:
    """The contract's statistics recomputed from a returned `h` ([T, F] or [T, F_live])."""
    used = h > 0
    if live is not None:
        # Dead units count zero; statistics keep the caller's unit ids 0..F-1.
        used = jnp.zeros((h.shape[0], num_units), bool).at[:, jnp.asarray(live)].set(used)
    num_tokens = used.shape[0]
    token_count = jnp.sum(used, axis=1, dtype=jnp.int32)
    seq_count = jnp.sum(used.reshape(num_tokens // seq_len, seq_len, num_units), axis=1,
                        dtype=jnp.int32)
    seq_mask = pack_bits(seq_count > 0)
    token_mask = pack_bits(used) if with_token_mask else None
    return SparsityStats(token_count, seq_count, seq_mask, token_mask)


def reference_forward(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    *,
    seq_len: int,
    live: tuple[int, ...] | None,
    with_stats: bool,
    with_token_mask: bool,
) -> tuple[jax.Array, SparsityStats | None]:
    """relu(x @ w1 + b1) with f32 accumulation, returned in x.dtype, plus its statistics."""
    num_units = w1.shape[1]
    if live is not None:
        idx = jnp.asarray(live)
        w1, b1 = w1[:, idx], b1[idx]
    # bf16 products are exact in f32, so a bf16 GEMM with f32 accumulation is the f32 result up
    # to summation order, and it runs on the tensor cores when `--instrument xla` trains on a GPU.
    pre = jnp.dot(x, w1, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
    h = jax.nn.relu(pre).astype(x.dtype)
    if not with_stats:
        return h, None
    return h, stats_from_h(h, seq_len=seq_len, num_units=num_units, live=live,
                           with_token_mask=with_token_mask)
