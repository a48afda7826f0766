"""Train-step benchmark: one model, `--instrument off | xla | fused`, steps that do not log, and
beside it (`--baseline flax`) the plain Flax/optax model of the same shape (bench/baseline.py).

With `prune`, the step after pruning is timed: a seeded random `keep_fraction` of each layer's
units remain, kept as live columns at full shape (`mask`) or physically removed (`compact`).

Each measured variant runs in its own process, so that the device's peak-memory counter
belongs to that mode alone. Times are medians over rounds of back-to-back steps after warm-up, on
random tokens (the data pipeline is not what is measured).
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from relu_sparsity.bench.baseline import plain_setup
from relu_sparsity.bench.timing import Timing, measure
from relu_sparsity.model import Transformer
from relu_sparsity.runs.reader import PROFILE_HLO_FILE, PROFILE_STEPS_FILE
from relu_sparsity.train.config import preset
from relu_sparsity.train.pruning import Pruning
from relu_sparsity.train.steps import (NO_COMMAND_BUFFERS, compute_dtype, init_state,
                                       make_optimizer, make_train_step, model_config)

BASELINE = "plain-flax"  # the instrument column's name for bench/baseline.py's model
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:")


def random_pruning(mode: str, widths: tuple[int, ...], keep_fraction: float, seed: int = 0,
                   multiple: int = 1) -> Pruning:
    """Each layer keeps a seeded random round(keep_fraction * width) of its units; compact
    widths round up to `multiple` as in training."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    rng = np.random.default_rng(seed)
    keep = tuple(np.sort(rng.choice(w, size=max(1, round(keep_fraction * w)), replace=False))
                 for w in widths)
    return Pruning(mode, 0, keep, tuple(widths), multiple)


def time_train_step(config_name: str, instrument: str, overrides: list[str], *, rounds: int,
                    steps_per_round: int, prune: str = "none", keep_fraction: float = 1.0,
                    history: bool = True, profile_dir: str | None = None) -> dict:
    """One variant's step time and peak memory. `history`: the unit histories update every
    step, as in training (instrumented modes only). `profile_dir`: also trace a few steps
    there, for `relu-sparsity profile` (time_and_profile)."""
    config = preset(config_name, [f"instrument={instrument}", *overrides])
    vocab = config.data.vocab_size
    widths = model_config(config, vocab).layer_widths()
    pruning = None
    if prune != "none":
        if prune not in ("mask", "compact"):
            raise ValueError(f"prune must be none, mask or compact, got {prune!r}")
        pruning = random_pruning(prune, widths, keep_fraction,
                                 multiple=config.train.prune_multiple)
    model = Transformer(model_config(config, vocab, pruning=pruning))
    optimizer = make_optimizer(config)
    history = history and instrument != "off"
    state = init_state(model, optimizer, config, widths if history else None)
    tokens = jax.random.randint(jax.random.key(1), (config.train.batch_size,
                                                    config.model.seq_len + 1), 0, vocab)
    unit_ids = pruning.compacted_ids() if pruning is not None else None
    lowered = make_train_step(model, optimizer, unit_ids=unit_ids).lower(state, tokens)
    carried = {"state": state}

    def advance(step):  # the state is donated: each step takes the one before's
        carried["state"], scalars, _ = step(carried["state"], tokens)
        return scalars

    timing, memory = time_and_profile(lowered, advance, rounds=rounds,
                                      steps_per_round=steps_per_round, profile_dir=profile_dir)
    return {"config": config_name, "instrument": instrument, "prune": prune, "history": history,
            "d_ff": list(model.config.layer_widths()) if pruning is None
            else list(pruning.widths), "param_widths": list(model.config.layer_widths()),
            "ms": timing.median_ms, "min_ms": timing.min_ms, "iqr_ms": timing.iqr_ms,
            "peak_bytes": memory.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
            "dtype": model.config.dtype, "kernel": config.kernel if instrument == "fused"
            else "reference"}


