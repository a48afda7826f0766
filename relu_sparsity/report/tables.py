"""The report's Markdown: the paper's Tables 1-3 for a run, and with several runs Table 5 (per-batch
use by run, with a width-weighted Total) and Table 4 (units used per batch)."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from relu_sparsity.report.numbers import (
    diverged_step,
    final_means,
    last_layer_records,
    number,
    prune_step,
    total_batch_use,
    used_units,
    with_layers,
)
from relu_sparsity.runs.reader import config_value

# (metrics key, column header, kind) — kind "pct" prints 100*x with one decimal, "ratio" prints x
# with three decimals, as in the paper's tables.
TABLE1 = [
    ("token_use", "Per-Token (%)", "pct"),
    ("seq_use", "Per-Sequence (%)", "pct"),
    ("batch_use", "Per-Batch (%)", "pct"),
    ("token_per_seq", "Token/Seq Dims", "ratio"),
    ("seq_per_batch", "Seq/Batch Dims", "ratio"),
]
TABLE2 = [
    ("on0", "On Batch 0 (%)", "pct"),
    ("turned_on", "Turned On (%)", "pct"),
    ("turned_off", "Turned Off (%)", "pct"),
    ("final", "Final Use (%)", "pct"),
    ("never_on", "Never On (%)", "pct"),
]
TABLE3 = [
    ("p50", "50th Perc (%)", "pct"),
    ("p65", "65th Perc (%)", "pct"),
    ("p75", "75th Perc (%)", "pct"),
    ("p90", "90th Perc (%)", "pct"),
]

# One line per column, appended to the captions (the paper's captions explain each column).
TABLE1_CAPTION = (
    "Per-Token: percent of the layer's current d_ff units that are nonzero after the ReLU, per "
    "token, averaged over tokens; Per-Sequence: percent nonzero anywhere in a sequence, averaged "
    "over sequences; Per-Batch: percent nonzero anywhere in one device batch; Token/Seq Dims: "
    "units used per token / units used per sequence (averaged over sequences); Seq/Batch Dims: "
    "units used per sequence (mean) / units used per batch."
)
TABLE2_CAPTION = (
    "All as percent of the layer's original width. On Batch 0: units active in the batch of the "
    "first step (the forward pass at initialization); Turned On: units off in batch 0 but active "
    "in the logged batch; Turned Off: units active in batch 0 but off in the logged batch; Final "
    "Use: units active in the logged batch (= On Batch 0 + Turned On - Turned Off); Never On: "
    "units off in batch 0 and in every "
)
NEVER_ON_EVERY_STEP = "batch since (every training step, from the unit histories)."
NEVER_ON_LOGGED = "logged batch since."
TABLE3_CAPTION = (
    "For each sequence, take the hidden units used at least once in it; the Nth Perc column is "
    "the percent of the sequence's tokens on which the Nth-percentile unit of that subset is used "
    "(appendix A.6.1 on the 0/1 use indicator), averaged over sequences."
)


def _fmt(value: float, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if kind == "pct":
        return f"{100.0 * value:.1f}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "int":
        return f"{value:.0f}"
    raise ValueError(kind)


def _steps_phrase(window: list[dict]) -> str:
    """'mean over the last 5 logged steps, 1600-2000': the K actually used and its step range."""
    steps = [r.get("step") for r in window]
    k = len(window)
    if k == 1:
        return f"the last logged step, {steps[0]}"
    return f"mean over the last {k} logged steps, {steps[0]}-{steps[-1]}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    # Layer column left-aligned, numbers right-aligned.
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_table(means: list[dict], columns: list[tuple[str, str, str]],
                  extra: list[tuple[str, list[str]]] = ()) -> str:
    header = ["Layer"] + [c[1] for c in columns] + [name for name, _ in extra]
    rows = []
    for i, m in enumerate(means):
        cells = [_fmt(m.get(key, float("nan")), kind) for key, _, kind in columns]
        rows.append([str(i)] + cells + [values[i] for _, values in extra])
    return _markdown_table(header, rows)


def _widths_changed(records: list[dict]) -> bool:
    """True when any layer's width changed during the run (compaction)."""
    seen: dict[int, set] = {}
    for r in with_layers(records):
        for i, layer in enumerate(r["layers"]):
            seen.setdefault(i, set()).add(str(layer.get("d_ff")))
    return any(len(widths) > 1 for widths in seen.values())


