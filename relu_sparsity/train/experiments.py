"""The paper's pruning experiments as one command each.

- masking (section 4.1): baseline, `mask`, `compact` and `random` from the same initialization and
  data order; eval curves on shared axes, step time before and after the prune step, a table.
- capacity (section 4.4, Table 4): round 1 at the configured widths, then round 2 with each layer's
  width set to the units round 1 used per batch at its end.
"""

import dataclasses
import json
from pathlib import Path

from relu_sparsity.report import used_units, write_report
from relu_sparsity.report.numbers import Timing
from relu_sparsity.runs import lock
from relu_sparsity.runs.reader import read_metrics
from relu_sparsity.train.config import Config, apply_overrides
from relu_sparsity.train.trainer import train

MASKING_RUNS = ("baseline", "mask", "compact", "random")


def _variant(config: Config, name: str, **train_fields) -> Config:
    return dataclasses.replace(config, name=name,
                               train=dataclasses.replace(config.train, **train_fields))


def _step_times(records: list[dict], keep, tokens_per_step: int) -> Timing | None:
    """ms per step over the logged intervals whose step passes `keep`: median and spread."""
    # The first logged step of a (re)compiled program is one step long: leave it out.
    ms = [tokens_per_step / r["tokens_per_s"] * 1e3 for r in records[1:]
          if keep(r["step"]) and r.get("tokens_per_s")]
    return Timing.from_rounds(ms) if ms else None


def _fmt_times(timing: Timing | None) -> str:
    return f"{timing.median_ms:.2f} ({timing.iqr_ms:.2f}, {timing.rounds})" if timing else "n/a"


def _final_eval(records: list[dict]) -> dict:
    evals = [r for r in records if "eval_loss" in r]
    return evals[-1] if evals else {}


def masking_table(runs: dict[str, Path], prune_at: int, tokens_per_step: int) -> str:
    lines = [f"# Masking experiment (pruned after step {prune_at})", "",
             "| run | units kept (all layers) | final eval loss | final eval accuracy | "
             "ms/step before (IQR, n) | ms/step after (IQR, n) | after / before |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, run in runs.items():
        records = read_metrics(run)
        pruned = next((r["pruned"] for r in records if "pruned" in r), None)
        widths = [layer["d_ff"] for layer in records[0].get("layers", [])]
        kept = f"{sum(pruned['kept'])} / {sum(widths)} ({100 * sum(pruned['kept']) / sum(widths):.1f}%)" \
            if pruned and widths else "all"
        final = _final_eval(records)
        before = _step_times(records, lambda s: s <= prune_at, tokens_per_step)
        after = _step_times(records, lambda s: s > prune_at + 1, tokens_per_step)
        ratio = f"{after.median_ms / before.median_ms:.3f}" if before and after else "n/a"
        lines.append(f"| {name} | {kept} | {final.get('eval_loss', float('nan')):.4f} | "
                     f"{100 * final.get('eval_accuracy', float('nan')):.2f}% | "
                     f"{_fmt_times(before)} | {_fmt_times(after)} | {ratio} |")
    lines += ["", "Step times are medians of the logged intervals (evaluation excluded) on each "
              "side of the prune step, with their interquartile range and count (judge the "
              "ratio against the spread); `mask` computes only the live columns, `compact` trains "
              "at the smaller width, `random` keeps as many units per layer as `mask`, chosen at "
              "random. All four share the initialization and the data order."]
    return "\n".join(lines) + "\n"


def masking_experiment(config: Config, out_dir: str | Path, prune_at: int, *,
                       progress: bool = True) -> Path:
    out = Path(out_dir)
    with lock.folder_held(out, "experiment folder"):
        return _masking(config, out, prune_at, progress)


def _masking(config: Config, out: Path, prune_at: int, progress: bool) -> Path:
    runs = {name: out / name for name in MASKING_RUNS}
    for name, run in runs.items():
        fields = {} if name == "baseline" else {"prune": name, "prune_at": prune_at}
        train(_variant(config, f"{config.name}-{name}", **fields), run, progress=progress)
    write_report(list(runs.values()), out, last_k=config.train.mean_last)
    table = out / "masking.md"
    table.write_text(masking_table(runs, prune_at,
                                   config.train.batch_size * config.model.seq_len))
    return table


def capacity_experiment(config: Config, out_dir: str | Path, *, progress: bool = True) -> Path:
    out = Path(out_dir)
    with lock.folder_held(out, "experiment folder"):
        return _capacity(config, out, progress)


def _capacity(config: Config, out: Path, progress: bool) -> Path:
    round1 = out / "round1"
    train(dataclasses.replace(config, name=f"{config.name}-round1"), round1, progress=progress)
    used1 = [max(1, round(u)) for u in used_units(read_metrics(round1), config.train.mean_last)]
    config2 = apply_overrides(config, [f"model.d_ff={json.dumps(used1)}",
                                       f"name={config.name}-round2"])
    round2 = out / "round2"
    train(config2, round2, progress=progress)
    used2 = used_units(read_metrics(round2), config.train.mean_last)
    widths1 = [layer["d_ff"] for layer in read_metrics(round1)[0]["layers"]]
    lines = ["# Capacity experiment (the paper's Table 4)", "",
             "| Layer | Hidden Units Used Round 1 | Hidden Units Used Round 2 | "
             "Percent Used Round 1 | Percent Used Round 2 |",
             "| :--- | ---: | ---: | ---: | ---: |"]
    for i, (w1, u1, u2) in enumerate(zip(widths1, used1, used2)):
        lines.append(f"| {i} | {u1} | {u2:.0f} | {100 * u1 / w1:.1f} | {100 * u2 / u1:.1f} |")
    final1, final2 = _final_eval(read_metrics(round1)), _final_eval(read_metrics(round2))
    lines += ["", f"Units used: the mean of batch use x width over the last "
              f"{config.train.mean_last} logged steps of each round. Round 2's widths are round "
              f"1's used units. Final eval loss: round 1 {final1.get('eval_loss', float('nan')):.4f}, "
              f"round 2 {final2.get('eval_loss', float('nan')):.4f}."]
    table = out / "capacity.md"
    table.write_text("\n".join(lines) + "\n")
    write_report([round1, round2], out, last_k=config.train.mean_last)
    return table
