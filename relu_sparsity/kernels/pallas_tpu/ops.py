"""The `pallas_tpu` backend: `kernel.fused_mlp_up_call` with padding and slicing.

On a TPU the kernel is compiled by Mosaic; anywhere else it runs in Pallas's TPU interpret mode
(`pltpu.InterpretParams`), with a warning, so that CPUs and CI can check it (`interpret`: see
kernels/backends.py). Across several processes it runs in Pallas's generic interpreter instead:
the TPU interpret mode simulates the devices of one process and waits for the others' forever.
Tile configurations are data (`kernels/configs/pallas_tpu.json`, one entry per shape for every
TPU; see kernel.py for why); shapes not listed there take the nearest listed shape's
(`tile_configs.tuned_entry`), else `kernel.DEFAULT_CONFIG`.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from relu_sparsity.kernels.backends import resolve_interpret
from relu_sparsity.kernels.bits import num_words
from relu_sparsity.kernels.contract import SparsityStats
from relu_sparsity.kernels.pallas_tpu import kernel as tpu_kernel
from relu_sparsity.kernels.tile_configs import tuned_entry


def tile_config(device_kind: str, shape: tuple[int, int, int], dtype: str
                ) -> tpu_kernel.TileConfig:
    """The committed configuration for this shape (T, D, F) or the nearest tuned one, else the
    default. One entry serves every TPU generation (sized for the smallest VMEM), so
    `device_kind` does not select."""
    del device_kind
    entry = tuned_entry("pallas_tpu", "tpu", shape, dtype)
    return tpu_kernel.TileConfig(**entry) if entry else tpu_kernel.DEFAULT_CONFIG


def _select_rows(a: jax.Array, plan: tpu_kernel.Plan) -> jax.Array:
    """[Tp, ...] -> [T, ...]: drop per-sequence padding rows and padding sequences."""
    if plan.Lp == plan.seq_len:
        return a[:plan.T] if plan.Tp != plan.T else a
    a = a.reshape(plan.n_seq_p, plan.Lp, *a.shape[1:])[:plan.n_seq, :plan.seq_len]
    return a.reshape(plan.T, *a.shape[2:])


def default_interpreter():
    return pltpu.InterpretParams() if jax.process_count() == 1 else True


def forward(x, w1, b1, *, seq_len, with_stats, with_token_mask,
            config: tpu_kernel.TileConfig | None = None, interpret=None):
    """The backend forward (kernels/backends.py)."""
    T, D = x.shape
    F = w1.shape[1]
    if config is None:
        config = tile_config("tpu", (T, D, F), jnp.dtype(x.dtype).name)
    interpret = resolve_interpret(interpret, backend="pallas_tpu", platform="tpu",
                                  make_params=default_interpreter)
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
                                        with_token_mask=with_token_mask,
                                        interpret=interpret or False)
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
