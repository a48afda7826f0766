"""The mosaic_gpu backend on the CPU: the kernel in Mosaic GPU's interpreter against the reference
(integer outputs by the exactness rule: equal to the statistics recomputed from the backend's own
h), gradients through api.fused_mlp_up, and the CUDA lowering at the benchmark shapes with the
committed tile configurations (Mosaic GPU rejects a kernel that overflows shared memory there).

The interpreter runs neither inline Mosaic GPU (the PTX packing of bf16 use bits, the per-warp
column sums) nor atomics (the counts' adds); for it the kernel takes plain-JAX stand-ins with the
same arithmetic in interpret mode and writes per-tile partials that JAX adds (see kernel.py). The
lowering tests cover the compiled forms, the gpu-marked tests (test_mosaic_gpu_device.py) their
results."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from relu_sparsity.kernels import api, backends
from relu_sparsity.kernels.mosaic_gpu import kernel, ops
from relu_sparsity.kernels.mosaic_gpu.testing import SMALL, SMALL_N, SMALL_PP, SMALL_PP3
from relu_sparsity.kernels.reference import reference_forward, stats_from_h
from relu_sparsity.kernels.testing import (
    BENCH_SHAPES,
    assert_grads_match_plain_expression,
    assert_matches_reference,
    integer_inputs,
    random_inputs,
    tolerance,
)
from relu_sparsity.kernels.tile_configs import tuned_entry

INTERPRET = plgpu.InterpretGPUParams()


inputs = random_inputs


def run(x, w1, b1, *, seq_len, with_stats=True, with_token_mask=True, config=SMALL):
    return ops.forward(x, w1, b1, seq_len=seq_len, with_stats=with_stats,
                       with_token_mask=with_token_mask, config=config, interpret=INTERPRET)


def check_against_reference(x, w1, b1, *, seq_len, with_token_mask=True, config=SMALL):
    h, stats = run(x, w1, b1, seq_len=seq_len, with_token_mask=with_token_mask, config=config)
    assert_matches_reference(h, stats, x, w1, b1, seq_len=seq_len,
                             with_token_mask=with_token_mask, tol=tolerance(x.dtype))
    return h, stats


@pytest.fixture(autouse=True)
def quiet_interpreter_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mosaic_gpu: no GPU")
        yield


# (T, D, F, seq_len, config, dtype): what each case exercises is in the comment.
RAGGED = [
    # several sequences per row tile (seq_len 24: up to 4 segments of a 64-row tile); F not a
    # multiple of 32 nor of the tile; D not of tile_k; T not of the CTA tile (padding rows)
    (96, 40, 70, 24, SMALL, jnp.bfloat16),
    # several row tiles per sequence (seq_len 128 = 2 tiles), aligned: one segment per tile;
    # two column tiles, D = 2 pipeline steps; f32 inputs (the bf16x3 split)
    (256, 128, 256, 128, SMALL, jnp.float32),
    # sequences straddle tiles (seq_len 80), wg_dim "n", 64-wide tiles (2 mask words each)
    (160, 64, 200, 80, SMALL_N, jnp.bfloat16),
    # ping-pong: 8 tiles over the 2 simulated CTAs (2 per warpgroup), D = 3 steps over 2 stages
    (256, 192, 256, 64, SMALL_PP, jnp.bfloat16),
    # ping-pong with segments, padding rows and columns, an odd number of tiles per CTA
    (96, 40, 70, 24, SMALL_PP, jnp.bfloat16),
    # ping-pong, 3 stages: 2 steps per tile, 6 tiles per CTA (3 per warpgroup)
    (384, 128, 256, 128, SMALL_PP3, jnp.bfloat16),
    # h through one SMEM slot per piece of a tile (4 pieces: no wait within a tile), segments
    (96, 40, 70, 24, dataclasses.replace(SMALL_PP, epi_tile_n=32, epi_slots=4), jnp.bfloat16),
    # h stored from registers, f32 (the bf16x3 split), padding rows and columns
    (160, 64, 200, 80, dataclasses.replace(SMALL_N, h_store="direct"), jnp.float32),
    # ordered mainloops: 4 tiles per CTA (warpgroup 1's last "done" left over), D = 3 steps
    (256, 192, 256, 64, dataclasses.replace(SMALL_PP, ordered=True), jnp.bfloat16),
    # ordered, an odd number of tiles per CTA (warpgroup 0's last left over), f32
    (96, 40, 70, 24, dataclasses.replace(SMALL_PP3, ordered=True), jnp.float32),
]


@pytest.mark.parametrize("case", RAGGED, ids=["segments", "f32-aligned", "straddle-wgN",
                                              "pingpong", "pingpong-segments",
                                              "pingpong-3-stages", "all-slots",
                                              "direct-h-f32", "ordered-even",
                                              "ordered-odd-f32"])
def test_interpreter_matches_reference(case):
    T, D, F, seq_len, config, dtype = case
    x, w1, b1 = inputs(T, D, F, dtype)
    check_against_reference(x, w1, b1, seq_len=seq_len, config=config)


# x, w1 and h all unpadded (kernel.tma_edges): T and F past a CTA tile's edge (T a multiple of
# 8, D and F of 64); TMA zero-fills the loads past the edges and drops the stores.
UNPADDED = [
    (200, 192, 320, 40, SMALL_PP, jnp.bfloat16),  # ping-pong, segments, 3 steps over 2 stages
    (200, 64, 320, 40, SMALL, jnp.float32),  # cooperative along M; the bf16x3 split (K = 192)
    (168, 64, 320, 56, SMALL_N, jnp.bfloat16),  # cooperative along N, 64-wide column tiles
]


@pytest.mark.parametrize("case", UNPADDED, ids=["pingpong", "coop-m-f32", "coop-n"])
def test_unpadded_edges_match_reference(case):
    T, D, F, seq_len, config, dtype = case
    D_k = 3 * D if dtype == jnp.float32 else D
    assert kernel.tma_edges(T, D_k, F, config, jnp.bfloat16, dtype) == kernel.Unpadded(
        x=True, w=True, h=True)
    x, w1, b1 = inputs(T, D, F, dtype)
    check_against_reference(x, w1, b1, seq_len=seq_len, config=config)


# Each array's edge decided on its own: (T, D, F, seq_len, config, dtype, expected Unpadded,
# columns of h's SMEM tiles: 0 untiled, None where h is padded).
PER_ARRAY = [
    # F a multiple of 8 only: w1 padded to whole tiles, h [T, F] stored through untiled
    # pieces, x unpadded
    (200, 192, 328, 40, SMALL_PP, jnp.bfloat16, kernel.Unpadded(True, False, True), 0),
    # F a multiple of 16 only: h through 32-byte swizzled rows; cooperative along M
    (256, 128, 208, 64, SMALL, jnp.bfloat16, kernel.Unpadded(True, False, True), 16),
    # F a multiple of 32 only, ping-pong's 64-wide pieces narrowed to 32 columns
    (200, 128, 288, 40, SMALL_PP, jnp.bfloat16, kernel.Unpadded(True, False, True), 32),
    # f32 h (bf16x3 split, K = 3 D): F a multiple of 8, h through 32-byte rows
    (200, 64, 328, 40, SMALL, jnp.float32, kernel.Unpadded(True, False, True), 8),
    # f32 h with F a multiple of 4 only: untiled pieces
    (200, 64, 332, 40, SMALL, jnp.float32, kernel.Unpadded(True, False, True), 0),
    # T not a multiple of 8: x padded to whole row tiles, h [T, F] through untiled pieces
    (204, 128, 320, 51, SMALL_PP, jnp.bfloat16, kernel.Unpadded(False, True, True), 0),
    # D not a multiple of 64: x padded to Dp, w1 [96, F] read past D by TMA (zeros)
    (200, 96, 320, 40, SMALL_PP, jnp.bfloat16, kernel.Unpadded(False, True, True), 64),
    # F not a multiple of 8: TMA cannot address h [T, F] (rows of F * 2 bytes, not 16-byte
    # aligned), so h is written padded and sliced
    (200, 128, 332, 40, SMALL_N, jnp.bfloat16, kernel.Unpadded(True, False, False), None),
]


@pytest.mark.parametrize("case", PER_ARRAY, ids=["h-untiled", "h-16-cols", "h-32-cols",
                                                 "h-f32", "h-f32-untiled", "t-ragged",
                                                 "x-padded", "h-padded"])
def test_each_edge_is_left_to_tma_where_it_can_be(case):
    T, D, F, seq_len, config, dtype, expected, cols = case
    D_k = 3 * D if dtype == jnp.float32 else D
    unpadded = kernel.tma_edges(T, D_k, F, config, jnp.bfloat16, dtype)
    assert unpadded == expected
    assert kernel.h_tile_cols(config, T, F, dtype) == cols
    x, w1, b1 = inputs(T, D, F, dtype)
    check_against_reference(x, w1, b1, seq_len=seq_len, config=config)


def copies_of_edges(T, D, F, config) -> tuple[int, int]:
    """(pads of a 2-D array, slices to h's [T, F]) in the forward's traced program."""
    fn = functools.partial(ops.forward, seq_len=T // 4, with_stats=True, with_token_mask=True,
                           config=config, interpret=False)
    eqns = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.bfloat16)
                                for s in ((T, D), (D, F), (F,)))).eqns
    pads = sum(e.params.get("name") == "_pad" and e.invars[0].aval.shape in ((T, D), (D, F))
               for e in eqns)  # jnp.pad, traced as a nested jit
    slices = sum(e.primitive.name == "slice" and e.outvars[0].aval.shape == (T, F)
                 for e in eqns)
    return pads, slices


def test_unpadded_edges_copy_nothing():
    # Past the tiles' edges but TMA-addressable: no padded copy of x or w1, no sliced copy of h.
    assert copies_of_edges(200, 128, 320, SMALL_PP) == (0, 0)
    # Only what TMA cannot address is copied: w1 where F is not a multiple of its blocks'
    # 64-column SMEM tile (h stays unpadded through narrower tiles or untiled pieces), x where D
    # is not or T is not a multiple of 8 rows, h where F is not of 8 columns or h is stored from
    # registers (which would write past the edge).
    for T, D, F, config, copies in (
            (200, 128, 288, SMALL_PP, (1, 0)), (200, 128, 328, SMALL_PP, (1, 0)),
            (200, 96, 320, SMALL_PP, (1, 0)), (204, 128, 320, SMALL_PP, (1, 0)),
            (200, 128, 332, SMALL_PP, (1, 1)),
            (200, 128, 320, dataclasses.replace(SMALL_PP, h_store="direct"), (0, 1))):
        assert copies_of_edges(T, D, F, config) == copies, (T, D, F)


def test_stats_equal_reference_on_exact_inputs():
    # Small integers: every sum is exact in bf16 and f32, so the statistics equal the reference.
    x, w1, b1 = integer_inputs(64, 24, 100, jnp.bfloat16)
    h, stats = check_against_reference(x, w1, b1, seq_len=16)
    ref_h, ref = reference_forward(x, w1, b1, seq_len=16, with_stats=True,
                                   with_token_mask=True)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(ref_h, np.float32))
    for got, want in zip(stats, ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_without_token_mask_and_without_stats():
    x, w1, b1 = inputs(64, 32, 96, jnp.bfloat16)
    h_stats, _ = check_against_reference(x, w1, b1, seq_len=32, with_token_mask=False)
    h, stats = run(x, w1, b1, seq_len=32, with_stats=False, with_token_mask=False)
    assert stats is None
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_stats, np.float32))


def test_gradients_match_plain_expression(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "mosaic_gpu",
                        functools.partial(ops.forward, config=SMALL, interpret=INTERPRET))
    x, w1, b1 = inputs(32, 16, 100, jnp.float32)
    assert_grads_match_plain_expression("mosaic_gpu", x, w1, b1, seq_len=8, tol=1e-3)


def lower_for_cuda(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lowers_for_cuda_at_bench_shapes(shape):
    T, D, F = shape
    bf16 = jnp.bfloat16
    assert tuned_entry("mosaic_gpu", "NVIDIA H200", (T, D, F), "bfloat16") is not None
    config = ops.tile_config("NVIDIA H200", (T, D, F), "bfloat16")
    for with_stats, with_token_mask in ((False, False), (True, False), (True, True)):
        fn = functools.partial(ops.forward, seq_len=512, with_stats=with_stats,
                               with_token_mask=with_token_mask, config=config, interpret=False)
        text = lower_for_cuda(fn, ((T, D), bf16), ((D, F), bf16), ((F,), bf16))
        assert "mosaic_gpu" in text


@pytest.mark.parametrize("shape, seq_len, unpadded", [
    ((4096, 768, 3000), 512, kernel.Unpadded(True, False, True)),
    ((6000, 512, 4100), 1000, kernel.Unpadded(True, False, False)),
    ((6000, 512, 8192), 1000, kernel.Unpadded(True, True, True))],
    ids=["4096x768x3000", "6000x512x4100", "6000x512x8192"])
def test_untuned_shapes_lower_for_cuda(shape, seq_len, unpadded):
    # Untuned shapes with the default configuration: F = 3000 (a multiple of 8, not of 64) pads
    # w1 only, h going through untiled SMEM pieces; F = 4100 (not a multiple of 8)
    # pads h as well; T = 6000 (not a multiple of the 128-row tile) with F = 8192 pads nothing.
    T, D, F = shape
    config = ops.fitted_tile_config(shape, jnp.bfloat16)
    assert kernel.tma_edges(T, D, F, config, jnp.bfloat16, jnp.bfloat16) == unpadded
    fn = functools.partial(ops.forward, seq_len=seq_len, with_stats=True,
                           with_token_mask=False, interpret=False)
    bf16 = jnp.bfloat16
    assert "mosaic_gpu" in lower_for_cuda(fn, ((T, D), bf16), ((D, F), bf16), ((F,), bf16))


def test_ragged_f32_and_gradient_lower_for_cuda(monkeypatch):
    # Unaligned sequences (several segments per tile), padded T, D and F, the f32 split, the
    # 64-wide tiles, and the backward through api: all lower.
    for T, D, F, seq_len, dtype, config in ((600, 100, 1000, 24, jnp.float32, SMALL),
                                            (640, 64, 330, 80, jnp.bfloat16, SMALL_N),
                                            (640, 64, 330, 80, jnp.bfloat16, SMALL_PP)):
        fn = functools.partial(ops.forward, seq_len=seq_len, with_stats=True,
                               with_token_mask=True, config=config, interpret=False)
        assert "mosaic_gpu" in lower_for_cuda(fn, ((T, D), dtype), ((D, F), dtype), ((F,), dtype))
    monkeypatch.setitem(backends.BACKENDS, "mosaic_gpu",
                        functools.partial(ops.forward, interpret=False))

    def loss(x, w1, b1):
        h, stats = api._fused(x, w1, b1, 512, True, False, "mosaic_gpu")
        return jnp.sum(h.astype(jnp.float32)) + 0 * stats.token_count.sum()

    bf16 = jnp.bfloat16
    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), ((1024, 256), bf16),
                          ((256, 2048), bf16), ((2048,), bf16))
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("config", [
    kernel.TileConfig(128, 128, 64, 4, "pingpong", 32, "m", 16, epi_slots=8),
    kernel.TileConfig(128, 128, 64, 6, "pingpong", 32, "m", 16, h_store="direct"),
], ids=["all-slots", "direct-h"])
def test_h_store_options_lower_for_cuda(config):
    # The tuning options of h's store fit and lower at a benchmark shape (their speed:
    # bench/RESULTS.md).
    T, D, F = BENCH_SHAPES[0]
    assert kernel.smem_bytes(config, 2, 2) <= kernel.SMEM_LIMIT_BYTES
    fn = functools.partial(ops.forward, seq_len=512, with_stats=True,
                           with_token_mask=True, config=config, interpret=False)
    bf16 = jnp.bfloat16
    assert "mosaic_gpu" in lower_for_cuda(fn, ((T, D), bf16), ((D, F), bf16), ((F,), bf16))


def test_oversized_config_is_rejected():
    too_big = kernel.TileConfig(tile_m=128, tile_n=128, tile_k=128, stages=4, wg_dim="n")
    x, w1, b1 = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((1024, 512), (512, 1024),
                                                                  (1024,)))
    fn = functools.partial(ops.forward, seq_len=512, with_stats=True,
                           with_token_mask=True, config=too_big, interpret=False)
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(fn).trace(x, w1, b1).lower(lowering_platforms=("cuda",))
    # Mosaic GPU's own check agrees where ours is bypassed: the estimate is not what fails.
    plan = kernel.make_plan(1024, 512, 1024, 512, too_big)
    original = kernel.check_smem
    try:
        kernel.check_smem = lambda *a, **k: None
        call = kernel.build_call(plan, jnp.bfloat16, jnp.bfloat16, with_stats=False,
                                 with_token_mask=False, num_sms=132)
        with pytest.raises(ValueError, match="exceeds available shared memory"):
            jax.jit(call).trace(
                jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16),
                jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16),
                jax.ShapeDtypeStruct((1024,), jnp.float32)).lower(lowering_platforms=("cuda",))
    finally:
        kernel.check_smem = original
    with pytest.raises(ValueError, match="tile_n"):
        kernel.TileConfig(tile_n=512).validate()


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_committed_configs_fit_estimate(shape):
    T, D, F = shape
    config = ops.tile_config("NVIDIA H200", (T, D, F), "bfloat16")
    assert kernel.smem_bytes(config, 2, 2) <= kernel.SMEM_LIMIT_BYTES
    plan = kernel.make_plan(T, D, F, 512, config)
    assert plan.aligned and plan.Tp == T and plan.Fp == F and plan.n_seg == 1


def test_plan_segments():
    # seq_len 24, 64-row tiles: tile 0 meets sequences 0..2, tile 1 (rows 64..95, then
    # padding) 2..3; a tile starting at row 64 of a longer batch meets four (2..5).
    plan = kernel.make_plan(96, 8, 64, 24, SMALL)
    assert plan.n_seg == 3 and not plan.aligned
    ids = plan.segment_ids()
    assert ids.tolist() == [[0, 1, 2], [2, 3, 4]]  # 4 = n_seq: an empty segment
    assert kernel.make_plan(24 * 8, 8, 64, 24, SMALL).n_seg == 4


@pytest.mark.parametrize("tile_m", [128, 192, 256])
def test_column_counts_up_to_tile_m(tile_m):
    # The counts are summed four to an int32 (8-bit lanes; per warp, tile_m / 4 rows):
    # columns used by every row of a tile reach tile_m in the sum of the warps' partials (past
    # a byte at 256) and fill a lane up to 64; the token mask's bit 31 is set.
    config = kernel.TileConfig(tile_m=tile_m, tile_n=64, tile_k=64, stages=2, wg_dim="n",
                               epi_tile_n=32)
    x, w1, b1 = inputs(2 * tile_m, 64, 128, jnp.bfloat16)
    always = (jnp.arange(128) % 3 == 0) | (jnp.arange(128) % 32 == 31)
    b1 = jnp.where(always, 100.0, jnp.where(jnp.arange(128) % 3 == 1, -100.0, b1))
    b1 = b1.astype(jnp.bfloat16)
    _, stats = check_against_reference(x, w1, b1, seq_len=tile_m, config=config)
    counts = np.asarray(stats.seq_count)
    assert (counts[:, np.asarray(always)] == tile_m).all()


@pytest.mark.parametrize("config, shape", [
    (SMALL_N, (160, 64, 200, 80)), (SMALL_PP, (160, 64, 200, 80)),
    (SMALL_PP3, (160, 64, 200, 80)),
    (dataclasses.replace(SMALL_PP, epi_tile_n=32, epi_slots=4), (160, 64, 200, 80)),
    (SMALL_PP, (200, 128, 320, 40)), (SMALL_PP, (200, 128, 328, 40)),
], ids=["wgN", "pingpong", "pingpong-3", "all-slots", "pingpong-unpadded", "unswizzled-h"])
def test_interpreter_finds_no_races(config, shape):
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    # Two compute warpgroups, segments straddling tiles, the token mask: the SMEM ring, the
    # h staging slots, checked by the race detector (and the stores past unpadded edges).
    T, D, F, seq_len = shape
    x, w1, b1 = inputs(T, D, F, jnp.bfloat16)
    h, stats = ops.forward(x, w1, b1, seq_len=seq_len, with_stats=True,
                           with_token_mask=True, config=config,
                           interpret=plgpu.InterpretGPUParams(detect_races=True))
    jax.block_until_ready((h, stats))
    assert not gpu_callbacks.get_races().races_found
    own = stats_from_h(h, seq_len=seq_len, with_token_mask=True)
    np.testing.assert_array_equal(np.asarray(stats.token_mask), np.asarray(own.token_mask))


def test_f32_without_a_config_fits_shared_memory():
    # Tiles sized for a bf16 h: an f32 h doubles the epilogue's buffers, and the backend drops
    # pipeline stages until the kernel fits; the default tiles (which fit as they are, or
    # after the drop) lower for CUDA with an f32 h.
    bf16_sized = dataclasses.replace(kernel.DEFAULT_CONFIG, epi_slots=4)
    assert kernel.fit_stages(bf16_sized, jnp.bfloat16, jnp.bfloat16) == bf16_sized
    fitted = kernel.fit_stages(bf16_sized, jnp.bfloat16, jnp.float32)
    assert 2 <= fitted.stages < bf16_sized.stages
    kernel.check_smem(fitted, jnp.bfloat16, jnp.float32)
    with pytest.raises(ValueError, match="shared memory"):
        kernel.check_smem(bf16_sized, jnp.bfloat16, jnp.float32)
    fn = functools.partial(ops.forward, seq_len=256, with_stats=True,
                           with_token_mask=True, interpret=False)
    f32 = jnp.float32
    assert "mosaic_gpu" in lower_for_cuda(fn, ((1024, 256), f32), ((256, 2048), f32),
                                          ((2048,), f32))


def test_f32_split_keeps_the_low_part():
    # hi + lo carries 16 mantissa bits; hi alone is bf16 (8). Under jit, as the kernel runs it.
    # (XLA's CPU compiler keeps a bf16 round trip anyway; the GPU folding that reduce_precision
    # guards against is exercised by the gpu-marked f32 tests in test_mosaic_gpu_device.py.)
    a = jax.random.normal(jax.random.key(7), (4096,), jnp.float32)
    hi, lo = jax.jit(ops.split_bf16)(a)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(hi), np.asarray(a.astype(jnp.bfloat16)))
    err_hi = np.abs(np.asarray(hi, np.float32) - np.asarray(a))
    err = np.abs(np.asarray(hi, np.float32) + np.asarray(lo, np.float32) - np.asarray(a))
    assert (np.asarray(lo) != 0).mean() > 0.9
    assert err.max() <= 2.0 ** -16 * np.abs(np.asarray(a)).max()
    assert err.mean() < err_hi.mean() / 100


@pytest.mark.parametrize("seq_len, T", [(1024, 2048), (192, 384)])
def test_interpreted_sequence_counts_match_unpacking_each_byte(seq_len, T):
    # The interpreted kernel's per-warp counts (up to tile_m / 4 = 32 in every byte) unpacked,
    # summed and scattered into their sequences: a 1024-token sequence sums 32 of them per
    # column, past an 8-bit lane; seq_len 192 is not a multiple of tile_m = 128 (two segments).
    config = kernel.TileConfig(tile_m=128, tile_n=128, tile_k=64, stages=2, wg_dim="pingpong")
    plan = kernel.make_plan(T, 64, 256, seq_len, config)
    assert plan.aligned == (seq_len % 128 == 0)
    rng = np.random.default_rng(seq_len)
    shape = (plan.row_tiles, plan.n_seg, kernel.WARPS, plan.Fp)
    counts = rng.integers(0, 33, shape).astype(np.int64)
    if not plan.aligned:  # segments that hold no sequence's rows count nothing
        counts[plan.segment_ids() == plan.n_seq] = 0
    # Pack: lane i of word (tile t, c) is column t * tile_n + i * tile_n / 4 + c.
    per_tile = counts.reshape(*shape[:3], plan.col_tiles, 4, config.tile_n // 4)
    words = sum(per_tile[..., i, :] << (8 * i) for i in range(4))
    sc_part = jnp.asarray(words.reshape(*shape[:3], plan.Fp // 4).astype(np.uint32).view(np.int32))
    ids = plan.segment_ids()
    want = np.zeros((plan.n_seq, plan.Fp), np.int64)
    for r in range(plan.row_tiles):
        for s in range(plan.n_seg):
            if ids[r, s] < plan.n_seq:
                want[ids[r, s]] += counts[r, s].sum(axis=0)
    assert want.max() > 255 or not plan.aligned
    np.testing.assert_array_equal(
        np.asarray(kernel._interpreted_sequence_counts(sc_part, plan)), want)


def test_sequence_count_words_unpack_to_columns():
    # The compiled kernel's [n_seq, Fp / 2] words: per tile, word p * lane_cols + c holds column
    # p * lane_cols + c in its low 16 bits and column (p + 2) * lane_cols + c in its high bits.
    tile_n, n_tiles = 128, 3
    lane_cols = tile_n // 4
    counts = np.random.default_rng(0).integers(0, 2 ** 16, (5, n_tiles * tile_n))
    per_tile = counts.reshape(5, n_tiles, tile_n)
    words = per_tile[..., :2 * lane_cols] | (per_tile[..., 2 * lane_cols:] << 16)
    words = jnp.asarray(words.reshape(5, -1).astype(np.uint32).view(np.int32))
    np.testing.assert_array_equal(np.asarray(kernel._unpack_col_counts(words, tile_n)), counts)


def test_long_sequences_are_counted_in_parts(monkeypatch):
    # The kernel's sequence counts are 16-bit, so build_call refuses a longer sequence; the
    # forward counts it in parts (the largest divisor that fits) and adds them: exact against
    # the reference, shown here in the interpreter with the limit lowered to 16 (seq_len 48 in
    # parts of 16, across row tiles of 64 rows).
    T = 2 * (kernel.MAX_SEQ_LEN + 1)
    plan = kernel.make_plan(T, 64, 256, T // 2, SMALL_PP)
    with pytest.raises(ValueError, match="16-bit"):
        kernel.build_call(plan, jnp.bfloat16, jnp.bfloat16, with_stats=True,
                          with_token_mask=False, num_sms=132)
    assert ops.counting_seq_len(T // 2) == 2 ** 15
    fn = functools.partial(ops.forward, seq_len=T // 2, with_stats=True,
                           with_token_mask=False, config=SMALL_PP, interpret=False)
    assert "mosaic_gpu" in lower_for_cuda(fn, ((T, 64), jnp.bfloat16), ((64, 256), jnp.bfloat16),
                                          ((256,), jnp.bfloat16))
    with pytest.raises(ValueError, match="no divisor"):
        ops.counting_seq_len(65537)  # a prime

    monkeypatch.setattr(kernel, "MAX_SEQ_LEN", 16)
    monkeypatch.setattr(ops, "MIN_COUNT_PART", 8)
    assert ops.counting_seq_len(48) == 16
    x, w1, b1 = inputs(192, 64, 130, jnp.bfloat16)
    check_against_reference(x, w1, b1, seq_len=48, config=SMALL_PP)
