"""On the GPU: check the Triton backend against the reference at full size, time every tile
configuration with and without statistics next to XLA, and write the best configuration per shape
as `triton.json` (committed as relu_sparsity/kernels/configs/triton.json).

    python3 bench/device_triton.py --out $OUT
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.kernels import backends, fused_mlp_up
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, full_size_check, random_inputs
from relu_sparsity.bench.timing import median_ms
from relu_sparsity.kernels.triton import kernel, ops

CANDIDATES = [
    kernel.TileConfig(128, 128, 64, 8, 8, 3),
    kernel.TileConfig(128, 256, 64, 8, 8, 3),
    kernel.TileConfig(128, 256, 64, 8, 8, 4),
    kernel.TileConfig(128, 128, 64, 8, 4, 4),
    kernel.TileConfig(128, 128, 64, 8, 8, 3, seq_programs=True),
    kernel.TileConfig(128, 256, 64, 8, 8, 3, seq_programs=True),
]


def triton_fn(config, with_stats, with_token_mask=False):
    """The backend's forward, jitted; config None: the committed one."""
    return jax.jit(lambda x, w, b: ops.forward(
        x, w, b, seq_len=SEQ_LEN, with_stats=with_stats, with_token_mask=with_token_mask,
        config=config))


def time_ms(fn, args):
    return median_ms(fn, args, repeats=5, launches=50)


def check(x, w1, b1, config) -> dict:
    """h against the reference and the integer outputs by the own-h rule, with the token mask;
    raises on a mismatch."""
    h, stats = triton_fn(config, True, True)(x, w1, b1)
    return full_size_check(h, stats, x, w1, b1, seq_len=SEQ_LEN, with_token_mask=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    backends.load_backend("triton")
    device = jax.devices()[0].device_kind
    rows, best = [], {}
    for t, d, f in BENCH_SHAPES:
        x, w1, b1 = random_inputs(t, d, f, jnp.bfloat16)
        flops = 2.0 * t * d * f
        base = time_ms(jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b)), (x, w1, b1))
        xla_stats = time_ms(jax.jit(lambda x, w, b: fused_mlp_up(
            x, w, b, seq_len=SEQ_LEN, backend="reference")), (x, w1, b1))
        shape = f"{t}x{d}x{f}"
        rows.append(dict(shape=shape, variant="xla dot+bias+relu", ms=base))
        rows.append(dict(shape=shape, variant="xla relu+stats (reference)", ms=xla_stats))
        for cfg in CANDIDATES:
            name = (f"triton {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
                    f"s{cfg.num_stages}" + (" seqprog" if cfg.seq_programs else ""))
            try:
                figures = check(x, w1, b1, cfg)
                times = {}
                for with_stats in (False, True):
                    times[with_stats] = time_ms(triton_fn(cfg, with_stats), (x, w1, b1))
            except Exception as e:  # a config that does not fit: record it, go on
                rows.append(dict(shape=shape, variant=name, error=str(e).splitlines()[0][:120]))
                continue
            rows.append(dict(shape=shape, variant=name, ms=times[False], ms_stats=times[True],
                             max_err=figures["h_max_abs_diff"], exact=figures["ok"]))
            if shape not in best or times[True] < best[shape][1]:
                best[shape] = (cfg, times[True])
        for r in rows:
            if r["shape"] == shape:
                r["tflops"] = flops / r["ms"] / 1e9 if "ms" in r else None
                r["vs_xla"] = r["ms"] / base if "ms" in r else None
                if "ms_stats" in r:
                    r["stats_vs_nostats"] = r["ms_stats"] / r["ms"]
                    r["stats_vs_xla_stats"] = r["ms_stats"] / xla_stats
                    r["stats_vs_xla"] = r["ms_stats"] / base
        print(f"done {shape}", flush=True)
    configs = {device: {f"{s}:bfloat16": dataclasses.asdict(c) for s, (c, _) in best.items()}}
    (out / "triton.json").write_text(json.dumps(configs, indent=2) + "\n")
    (out / "triton_rows.json").write_text(json.dumps(rows, indent=2))
    print(f"device {device}; bf16; seq_len {SEQ_LEN}; median of 5 x 50 launches")
    print("| shape | variant | ms | TF/s | /xla | +stats ms | stats/nostats | stats/xla-stats "
          "| stats/xla | max err | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['variant']} | failed: {r['error']} |")
            continue
        f = lambda k, p=3: f"{r[k]:.{p}f}" if r.get(k) is not None else ""  # noqa: E731
        print(f"| {r['shape']} | {r['variant']} | {f('ms')} | {f('tflops', 0)} | {f('vs_xla', 2)} "
              f"| {f('ms_stats')} | {f('stats_vs_nostats', 3)} | {f('stats_vs_xla_stats', 3)} "
              f"| {f('stats_vs_xla', 3)} | {f('max_err', 4)} | {r.get('exact', '')} |")


if __name__ == "__main__":
    main()
