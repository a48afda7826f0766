"""The kernel contract (docs/design.md §2): what every backend's forward takes and returns.

`fused_mlp_up` checks its inputs here once, before a backend is chosen; the backends' own
forwards receive checked inputs.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


class SparsityStats(NamedTuple):
    token_count: jax.Array  # [T] int32: units with h > 0, per token
    seq_count: jax.Array  # [n_seq, F] int32: tokens with h > 0, per sequence and unit
    seq_mask: jax.Array  # [n_seq, W] uint32: bit-packed seq_count > 0
    token_mask: jax.Array | None  # [T, W] uint32: bit-packed h > 0, only with with_token_mask


def check_seq_len(num_tokens: int, seq_len) -> None:
    """seq_len is a positive int that divides the token count T (whole sequences only)."""
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if num_tokens % seq_len:
        raise ValueError(f"seq_len must divide the token count T = {num_tokens}, got {seq_len}")


def check_inputs(x, w1, b1, seq_len) -> None:
    """A ValueError naming the argument for any input outside the contract."""
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if w1.ndim != 2 or w1.shape[0] != x.shape[1]:
        raise ValueError(f"w1 must be [D, F] with D = {x.shape[1]}, got shape {w1.shape}")
    if b1.ndim != 1 or b1.shape[0] != w1.shape[1]:
        raise ValueError(f"b1 must be [F] with F = {w1.shape[1]}, got shape {b1.shape}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    for name, arr in (("w1", w1), ("b1", b1)):
        if arr.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype} (the caller casts), "
                             f"got {arr.dtype}")
    check_seq_len(x.shape[0], seq_len)