def _layer_widths(record: dict) -> list[Any]:
    return [layer.get("d_ff") for layer in record.get("layers") or []]


def _widths_phrase(config: dict, records: list[dict]) -> str:
    """'d_ff 512 x 3 layers' or 'd_ff [512, 256, 512]', plus the final widths if they changed."""
    logged = with_layers(records)
    configured = config_value(config, "model.d_ff")
    num_layers = config_value(config, "model.num_layers")
    if configured is None and logged:
        configured = _layer_widths(logged[0])
    if isinstance(configured, list) and len(set(map(str, configured))) == 1:
        num_layers, configured = len(configured), configured[0]
    if configured is None:
        phrase = "d_ff unknown"
    elif isinstance(configured, list):
        phrase = f"d_ff {configured}"
    else:
        phrase = f"d_ff {configured}" + (f" x {num_layers} layers" if num_layers else "")
    if logged:
        first, final = _layer_widths(logged[0]), _layer_widths(logged[-1])
        if final != first:
            phrase += f" (at step {logged[-1].get('step')}: {final})"
    return phrase


def auto_prune_note(config: dict, records: list[dict]) -> str | None:
    """What a run with train.prune_at=auto that never pruned has to say, else None."""
    if (config_value(config, "train.prune_at") != "auto"
            or config_value(config, "train.prune", "none") == "none" or not records
            or prune_step(records) is not None):
        return None
    window = config_value(config, "train.prune_window")
    return (f"**--prune-at auto never fired** (up to step {records[-1].get('step')}): no logged "
            f"step had units unused for train.prune_window = {window} steps with none coming "
            "back; the run trained at its full width.")


MEASURED_NOTE = (" Measured without training (`relu-sparsity measure`): the steps are eval "
                 "batches of one fixed model, batch 0 the first of them.")


def _summary_line(config: dict, records: list[dict], run_dir: str | Path | None) -> str:
    if config.get("measured"):
        return _measured_line(config, records, run_dir)
    parts = []
    if run_dir is not None:
        parts.append(f"`{run_dir}`")
    diverged = diverged_step(records)
    if diverged is not None:
        parts.append(f"**DIVERGED at step {diverged}**")
    if records:
        trained = [r for r in records if "diverged" not in r]
        parts.append(f"steps: {records[-1].get('step')} ({len(trained)} logged)")
        loss = number(trained[-1].get("loss")) if trained else None
        parts.append(f"final train loss {loss:.4f}" if loss is not None else "final train loss n/a")
    evals = [r for r in records if number(r.get("eval_loss")) is not None]
    if evals:
        last = evals[-1]
        text = f"last eval (step {last.get('step')}): loss {last['eval_loss']:.4f}"
        acc = number(last.get("eval_accuracy"))
        if acc is not None:
            text += f", accuracy {100.0 * acc:.2f}%"
        parts.append(text)
    else:
        parts.append("no eval logged")
    entropy = number(config_value(config, "corpus.unigram_entropy_nats"))
    if entropy is not None:  # the loss a model that ignores context would reach
        parts.append(f"unigram entropy {entropy:.3f}")
    # Median, so the first step (which includes compilation) does not drag the figure down.
    speeds = [s for s in (number(r.get("tokens_per_s")) for r in records) if s and s > 0]
    if speeds:
        parts.append(f"tokens/s median {float(np.median(speeds)):,.0f}")
    peak_lr = number(config_value(config, "train.peak_lr"))
    if peak_lr is None:  # fall back to the largest logged learning rate
        lrs = [x for x in (number(r.get("lr")) for r in records) if x is not None]
        peak_lr = max(lrs) if lrs else None
    if peak_lr is not None:
        parts.append(f"peak LR {peak_lr:g}")
    parts.append(_widths_phrase(config, records))
    instrument = config.get("instrument")
    if instrument:
        parts.append(f"instrument: {instrument}")
    return " · ".join(parts)