def time_baseline_step(config_name: str, overrides: list[str], *, rounds: int,
                       steps_per_round: int, profile_dir: str | None = None) -> dict:
    """The plain Flax/optax model of the configuration's shape (bench/baseline.py): its step
    time and peak memory, as `time_train_step` measures ours."""
    config = preset(config_name, overrides)
    vocab = config.data.vocab_size
    step, params, opt_state = plain_setup(config, vocab, seed=config.train.seed)
    tokens = jax.random.randint(jax.random.key(1), (config.train.batch_size,
                                                    config.model.seq_len + 1), 0, vocab)
    lowered = step.lower(params, opt_state, tokens)
    carried = {"params": params, "opt_state": opt_state}

    def advance(step):
        carried["params"], carried["opt_state"], loss = step(
            carried["params"], carried["opt_state"], tokens)
        return loss

    timing, memory = time_and_profile(lowered, advance, rounds=rounds,
                                      steps_per_round=steps_per_round, profile_dir=profile_dir)
    return {"config": config_name, "instrument": BASELINE, "prune": "none", "history": False,
            "d_ff": [config.model.d_ff] * config.model.num_layers,
            "param_widths": [config.model.d_ff] * config.model.num_layers,
            "ms": timing.median_ms, "min_ms": timing.min_ms, "iqr_ms": timing.iqr_ms,
            "peak_bytes": memory.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
            "dtype": compute_dtype(config), "kernel": "none"}


def time_and_profile(lowered, advance, *, rounds: int, steps_per_round: int,
                     profile_dir: str | None = None, profiled_steps: int = 3
                     ) -> tuple[Timing, dict]:
    """The step time of `lowered`, compiled, over rounds of `advance(step)` calls (one step on
    state the closure carries, returning a value to wait for), and the device's memory counters
    after them. With `profile_dir`, then `profiled_steps` steps of the same program compiled
    without XLA's command buffers traced into profile_dir/profile with their HLO beside, as
    `train --profile-steps` writes them: `relu-sparsity profile profile_dir` reads them."""
    step = lowered.compile()

    def run_round():
        for _ in range(steps_per_round):
            out = advance(step)
        return jax.block_until_ready(out)

    timing = measure(run_round, rounds=rounds, calls_per_round=steps_per_round)
    memory = jax.devices()[0].memory_stats() or {}
    if profile_dir is not None:
        trace_steps(lowered.compile(NO_COMMAND_BUFFERS), advance, Path(profile_dir) / "profile",
                    profiled_steps)
    return timing, memory


def trace_steps(step, advance, folder: Path, steps: int) -> None:
    """`steps` calls of `advance(step)` traced into `folder`, with the step's HLO and the steps
    traced beside, as `train --profile-steps` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROFILE_HLO_FILE).write_text(step.as_text())
    jax.block_until_ready(advance(step))  # its first call loads it
    jax.profiler.start_trace(str(folder))
    for _ in range(steps):
        out = advance(step)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    (folder / PROFILE_STEPS_FILE).write_text(json.dumps(
        {"first": 0, "stop": steps, "command_buffers": "off"}) + "\n")


def variant_name(prune: str, instrument: str, history: bool) -> str:
    """A variant's folder name under `bench --profile DIR`."""
    return f"{instrument}-{prune}" + ("" if history or instrument in ("off", BASELINE)
                                      else "-no-history")


