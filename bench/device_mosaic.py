"""Device check and benchmark of the mosaic_gpu backend on a Hopper GPU (written for the H200).

    OUT=/tmp/out PYTHONPATH=$PWD python3 bench/device_mosaic.py [--quick]

For each benchmark shape (T x D x F, seq_len 512, bf16):
  (a) correctness at full size with the committed config: h allclose to the reference backend's,
      and the integer statistics equal to those recomputed from the backend's own h (the
      exactness rule), with and without the token mask;
  (b) a sweep of a few tile configurations (with statistics, no token mask); a config that fails
      to compile or to check is reported and skipped;
  (c) timings in one run (warm-up, then the median over 5 batches of 50 launches): XLA dot,
      XLA dot+bias+relu, the reference backend with statistics, mosaic with_stats False / True /
      True + token mask (committed and best config), in ms, TF/s and ratio to XLA dot+bias+relu.
Writes $OUT/device_mosaic.json (everything, plus the best config per shape in the
kernels/configs/mosaic_gpu.json format) and $OUT/device_mosaic.log; prints a short table last.
"""

import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.bench.kernels import time_fn
from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
from relu_sparsity.kernels.mosaic_gpu import ops as mgpu_ops
from relu_sparsity.kernels.reference import reference_forward, stats_from_h

SHAPES = [(8192, 1024, 32768), (8192, 2048, 16384), (8192, 512, 8192)]
SEQ_LEN = 512
REPS, LAUNCHES = 5, 50
TC = mgpu_kernel.TileConfig
SWEEP = [
    TC(128, 128, 64, 6, "pingpong", 32, "m", 16),
    TC(128, 128, 64, 6, "pingpong", 32, "m", 8),
    TC(128, 128, 128, 3, "pingpong", 32, "m", 16),
    TC(128, 128, 64, 5, "pingpong", 64, "m", 16),
    TC(128, 128, 64, 4, "n", 32, "m", 8),
    # every piece of h in its own SMEM slot (no wait within a tile), at the cost of ring stages;
    # the other h-store options (4 slots, h_store="direct") lost at every shape on 2026-11-29
    # (bench/RESULTS.md) and are left out
    TC(128, 128, 64, 4, "pingpong", 32, "m", 16, epi_slots=8),
]

OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
LOG = open(OUT / "device_mosaic.log", "w")


