"""`fused_mlp_up`: the one entry point of every backend, and its custom VJP.

Each backend supplies only a forward (kernels/backends.py); the backward (the ReLU mask from `h`,
then three GEMMs) is shared here.
"""

import functools

import jax
import jax.numpy as jnp

from relu_sparsity.kernels import backends
from relu_sparsity.kernels.contract import SparsityStats, check_inputs


def fused_mlp_up(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    *,
    seq_len: int,
    with_stats: bool = True,
    with_token_mask: bool = False,
    backend: str = "auto",
) -> tuple[jax.Array, SparsityStats | None]:
    """h = relu(x @ w1 + b1) [T, F] and its sparsity statistics (docs/design.md §2).

    Differentiable in x, w1 and b1, with relu'(0) = 0.
    """
    check_inputs(x, w1, b1, seq_len)
    name = backends.resolve_backend(backend)
    return _fused(x, w1, b1, int(seq_len), bool(with_stats), bool(with_token_mask), name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, w1, b1, seq_len, with_stats, with_token_mask, backend):
    # Loaded by resolve_backend (or, to lower for a GPU on a CPU, by load_backend(platform=...)).
    return backends.BACKENDS[backend](x, w1, b1, seq_len=seq_len, with_stats=with_stats,
                                      with_token_mask=with_token_mask)


def _fused_fwd(x, w1, b1, seq_len, with_stats, with_token_mask, backend):
    h, stats = _fused(x, w1, b1, seq_len, with_stats, with_token_mask, backend)
    return (h, stats), (x, w1, h)


def _fused_bwd(seq_len, with_stats, with_token_mask, backend, residuals, cotangents):
    del seq_len, with_stats, with_token_mask, backend
    x, w1, h = residuals
    dh, _ = cotangents  # integer statistics carry no cotangent
    # relu'(0) = 0: a unit that is exactly zero passes no gradient.
    dpre = jnp.where(h > 0, dh, jnp.zeros_like(dh))
    # HIGHEST keeps f32 GEMMs in f32 on GPUs (not TF32); bf16 GEMMs are unaffected.
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    dx = dot(dpre, w1.T).astype(x.dtype)
    dw1 = dot(x.T, dpre).astype(w1.dtype)
    db1 = jnp.sum(dpre, axis=0, dtype=jnp.float32).astype(w1.dtype)
    return dx, dw1, db1


_fused.defvjp(_fused_fwd, _fused_bwd)
