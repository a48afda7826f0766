"""Probe: scheduling variants of the mosaic_gpu kernel, timed against XLA in one run.

    OUT=/tmp/out PYTHONPATH=$PWD python3 bench/probe_mosaic_schedule.py
        [--stagger | --two-cta | --interpret]

Default: the warp-specialized kernel (kernels/mosaic_gpu/kernel.py, committed tiles) with a few
epilogue SMEM layouts (pipeline stages, h piece width, slots per warpgroup: TileConfig.stages,
epi_tile_n, epi_slots) with and without Pallas's automatic barriers (auto_barriers), without
statistics, with them, and with the token mask too where it fits
(statistics checked bit for bit against those recomputed from the kernel's own h).
--stagger: the compute warpgroups staggered by 0..stages-1 pipeline steps (TileConfig.stagger).

--two-cta: the kernel with delay_release 0 and 1, and a non-warp-specialized schedule (`build`
below) that relies on two CTAs per SM to hide one's epilogue behind the other's wgmmas: one CTA
per [tile_m, tile_n] output tile, one warpgroup, `plgpu.emit_pipeline` streaming x and w1 blocks
by TMA; the epilogue adds the bias, applies ReLU, writes h by TMA through two SMEM slots and (with
statistics) the aligned-sequence partials of the real kernel. SMEM per CTA is kept under half
the SM's so that two CTAs co-reside. Its h and partial sums are checked against plain JAX.
--interpret: `build` in the Mosaic GPU interpreter on a small shape (CPU).

Prints a table last (ratios to XLA's dot+bias+ReLU).
"""

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SHAPES = [(8192, 1024, 32768), (8192, 2048, 16384), (8192, 512, 8192)]
SEQ_LEN = 512