def say(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def time_ms(fn, *args) -> float:
    """Median over REPS batches of LAUNCHES launches, ms per launch (the CLI bench's timer)."""
    return time_fn(fn, args, repeats=REPS, launches=LAUNCHES)


def inputs(T, D, F):
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(jnp.bfloat16)
    w1 = (jax.random.normal(kw, (D, F), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    b1 = (0.1 * jax.random.normal(kb, (F,), jnp.float32)).astype(jnp.bfloat16)
    return x, w1, b1


def reference_h(x, w1, b1):
    """The reference backend's h, what `check` compares the kernel's h with."""
    return jax.jit(functools.partial(reference_forward, seq_len=SEQ_LEN, live=None,
                                     with_stats=False, with_token_mask=False))(x, w1, b1)[0]


@functools.cache
def mosaic_fn(config, with_stats, with_token_mask, ops_module=mgpu_ops):
    """The backend's forward, jitted; `ops_module`: another version of ops.py (ab_mosaic.py)."""
    return jax.jit(functools.partial(ops_module.mosaic_gpu_forward, seq_len=SEQ_LEN, live=None,
                                     with_stats=with_stats, with_token_mask=with_token_mask,
                                     config=config, interpret=False))


@functools.partial(jax.jit, static_argnames=("num_units", "with_token_mask"))
def compare(h, ref_h, stats, num_units, with_token_mask):
    """On the device: h against the reference's h, and each statistic against the one recomputed
    from this h (the exactness rule)."""
    hf, rf = h.astype(jnp.float32), ref_h.astype(jnp.float32)
    own = stats_from_h(h, seq_len=SEQ_LEN, num_units=num_units, live=None,
                       with_token_mask=with_token_mask)
    out = {"h_max_abs_diff": jnp.max(jnp.abs(hf - rf)),
           "h_frac_not_close": 1.0 - jnp.mean(jnp.isclose(hf, rf, rtol=2e-2, atol=2e-2)),
           "used_differs_from_reference_frac": jnp.mean((hf > 0) != (rf > 0))}
    for name, got, want in zip(own._fields, stats, own):
        if want is not None:
            out[f"{name}_exact"] = jnp.array_equal(got, want)
    return out


def check(config, x, w1, b1, ref_h, with_token_mask) -> dict:
    """h against the reference, statistics by the exactness rule. Raises on a mismatch."""
    h, stats = mosaic_fn(config, True, with_token_mask)(x, w1, b1)
    for name, got in zip(stats._fields, stats):
        want_shape = {"token_count": (x.shape[0],), "seq_count": (x.shape[0] // SEQ_LEN,
                                                                   w1.shape[1])}.get(name)
        if want_shape is not None and got.shape != want_shape:
            raise AssertionError(f"{name} has shape {got.shape}, expected {want_shape}")
    result = {k: (bool(v) if k.endswith("_exact") else float(v))
              for k, v in compare(h, ref_h, stats, num_units=w1.shape[1],
                                  with_token_mask=with_token_mask).items()}
    ok = result["h_frac_not_close"] == 0.0 and all(
        v for k, v in result.items() if k.endswith("_exact"))
    result["ok"] = bool(ok)
    if not ok:
        raise AssertionError(f"check failed: {result}")
    return result


def main():
    quick = "--quick" in sys.argv
    device = jax.devices()[0]
    say(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"SMs {getattr(device, 'core_count', '?')}")
    kind = device.device_kind
    results = {"device": kind, "jax": jax.__version__, "seq_len": SEQ_LEN,
               "timing": f"median of {REPS} x {LAUNCHES} launches after a warm-up call",
               "shapes": {}, "best_configs": {kind: {}}}
    table = []
    t_start = time.time()
    for T, D, F in SHAPES:
        key = f"{T}x{D}x{F}:bfloat16"
        flops = 2 * T * D * F
        say(f"\n=== {key} ===")
        rec = results["shapes"][key] = {"sweep": [], "times_ms": {}, "checks": {}}
        x, w1, b1 = inputs(T, D, F)
        ref = jax.jit(functools.partial(reference_forward, seq_len=SEQ_LEN, live=None,
                                        with_stats=True, with_token_mask=False))
        ref_h, _ = ref(x, w1, b1)  # (ref is timed below too)
        committed = mgpu_ops.tile_config(kind, T, D, F, "bfloat16")
        say("committed config:", committed)

        # (a) correctness with the committed config
        for with_tm in (False, True):
            name = "stats+token_mask" if with_tm else "stats"
            try:
                rec["checks"][name] = check(committed, x, w1, b1, ref_h, with_tm)
                say(f"check committed {name}: {rec['checks'][name]}")
            except Exception as err:  # noqa: BLE001 - report and go on
                rec["checks"][name] = {"ok": False, "error": repr(err)[:2000]}
                say(f"check committed {name} FAILED: {err!r}"[:3000])
                say(traceback.format_exc()[-3000:])

        # (b) sweep
        best, best_ms = None, float("inf")
        for config in (SWEEP[:2] if quick else SWEEP):
            entry = {"config": dataclasses.asdict(config)}
            try:
                mgpu_kernel.check_smem(config, jnp.bfloat16, jnp.bfloat16)
                entry["check"] = check(config, x, w1, b1, ref_h, False)
                entry["stats_ms"] = time_ms(mosaic_fn(config, True, False), x, w1, b1)
                entry["tflops"] = flops / entry["stats_ms"] / 1e9
                say(f"sweep {config}: {entry['stats_ms']:.3f} ms ({entry['tflops']:.0f} TF/s)")
                if entry["stats_ms"] < best_ms:
                    best, best_ms = config, entry["stats_ms"]
            except Exception as err:  # noqa: BLE001 - a failing config is skipped
                entry["error"] = repr(err)[:2000]
                say(f"sweep {config}: skipped: {err!r}"[:600])
            rec["sweep"].append(entry)
        if best is not None:
            results["best_configs"][kind][key] = dataclasses.asdict(best)
        say("best config:", best)

        # (c) timings
        # The plain expression in x's dtype, as relu_sparsity.bench.kernels times it: XLA folds
        # bias and ReLU into cuBLAS's epilogue.
        bias_relu = jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b))
        variants = {
            "xla_dot": jax.jit(lambda x, w, b: jnp.dot(x, w)),
            "xla_dot_bias_relu": bias_relu,
            "reference_stats": ref,
        }
        configs = {"committed": committed}
        if best is not None and best != committed:
            configs["best"] = best
        for label, config in configs.items():
            variants[f"mosaic_{label}_nostats"] = mosaic_fn(config, False, False)
            variants[f"mosaic_{label}_stats"] = mosaic_fn(config, True, False)
            variants[f"mosaic_{label}_stats_tm"] = mosaic_fn(config, True, True)
        for name, fn in variants.items():
            try:
                rec["times_ms"][name] = time_ms(fn, x, w1, b1)
            except Exception as err:  # noqa: BLE001
                rec["times_ms"][name] = None
                say(f"time {name} FAILED: {err!r}"[:600])
        base = rec["times_ms"].get("xla_dot_bias_relu")
        for name, ms in rec["times_ms"].items():
            if ms is None:
                continue
            ratio = ms / base if base else float("nan")
            say(f"{name:34s} {ms:8.3f} ms {flops / ms / 1e9:7.0f} TF/s  {ratio:5.2f}x")
            table.append((key, name, ms, flops / ms / 1e9, ratio))
        say(f"elapsed {time.time() - t_start:.0f} s")
        (OUT / "device_mosaic.json").write_text(json.dumps(results, indent=2))

    results["elapsed_s"] = time.time() - t_start
    (OUT / "device_mosaic.json").write_text(json.dumps(results, indent=2))
    say("\nbest configs (kernels/configs/mosaic_gpu.json format):")
    say(json.dumps(results["best_configs"], indent=2))
    say("\n| shape | variant | ms | TF/s | vs XLA dot+bias+relu |")
    say("| --- | --- | --- | --- | --- |")
    for key, name, ms, tf, ratio in table:
        say(f"| {key} | {name} | {ms:.3f} | {tf:.0f} | {ratio:.2f}x |")
    checks_ok = all(c.get("ok") for s in results["shapes"].values() for c in s["checks"].values())
    say(f"\nall committed-config checks ok: {checks_ok}; total {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
