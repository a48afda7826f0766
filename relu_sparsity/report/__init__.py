"""The paper's tables and figures from one or more run folders (`relu-sparsity report RUN...`).

Reads only what a run writes (`config.json`, `metrics.jsonl`, through `runs.reader`), so a
report can be made on a machine without JAX, and every printed number can be recomputed from
`metrics.jsonl`:

- Tables 1-3 (paper section 3): per layer, the mean of each metric over the last `last_k` logged
  steps that have per-layer metrics (one batch is noisy) (`tables`, `numbers`).
- With several runs, Table 5's comparison of per-batch use (section 5) with a width-weighted Total
  row, and Table 4's count of hidden units used (section 4.4).
- Figures 1, 2 and appendix A.1 / A.2, the unit states over training, and the loss curves
  (`figures`).
- With `paper`, each run beside the paper's own numbers (`paper`): one table and a bar figure of
  per-batch use by layer for all runs, then each run's Tables 1, 2, 3 and 5.
"""

from pathlib import Path

from relu_sparsity.report.figures import paper_batch_use_plot, write_plots
from relu_sparsity.report.numbers import final_means, used_units, with_layers
from relu_sparsity.report.paper import (
    PAPER_MODEL,
    TABLE1,
    batch_use_by_run,
    format_paper_comparison,
)
from relu_sparsity.report.tables import format_comparison, format_tables
from relu_sparsity.runs.reader import read_config_or_empty, read_metrics, read_units, run_name

TABLES_FILE = "tables.md"
PLOTS_DIR = "plots"

__all__ = ["used_units", "write_report"]


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
                 last_k: int = 5, paper: bool = False) -> Path:
    """Write `out_dir/tables.md` and `out_dir/plots/*.png` for these runs; return tables.md's path.

    `out_dir` defaults to the run's folder when there is one run; with several it is required
    (no single run folder is the natural home of a comparison). `paper`: each run's Tables 1, 2,
    3 and 5 beside the paper's own numbers (report/paper.py).
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

    records_per_run = [read_metrics(d) for d in dirs]  # fails first, before anything is written
    configs = [read_config_or_empty(d) for d in dirs]
    names = _unique_names([run_name(d, c) for d, c in zip(dirs, configs)], dirs)

    doc = ["# Activation sparsity report", "",
           f"Runs: {', '.join(names)}. Tables average the last {last_k} logged steps that have "
           "per-layer metrics (one batch is noisy).", ""]
    units = [read_units(d) for d in dirs]
    for name, recs, config, d, run_units in zip(names, records_per_run, configs, dirs, units):
        doc.append(format_tables(name, recs, last_k, config=config, run_dir=d,
                                 every_step=run_units is not None))
    if len(dirs) > 1:
        doc.append(format_comparison(names, records_per_run, configs, last_k))
    plots = write_plots(list(zip(names, records_per_run)), out / PLOTS_DIR, units)
    if paper:
        means = [final_means(recs, last_k) for recs in records_per_run]
        doc += ["## Against the paper", "",
                f"Per-batch use (%) by layer, the mean of each run's last {last_k} logged steps, "
                f"and the paper's ({PAPER_MODEL}):", "", batch_use_by_run(names, means), ""]
        doc += [format_paper_comparison(name, recs, config, last_k)
                for name, recs, config in zip(names, records_per_run, configs)]
        if any(means):
            path = out / PLOTS_DIR / "paper_batch_use.png"
            paper_batch_use_plot(path, [(n, m) for n, m in zip(names, means) if m],
                                 [row[2] for row in TABLE1])
            plots.append(path)

    doc += ["## Figures", ""]
    if not any(with_layers(recs) for recs in records_per_run):
        doc += ["Sparsity figures skipped: no run has per-layer metrics (instrumentation off). "
                "Only the loss curves are drawn.", ""]
    for p in plots:
        doc += [f"![{p.stem}]({PLOTS_DIR}/{p.name})", ""]

    path = out / TABLES_FILE
    path.write_text("\n".join(doc), encoding="utf-8")
    return path
