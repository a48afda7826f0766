"""Where the mosaic_gpu kernel's time goes: Mosaic GPU's on-device profiler on the H200.

    OUT=/tmp/out PYTHONPATH=$PWD python3 -m relu_sparsity.bench.profile_mosaic

For each benchmark shape (bf16, seq_len 512, committed tiles) with and without statistics, one
profiled call records, per compute warpgroup and output tile, the phases named in kernel.py:
`mainloop` (waiting for and issuing the wgmmas of one tile), `epilogue_h` (bias, ReLU, h through
SMEM to TMA), and, once per column piece of the statistics, `pack` (h > 0, four columns to an
int32), `token_count`, `seq_count` (the per-warp column sums and their store) and `token_mask`.
Times are SM clock cycles (%clock). Printed per variant:
  * cycles per range of each phase (median over ranges and warpgroups: one range per tile for
    mainloop and epilogue_h, one per piece for the statistics' phases, a piece being a 128 x 128
    tile's [128, 32] columns of packed words) and its share of the warpgroup's span (all its
    ranges, first range start to last range end);
  * how far apart the two compute warpgroups of a CTA start their epilogues (median |delta|, in
    cycles): ~0 means lockstep, i.e. the tensor cores idle through both epilogues at once
    (split schedule; with ping-pong the i-th epilogues of the two belong to consecutive tiles,
    about one mainloop apart).
Only the first `profile_ranges` ranges of each warpgroup are kept (shared-memory buffer), so at
the large shapes the figures cover the first tiles of each CTA. Traces go to $OUT/traces/.
"""

import collections
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.mosaic_gpu import kernel as mk
from relu_sparsity.kernels.mosaic_gpu import ops as mops
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, random_inputs
WARPGROUPS_PER_CTA = 3  # two compute warpgroups, then the memory warpgroup


def ranges_by_trace(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
    """tid -> [(name, begin, end)] from the profiler's B/E events (nested ranges allowed)."""
    out = collections.defaultdict(list)
    stacks = collections.defaultdict(list)
    for ev in trace["traceEvents"]:
        tid = ev["tid"]
        if ev["ph"] == "B":
            stacks[tid].append((ev["name"], ev["ts"]))
        else:
            name, begin = stacks[tid].pop()
            out[tid].append((name, begin, ev["ts"]))
    return out


def summarize(trace: dict) -> dict:
    """Per-phase cycles per range, share of the warpgroup span, and epilogue lockstep."""
    per_tid = ranges_by_trace(trace)
    durations = collections.defaultdict(list)
    shares = collections.defaultdict(list)
    epi_starts = collections.defaultdict(dict)  # block -> {wg: [starts]}
    for tid, ranges in per_tid.items():
        block, wg = divmod(tid - 1, WARPGROUPS_PER_CTA)
        if not ranges:
            continue
        span = max(e for _, _, e in ranges) - min(b for _, b, _ in ranges)
        totals = collections.Counter()
        for name, b, e in ranges:
            # ts is start_time (ns) + cycles, divided by 1e3 by the dump: cycles = 1e3 * delta.
            durations[name].append((e - b) * 1e3)
            totals[name] += e - b
        for name, total in totals.items():
            shares[name].append(total / span if span > 0 else 0.0)
        epi_starts[block][wg] = sorted(b for name, b, _ in ranges if name == "epilogue_h")
    deltas = []
    for starts in epi_starts.values():
        if 0 in starts and 1 in starts:
            n = min(len(starts[0]), len(starts[1]))
            deltas += [abs(a - b) * 1e3 for a, b in zip(starts[0][:n], starts[1][:n])]
    return {
        "phases": {name: {"tiles": len(d), "median_cycles": statistics.median(d),
                          "mean_cycles": statistics.fmean(d),
                          "share_of_span": statistics.fmean(shares[name])}
                   for name, d in sorted(durations.items())},
        "epilogue_start_delta_cycles_median": statistics.median(deltas) if deltas else None,
    }


def profile_once(T, D, F, config, with_stats, trace_dir: Path) -> dict:
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.glob("*.json"))
    plan = mk.make_plan(T, D, F, SEQ_LEN, config)
    call = mk.build_call(plan, jnp.bfloat16, jnp.bfloat16, with_stats=with_stats,
                         with_token_mask=False, num_sms=jax.devices()[0].core_count,
                         profile_dir=str(trace_dir))
    x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
    jax.block_until_ready(jax.jit(call)(x, w1, b1))
    jax.effects_barrier()  # the trace is written by a host callback
    new = sorted(set(trace_dir.glob("*.json")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"no trace written to {trace_dir}")
    return summarize(json.loads(new[-1].read_text()))


def main():
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    kind = jax.devices()[0].device_kind
    results, lines = {}, []
    for T, D, F in BENCH_SHAPES:
        committed = mops.tile_config(kind, (T, D, F), "bfloat16")
        variants = {"nostats": (committed, False), "stats": (committed, True)}
        for label, (config, with_stats) in variants.items():
            key = f"{T}x{D}x{F} {label}"
            t0 = time.time()
            try:
                summary = profile_once(T, D, F, config, with_stats,
                                       out / "traces" / key.replace(" ", "_"))
            except Exception as err:  # noqa: BLE001 - report and go on
                print(key, "FAILED", repr(err)[:1500], flush=True)
                continue
            results[key] = summary
            print(key, f"({time.time() - t0:.0f} s)", json.dumps(summary), flush=True)
            for name, ph in summary["phases"].items():
                lines.append(f"| {key} | {name} | {ph['tiles']} | {ph['median_cycles']:.0f} | "
                             f"{100 * ph['share_of_span']:.1f}% |")
            lines.append(f"| {key} | epilogue start delta wg0-wg1 | | "
                         f"{summary['epilogue_start_delta_cycles_median']} | |")
    (out / "profile_mosaic.json").write_text(json.dumps(results, indent=1))
    print("\n| shape, variant | phase | ranges | median cycles | share of span |")
    print("| --- | --- | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