def _measured_line(config: dict, records: list[dict], run_dir: str | Path | None) -> str:
    """The summary of a measurement: the model measured, the batches, their mean loss."""
    losses = [x for x in (number(r.get("eval_loss")) for r in records) if x is not None]
    parts = [f"`{run_dir}`" if run_dir is not None else "",
             f"the model of `{config['measured']}`, measured without training over "
             f"{len(records)} eval batches",
             f"mean eval loss {float(np.mean(losses)):.4f}" if losses else "no loss logged",
             _widths_phrase(config, records), f"instrument: {config.get('instrument')}"]
    return " · ".join(p for p in parts if p)


NO_LAYERS_NOTE = (
    "Sparsity tables are unavailable: no logged step has per-layer metrics "
    "(the run was trained with instrumentation off, or logged no layer statistics)."
)


def format_tables(run_name: str, records: list[dict], last_k: int, *,
                  config: dict | None = None, run_dir: str | Path | None = None,
                  every_step: bool = False) -> str:
    """Markdown for one run: a heading, a one-line summary, and the paper's Tables 1-3.
    `every_step`: the run kept unit histories, so Never On covers every step."""
    config = config or {}
    out = [f"## {run_name}", "", _summary_line(config, records, run_dir), ""]
    diverged = diverged_step(records)
    if diverged is not None:
        out += [f"**This run DIVERGED at step {diverged}** (a non-finite loss or gradient norm; "
                "its `diverged` entry in metrics.jsonl says more). The tables cover the steps "
                "logged before it.", ""]
    never_fired = auto_prune_note(config, records)
    if never_fired:
        out += [never_fired, ""]
    window = last_layer_records(records, last_k)
    if not window:
        out += [NO_LAYERS_NOTE, ""]
        return "\n".join(out)

    means = final_means(records, last_k)
    span = _steps_phrase(window)
    extra: list[tuple[str, list[str]]] = []
    first = _layer_widths(with_layers(records)[0])
    last = _layer_widths(window[-1])
    changed = _widths_changed(records)
    if changed or len(set(map(str, last))) > 1:
        extra = [("Width", [str(w) for w in last])]
    table1_extra: list[tuple[str, list[str]]] = []
    spans = {1: span, 2: span, 3: span}
    if changed:
        # Table 2's fractions are of the original width, Table 1's of the current one: show both.
        extra.append(("Orig. Width", [str(w) for w in first]))
        table1_extra = [("Per-Batch of Orig. (%)", [
            f"{100 * used / w0:.1f}" for used, w0 in zip(used_units(records, last_k), first)])]
        pruned = prune_step(records)
        if pruned is not None and window[0]["step"] > pruned:
            after = f", after the prune step {pruned}"
            # Each table names its own base: Table 2's states stay fractions of the original width.
            spans = {1: f"{span}{after}: percent of the kept width; Per-Batch of Orig.: the same "
                        "units as percent of the original width",
                     2: f"{span}{after}",
                     3: f"{span}{after}: over the kept units"}
    if len(window) < last_k:
        short = (f" (only {len(window)} logged steps have per-layer metrics; {last_k} were "
                 "asked for)")
        spans = {k: v + short for k, v in spans.items()}

    out += [
        "### Table 1: hidden unit use per token, sequence and batch", "",
        _metric_table(means, TABLE1, table1_extra), "",
        f"*Table 1: {spans[1]}. {TABLE1_CAPTION}*", "",
        "### Table 2: unit states relative to the first batch", "",
        _metric_table(means, TABLE2, extra), "",
        f"*Table 2: {spans[2]}. {TABLE2_CAPTION}"
        + (NEVER_ON_EVERY_STEP if every_step else NEVER_ON_LOGGED)
        + (" Width: d_ff at the last logged step." if extra else "")
        + (" Orig. Width: d_ff at the first." if len(extra) > 1 else "")
        + (MEASURED_NOTE if config.get("measured") else "") + "*", "",
        "### Table 3: use-frequency percentiles within a sequence", "",
        _metric_table(means, TABLE3), "",
        f"*Table 3: {spans[3]}. {TABLE3_CAPTION}*", "",
    ]
    return "\n".join(out)


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'peak_lr': 1e-3}} -> {'train.peak_lr': 1e-3}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


