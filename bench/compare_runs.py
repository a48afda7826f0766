"""Compare two run folders that trained the same model on the same global batches in different
layouts (1 GPU against 2, data parallel against width-sharded, 1 process against 2): losses,
evaluations, the units used by the whole global batch (each step's device masks ORed), unit
states, speed. Per-device figures differ by design when the device batches differ, so they are
compared only with --same-device-batches.

    python3 bench/compare_runs.py RUN_A RUN_B [--same-device-batches] [--skip-steps 2]

Prints a table last; exits 1 when a statistic differs beyond the tolerance.
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relu_sparsity.kernels.bits import np_or_rows  # noqa: E402
from relu_sparsity.runs.folder import RunFolder  # noqa: E402

UNION_KEYS = ("on0", "turned_on", "turned_off", "final", "never_on")
DEVICE_KEYS = ("token_use", "seq_use", "batch_use", "p50")


def max_diff(pairs) -> float:
    return max((abs(a - b) for a, b in pairs), default=0.0)


def compare(a: Path, b: Path, same_device_batches: bool, skip: int) -> dict:
    fa, fb = RunFolder(a), RunFolder(b)
    ra, rb = fa.read_metrics(), fb.read_metrics()
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        raise SystemExit(f"{a} and {b} logged different steps")
    layered = [(x, y) for x, y in zip(ra, rb) if x.get("layers") and y.get("layers")]
    out = {
        "loss": max_diff((x["loss"], y["loss"]) for x, y in zip(ra, rb)),
        "eval_loss": max_diff((x["eval_loss"], y["eval_loss"]) for x, y in zip(ra, rb)
                              if "eval_loss" in x),
        "unit states": max_diff((lx[k], ly[k]) for x, y in layered
                                for lx, ly in zip(x["layers"], y["layers"]) for k in UNION_KEYS),
        "global-batch use": max_diff(
            (lx.get("batch_use_all_devices", lx["batch_use"]),
             ly.get("batch_use_all_devices", ly["batch_use"]))
            for x, y in layered for lx, ly in zip(x["layers"], y["layers"])),
    }
    if same_device_batches:
        out["per-device metrics"] = max_diff(
            (lx[k], ly[k]) for x, y in layered for lx, ly in zip(x["layers"], y["layers"])
            for k in DEVICE_KEYS)
    kept = [next((r["pruned"]["kept"] for r in recs if "pruned" in r), None) for recs in (ra, rb)]
    if kept[0] is not None or kept[1] is not None:
        out["units kept per layer equal"] = str(kept[0] == kept[1])
    steps = fa.mask_steps()
    differ = [s for s in steps if any(
        not np.array_equal(np_or_rows(ma), np_or_rows(mb))
        for ma, mb in zip(fa.read_masks(s), fb.read_masks(s), strict=True))]
    out["global-batch masks equal"] = f"{len(steps) - len(differ)} / {len(steps)} steps"
    for name, recs in (("A tokens/s", ra), ("B tokens/s", rb)):
        out[name] = statistics.median(r["tokens_per_s"] for r in recs[skip:]
                                      if r.get("tokens_per_s"))
    out["B / A tokens/s"] = out["B tokens/s"] / out["A tokens/s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--same-device-batches", action="store_true",
                        help="the runs' device batches are the same sequences: compare the "
                        "per-device metrics too")
    parser.add_argument("--skip-steps", type=int, default=2,
                        help="logged steps left out of the speed (compilation, warm-up)")
    parser.add_argument("--tolerance", type=float, default=2e-3,
                        help="largest difference of a fraction accepted as equal (GPU runs "
                        "differ run to run by ~1e-3: bench/RESULTS.md)")
    args = parser.parse_args()
    result = compare(args.run_a, args.run_b, args.same_device_batches, args.skip_steps)
    print(f"A: {args.run_a}\nB: {args.run_b}\n| quantity | value |\n| --- | ---: |")
    for key, value in result.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    stats_keys = ("unit states", "global-batch use", "per-device metrics")
    worst = max(result.get(k, 0.0) for k in stats_keys)
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
