"""The report's figures: Figures 1 and 2 and appendix A.1 / A.2 of the paper, the unit states
over training, and the loss curves; several runs share axes (colour = layer, style = run)."""

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from relu_sparsity.report.numbers import number, prune_step, with_layers

DPI = 120
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# Below this many points per curve, markers make single steps visible.
MARKER_MAX_POINTS = 40


def _layer_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a [steps, layers] array of `key`; NaN (a gap in the curve) where missing."""
    recs = with_layers(records)
    num_layers = max((len(r["layers"]) for r in recs), default=0)
    steps = np.array([number(r.get("step")) for r in recs], dtype=float)
    values = np.full((len(recs), num_layers), np.nan)
    for t, r in enumerate(recs):
        for i, layer in enumerate(r["layers"]):
            v = number(layer.get(key))
            if v is not None:
                values[t, i] = v
    return steps, values


def layer_colors(num_layers: int) -> list:
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
    runs = [(n, recs) for n, recs in runs if with_layers(recs)]
    num_layers = max(len(r["layers"]) for _, recs in runs for r in with_layers(recs))
    colors = layer_colors(num_layers)
    few = max(len(with_layers(recs)) for _, recs in runs) <= MARKER_MAX_POINTS
    styles = [_run_style(r, few) for r in range(len(runs))]
    prune_steps = [prune_step(recs) for _, recs in runs]
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols + 1.6, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, panel_title, ylabel) in zip(axes, panels):
        for (_, recs), (linestyle, marker) in zip(runs, styles):
            steps, values = _layer_series(recs, key)
            for layer in range(values.shape[1]):
                ax.plot(steps, values[:, layer], color=colors[layer], linestyle=linestyle,
                        marker=marker, markersize=3, linewidth=1.4)
        for pruned, (linestyle, _) in zip(prune_steps, styles):
            if pruned is not None:  # after it, "current d_ff" is the kept width
                ax.axvline(pruned, color=PRUNE_COLOR, linestyle=linestyle, linewidth=1.0)
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
    if any(pruned is not None for pruned in prune_steps):
        handles.append(Line2D([], [], color=PRUNE_COLOR, linewidth=1.0,
                              label="prune step (after it:\nfraction of the kept d_ff)"))
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", linestyle=linestyle, marker=marker,
                           markersize=4, label=name)
                    for (name, _), (linestyle, marker) in zip(runs, styles)]
    _finish(fig, path, handles)


FRACTION_D_FF = "fraction of current d_ff"
PRUNE_COLOR = "0.45"
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
    has_acc = any(number(r.get("eval_accuracy")) is not None for _, recs in runs for r in recs)
    fig = Figure(figsize=(11.5 if has_acc else 7.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False).ravel()
    colors = colormaps["tab10"].colors
    handles = []
    for r, (name, recs) in enumerate(runs):
        color = colors[r % len(colors)]
        prefix = f"{name}: " if len(runs) > 1 else ""
        train = [(s, x) for s, x in ((number(q.get("step")), number(q.get("loss"))) for q in recs)
                 if s is not None and x is not None]
        evals = [(s, x, number(q.get("eval_accuracy")))
                 for s, x, q in ((number(q.get("step")), number(q.get("eval_loss")), q)
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


def unit_life_plot(path: Path, name: str, units: dict) -> None:
    """From one run's unit histories: (a) the share of each layer's units not used since step t
    (dead by t: when units died), (b) the share that came back after an off period longer than
    g steps."""
    layers, last_step = units["layers"], units["step"]
    colors = layer_colors(len(layers))
    fig = Figure(figsize=(11.5, 4.2), layout="constrained")
    dead_ax, back_ax = fig.subplots(1, 2)
    steps = np.arange(last_step + 1)
    for i, (layer, color) in enumerate(zip(layers, colors)):
        last_on = np.sort(layer["last_on"])
        dead = np.searchsorted(last_on, steps, side="left") / last_on.size
        dead_ax.plot(steps, dead, color=color, linewidth=1.4)
        gaps = np.sort(layer["longest_off"])
        came_back = 1.0 - np.searchsorted(gaps, steps, side="right") / gaps.size
        back_ax.plot(steps, came_back, color=color, linewidth=1.4)
    dead_ax.set_title("(a) units not used since step t (dead by t)")
    dead_ax.set_ylabel("fraction of original d_ff")
    back_ax.set_title("(b) units that came back after more than g steps off")
    back_ax.set_xlabel("g (steps)")
    back_ax.set_ylabel("fraction of original d_ff")
    back_ax.set_yscale("symlog", linthresh=1e-3)
    dead_ax.set_xlabel("training step t")
    for ax in (dead_ax, back_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Unit life over every step (to step {last_step}) — {name}")
    handles = [Line2D([], [], color=c, linewidth=2, label=f"layer {i}")
               for i, c in enumerate(colors)]
    _finish(fig, path, handles)


def paper_batch_use_plot(path: Path, runs: list[tuple[str, list[dict]]],
                         paper: list[float]) -> None:
    """Per-batch use by layer as grouped bars: each run's (the mean of its last logged steps,
    `runs` as (name, per-layer means)) beside the paper's (`paper`, %), hatched."""
    layers = max([len(paper), *(len(means) for _, means in runs)])
    width = 0.8 / (len(runs) + 1)
    fig = Figure(figsize=(max(6.0, 1.1 * layers + 2.5), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(layers)
    colors = colormaps["tab10"].colors
    for r, (name, means) in enumerate(runs):
        values = [number(m.get("batch_use")) for m in means] + [None] * (layers - len(means))
        ax.bar(x + r * width, [np.nan if v is None else 100 * v for v in values], width,
               color=colors[r % len(colors)], label=name)
    ax.bar(x + len(runs) * width, list(paper) + [np.nan] * (layers - len(paper)), width,
           color="white", edgecolor="black", hatch="//", label="paper (Table 1)")
    ax.set_xticks(x + width * len(runs) / 2, [str(i) for i in range(layers)])
    ax.set_xlabel("layer")
    ax.set_ylabel("per-batch use (% of d_ff)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Per-batch use by layer against the paper")
    fig.legend(loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=DPI)


def write_plots(runs: list[tuple[str, list[dict]]], plots_dir: Path,
                units: list[dict | None] | None = None) -> list[Path]:
    """Every figure for these runs, drawn on shared axes; the sparsity ones only with layer data,
    a unit-life figure per run with unit histories."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (name, _), run_units in zip(runs, units or [None] * len(runs)):
        if run_units is not None:
            path = plots_dir / ("unit_life.png" if len(runs) == 1 else f"unit_life_{name}.png")
            unit_life_plot(path, name, run_units)
            written.append(path)
    if any(with_layers(recs) for _, recs in runs):
        for name, (title, panels, ncols) in LAYER_FIGURES.items():
            _layer_plot(plots_dir / name, runs, title, panels, ncols)
            written.append(plots_dir / name)
    _loss_plot(plots_dir / "loss.png", runs)
    written.append(plots_dir / "loss.png")
    return written
