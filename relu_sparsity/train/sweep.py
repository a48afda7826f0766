"""The paper's sweeps (section 5) as one command: learning rate (Table 5), width (Figure 3) and
depth (Figure 4), one axis or a product, each point a normal run folder from the same seed and
data order. A sweep started again skips its finished and diverged points and resumes the
interrupted one from its checkpoint."""

import itertools
import json
import logging
import math
from pathlib import Path

from matplotlib.figure import Figure

from relu_sparsity.report import write_report
from relu_sparsity.report.figures import layer_colors
from relu_sparsity.report.numbers import diverged_step, final_means, number
from relu_sparsity.report.tables import format_comparison
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.runs import lock
from relu_sparsity.runs.reader import config_value, read_config_or_empty, read_metrics
from relu_sparsity.train.config import Config, apply_overrides
from relu_sparsity.train.trainer import Diverged, train

log = logging.getLogger(__name__)

# sweep axis -> (config field, short name in run folder names)
AXES = {"lr": ("train.peak_lr", "lr"), "d_ff": ("model.d_ff", "dff"),
        "layers": ("model.num_layers", "layers")}


def sweep_points(axes: dict[str, list]) -> list[dict]:
    """Every combination of the given axes' values, in order: [{axis: value}, ...]."""
    given = {k: v for k, v in axes.items() if v}
    if not given:
        raise ValueError("a sweep needs at least one axis: --lr, --d-ff or --layers")
    return [dict(zip(given, values)) for values in itertools.product(*given.values())]


def point_name(point: dict) -> str:
    return ",".join(f"{AXES[k][1]}={v:g}" if isinstance(v, float) else f"{AXES[k][1]}={v}"
                    for k, v in point.items())


def point_config(config: Config, point: dict) -> Config:
    overrides = [f"{AXES[k][0]}={json.dumps(v)}" for k, v in point.items()]
    return apply_overrides(config, [*overrides, f"name={point_name(point)}"])


def finished(run: Path, config: Config) -> bool:
    """A point that needs no more training: it reached its last step, or it diverged."""
    folder = RunFolder(run)
    steps = folder.checkpoint_steps()
    if steps and steps[-1] >= config.train.steps:
        return True
    return diverged_step(read_metrics(run, missing_ok=True)) is not None


def run_sweep(config: Config, out_dir: str | Path, axes: dict[str, list], *,
              progress: bool = True) -> Path:
    """Trains every point not yet finished, then writes sweep.md, the figures and the shared
    report. Raises Interrupted as train does (run it again to resume)."""
    out = Path(out_dir)
    points = sweep_points(axes)
    configs = [point_config(config, p) for p in points]  # every point checked before any work
    runs = [out / point_name(p) for p in points]
    with lock.folder_held(out, "sweep folder"):
        train_points(configs, runs, progress)
        return write_sweep(config, out, points, runs)


def train_points(configs, runs, progress: bool) -> None:
    for point_cfg, run in zip(configs, runs, strict=True):
        if finished(run, point_cfg):
            log.info("sweep: %s is done", run.name)
            continue
        log.info("sweep: training %s", run.name)
        try:
            train(point_cfg, run, progress=progress)
        except Diverged as err:
            log.warning("sweep: %s diverged (%s); the sweep goes on", run.name, err)


def write_sweep(config: Config, out: Path, points, runs) -> Path:
    records = [read_metrics(run) for run in runs]
    write_report(runs, out, last_k=config.train.mean_last)
    figures = [draw_use_against(axis, points, records, config.train.mean_last, out / "plots")
               for axis in ("d_ff", "layers") if len({p.get(axis) for p in points}) > 1]
    table = out / "sweep.md"
    configs = [read_config_or_empty(run) for run in runs]
    table.write_text(sweep_markdown(points, records, configs, config.train.mean_last, figures))
    return table


def diverged_points(out_dir: str | Path, axes: dict[str, list]) -> list[str]:
    """The names of the sweep's points that diverged."""
    names = [point_name(p) for p in sweep_points(axes)]
    return [name for name in names
            if diverged_step(read_metrics(Path(out_dir) / name, missing_ok=True)) is not None]


def point_status(records: list[dict], config: dict) -> str:
    """finished, diverged at its step, the last step logged, or not run."""
    diverged = diverged_step(records)
    if diverged is not None:
        return f"**diverged at step {diverged}**"
    if not records:
        return "not run"
    steps = config_value(config, "train.steps")
    last = records[-1]["step"]
    return "finished" if steps is not None and last >= steps - 1 else f"stopped at step {last}"


def sweep_markdown(points, records, configs, last_k: int, figures: list[Path]) -> str:
    names = [point_name(p) for p in points]
    lines = ["# Sweep", "", "| point | status | final eval loss | final eval accuracy |",
             "| --- | --- | ---: | ---: |"]
    for name, recs, config in zip(names, records, configs, strict=True):
        evals = [r for r in recs if number(r.get("eval_loss")) is not None]
        loss = f"{evals[-1]['eval_loss']:.4f}" if evals else "n/a"
        acc = number(evals[-1].get("eval_accuracy")) if evals else None
        status = point_status(recs, config)
        lines.append(f"| {name} | {status} | {loss} | "
                     f"{'n/a' if acc is None else f'{100 * acc:.2f}%'} |")
    lines += ["", format_comparison(names, records, configs, last_k)]
    lines += [f"![{p.stem}](plots/{p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def draw_use_against(axis: str, points, records, last_k: int, plots_dir: Path) -> Path:
    """Figures 3 (width) and 4 (depth): per-batch and per-token use by layer against the axis,
    one line per layer (and per value of the other axes); diverged points are left out, never
    drawn as 0% use."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    groups: dict[tuple, list] = {}
    for point, recs in zip(points, records, strict=True):
        if diverged_step(recs) is not None or not recs:
            continue
        rest = tuple((k, v) for k, v in point.items() if k != axis)
        groups.setdefault(rest, []).append((point[axis], final_means(recs, last_k)))
    for ax, key, title in ((axes[0], "batch_use", "per-batch use"),
                           (axes[1], "token_use", "per-token use")):
        for rest, values in groups.items():
            values.sort(key=lambda v: v[0])
            depth = max(len(means) for _, means in values)
            for layer in range(depth):
                xs = [x for x, means in values if layer < len(means)]
                ys = [means[layer].get(key, math.nan) for _, means in values
                      if layer < len(means)]
                label = f"layer {layer}" + (f" ({point_name(dict(rest))})" if rest else "")
                ax.plot(xs, ys, marker="o", label=label, color=layer_colors(depth)[layer])
        ax.set_title(title)
        ax.set_xlabel({"d_ff": "d_ff (width)", "layers": "layers (depth)"}[axis])
        ax.set_ylabel("fraction of d_ff")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if axis == "d_ff":
            ax.set_xscale("log", base=2)
    axes[1].legend(fontsize="small")
    figure = "3" if axis == "d_ff" else "4"
    fig.suptitle(f"Use by layer against {'width' if axis == 'd_ff' else 'depth'} "
                 f"(Figure {figure})")
    path = plots_dir / f"fig{figure}_use_vs_{axis}.png"
    fig.savefig(path, dpi=120)
    return path

