"""The paper's tables and figures from one or more run folders (`relu-sparsity report RUN...`).

Reads only what a run writes (`config.json`, `metrics.jsonl`), so a report can be made on a
machine without JAX, and every printed number can be recomputed from `metrics.jsonl`:

- Tables 1-3 (paper section 3): per layer, the mean of each metric over the last `last_k` logged
  steps that have per-layer metrics (one batch is noisy; DESIGN.md "Metrics").
- With several runs, Table 5's comparison of per-batch use (section 5) with a width-weighted Total
  row, and Table 4's count of hidden units used (section 4.4).
- Figures 1, 2 and appendix A.1 / A.2, the unit states over training, and the loss curves.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TABLES_FILE = "tables.md"
PLOTS_DIR = "plots"
DPI = 120

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
    "units off in batch 0 and in every logged batch since."
)
TABLE3_CAPTION = (
    "For each sequence, take the hidden units used at least once in it; the Nth Perc column is "
    "the percent of the sequence's tokens on which the Nth-percentile unit of that subset is used "
    "(appendix A.6.1 on the 0/1 use indicator), averaged over sequences."
)

LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# Below this many points per curve, markers make single steps visible.
MARKER_MAX_POINTS = 40


# ---------------------------------------------------------------------------------------------
# Reading a run


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The parsed lines of `run_dir/metrics.jsonl`, in file order.

    A run interrupted mid-write can leave a truncated last line: it is skipped with a warning.
    A bad line anywhere else means the file is corrupt, and that is an error.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    # Index of the last non-blank line: only that one may be a partial write.
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                log.warning("%s: skipping truncated last line %d (%s)", path, i + 1, err)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        records.append(record)
    return records


def load_config(run_dir: str | Path) -> dict:
    """`run_dir/config.json`, or {} when it is missing or unreadable (the report still works)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        log.warning("%s is missing; the report uses the folder name and the metrics only", path)
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        log.warning("%s is not valid JSON (%s); ignoring it", path, err)
        return {}
    return config if isinstance(config, dict) else {}


def run_name(run_dir: str | Path, config: dict) -> str:
    name = config.get("name")
    return str(name) if name else Path(run_dir).resolve().name


def layer_records(records: Iterable[dict]) -> list[dict]:
    """Records that carry per-layer metrics (instrumentation off leaves `layers` absent/empty)."""
    return [r for r in records if r.get("layers")]


def last_layer_records(records: Sequence[dict], last_k: int) -> list[dict]:
    """The last `last_k` records that have per-layer metrics: the window the tables average."""
    if last_k < 1:
        raise ValueError(f"last_k must be >= 1, got {last_k}")
    return layer_records(records)[-last_k:]


