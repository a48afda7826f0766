"""The pallas_tpu backend: the kernel in Pallas's TPU interpreter against the reference, its race
freedom, gradients, its Mosaic lowering for TPU at the benchmark shapes (jax.export with
platforms=["tpu"], which checks block shapes), and the VMEM footprint of the committed tiles."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from relu_sparsity.kernels import backends
from relu_sparsity.kernels.pallas_tpu import kernel, ops
from relu_sparsity.kernels.reference import reference_forward, stats_from_h
from relu_sparsity.kernels.testing import (
    BENCH_SHAPES,
    assert_grads_match_plain_expression,
    assert_matches_reference,
    integer_inputs,
    random_inputs,
    tolerance,
)

# The smallest default scoped-VMEM limit of current TPUs: 16 MiB on v5e (v6e / v7x: 32 MiB);
# physical VMEM per core is 128 MiB on v5e / v6e and 64 MiB on v5p / v7x
# (jax/_src/tpu_info.py, TpuInfo.vmem_capacity_bytes). Export does not check VMEM.
SMALLEST_SCOPED_VMEM = 16 * 1024 * 1024
SMALLEST_PHYSICAL_VMEM = 64 * 1024 * 1024
INTERPRET = pltpu.InterpretParams()


inputs = random_inputs


def check_against_reference(x, w1, b1, *, seq_len, config, with_token_mask=True):
    h, stats = ops.forward(x, w1, b1, seq_len=seq_len, with_stats=True,
                           with_token_mask=with_token_mask, config=config, interpret=INTERPRET)
    assert_matches_reference(h, stats, x, w1, b1, seq_len=seq_len,
                             with_token_mask=with_token_mask, tol=tolerance(x.dtype))
    return h, stats


# (T, D, F, seq_len, config): what each case exercises is in the comment.
RAGGED = [
    # several sequences per tile (m = 8, bm = 24), F not a multiple of 32, D not of 128
    (60, 40, 70, 3, kernel.TileConfig(32, 128, 128)),
    # seq_len 11 cannot tile in multiples of 8: padded to Lp = 16, 2 sequences per tile
    (66, 40, 200, 11, kernel.TileConfig(32, 128, 128)),
    # several tiles per sequence (tps = 2, counts accumulate over i), D tiled (3 k steps)
    (64, 300, 300, 32, kernel.TileConfig(16, 256, 128)),
    # seq_len 20 does not divide a tile: bm 8, padded to Lp = 24, tps = 3
    (40, 24, 33, 20, kernel.TileConfig(16, 128, 128)),
    # the whole batch in one full-dim tile (bm = T = 15, not a multiple of 8); F = 1
    (15, 8, 1, 5, kernel.TileConfig(16, 128, 128)),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", RAGGED, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}L{c[3]}"
                         if isinstance(c, tuple) else None)
def test_interpreter_matches_reference(case, dtype):
    T, D, F, seq_len, config = case
    x, w1, b1 = inputs(T, D, F, dtype)
    check_against_reference(x, w1, b1, seq_len=seq_len, config=config)


def test_stats_agree_with_reference_on_exact_inputs():
    # Small integers: every sum is exact, so h and the statistics equal the reference's.
    x, w1, b1 = integer_inputs(48, 24, 150, jnp.float32)
    h, stats = check_against_reference(x, w1, b1, seq_len=12,
                                       config=kernel.TileConfig(16, 128, 128))
    _, ref = reference_forward(x, w1, b1, seq_len=12, with_stats=True,
                               with_token_mask=True)
    for got, want in zip(stats, ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_without_token_mask_and_without_stats():
    x, w1, b1 = inputs(48, 40, 200, jnp.bfloat16)
    config = kernel.TileConfig(16, 128, 128)
    h_stats, _ = check_against_reference(x, w1, b1, seq_len=12, config=config,
                                         with_token_mask=False)
    h, stats = ops.forward(x, w1, b1, seq_len=12, with_stats=False,
                                      with_token_mask=False, config=config, interpret=INTERPRET)
    assert stats is None
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_stats, np.float32))


def test_no_races_with_two_cores():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    # tps = 2 (an accumulating "arbitrary" row axis) and 2 column tiles split over 2 cores.
    x, w1, b1 = inputs(32, 40, 256, jnp.float32)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    h, stats = ops.forward(x, w1, b1, seq_len=16, with_stats=True,
                                      with_token_mask=True, config=kernel.TileConfig(8, 128, 128),
                                      interpret=params)
    jax.block_until_ready((h, stats))
    assert tpu_interpret.races is not None  # the detector ran
    assert not tpu_interpret.races.races_found
    own = stats_from_h(h, seq_len=16, with_token_mask=True)
    np.testing.assert_array_equal(np.asarray(stats.seq_mask), np.asarray(own.seq_mask))


def test_race_detector_sees_a_planted_race():
    # The control for the test above: two cores writing one output block on a "parallel" axis.
    from jax.experimental import pallas as pl
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    racy = pl.pallas_call(
        copy, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2))
    jax.block_until_ready(racy(jnp.ones((16, 128), jnp.float32)))
    assert tpu_interpret.races.races_found


def test_gradients_match_plain_expression():
    x, w1, b1 = inputs(24, 16, 100, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpreting: expected here
        assert_grads_match_plain_expression("pallas_tpu", x, w1, b1, seq_len=8, tol=1e-4)


def test_interpreting_warns():
    x, w1, b1 = inputs(16, 8, 8, jnp.float32)
    with pytest.warns(UserWarning, match="interpret"):
        ops.forward(x, w1, b1, seq_len=8, with_stats=False,
                               with_token_mask=False)


def export_for_tpu(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exports_for_tpu_at_bench_shapes(shape):
    T, D, F = shape
    bf16 = jnp.bfloat16
    config = ops.tile_config("tpu", (T, D, F), "bfloat16")
    assert config != kernel.DEFAULT_CONFIG  # the committed tiles are the ones exported
    for with_stats, with_token_mask in ((False, False), (True, False), (True, True)):
        fn = functools.partial(ops.forward, seq_len=512, with_stats=with_stats,
                               with_token_mask=with_token_mask, interpret=False)
        text = export_for_tpu(fn, ((T, D), bf16), ((D, F), bf16), ((F,), bf16))
        assert "tpu_custom_call" in text


def test_exports_accumulating_paths_for_tpu():
    # Several tiles per sequence (tps = 4), D tiled (nk = 2), f32, ragged F, padded seq_len.
    for T, D, F, seq_len, dtype in ((4096, 2048, 1000, 2048, jnp.float32),
                                    (1100, 256, 300, 11, jnp.bfloat16)):
        fn = functools.partial(ops.forward, seq_len=seq_len, with_stats=True,
                               with_token_mask=True, interpret=False)
        text = export_for_tpu(fn, ((T, D), dtype), ((D, F), dtype), ((F,), dtype))
        assert "tpu_custom_call" in text
    plan = kernel.make_plan(4096, 2048, 1000, 2048, kernel.DEFAULT_CONFIG)
    assert plan.tps == 4 and plan.grid[2] == 2


def test_export_rejects_illegal_block():
    # The check the export test relies on: a row tile of 12 (not a multiple of 8, not the full
    # dimension) must fail the Mosaic lowering.
    plan = kernel.make_plan(96, 256, 256, 48, kernel.TileConfig(16, 128, 128))
    bad = dataclasses.replace(plan, bm=12, tps=4)
    for p, ok in ((plan, True), (bad, False)):
        fn = functools.partial(kernel.fused_mlp_up_call, plan=p, with_stats=True,
                               with_token_mask=True, interpret=False)
        shapes = (((p.Tp, p.Dp), jnp.bfloat16), ((p.Dp, p.Fp), jnp.bfloat16),
                  ((1, p.Fp), jnp.bfloat16))
        if ok:
            assert "tpu_custom_call" in export_for_tpu(fn, *shapes)
        else:
            with pytest.raises(ValueError, match="divisible by 8 and 128"):
                export_for_tpu(fn, *shapes)


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_committed_tiles_fit_vmem(shape):
    T, D, F = shape
    plan = kernel.make_plan(T, D, F, 512, ops.tile_config("tpu", (T, D, F), "bfloat16"))
    footprint = kernel.vmem_footprint_bytes(plan, 2, with_stats=True, with_token_mask=True)
    assert footprint <= SMALLEST_SCOPED_VMEM, footprint / 2**20
    assert kernel.VMEM_LIMIT_BYTES <= SMALLEST_PHYSICAL_VMEM
    # The layout the configs were chosen for: one D step, one sequence per row tile.
    assert plan.grid[2] == 1 and plan.tps == 1 and plan.m == 1 and plan.Tp == T
    assert plan.Fp == F


def test_footprint_counts_double_buffers():
    plan = kernel.make_plan(1024, 1024, 1024, 512, kernel.TileConfig(512, 512, 1024))
    bare = kernel.vmem_footprint_bytes(plan, 2, with_stats=False, with_token_mask=False)
    # x [512, 1024] + w1 [1024, 512] + b1 [1 -> 16, 512] + h [512, 512], bf16, twice each.
    assert bare == 2 * 2 * (512 * 1024 + 1024 * 512 + 16 * 512 + 512 * 512)


@pytest.mark.parametrize("block_m", [8, 64, 512])
def test_row_plan_is_legal(block_m):
    for seq_len in (1, 3, 5, 8, 11, 12, 20, 64, 100, 512, 520, 1000):
        for n_seq in (1, 2, 3, 7, 16):
            T = n_seq * seq_len
            bm, Lp, m, tps, n_seq_p = kernel.row_plan(T, seq_len, block_m)
            Tp = n_seq_p * Lp
            assert Lp >= seq_len and n_seq_p >= n_seq and Tp % bm == 0
            assert bm % 8 == 0 or bm == Tp
            assert bm == m * Lp if tps == 1 else (m == 1 and Lp == tps * bm)
            assert n_seq_p % m == 0 and bm <= max(block_m, T)


def test_registered_interpretable_but_not_benchmarked_off_tpu(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))  # loading stays local
    # fused_mlp_up(backend="pallas_tpu") runs anywhere (interpreted); auto picks it on TPUs only,
    # and the benchmarks measure only kernels compiled for the platform.
    assert backends.load_backend("pallas_tpu", platform="cpu") is ops.forward
    assert backends.preferred_backends("tpu", "TPU v5 lite") == ("pallas_tpu",)
    assert "pallas_tpu" not in backends.compiled_backends("cpu")
    assert "pallas_tpu" not in backends.compiled_backends("gpu")
