"""The `pallas_tpu` backend: `kernel.fused_mlp_up_call` with padding, slicing and `live`.

On a TPU the kernel is compiled by Mosaic; anywhere else it runs in Pallas's TPU interpret mode
(`pltpu.InterpretParams`), with a warning, so that CPUs and CI can check it. Tile configurations
are data (`kernels/configs/pallas_tpu.json`, per shape; see kernel.py for why); shapes not listed
there use `kernel.DEFAULT_CONFIG`.
"""

import logging
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from relu_sparsity.kernels.bits import num_words
from relu_sparsity.kernels.live import with_live_columns
from relu_sparsity.kernels.pallas_tpu import kernel as tpu_kernel
from relu_sparsity.kernels.reference import SparsityStats
from relu_sparsity.kernels.tile_configs import tuned_entry

log = logging.getLogger(__name__)



def tile_config(T: int, D: int, F: int, dtype: str) -> tpu_kernel.TileConfig:
    """The committed configuration for this shape, else the default."""
    entry = tuned_entry("pallas_tpu", "tpu", T, D, F, dtype)
    return tpu_kernel.TileConfig(**entry) if entry else tpu_kernel.DEFAULT_CONFIG


def default_interpret():
    """False on a TPU; elsewhere the interpreter's parameters, with a warning."""
    if jax.default_backend() == "tpu":
        return False
    warnings.warn("pallas_tpu: no TPU here; interpreting the Pallas TPU kernel on the "
                  f"{jax.default_backend()} (pltpu.InterpretParams), which is slow", stacklevel=3)
    return pltpu.InterpretParams()


def _select_rows(a: jax.Array, plan: tpu_kernel.Plan) -> jax.Array:
    """[Tp, ...] -> [T, ...]: drop per-sequence padding rows and padding sequences."""
    if plan.Lp == plan.seq_len:
        return a[:plan.T] if plan.Tp != plan.T else a
    a = a.reshape(plan.n_seq_p, plan.Lp, *a.shape[1:])[:plan.n_seq, :plan.seq_len]
    return a.reshape(plan.T, *a.shape[2:])


def pallas_tpu_dense_forward(x, w1, b1, *, seq_len, live=None, with_stats, with_token_mask,
                             config: tpu_kernel.TileConfig | None = None, interpret=None):
    """Every column of w1 (`live` is handled by `pallas_tpu_forward`). `interpret`: None picks by platform; False compiles for TPU (also to
    export for TPU from a CPU); an InterpretParams interprets."""
    assert live is None
    T, D = x.shape
    F = w1.shape[1]
    if config is None:
        config = tile_config(T, D, F, jnp.dtype(x.dtype).name)
    if interpret is None:
        interpret = default_interpret()
    plan = tpu_kernel.make_plan(T, D, F, seq_len, config)
    # Pad: sequences to Lp rows and to a multiple of m sequences; D and F with zeros (zero
    # columns give h = 0, so their bits stay clear).
    xp = x
    if plan.Lp != seq_len or plan.n_seq_p != plan.n_seq:
        xp = x.reshape(plan.n_seq, seq_len, D)
        xp = jnp.pad(xp, ((0, plan.n_seq_p - plan.n_seq), (0, plan.Lp - seq_len), (0, 0)))
        xp = xp.reshape(plan.Tp, D)
    xp = jnp.pad(xp, ((0, 0), (0, plan.Dp - D))) if plan.Dp != D else xp
    wp = jnp.pad(w1, ((0, plan.Dp - D), (0, plan.Fp - F))) if w1.shape != (plan.Dp, plan.Fp) \
        else w1
    bp = jnp.pad(b1, (0, plan.Fp - F)).reshape(1, plan.Fp)
    outs = tpu_kernel.fused_mlp_up_call(xp, wp, bp, plan, with_stats=with_stats,
                                        with_token_mask=with_token_mask, interpret=interpret)
    h = _select_rows(outs[0], plan)
    h = h[:, :F] if plan.Fp != F else h
    if not with_stats:
        return h, None
    W = num_words(F)
    nj = plan.grid[0]
    token_count = _select_rows(jnp.sum(outs[1][:, :, 0], axis=0), plan)
    seq_count = outs[2].reshape(plan.n_seq_p, plan.Fp)[:plan.n_seq, :F]
    seq_mask = jnp.transpose(outs[3], (1, 2, 0, 3)).reshape(plan.n_seq_p, nj * plan.nw)
    seq_mask = jax.lax.bitcast_convert_type(seq_mask[:plan.n_seq, :W], jnp.uint32)
    token_mask = None
    if with_token_mask:
        words = jnp.transpose(outs[4], (1, 0, 2)).reshape(plan.Tp, nj * plan.nw)
        token_mask = jax.lax.bitcast_convert_type(_select_rows(words, plan)[:, :W], jnp.uint32)
    return h, SparsityStats(token_count, seq_count, seq_mask, token_mask)


# The backend forward of the kernel contract (see api.fused_mlp_up): with `live`, the live columns
# are gathered and the kernel runs at their width.
pallas_tpu_forward = with_live_columns(pallas_tpu_dense_forward)