# ---------------------------------------------------------------------------------------------
# Numbers


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / null / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[Any]) -> float:
    """Mean of the finite values; NaN when there are none (printed as 'n/a')."""
    kept = [v for v in (_number(x) for x in values) if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def final_means(records: list[dict], last_k: int) -> list[dict]:
    """Per layer: the mean of each numeric key over the last `last_k` records that have layers.

    A key missing (or NaN) in some of those records is averaged over the records that have it,
    so one bad step does not blank a cell.
    """
    window = last_layer_records(records, last_k)
    num_layers = max((len(r["layers"]) for r in window), default=0)
    means: list[dict] = []
    for layer in range(num_layers):
        rows = [r["layers"][layer] for r in window if layer < len(r["layers"])]
        keys = dict.fromkeys(k for row in rows for k in row)  # first-seen order, no duplicates
        means.append({k: _mean(row.get(k) for row in rows) for k in keys})
    return means


def used_units(records: list[dict], last_k: int) -> list[float]:
    """Per layer: mean over the window of batch_use * d_ff, the count of units used per batch."""
    window = last_layer_records(records, last_k)
    num_layers = max((len(r["layers"]) for r in window), default=0)
    out = []
    for layer in range(num_layers):
        products = []
        for r in window:
            if layer < len(r["layers"]):
                use = _number(r["layers"][layer].get("batch_use"))
                width = _number(r["layers"][layer].get("d_ff"))
                if use is not None and width is not None:
                    products.append(use * width)
        out.append(_mean(products))
    return out


def total_batch_use(records: list[dict], last_k: int) -> float:
    """Table 5's Total: units used over all layers / width over all layers (width-weighted)."""
    used = used_units(records, last_k)
    widths = [m.get("d_ff", float("nan")) for m in final_means(records, last_k)]
    pairs = [(u, w) for u, w in zip(used, widths) if math.isfinite(u) and math.isfinite(w)]
    total_width = sum(w for _, w in pairs)
    return sum(u for u, _ in pairs) / total_width if total_width > 0 else float("nan")


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
    for r in layer_records(records):
        for i, layer in enumerate(r["layers"]):
            seen.setdefault(i, set()).add(str(layer.get("d_ff")))
    return any(len(widths) > 1 for widths in seen.values())


def _layer_widths(record: dict) -> list[Any]:
    return [layer.get("d_ff") for layer in record.get("layers") or []]


# ---------------------------------------------------------------------------------------------
# Markdown


def _config_get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _widths_phrase(config: dict, records: list[dict]) -> str:
    """'d_ff 512 x 3 layers' or 'd_ff [512, 256, 512]', plus the final widths if they changed."""
    with_layers = layer_records(records)
    configured = _config_get(config, "model.d_ff")
    num_layers = _config_get(config, "model.num_layers")
    if configured is None and with_layers:
        configured = _layer_widths(with_layers[0])
    if isinstance(configured, list) and len(set(map(str, configured))) == 1:
        num_layers, configured = len(configured), configured[0]
    if configured is None:
        phrase = "d_ff unknown"
    elif isinstance(configured, list):
        phrase = f"d_ff {configured}"
    else:
        phrase = f"d_ff {configured}" + (f" x {num_layers} layers" if num_layers else "")
    if with_layers:
        first, final = _layer_widths(with_layers[0]), _layer_widths(with_layers[-1])
        if final != first:
            phrase += f" (at step {with_layers[-1].get('step')}: {final})"
    return phrase


def _summary_line(config: dict, records: list[dict], run_dir: str | Path | None) -> str:
    parts = []
    if run_dir is not None:
        parts.append(f"`{run_dir}`")
    if records:
        parts.append(f"steps: {records[-1].get('step')} ({len(records)} logged)")
        loss = _number(records[-1].get("loss"))
        parts.append(f"final train loss {loss:.4f}" if loss is not None else "final train loss n/a")
    evals = [r for r in records if _number(r.get("eval_loss")) is not None]
    if evals:
        last = evals[-1]
        text = f"last eval (step {last.get('step')}): loss {last['eval_loss']:.4f}"
        acc = _number(last.get("eval_accuracy"))
        if acc is not None:
            text += f", accuracy {100.0 * acc:.2f}%"
        parts.append(text)
    else:
        parts.append("no eval logged")
    entropy = _number(_config_get(config, "corpus.unigram_entropy_nats"))
    if entropy is not None:  # the loss a model that ignores context would reach
        parts.append(f"unigram entropy {entropy:.3f}")
    # Median, so the first step (which includes compilation) does not drag the figure down.
    speeds = [s for s in (_number(r.get("tokens_per_s")) for r in records) if s and s > 0]
    if speeds:
        parts.append(f"tokens/s median {float(np.median(speeds)):,.0f}")
    peak_lr = _number(_config_get(config, "train.peak_lr"))
    if peak_lr is None:  # fall back to the largest logged learning rate
        lrs = [x for x in (_number(r.get("lr")) for r in records) if x is not None]
        peak_lr = max(lrs) if lrs else None
    if peak_lr is not None:
        parts.append(f"peak LR {peak_lr:g}")
    parts.append(_widths_phrase(config, records))
    instrument = config.get("instrument")
    if instrument:
        parts.append(f"instrument: {instrument}")
    return " · ".join(parts)


NO_LAYERS_NOTE = (
    "Sparsity tables are unavailable: no logged step has per-layer metrics "
    "(the run was trained with instrumentation off, or logged no layer statistics)."
)


def format_tables(run_name: str, records: list[dict], last_k: int, *,
                  config: dict | None = None, run_dir: str | Path | None = None) -> str:
    """Markdown for one run: a heading, a one-line summary, and the paper's Tables 1-3."""
    config = config or {}
    out = [f"## {run_name}", "", _summary_line(config, records, run_dir), ""]
    window = last_layer_records(records, last_k)
    if not window:
        out += [NO_LAYERS_NOTE, ""]
        return "\n".join(out)

    means = final_means(records, last_k)
    span = _steps_phrase(window)
    extra: list[tuple[str, list[str]]] = []
    first = _layer_widths(layer_records(records)[0])
    last = _layer_widths(window[-1])
    changed = _widths_changed(records)
    if changed or len(set(map(str, last))) > 1:
        extra = [("Width", [str(w) for w in last])]
    if changed:
        # Table 2's fractions are of the original width, Table 1's of the current one: show both.
        extra.append(("Orig. Width", [str(w) for w in first]))
    if len(window) < last_k:
        span += f" (only {len(window)} logged steps have per-layer metrics; {last_k} were asked for)"

    out += [
        "### Table 1: hidden unit use per token, sequence and batch", "",
        _metric_table(means, TABLE1), "",
        f"*Table 1: {span}. {TABLE1_CAPTION}*", "",
        "### Table 2: unit states relative to the first batch", "",
        _metric_table(means, TABLE2, extra), "",
        f"*Table 2: {span}. {TABLE2_CAPTION}"
        + (" Width: d_ff at the last logged step." if extra else "")
        + (" Orig. Width: d_ff at the first." if len(extra) > 1 else "") + "*", "",
        "### Table 3: use-frequency percentiles within a sequence", "",
        _metric_table(means, TABLE3), "",
        f"*Table 3: {span}. {TABLE3_CAPTION}*", "",
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

    have = [i for i, recs in enumerate(records_per_run) if layer_records(recs)]
    if not have:
        out += [NO_LAYERS_NOTE, ""]
        return "\n".join(out)
    missing = [names[i] for i in range(len(names)) if i not in have]
    cols = [names[i] for i in have]
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


# ---------------------------------------------------------------------------------------------
# Figures


def _layer_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a [steps, layers] array of `key`; NaN (a gap in the curve) where missing."""
    recs = layer_records(records)
    num_layers = max((len(r["layers"]) for r in recs), default=0)
    steps = np.array([_number(r.get("step")) for r in recs], dtype=float)
    values = np.full((len(recs), num_layers), np.nan)
    for t, r in enumerate(recs):
        for i, layer in enumerate(r["layers"]):
            v = _number(layer.get(key))
            if v is not None:
                values[t, i] = v
    return steps, values


def _layer_colors(num_layers: int) -> list:
    # Sequential colormap so depth order reads off the colour; stop before viridis' palest yellow.
    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(num_layers, 1))][:num_layers]


def _finish(fig: Figure, path: Path, handles: list[Line2D]) -> None:
    ncol = 1 if len(handles) <= 16 else 2
    fig.legend(handles=handles, loc="outside right upper", ncol=ncol, fontsize="small")
    fig.savefig(path, dpi=DPI)


def _run_style(r: int, few_points: bool) -> tuple[str, str | None]:
    """Linestyle and marker of the r-th run; markers when curves are short or styles run out."""
    marker = MARKERS[r % len(MARKERS)] if few_points or r >= len(LINESTYLES) else None
    return LINESTYLES[r % len(LINESTYLES)], marker


def _layer_plot(path: Path, runs: list[tuple[str, list[dict]]], title: str,
                panels: list[tuple[str, str, str]], ncols: int) -> None:
    """One figure: a panel per (metric key, panel title, y label); colour = layer, style = run."""
    runs = [(n, recs) for n, recs in runs if layer_records(recs)]
    num_layers = max(len(r["layers"]) for _, recs in runs for r in layer_records(recs))
    colors = _layer_colors(num_layers)
    few = max(len(layer_records(recs)) for _, recs in runs) <= MARKER_MAX_POINTS
    styles = [_run_style(r, few) for r in range(len(runs))]
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols + 1.6, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, panel_title, ylabel) in zip(axes, panels):
        for (_, recs), (linestyle, marker) in zip(runs, styles):
            steps, values = _layer_series(recs, key)
            for layer in range(values.shape[1]):
                ax.plot(steps, values[:, layer], color=colors[layer], linestyle=linestyle,
                        marker=marker, markersize=3, linewidth=1.4)
        ax.set_title(panel_title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title if len(runs) > 1 else f"{title} — {runs[0][0]}")
    handles = [Line2D([], [], color=c, linewidth=2, label=f"layer {i}") for i, c in enumerate(colors)]
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", linestyle=linestyle, marker=marker,
                           markersize=4, label=name)
                    for (name, _), (linestyle, marker) in zip(runs, styles)]
    _finish(fig, path, handles)


FRACTION_D_FF = "fraction of d_ff"
FRACTION_TOKENS = "fraction of the sequence's tokens"
FRACTION_ORIG = "fraction of original d_ff"

# file name -> (suptitle, panels, columns)
LAYER_FIGURES = {
    "fig1_batch_use.png": (
        "Hidden units used per batch (Figure 1)",
        [("batch_use", "per-batch use", FRACTION_D_FF)], 1),
    "fig2_token_use_p50.png": (
        "Per-token use and median use frequency (Figure 2)",
        [("token_use", "(a) per-token use", FRACTION_D_FF),
         ("p50", "(b) 50th-percentile use frequency", FRACTION_TOKENS)], 2),
    "use_token_seq_batch.png": (
        "Hidden unit use per token, sequence and batch (A.1)",
        [("token_use", "per-token use", FRACTION_D_FF),
         ("seq_use", "per-sequence use", FRACTION_D_FF),
         ("batch_use", "per-batch use", FRACTION_D_FF)], 3),
    "percentiles.png": (
        "Use-frequency percentiles within a sequence (A.2)",
        [("p50", "50th percentile", FRACTION_TOKENS), ("p65", "65th percentile", FRACTION_TOKENS),
         ("p75", "75th percentile", FRACTION_TOKENS), ("p90", "90th percentile", FRACTION_TOKENS)],
        2),
    "unit_states.png": (
        "Unit states relative to the first batch",
        [("turned_on", "turned on (off in batch 0, on now)", FRACTION_ORIG),
         ("turned_off", "turned off (on in batch 0, off now)", FRACTION_ORIG),
         ("final", "final (on in this batch)", FRACTION_ORIG),
         ("never_on", "never on (off in every logged batch)", FRACTION_ORIG)], 2),
}


def _loss_plot(path: Path, runs: list[tuple[str, list[dict]]]) -> None:
    """Train and eval loss (left), eval accuracy (right, when any run evaluated)."""
    has_acc = any(_number(r.get("eval_accuracy")) is not None for _, recs in runs for r in recs)
    fig = Figure(figsize=(11.5 if has_acc else 7.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False).ravel()
    colors = colormaps["tab10"].colors
    handles = []
    for r, (name, recs) in enumerate(runs):
        color = colors[r % len(colors)]
        prefix = f"{name}: " if len(runs) > 1 else ""
        train = [(s, x) for s, x in ((_number(q.get("step")), _number(q.get("loss"))) for q in recs)
                 if s is not None and x is not None]
        evals = [(s, x, _number(q.get("eval_accuracy")))
                 for s, x, q in ((_number(q.get("step")), _number(q.get("eval_loss")), q)
                                 for q in recs) if s is not None and x is not None]
        if train:
            s, x = zip(*train)
            marker = "." if len(s) <= MARKER_MAX_POINTS else None
            axes[0].plot(s, x, color=color, linewidth=1.3, marker=marker)
            handles.append(Line2D([], [], color=color, label=prefix + "train loss"))
        if evals:
            s, x, acc = zip(*evals)
            axes[0].plot(s, x, color=color, linestyle="--", marker="o", markersize=4)
            handles.append(Line2D([], [], color=color, linestyle="--", marker="o",
                                  label=prefix + "eval loss"))
            acc_pts = [(a, b) for a, b in zip(s, acc) if b is not None]
            if has_acc and acc_pts:
                axes[1].plot(*zip(*acc_pts), color=color, linestyle="-.", marker="s",
                             markersize=4)
                handles.append(Line2D([], [], color=color, linestyle="-.", marker="s",
                                      label=prefix + "eval accuracy"))
    axes[0].set_title("loss")
    axes[0].set_ylabel("cross-entropy loss")
    if has_acc:
        axes[1].set_title("eval accuracy")
        axes[1].set_ylabel("next-token accuracy")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
        ax.grid(alpha=0.3)
    fig.suptitle("Training and evaluation" + ("" if len(runs) > 1 else f" — {runs[0][0]}"))
    _finish(fig, path, handles)


def write_plots(runs: list[tuple[str, list[dict]]], plots_dir: Path) -> list[Path]:
    """Every figure for these runs, drawn on shared axes; the sparsity ones only with layer data."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if any(layer_records(recs) for _, recs in runs):
        for name, (title, panels, ncols) in LAYER_FIGURES.items():
            _layer_plot(plots_dir / name, runs, title, panels, ncols)
            written.append(plots_dir / name)
    _loss_plot(plots_dir / "loss.png", runs)
    written.append(plots_dir / "loss.png")
    return written


# ---------------------------------------------------------------------------------------------
# The report


def _unique_names(names: list[str], run_dirs: list[Path]) -> list[str]:
    """Run names as columns and legend entries must differ: suffix duplicates with the folder."""
    out = []
    for name, run_dir in zip(names, run_dirs):
        if names.count(name) > 1:
            name = f"{name} ({run_dir.name})"
        out.append(name)
    # Same folder name too (e.g. runs/a/x and runs/b/x): fall back to the position.
    return [f"{n} #{i}" if out.count(n) > 1 else n for i, n in enumerate(out)]


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, *,
                 last_k: int = 5) -> Path:
    """Write `out_dir/tables.md` and `out_dir/plots/*.png` for these runs; return tables.md's path.

    `out_dir` defaults to the run's folder when there is one run; with several it is required
    (no single run folder is the natural home of a comparison).
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("write_report needs at least one run folder")
    if last_k < 1:
        raise ValueError(f"last_k must be >= 1, got {last_k}")
    if out_dir is None:
        if len(dirs) > 1:
            raise ValueError("out_dir is required when reporting several runs")
        out_dir = dirs[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    records_per_run = [load_metrics(d) for d in dirs]  # fails first, before anything is written
    configs = [load_config(d) for d in dirs]
    names = _unique_names([run_name(d, c) for d, c in zip(dirs, configs)], dirs)

    doc = ["# Activation sparsity report", "",
           f"Runs: {', '.join(names)}. Tables average the last {last_k} logged steps that have "
           "per-layer metrics (one batch is noisy).", ""]
    for name, recs, config, d in zip(names, records_per_run, configs, dirs):
        doc.append(format_tables(name, recs, last_k, config=config, run_dir=d))
    if len(dirs) > 1:
        doc.append(format_comparison(names, records_per_run, configs, last_k))

    plots = write_plots(list(zip(names, records_per_run)), out / PLOTS_DIR)
    doc += ["## Figures", ""]
    if not any(layer_records(recs) for recs in records_per_run):
        doc += ["Sparsity figures skipped: no run has per-layer metrics (instrumentation off). "
                "Only the loss curves are drawn.", ""]
    for p in plots:
        doc += [f"![{p.stem}]({PLOTS_DIR}/{p.name})", ""]

    path = out / TABLES_FILE
    path.write_text("\n".join(doc), encoding="utf-8")
    return path
