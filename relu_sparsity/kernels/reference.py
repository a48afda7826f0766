"""The reference backend: pure jax.numpy, runs anywhere, the oracle for every other backend.

XLA fuses the counting into the ReLU pass it already makes, so on CPUs this is also the fast path
(`--instrument xla`).
"""

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.bits import pack_bits
from relu_sparsity.kernels.contract import SparsityStats


def stats_from_h(h: jax.Array, *, seq_len: int, with_token_mask: bool) -> SparsityStats:
    """The contract's statistics recomputed from a returned h [T, F] (the exactness rule's
    right-hand side, docs/design.md §3)."""
    used = h > 0
    num_tokens, num_units = used.shape
    token_count = jnp.sum(used, axis=1, dtype=jnp.int32)
    seq_count = jnp.sum(used.reshape(num_tokens // seq_len, seq_len, num_units), axis=1,
                        dtype=jnp.int32)
    seq_mask = pack_bits(seq_count > 0)
    token_mask = pack_bits(used) if with_token_mask else None
    return SparsityStats(token_count, seq_count, seq_mask, token_mask)


def reference_forward(x: jax.Array, w1: jax.Array, b1: jax.Array, *, seq_len: int,
                      with_stats: bool, with_token_mask: bool
                      ) -> tuple[jax.Array, SparsityStats | None]:
    """relu(x @ w1 + b1) with f32 accumulation, returned in x.dtype, plus its statistics."""
    # bf16 products are exact in f32, so a bf16 GEMM with f32 accumulation is the f32 result up
    # to summation order, and it runs on the tensor cores when `--instrument xla` trains on a GPU.
    pre = jnp.dot(x, w1, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
    h = jax.nn.relu(pre).astype(x.dtype)
    if not with_stats:
        return h, None
    return h, stats_from_h(h, seq_len=seq_len, with_token_mask=with_token_mask)
