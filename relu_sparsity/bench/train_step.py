"""Train-step benchmark: one model, `--instrument off | xla | fused`, steps that do not log.

Each instrumentation mode runs in its own process, so that the device's peak-memory counter
belongs to that mode alone. Times are medians over rounds of back-to-back steps after warm-up, on
random tokens (the data pipeline is not what is measured).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax

from relu_sparsity.model import Transformer
from relu_sparsity.train.config import preset
from relu_sparsity.train.loop import init_state, make_optimizer, make_train_step, model_config


def time_train_step(config_name: str, instrument: str, overrides: list[str], *, rounds: int,
                    steps_per_round: int) -> dict:
    config = preset(config_name, [f"instrument={instrument}", *overrides])
    vocab = config.data.vocab_size
    model = Transformer(model_config(config, vocab))
    optimizer = make_optimizer(config)
    state = init_state(model, optimizer, config)
    tokens = jax.random.randint(jax.random.key(1), (config.train.batch_size,
                                                    config.model.seq_len + 1), 0, vocab)
    step = make_train_step(model, optimizer).lower(state, tokens).compile()
    for _ in range(3):  # warm-up
        state, scalars, _ = step(state, tokens)
    jax.block_until_ready(scalars)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps_per_round):
            state, scalars, _ = step(state, tokens)
        jax.block_until_ready(scalars)
        times.append((time.perf_counter() - start) / steps_per_round * 1e3)
    memory = jax.devices()[0].memory_stats() or {}
    return {"config": config_name, "instrument": instrument, "ms": statistics.median(times),
            "peak_bytes": memory.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
            "dtype": model.config.dtype, "kernel": config.kernel if instrument == "fused"
            else "reference"}


def run_isolated(config_name: str, instruments: list[str], overrides: list[str], *,
                 rounds: int = 5, steps_per_round: int = 10) -> list[dict]:
    rows = []
    for instrument in instruments:
        cmd = [sys.executable, "-m", "relu_sparsity.bench.train_step", "--config", config_name,
               "--instrument", instrument, "--rounds", str(rounds), "--steps", str(steps_per_round),
               *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"config": config_name, "instrument": instrument,
                         "error": done.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r.get("instrument") == "off" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["ratio"] = r["ms"] / base["ms"]
            if base.get("peak_bytes") and r.get("peak_bytes"):
                r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| config | instrument | ms / step | / off | peak memory (GiB) | / off |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['instrument']} | failed: {r['error']} | | | |")
            continue
        gib = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else float("nan")
        lines.append(f"| {r['config']} | {r['instrument']} | {r['ms']:.2f} | "
                     f"{r.get('ratio', float('nan')):.3f} | {gib:.2f} | "
                     f"{r.get('memory_ratio', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="paper")
    parser.add_argument("--instrument", default="off")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(json.dumps(time_train_step(args.config, args.instrument, args.overrides,
                                     rounds=args.rounds, steps_per_round=args.steps)))


if __name__ == "__main__":
    main()
