"""The `mosaic_gpu` backend: `kernel.build_call` with padding where TMA cannot take the edges
(`kernel.tma_edges`), the dtype policy and the small JAX steps after the kernel.

On a GPU the kernel is compiled by Mosaic GPU (Hopper: TMA, wgmma, warp specialization);
anywhere else it runs in Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`), with a warning,
so that CPUs can check it (`interpret`: see kernels/backends.py). Tile configurations are data
(`kernels/configs/mosaic_gpu.json`, per device kind and shape); shapes not listed there take
the nearest listed shape's (`tile_configs.tuned_entry`), else `kernel.DEFAULT_CONFIG`. Either
gives up pipeline stages where an f32 h's doubled epilogue buffers need the shared memory
(`kernel.fit_stages`, logged); a configuration passed explicitly is used as it is, or rejected
if it does not fit.

Dtypes. bf16 inputs go to wgmma as they are (f32 accumulation), h is written in bf16.
f32 inputs: wgmma would round f32 operands to TF32 (10-bit mantissa), far from the reference's
f32 product, so they are split into bf16 pieces, a = a_hi + a_lo with a_hi = bf16(a) and
a_lo = bf16(a - a_hi), and the kernel runs the bf16 GEMM [x_hi | x_lo | x_hi] @ [w_hi; w_hi; w_lo]
(K = 3 D) = x_hi w_hi + x_lo w_hi + x_hi w_lo with f32 accumulation, writing h in f32. The dropped
x_lo w_lo term and the rounding of the lo pieces leave a relative error of about 2^-16 per
product (`bf16x3`), f32 tolerance for our purposes, at three times the bf16 GEMM's work plus the
splitting pass (`split_bf16`, which rounds with reduce_precision: see there why). The
statistics follow the exactness rule on that returned f32 h as always.

The compiled kernel adds the token and sequence counts atomically into zeroed int32 arrays
(`kernel.build_call`), so what is left to plain JAX is `seq_mask = pack_bits(seq_count > 0)`
([n_seq, F], one small fusion) and, only where padding calls for it, slicing h, the counts and
the mask words (`finish_statistics`). The kernel's sequence counts are 16-bit: a sequence longer
than 65535 tokens is counted in parts that JAX adds (`counting_seq_len`).
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from relu_sparsity.kernels.backends import device_kind, resolve_interpret
from relu_sparsity.kernels.bits import num_words, pack_bits
from relu_sparsity.kernels.contract import SparsityStats
from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
from relu_sparsity.kernels.tile_configs import tuned_entry

log = logging.getLogger(__name__)

H200_NUM_SMS = 132
# Parts shorter than this would give row tiles many sequence segments, each unrolled in the kernel.
MIN_COUNT_PART = 64
INTERPRET_NUM_SMS = 2  # CTAs the interpreter simulates (each runs three warpgroup threads)


def tile_config(device_kind: str, shape: tuple[int, int, int], dtype: str
                ) -> mgpu_kernel.TileConfig:
    """The committed configuration for this device and shape (T, D, F) or the nearest tuned
    one, else the default."""
    entry = tuned_entry("mosaic_gpu", device_kind, shape, dtype)
    return mgpu_kernel.TileConfig(**entry) if entry else mgpu_kernel.DEFAULT_CONFIG


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


def fitted_tile_config(shape: tuple[int, int, int], out_dtype) -> mgpu_kernel.TileConfig:
    """The committed configuration for this machine's GPU (or the H200 when lowering from a
    CPU), with fewer pipeline stages where an f32 epilogue needs the shared memory."""
    tuned = tile_config(device_kind("gpu"), shape, jnp.dtype(out_dtype).name)
    config = mgpu_kernel.fit_stages(tuned, jnp.bfloat16, out_dtype)
    if config != tuned:
        log.info("mosaic_gpu: %d pipeline stages instead of %d so that the %s epilogue "
                 "fits in shared memory", config.stages, tuned.stages, jnp.dtype(out_dtype).name)
    return config


def forward(x, w1, b1, *, seq_len, with_stats, with_token_mask,
            config: mgpu_kernel.TileConfig | None = None, interpret=None,
            num_sms: int | None = None):
    """The backend forward (kernels/backends.py). num_sms: the CTAs of the persistent grid
    (default: this GPU's SMs, an H200's when lowering from a CPU)."""
    T, D = x.shape
    F = w1.shape[1]
    out_dtype = jnp.dtype(x.dtype)
    with_token_mask = with_stats and with_token_mask
    if config is None:
        config = fitted_tile_config((T, D, F), out_dtype)
    interpret = resolve_interpret(interpret, backend="mosaic_gpu", platform="gpu",
                                  make_params=plgpu.InterpretGPUParams)
    if num_sms is None:
        device = jax.devices()[0]
        on_gpu = device.platform == "gpu"
        num_sms = INTERPRET_NUM_SMS if interpret is not None else (
            device.core_count if on_gpu else H200_NUM_SMS)

    if out_dtype == jnp.float32:
        x_hi, x_lo = split_bf16(x)
        w_hi, w_lo = split_bf16(w1)
        xk = jnp.concatenate([x_hi, x_lo, x_hi], axis=1)
        wk = jnp.concatenate([w_hi, w_hi, w_lo], axis=0)
    else:
        xk, wk = x, w1
    count_len = counting_seq_len(seq_len) if with_stats else seq_len
    unpadded = mgpu_kernel.tma_edges(T, xk.shape[1], F, config, jnp.bfloat16, out_dtype)
    if not unpadded.h:
        _log_sliced_h(T, F, config.h_store)
    plan = mgpu_kernel.make_plan(T, xk.shape[1], F, count_len, config, unpadded)
    xp = xk if plan.unpadded.x else _pad2(xk, plan.Tp, plan.Dp)
    wp = wk if plan.unpadded.w else _pad2(wk, plan.Dp, plan.Fp)
    if b1.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        b1 = b1.astype(jnp.float32)
    bp = b1 if plan.Fp == F else jnp.pad(b1, (0, plan.Fp - F))
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
    return h, finish_statistics(outs[1:], plan, T, F, parts_per_seq=seq_len // count_len)


def edge_copies(shape: tuple[int, int, int], dtype) -> str:
    """What the forward does at the edges of x [T, D], w1 [D, F] and h [T, F] with this shape's
    tiles (`kernel.tma_edges`), for bench's tiles column: "" where TMA takes every edge through
    swizzled tiles, else the copies and h's untiled pieces, e.g. "pads w1, h untiled"."""
    T, D, F = shape
    out_dtype = jnp.dtype(dtype)
    D_k = 3 * D if out_dtype == jnp.float32 else D
    config = fitted_tile_config(shape, out_dtype)
    unpadded = mgpu_kernel.tma_edges(T, D_k, F, config, jnp.bfloat16, out_dtype)
    pads = [name for name, kept in (("x", unpadded.x), ("w1", unpadded.w)) if not kept]
    untiled = unpadded.h and mgpu_kernel.h_tile_cols(config, T, F, out_dtype) == 0
    return ", ".join(([f"pads {' and '.join(pads)}"] if pads else [])
                     + ([] if unpadded.h else ["slices h"]) + (["h untiled"] if untiled else []))