def build(T, D, F, *, tile_m=128, tile_n=128, tile_k=64, stages=3, delay=1, epi_n=64,
          with_stats=True, interpret=None):
    """f(x [T, D] bf16, w1 [D, F] bf16, b1 [F] f32) -> h[, tc_part [F/tn, T], sc_part
    [T/tm, F]] (int32 partials, summed by the caller)."""
    m_iters, n_iters, k_iters = T // tile_m, F // tile_n, D // tile_k
    swizzle = plgpu.find_swizzle(tile_k * 2 * 8)
    in_tf = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi_n * 2 * 8)
    out_tf = (plgpu.TilingTransform((8, out_swizzle // 2)), plgpu.SwizzleTransform(out_swizzle))
    epi_m = 64
    layout = plgpu.Layout.WGMMA

    H_GMEM = []

    def body(x_gmem, w_gmem, b_gmem, h_gmem, *refs):
        H_GMEM[:] = [(x_gmem, w_gmem, b_gmem, h_gmem)]
        if with_stats:
            tc_gmem, sc_gmem, out_smem = refs
        else:
            (out_smem,) = refs
        m, n = lax.axis_index("m"), lax.axis_index("n")

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
        def _acc_scope(acc):
            epilogue(tc_gmem if with_stats else None, sc_gmem if with_stats else None,
                     out_smem, acc, m, n)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def epilogue(tc_gmem, sc_gmem, out_smem, acc, m, n):
        x_gmem, w_gmem, b_gmem, h_gmem = H_GMEM[0]

        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc, x_smem, w_smem)
            plgpu.wgmma_wait(delay)

        plgpu.emit_pipeline(
            step, grid=(k_iters,),
            in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda k: (m, k), transforms=in_tf,
                                      delay_release=delay),
                      plgpu.BlockSpec((tile_k, tile_n), lambda k: (k, n), transforms=in_tf,
                                      delay_release=delay)],
            max_concurrent_steps=stages)(x_gmem, w_gmem)
        plgpu.wgmma_wait(0)
        bias = plgpu.load(b_gmem.at[pl.ds(n * tile_n, tile_n)], layout=layout.reduce(0),
                          optimized=False)
        h = jnp.maximum(acc[...] + lax.broadcast_in_dim(bias, (tile_m, tile_n), [1]), 0.0)
        h = h.astype(jnp.bfloat16)
        rows_all, cols_all = pl.ds(m * tile_m, tile_m), pl.ds(n * tile_n, tile_n)
        n_epi = (tile_m // epi_m) * (tile_n // epi_n)
        for e in range(n_epi):
            ei, ej = divmod(e, tile_n // epi_n)
            rows = slice(ei * epi_m, (ei + 1) * epi_m)
            cols = slice(ej * epi_n, (ej + 1) * epi_n)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[e % 2] = h[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[e % 2], h_gmem.at[rows_all, cols_all].at[rows, cols])
        if with_stats:
            ones = jnp.where(h.astype(jnp.float32) > 0.0, 1, 0).astype(jnp.int32)
            tc_gmem.at[n, pl.ds(m * tile_m, tile_m)][...] = jnp.sum(ones, axis=1)
            sc_gmem.at[m, pl.ds(n * tile_n, tile_n)][...] = jnp.sum(ones, axis=0)

    out_type = [jax.ShapeDtypeStruct((T, F), jnp.bfloat16)]
    if with_stats:
        out_type += [jax.ShapeDtypeStruct((n_iters, T), jnp.int32),
                     jax.ShapeDtypeStruct((m_iters, F), jnp.int32)]
    return plgpu.kernel(
        body, out_type=tuple(out_type),
        scratch_types=[plgpu.SMEM((2, epi_m, epi_n), jnp.bfloat16, transforms=out_tf)],
        grid=(m_iters, n_iters), grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret)


def smem_kib(tile_m, tile_n, tile_k, stages, epi_n=64):
    return (stages * (tile_m + tile_n) * tile_k * 2 + 2 * 64 * epi_n * 2) / 1024


def inputs(T, D, F, seed=0):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(jnp.bfloat16)
    w1 = (jax.random.normal(kw, (D, F), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    b1 = 0.1 * jax.random.normal(kb, (F,), jnp.float32)
    return x, w1, b1


def check(fn, x, w1, b1, tile_m, with_stats):
    out = fn(x, w1, b1)
    want = jax.nn.relu(jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1).astype(
        jnp.bfloat16)
    h = out[0]
    ok = bool(jnp.allclose(h.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2,
                           atol=2e-2))
    if with_stats:
        used = (h.astype(jnp.float32) > 0).astype(jnp.int32)
        ok &= bool(jnp.array_equal(out[1].sum(0), used.sum(1)))
        ok &= bool(jnp.array_equal(out[2], used.reshape(-1, tile_m, used.shape[1]).sum(1)))
    return ok


def main():
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if "--interpret" in sys.argv:
        x, w1, b1 = inputs(256, 128, 256)
        for stats in (False, True):
            fn = build(256, 128, 256, tile_m=64, tile_n=64, stages=3, delay=1, with_stats=stats,
                       interpret=plgpu.InterpretGPUParams())
            print("interpret stats" if stats else "interpret", check(fn, x, w1, b1, 64, stats))
        return

    from relu_sparsity.bench.kernels import time_fn
    from relu_sparsity.kernels.mosaic_gpu import kernel as mk
    from relu_sparsity.kernels.mosaic_gpu import ops as mops
    from relu_sparsity.kernels.reference import stats_from_h

    def ws_fn(cfg, stats, token_mask=False):
        return jax.jit(functools.partial(
            mops.mosaic_gpu_forward, seq_len=SEQ_LEN, live=None, with_stats=stats,
            with_token_mask=token_mask, config=cfg, interpret=False))

    def ws_exact(fn, x, w1, b16, token_mask):
        h, st = fn(x, w1, b16)
        own = stats_from_h(h, seq_len=SEQ_LEN, num_units=w1.shape[1], live=None,
                           with_token_mask=token_mask)
        return all(bool(jnp.array_equal(a, b)) for a, b in zip(st, own) if b is not None)

    rows = []
    for T, D, F in SHAPES:
        x, w1, b1 = inputs(T, D, F)
        b16 = b1.astype(jnp.bfloat16)
        flops = 2 * T * D * F
        variants = {"xla dot+bias+relu": (jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b)),
                                          (x, w1, b16))}
        committed = mops.tile_config("NVIDIA H200", T, D, F, "bfloat16")
        if "--two-cta" in sys.argv:
            ws_variants = [(f"ws delay{d}", dataclasses.replace(committed, delay_release=d))
                           for d in (0, 1)]
        elif "--stagger" in sys.argv:
            ws_variants = [(f"ws stagger{g}", dataclasses.replace(committed, stagger=g))
                           for g in range(committed.stages)]
            ws_variants.append((f"ws stagger{committed.stages - 2} delay1", dataclasses.replace(
                committed, stagger=committed.stages - 2, delay_release=1)))
        else:  # epilogue: stages, piece width, slots per warpgroup, Pallas's auto barriers
            ws_variants = [
                (f"ws s{st} e{en} slots{sl}{'' if ab else ' noab'}",
                 dataclasses.replace(committed, stages=st, epi_tile_n=en, epi_slots=sl,
                                     auto_barriers=ab))
                for st, en, sl, ab in ((4, 32, 2, True), (4, 32, 2, False), (4, 32, 4, False),
                                       (3, 64, 4, True), (3, 64, 4, False), (3, 32, 8, False))]
        for label, cfg in ws_variants:
            for stats, tm in ((False, False), (True, False), (True, True)):
                try:
                    mk.check_smem(cfg, jnp.bfloat16, jnp.bfloat16, stats, tm)
                except ValueError:
                    continue
                fn = ws_fn(cfg, stats, tm)
                name = f"{label} {'nostats' if not stats else 'stats+tm' if tm else 'stats'}"
                if stats:
                    ok = ws_exact(fn, x, w1, b16, tm)
                    print(name, "exact", ok, flush=True)
                    name += "" if ok else " WRONG"
                variants[name] = (fn, (x, w1, b16))
        # (stages, delay, epi_n): the first three fit two CTAs per SM, the last one does not.
        for stages, delay, epi_n in ((2, 1, 64), (3, 1, 32), (3, 0, 32), (4, 1, 64)):
            if "--two-cta" not in sys.argv:
                break
            for stats in (False, True):
                name = f"2cta s{stages} d{delay} e{epi_n} {'stats' if stats else 'nostats'}"
                fn = jax.jit(build(T, D, F, stages=stages, delay=delay, epi_n=epi_n,
                                   with_stats=stats))
                try:
                    ok = check(fn, x, w1, b1, 128, stats)
                except Exception as err:  # noqa: BLE001 - report and go on
                    print(name, "FAILED", repr(err)[:400], flush=True)
                    continue
                print(name, "smem KiB", smem_kib(128, 128, 64, stages, epi_n), "check", ok,
                      flush=True)
                variants[name + ("" if ok else " WRONG")] = (fn, (x, w1, b1))
        base = None
        for name, (fn, args) in variants.items():
            try:
                ms = time_fn(fn, args, repeats=5, launches=50)
            except Exception as err:  # noqa: BLE001
                print(name, "FAILED", repr(err)[:400], flush=True)
                continue
            base = base or ms
            rows.append((f"{T}x{D}x{F}", name, ms, flops / ms / 1e9, ms / base))
            print(rows[-1], flush=True)
    (out_dir / "probe_mosaic_schedule.json").write_text(json.dumps(rows, indent=1))
    print("\n| shape | variant | ms | TF/s | / xla |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} | {r[4]:.3f} |")


if __name__ == "__main__":
    main()
