"""The `mosaic_gpu` backend: `kernel.build_call` with padding, dtype policy, the small reductions
of the kernel's per-tile partial statistics, and `live`.

On a GPU the kernel is compiled by Mosaic GPU (Hopper: TMA, wgmma, warp specialization);
anywhere else it runs in Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`), with a warning,
so that CPUs can check it. `interpret=False` compiles regardless of the platform (to lower for
CUDA from a CPU). Tile configurations are data (`kernels/configs/mosaic_gpu.json`, per device
kind and shape); shapes not listed there use `kernel.DEFAULT_CONFIG`. Either gives up pipeline
stages where an f32 h's doubled epilogue buffers need the shared memory (`kernel.fit_stages`,
logged); a configuration passed explicitly is used as it is, or rejected if it does not fit.

Dtypes. bf16 inputs go to wgmma as they are (f32 accumulation), h is written in bf16.
f32 inputs: wgmma would round f32 operands to TF32 (10-bit mantissa), far from the reference's
f32 product, so they are split into bf16 pieces, a = a_hi + a_lo with a_hi = bf16(a) and
a_lo = bf16(a - a_hi), and the kernel runs the bf16 GEMM [x_hi | x_lo | x_hi] @ [w_hi; w_hi; w_lo]
(K = 3 D) = x_hi w_hi + x_lo w_hi + x_hi w_lo with f32 accumulation, writing h in f32. The dropped
x_lo w_lo term and the rounding of the lo pieces leave a relative error of about 2^-16 per
product (`bf16x3`), f32 tolerance for our purposes, at three times the bf16 GEMM's work plus the
splitting pass (`split_bf16`, which rounds with reduce_precision: see there why). The
statistics follow the exactness rule on that returned f32 h as always.

What is left to plain JAX (all small next to h): the sum of the per-column-tile token counts
([F / tile_n, T]), the sum and unpacking of the per-warp sequence counts (one byte per warp,
row tile and column: [T / tile_m, n_seg, 4, F / 4] int32 -> [n_seq, F], `sequence_counts`),
`seq_mask = pack_bits(seq_count > 0)` ([n_seq, F]) and, only where padding calls for it, slicing
h / the mask words.
"""

import functools
import logging
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from relu_sparsity.kernels.bits import num_words, pack_bits
from relu_sparsity.kernels.live import with_live_columns
from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
from relu_sparsity.kernels.reference import SparsityStats
from relu_sparsity.kernels.tile_configs import tuned_entry

log = logging.getLogger(__name__)

DEFAULT_DEVICE_KIND = "NVIDIA H200"  # the config key used when lowering on a machine without one
H200_NUM_SMS = 132
INTERPRET_NUM_SMS = 2  # CTAs the interpreter simulates (each runs three warpgroup threads)


def tile_config(device_kind: str, T: int, D: int, F: int, dtype: str) -> mgpu_kernel.TileConfig:
    """The committed configuration for this device and shape, else the default."""
    entry = tuned_entry("mosaic_gpu", device_kind, T, D, F, dtype)
    return mgpu_kernel.TileConfig(**entry) if entry else mgpu_kernel.DEFAULT_CONFIG


def _gpu_device():
    device = jax.devices()[0]
    return device if device.platform == "gpu" else None


def default_interpret():
    """None (compile) on a GPU; elsewhere the interpreter's parameters, with a warning."""
    if _gpu_device() is not None:
        return None
    warnings.warn("mosaic_gpu: no GPU here; interpreting the Mosaic GPU kernel on the "
                  f"{jax.default_backend()} (plgpu.InterpretGPUParams), which is slow",
                  stacklevel=3)
    return plgpu.InterpretGPUParams()


