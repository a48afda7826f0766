"""The paper's own numbers, as printed in its Tables 1, 2, 3 and 5 (Wild & Anderson, the
6-layer model of section 2.2: d_model 1024, d_ff 32768, C4, peak LR 3e-3, at convergence),
shipped so that `report --paper` sets a run's tables beside them and nobody retypes them; and the
Markdown of that comparison. Values are percents, per layer 0-5, in the tables' column order."""

import math

from relu_sparsity.report.numbers import final_means, number
from relu_sparsity.runs.reader import config_value

PAPER_MODEL = ("the paper's model: 6 layers, d_model 1024, d_ff 32768, C4, peak LR 3e-3, "
               "at convergence")

# Table 1: Per-Token, Per-Sequence, Per-Batch (%).
TABLE1 = [(4.1, 12.2, 13.3), (6.8, 71.7, 79.3), (7.1, 58.8, 71.0), (6.4, 54.2, 73.0),
          (2.6, 50.7, 86.1), (3.0, 58.0, 95.6)]
# Table 2: On Batch 0, Turned On, Turned Off, Final Use (%).
TABLE2 = [(97.0, 0.05, 83.8, 13.2), (93.2, 1.7, 15.6, 79.3), (90.9, 2.6, 22.5, 71.0),
          (89.0, 4.3, 20.2, 73.1), (88.2, 8.5, 10.6, 86.1), (87.5, 12.2, 3.8, 95.6)]
# Table 3: the 50th, 65th, 75th and 90th percentile units' use within a sequence (%).
TABLE3 = [(13.5, 31.3, 59.2, 94.6), (1.7, 2.9, 4.6, 40.0), (1.6, 3.2, 5.9, 51.1),
          (1.2, 2.3, 4.0, 35.2), (0.5, 0.8, 1.2, 3.7), (0.6, 1.1, 1.8, 6.9)]
# Table 5: per-batch use (%) by peak learning rate; its Total row is the mean over layers.
TABLE5 = {3e-3: (13.3, 79.3, 71.0, 73.0, 86.1, 95.6), 2e-3: (24.8, 83.2, 63.5, 71.7, 92.1, 98.0),
          1e-3: (37.4, 93.4, 55.8, 78.4, 99.1, 99.0), 5e-3: (19.9, 75.6, 76.4, 79.6, 80.0, 88.1)}
TABLE5_TOTAL = {3e-3: 69.7, 2e-3: 72.2, 1e-3: 77.2, 5e-3: 69.9}

COLUMNS = {  # the run's metric keys for each paper table's columns
    1: [("token_use", "Per-Token"), ("seq_use", "Per-Sequence"), ("batch_use", "Per-Batch")],
    2: [("on0", "On Batch 0"), ("turned_on", "Turned On"), ("turned_off", "Turned Off"),
        ("final", "Final Use")],
    3: [("p50", "50th Perc"), ("p65", "65th Perc"), ("p75", "75th Perc"), ("p90", "90th Perc")],
}
PAPER_ROWS = {1: TABLE1, 2: TABLE2, 3: TABLE3}


def pct(value) -> str:
    """A percent with one decimal (two where the paper printed two, as its 0.05)."""
    value = number(value)
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.1f}" if round(value, 1) == value or abs(value) >= 1 else f"{value:.2f}"


def side_by_side(table: int, means: list[dict]) -> str:
    """Table `table` (1-3) with each column twice, this run's value then the paper's; one row
    per layer of either."""
    columns = COLUMNS[table]
    header = ["Layer"] + [f"{title} (%) {who}" for _, title in columns for who in ("run",
                                                                                 "paper")]
    lines = ["| " + " | ".join(header) + " |",
             "| :--- |" + " ---: |" * (len(header) - 1)]
    paper = PAPER_ROWS[table]
    for layer in range(max(len(means), len(paper))):
        cells = [str(layer)]
        for j, (key, _) in enumerate(columns):
            ours = means[layer].get(key) if layer < len(means) else None
            cells += [pct(None if ours is None else 100 * ours),
                      pct(paper[layer][j] if layer < len(paper) else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table5(means: list[dict], peak_lr: float | None) -> str:
    """Per-batch use by layer: this run beside the paper's column at the run's peak LR, or all
    four of the paper's where the run's is not one of them; a Total row of layer means."""
    lrs = [peak_lr] if peak_lr in TABLE5 else sorted(TABLE5, reverse=True)
    ours = [100 * m["batch_use"] if number(m.get("batch_use")) is not None else None
            for m in means]
    header = ["Layer", f"run (LR={peak_lr:g})" if peak_lr else "run"] + [
        f"paper (LR={lr:g})" for lr in lrs]
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 1)]
    for layer in range(max(len(ours), 6)):
        cells = [str(layer), pct(ours[layer] if layer < len(ours) else None)]
        cells += [pct(TABLE5[lr][layer] if layer < 6 else None) for lr in lrs]
        lines.append("| " + " | ".join(cells) + " |")
    known = [x for x in ours if x is not None]
    total = sum(known) / len(known) if known and len(known) == len(ours) else None
    lines.append("| **Total** | " + " | ".join([pct(total)] + [pct(TABLE5_TOTAL[lr])
                                                             for lr in lrs]) + " |")
    return "\n".join(lines)


def format_paper_comparison(run_name: str, records: list[dict], config: dict,
                            last_k: int) -> str:
    """The run's Tables 1, 2, 3 and 5 beside the paper's (a run without per-layer metrics: a
    line saying so)."""
    means = final_means(records, last_k)
    out = [f"### {run_name} against the paper", ""]
    if not means:
        return "\n".join(out + ["No per-layer metrics to compare.", ""])
    layers = len(means)
    note = (f"The run: {layers} layers, d_ff {config_value(config, 'model.d_ff')}, the mean "
            f"over its last {last_k} logged steps; {PAPER_MODEL}.")
    if layers != 6:
        note += f" The paper's model has 6 layers; this run's {layers} are set beside its first."
    out += [note, ""]
    for table, title in ((1, "Table 1: use per token, sequence and batch"),
                         (2, "Table 2: unit states relative to the first batch"),
                         (3, "Table 3: use-frequency percentiles within a sequence")):
        out += [f"#### {title}", "", side_by_side(table, means), ""]
    peak_lr = number(config_value(config, "train.peak_lr"))
    out += ["#### Table 5: per-batch use by peak learning rate", "", table5(means, peak_lr), ""]
    return "\n".join(out)


def batch_use_by_run(names: list[str], means_per_run: list[list[dict]]) -> str:
    """Per-batch use (%) by layer, a row per run and the paper's Table 1 row last: the one table
    that sets runs differing in one factor (width, schedule, length) beside the paper."""
    layers = max([6, *(len(m) for m in means_per_run)])
    lines = ["| run | " + " | ".join(str(i) for i in range(layers)) + " |",
             "| :--- |" + " ---: |" * layers]
    for name, means in zip(names, means_per_run):
        cells = [pct(100 * m["batch_use"] if number(m.get("batch_use")) is not None else None)
                 for m in means] + [pct(None)] * (layers - len(means))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = [pct(row[2]) for row in TABLE1] + [pct(None)] * (layers - 6)
    lines.append("| paper (Table 1) | " + " | ".join(paper) + " |")
    return "\n".join(lines)