# The run name labels the columns already; a difference in it says nothing about the runs.
DIFF_IGNORED = {"name"}


def config_differences(configs: list[dict]) -> dict[str, list[Any]]:
    """Flattened keys whose values are not the same in all runs (a missing key counts as None)."""
    flats = [flatten_config(c) for c in configs]
    keys = dict.fromkeys(k for f in flats for k in f)
    diffs = {}
    for key in keys:
        if key in DIFF_IGNORED:
            continue
        values = [f.get(key) for f in flats]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True)
               for v in values[1:]):
            diffs[key] = values
    return diffs


def _show(value: Any) -> str:
    return "(missing)" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def format_comparison(names: list[str], records_per_run: list[list[dict]],
                      configs: list[dict], last_k: int) -> str:
    """The paper's Table 5 (per-batch use by run, width-weighted Total) and Table 4 (units used)."""
    diffs = config_differences(configs)
    if diffs:
        diff_text = "; ".join(
            f"`{k}`: " + " / ".join(_show(v) for v in values) for k, values in diffs.items()
        )
        header_line = f"Runs ({' / '.join(names)}) differ in: {diff_text}."
    else:
        header_line = f"Runs ({' / '.join(names)}): their configurations do not differ (apart from the name)."
    out = ["## Comparison", "", header_line, ""]

    have = [i for i, recs in enumerate(records_per_run) if with_layers(recs)]
    if not have:
        out += [NO_LAYERS_NOTE, ""]
        return "\n".join(out)
    missing = [names[i] for i in range(len(names)) if i not in have]
    cols = [names[i] + (f", diverged at step {diverged_step(records_per_run[i])}"
                        if diverged_step(records_per_run[i]) is not None else "")
            for i in have]
    means = [final_means(records_per_run[i], last_k) for i in have]
    used = [used_units(records_per_run[i], last_k) for i in have]
    totals = [total_batch_use(records_per_run[i], last_k) for i in have]
    num_layers = max(len(m) for m in means)

    def cell(values: list, layer: int, kind: str) -> str:
        return _fmt(values[layer], kind) if layer < len(values) else "—"

    rows = [[str(layer)] + [cell([m.get("batch_use", float("nan")) for m in run], layer, "pct")
                            for run in means] for layer in range(num_layers)]
    rows.append(["**Total**"] + [f"**{_fmt(t, 'pct')}**" for t in totals])
    out += ["### Table 5: per-batch use by run", "",
            _markdown_table(["Layer"] + [f"Batch Use (%) ({n})" for n in cols], rows), ""]
    spans = "; ".join(f"{n}: {_steps_phrase(last_layer_records(records_per_run[i], last_k))}"
                      for n, i in zip(cols, have))
    out += [f"*Table 5: percent of the layer's current d_ff units used anywhere in a batch, "
            f"per run ({spans}). Total: units used summed over layers / widths summed over "
            f"layers (the width-weighted mean).*", ""]

    rows = [[str(layer)] + [cell(u, layer, "int") for u in used] for layer in range(num_layers)]
    rows.append(["**Total**"] + [f"**{_fmt(sum(u for u in run if math.isfinite(u)), 'int')}**"
                                 for run in used])
    out += ["### Table 4: hidden units used per batch by run", "",
            _markdown_table(["Layer"] + [f"Units Used ({n})" for n in cols], rows), ""]
    out += ["*Table 4: number of hidden units used anywhere in a batch (per-batch use x d_ff, "
            "averaged over the same steps as Table 5), per run.*", ""]
    if missing:
        out += [f"Runs without per-layer metrics, left out: {', '.join(missing)}.", ""]
    return "\n".join(out)