def split_bf16(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a (f32) = hi + lo + O(2^-16 |a|), hi and lo bf16.

    hi is rounded by `lax.reduce_precision`, not by a convert to bf16 and back: XLA's GPU
    compiler, allowed excess precision, folds such a convert pair away, which turned
    `a - f32(bf16(a))` into 0 on the H200 (lo = 0: the f32 path at bf16 precision)."""
    hi = lax.reduce_precision(a, exponent_bits=8, mantissa_bits=7)
    return hi.astype(jnp.bfloat16), (a - hi).astype(jnp.bfloat16)


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def mosaic_gpu_dense_forward(x, w1, b1, *, seq_len, live=None, with_stats, with_token_mask,
                             config: mgpu_kernel.TileConfig | None = None, interpret=None,
                             num_sms: int | None = None):
    """Every column of w1 (`live` is handled by `mosaic_gpu_forward`).

    interpret: None picks by platform (compile on a GPU, interpret elsewhere); False compiles
    (also to lower for CUDA from a CPU); an InterpretGPUParams interprets."""
    assert live is None
    T, D = x.shape
    F = w1.shape[1]
    out_dtype = jnp.dtype(x.dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"mosaic_gpu: x must be bfloat16 or float32, got {x.dtype}")
    with_token_mask = with_stats and with_token_mask
    device = _gpu_device()
    if config is None:
        kind = device.device_kind if device is not None else DEFAULT_DEVICE_KIND
        tuned = tile_config(kind, T, D, F, out_dtype.name)
        config = mgpu_kernel.fit_stages(tuned, jnp.bfloat16, out_dtype)
        if config != tuned:
            log.info("mosaic_gpu: %d pipeline stages instead of %d so that the %s epilogue "
                     "fits in shared memory", config.stages, tuned.stages, out_dtype.name)
    if interpret is None:
        interpret = default_interpret()
    elif interpret is False:
        interpret = None
    if num_sms is None:
        if interpret is not None:
            num_sms = INTERPRET_NUM_SMS
        else:
            num_sms = getattr(device, "core_count", None) or H200_NUM_SMS

    if out_dtype == jnp.float32:
        x_hi, x_lo = split_bf16(x)
        w_hi, w_lo = split_bf16(w1)
        xk = jnp.concatenate([x_hi, x_lo, x_hi], axis=1)
        wk = jnp.concatenate([w_hi, w_hi, w_lo], axis=0)
    else:
        xk, wk = x, w1
    plan = mgpu_kernel.make_plan(T, xk.shape[1], F, seq_len, config)
    xp = _pad2(xk, plan.Tp, plan.Dp)
    wp = _pad2(wk, plan.Dp, plan.Fp)
    bp = jnp.pad(b1.astype(jnp.float32), (0, plan.Fp - F))
    args = [xp, wp, bp]
    call = mgpu_kernel.build_call(plan, jnp.bfloat16, out_dtype, with_stats=with_stats,
                                  with_token_mask=with_token_mask, num_sms=num_sms,
                                  interpret=interpret)
    outs = call(*args)
    h = outs[0]
    if h.shape != (T, F):
        h = h[:T, :F]
    if not with_stats:
        return h, None
    tc_part, sc_part = outs[1], outs[2]
    token_count = jnp.sum(tc_part, axis=0, dtype=jnp.int32)[:T]
    seq_count = sequence_counts(sc_part, plan)
    seq_count = seq_count[:, :F] if plan.Fp != F else seq_count
    seq_mask = pack_bits(seq_count > 0)
    token_mask = None
    if with_token_mask:
        words = outs[3]
        W = num_words(F)
        if words.shape != (T, W):
            words = words[:T, :W]
        token_mask = jax.lax.bitcast_convert_type(words, jnp.uint32)
    return h, SparsityStats(token_count, seq_count, seq_mask, token_mask)


def sequence_counts(sc_part: jax.Array, plan: mgpu_kernel.Plan) -> jax.Array:
    """seq_count [n_seq, Fp] int32 from the kernel's per-warp column counts sc_part [row_tiles,
    n_seg, WARPS, Fp / 4]: four 8-bit lanes per int32, lane i of a tile's word c being column
    i * tile_n / 4 + c of that tile.

    When every row tile lies in one sequence (plan.aligned) and a count fits 16 bits, the words
    are summed over each sequence's row tiles and warps before they are unpacked: split into
    lanes 0 and 2 and lanes 1 and 3, each sum has two 16-bit lanes. Reductions over sc_part
    with the masking as their elementwise input, then a [n_seq, Fp / 4] unpacking, instead of
    unpacking a [row_tiles, WARPS, Fp] array first (the JAX steps after the kernel took 14% of
    XLA's GEMM time at 8192x512x8192: bench/RESULTS.md). Otherwise each segment's counts are
    unpacked and scattered into its sequence."""
    n_seq = plan.T // plan.seq_len
    tile_n = plan.config.tile_n
    if plan.aligned and plan.seq_len < 2 ** 16:
        words = sc_part.reshape(n_seq, -1, sc_part.shape[-1])  # [n_seq, tiles x WARPS, Fp / 4]
        even = jnp.sum(words & 0x00FF00FF, axis=1, dtype=jnp.int32)  # lanes 0 and 2
        odd = jnp.sum(lax.shift_right_logical(words, 8) & 0x00FF00FF, axis=1, dtype=jnp.int32)
        lanes = [even & 0xFFFF, odd & 0xFFFF, lax.shift_right_logical(even, 16),
                 lax.shift_right_logical(odd, 16)]
        return _lanes_to_columns(lanes, tile_n)
    lanes = [lax.shift_right_logical(sc_part, 8 * i) & 0xFF for i in range(4)]
    seq_part = _lanes_to_columns(lanes, tile_n)  # [row_tiles, n_seg, WARPS, Fp]
    ids = jnp.asarray(plan.segment_ids().reshape(-1))
    return jnp.zeros((n_seq + 1, plan.Fp), jnp.int32).at[ids].add(
        seq_part.sum(axis=2, dtype=jnp.int32).reshape(-1, plan.Fp))[:n_seq]


def _lanes_to_columns(lanes: list[jax.Array], tile_n: int) -> jax.Array:
    """Four lane arrays [..., Fp / 4] (lane i of a tile's word c) -> [..., Fp], column
    tile * tile_n + i * tile_n / 4 + c."""
    lead, words = lanes[0].shape[:-1], lanes[0].shape[-1]
    lane_cols = tile_n // 4
    tiles = words // lane_cols
    per_tile = jnp.stack([a.reshape(*lead, tiles, lane_cols) for a in lanes], axis=-2)
    return per_tile.reshape(*lead, tiles * tile_n)


# The backend forward of the kernel contract (see api.fused_mlp_up): with `live`, the live columns
# are gathered and the kernel runs at their width (live.with_live_columns).
def mosaic_gpu_forward(x, w1, b1, *, seq_len, live, with_stats, with_token_mask,
                       config: mgpu_kernel.TileConfig | None = None, interpret=None,
                       num_sms: int | None = None):
    dense = functools.partial(mosaic_gpu_dense_forward, config=config, interpret=interpret,
                              num_sms=num_sms)
    return with_live_columns(dense)(x, w1, b1, seq_len=seq_len, live=live,
                                    with_stats=with_stats, with_token_mask=with_token_mask)
