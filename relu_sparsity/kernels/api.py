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
    # relu'(0) = 0: a unit that is exactly zero passes no gradient. The select stays next to the
    # GEMMs' operand reads, so XLA can fuse it into them rather than write a masked copy.
    dpre = jnp.where(h > 0, dh, jnp.zeros_like(dh))
    dot = functools.partial(jnp.dot, precision=backward_precision(x.dtype))
    # Each GEMM writes its operand's dtype: bf16 GEMMs accumulate in f32 inside the GEMM, so
    # no f32 [T, D] or [D, F] result is written and then cast.
    dx = dot(dpre, w1.T, preferred_element_type=x.dtype)
    dw1 = dot(x.T, dpre, preferred_element_type=w1.dtype)
    db1 = jnp.sum(dpre, axis=0, dtype=jnp.float32).astype(w1.dtype)
    return dx, dw1, db1


def backward_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for f32 (a GPU would otherwise take TF32, which would break f32 exactness);
    DEFAULT for 16-bit types, whose products are exact in the tensor cores' f32 sums."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


_fused.defvjp(_fused_fwd, _fused_bwd)