@functools.cache
def _log_sliced_h(T: int, F: int, h_store: str) -> None:
    why = ("h is stored from registers" if h_store == "direct" else
           "TMA stores h at its own shape only where its rows are whole 16-byte multiples and "
           "neither dimension is smaller than one CTA tile")
    log.warning("mosaic_gpu: h [%d, %d] is written padded to whole tiles and sliced after the "
                "kernel (%s): one more pass over h", T, F, why)


def counting_seq_len(seq_len: int) -> int:
    """The sequence length the kernel counts by: seq_len itself, or for a sequence longer than
    its 16-bit sequence counts allow (`kernel.MAX_SEQ_LEN`) the largest divisor of seq_len that
    fits, whose counts JAX then adds up per sequence (exact: int32 sums of parts)."""
    if seq_len <= mgpu_kernel.MAX_SEQ_LEN:
        return seq_len
    fits = [d for d in range(MIN_COUNT_PART, mgpu_kernel.MAX_SEQ_LEN + 1) if seq_len % d == 0]
    if not fits:
        raise ValueError(
            f"mosaic_gpu: seq_len={seq_len} is longer than the kernel's 16-bit sequence counts "
            f"allow ({mgpu_kernel.MAX_SEQ_LEN}) and has no divisor in [{MIN_COUNT_PART}, "
            f"{mgpu_kernel.MAX_SEQ_LEN}] to count it in parts by; use backend='triton' or 'xla'")
    part = fits[-1]
    log.info("mosaic_gpu: seq_len %d counted in %d parts of %d tokens (16-bit sequence counts)",
             seq_len, seq_len // part, part)
    return part


def finish_statistics(parts, plan: mgpu_kernel.Plan, T: int, F: int,
                      parts_per_seq: int = 1) -> SparsityStats:
    """The statistics from the kernel's `parts` (token counts [Tp], sequence counts [n_seq *
    parts_per_seq, Fp] and, with the token mask, its words [Tp, Fp / 32]; `build_call`): each
    sequence's parts added (`counting_seq_len`), padding sliced off and seq_mask packed, the
    JAX steps after the kernel."""
    token_count, seq_count = parts[0], parts[1]
    if parts_per_seq > 1:
        seq_count = seq_count.reshape(-1, parts_per_seq, plan.Fp).sum(axis=1, dtype=jnp.int32)
    token_count = token_count[:T] if plan.Tp != T else token_count
    seq_count = seq_count[:, :F] if plan.Fp != F else seq_count
    seq_mask = pack_bits(seq_count > 0)
    token_mask = None
    if len(parts) > 2:
        words = parts[2]
        W = num_words(F)
        if words.shape != (T, W):
            words = words[:T, :W]
        token_mask = jax.lax.bitcast_convert_type(words, jnp.uint32)
    return SparsityStats(token_count, seq_count, seq_mask, token_mask)
