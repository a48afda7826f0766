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

from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
from relu_sparsity.kernels.mosaic_gpu import ops as mgpu_ops
from relu_sparsity.kernels.reference import reference_forward
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, full_size_check, random_inputs
from relu_sparsity.bench.timing import median_ms

REPS, LAUNCHES = 5, 50
TC = mgpu_kernel.TileConfig
SWEEP = [
    TC(128, 128, 64, 6, "pingpong", 32, "m", 16),
    TC(128, 128, 64, 6, "pingpong", 32, "m", 8),
    TC(128, 128, 128, 3, "pingpong", 32, "m", 16),
    TC(128, 128, 64, 5, "pingpong", 64, "m", 16),
    TC(128, 128, 64, 4, "n", 32, "m", 8),
    # every piece of h in its own SMEM slot (no wait within a tile), at the cost of ring stages
    TC(128, 128, 64, 4, "pingpong", 32, "m", 16, epi_slots=8),
]


def time_ms(fn, *args) -> float:
    """Median over REPS batches of LAUNCHES launches, ms per launch (the CLI bench's timer)."""
    return median_ms(fn, args, repeats=REPS, launches=LAUNCHES)


@functools.cache
def mosaic_fn(config, with_stats, with_token_mask):
    """The backend's forward, jitted."""
    return jax.jit(functools.partial(mgpu_ops.forward, seq_len=SEQ_LEN, with_stats=with_stats,
                                     with_token_mask=with_token_mask, config=config,
                                     interpret=False))


def check(config, x, w1, b1, with_token_mask) -> dict:
    """h against the reference, statistics by the exactness rule. Raises on a mismatch."""
    h, stats = mosaic_fn(config, True, with_token_mask)(x, w1, b1)
    return full_size_check(h, stats, x, w1, b1, seq_len=SEQ_LEN, with_token_mask=with_token_mask)


def main():
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "device_mosaic.log", "w")

    def say(*args):
        line = " ".join(str(a) for a in args)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

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
    for T, D, F in BENCH_SHAPES:
        key = f"{T}x{D}x{F}:bfloat16"
        flops = 2 * T * D * F
        say(f"\n=== {key} ===")
        rec = results["shapes"][key] = {"sweep": [], "times_ms": {}, "checks": {}}
        x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
        ref = jax.jit(functools.partial(reference_forward, seq_len=SEQ_LEN, with_stats=True,
                                        with_token_mask=False))
        committed = mgpu_ops.tile_config(kind, (T, D, F), "bfloat16")
        say("committed config:", committed)

        # (a) correctness with the committed config
        for with_tm in (False, True):
            name = "stats+token_mask" if with_tm else "stats"
            try:
                rec["checks"][name] = check(committed, x, w1, b1, with_tm)
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
                entry["check"] = check(config, x, w1, b1, False)
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
        (out / "device_mosaic.json").write_text(json.dumps(results, indent=2))

    results["elapsed_s"] = time.time() - t_start
    (out / "device_mosaic.json").write_text(json.dumps(results, indent=2))
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