def run_isolated(config_name: str, instruments: list[str], overrides: list[str], *,
                 rounds: int = 5, steps_per_round: int = 10, prunes: tuple[str, ...] = ("none",),
                 keep_fraction: float = 0.7, histories: tuple[bool, ...] = (True,),
                 baseline: bool = False, profile_dir: str | None = None) -> list[dict]:
    """Every (prune, instrument, history) variant in its own process, after the plain Flax
    baseline's when `baseline`; ratios against the first `off` row and against the baseline.
    With `profile_dir`, each variant's profile goes to profile_dir/<variant_name>."""
    variants = [(p, i, h) for p in prunes for i in instruments for h in histories
                if h or i != "off"]
    if baseline:
        variants.insert(0, ("none", BASELINE, False))
    rows = []
    for prune, instrument, history in variants:
        cmd = [sys.executable, "-m", "relu_sparsity.bench.train_step", "--config", config_name,
               "--instrument", instrument, "--rounds", str(rounds), "--steps",
               str(steps_per_round), "--prune", prune, "--keep-fraction", str(keep_fraction),
               *([] if history else ["--no-history"]), *overrides]
        if profile_dir is not None:
            cmd += ["--profile-dir", str(Path(profile_dir) / variant_name(prune, instrument,
                                                                          history))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"config": config_name, "instrument": instrument, "prune": prune,
                         "history": history, "error": error_line(done.stderr)})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    add_ratios(rows, "off", "ratio", "memory_ratio")
    add_ratios(rows, BASELINE, "baseline_ratio", "baseline_memory_ratio")
    return rows


def error_line(stderr: str) -> str:
    """The exception a failed variant's process ended with (its last `...Error: ...` line; JAX
    prints a note about filtered frames after it), else its last line."""
    lines = stderr.strip().splitlines() or [""]
    errors = [line for line in lines if EXCEPTION_LINE.match(line)]
    return (errors or lines)[-1]


def add_ratios(rows: list[dict], instrument: str, key: str, memory_key: str) -> None:
    """Each measured row's time and peak memory over those of the first `instrument` row."""
    base = next((r for r in rows if r.get("instrument") == instrument and "ms" in r), None)
    if base is None:
        return
    for r in rows:
        if "ms" in r:
            r[key] = r["ms"] / base["ms"]
            if base.get("peak_bytes") and r.get("peak_bytes"):
                r[memory_key] = r["peak_bytes"] / base["peak_bytes"]


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table; the `/ baseline` columns only where a baseline ran."""
    with_base = any("baseline_ratio" in r for r in rows)
    base_head, base_rule = (" / baseline | memory / baseline |", " ---: | ---: |") if with_base \
        else ("", "")
    lines = ["| config | prune | d_ff | instrument | unit history | ms / step | / off | "
             "peak memory (GiB) | / off |" + base_head,
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |" + base_rule]
    nan = float("nan")
    for r in rows:
        prune = r.get("prune", "none")
        history = "yes" if r.get("history") else "no"
        if "error" in r:
            lines.append(f"| {r['config']} | {prune} | | {r['instrument']} | {history} | "
                         f"failed: {r['error']} | | | |" + " |" * (2 if with_base else 0))
            continue
        base_cells = (f" {r.get('baseline_ratio', nan):.3f} | "
                      f"{r.get('baseline_memory_ratio', nan):.3f} |") if with_base else ""
        gib = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else float("nan")
        widths = "/".join(map(str, sorted(set(r.get("d_ff", [])))))
        padded = "/".join(map(str, sorted(set(r.get("param_widths", [])))))
        if prune == "compact" and padded != widths:
            widths += f" (padded {padded})"
        lines.append(f"| {r['config']} | {prune} | {widths} | {r['instrument']} | {history} | "
                     f"{r['ms']:.2f} | {r.get('ratio', float('nan')):.3f} | {gib:.2f} | "
                     f"{r.get('memory_ratio', float('nan')):.3f} |" + base_cells)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="paper")
    parser.add_argument("--instrument", default="off")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prune", default="none", choices=("none", "mask", "compact"))
    parser.add_argument("--keep-fraction", type=float, default=1.0)
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--profile-dir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.instrument == BASELINE:
        print(json.dumps(time_baseline_step(args.config, args.overrides, rounds=args.rounds,
                                            steps_per_round=args.steps,
                                            profile_dir=args.profile_dir)))
        return
    print(json.dumps(time_train_step(args.config, args.instrument, args.overrides,
                                     rounds=args.rounds, steps_per_round=args.steps,
                                     prune=args.prune, keep_fraction=args.keep_fraction,
                                     history=not args.no_history,
                                     profile_dir=args.profile_dir)))


if __name__ == "__main__":
    main()
