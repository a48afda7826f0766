"""Tests for relu_sparsity.report: every printed number is recomputed from metrics.jsonl."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from relu_sparsity.report import numbers, tables, write_report
from relu_sparsity.runs import reader

NUM_LAYERS = 3
NUM_STEPS = 12
LAYER_KEYS = ["token_use", "seq_use", "batch_use", "token_per_seq", "seq_per_batch",
              "p50", "p65", "p75", "p90", "on0", "turned_on", "turned_off", "final", "never_on"]

TABLE1_HEADER = ["Layer", "Per-Token (%)", "Per-Sequence (%)", "Per-Batch (%)",
                 "Token/Seq Dims", "Seq/Batch Dims"]
TABLE2_HEADER = ["Layer", "On Batch 0 (%)", "Turned On (%)", "Turned Off (%)", "Final Use (%)",
                 "Never On (%)"]
TABLE3_HEADER = ["Layer", "50th Perc (%)", "65th Perc (%)", "75th Perc (%)", "90th Perc (%)"]


# ---------------------------------------------------------------------------------------------
# Synthetic runs


def _layer(rng: np.random.Generator, d_ff: int, on0: float) -> dict:
    token, seq, batch = np.sort(rng.uniform(0.01, 1.0, 3))  # token <= seq <= batch
    on, off = rng.uniform(0, 1 - on0), rng.uniform(0, on0)
    p = np.sort(rng.uniform(0, 1, 4))
    return {
        "d_ff": d_ff, "token_use": token, "seq_use": seq, "batch_use": batch,
        "token_per_seq": token / seq, "seq_per_batch": seq / batch,
        "p50": p[0], "p65": p[1], "p75": p[2], "p90": p[3],
        "on0": on0, "turned_on": on, "turned_off": off, "final": on0 + on - off,
        "never_on": rng.uniform(0, 1 - on0 - on),
    }


def make_run(root: Path, name: str, *, seed: int = 0, peak_lr: float = 1e-3,
             d_ff: int | list[int] = 64, layers: bool = True, truncate: bool = False,
             widths_at=None, eval_every: int = 4) -> Path:
    """A run folder: config.json and metrics.jsonl (step 0 = init, then every 10 steps)."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    config = {"name": name, "model": {"num_layers": NUM_LAYERS, "d_ff": d_ff, "d_model": 32},
              "train": {"peak_lr": peak_lr, "steps": 110, "batch_size": 4, "seq_len": 16},
              "instrument": "xla" if layers else "off"}
    (run / "config.json").write_text(json.dumps(config))
    widths = d_ff if isinstance(d_ff, list) else [d_ff] * NUM_LAYERS
    on0 = rng.uniform(0.5, 1.0, NUM_LAYERS)
    lines = []
    for t in range(NUM_STEPS):
        step = 10 * t
        rec = {"step": step, "loss": float(5.0 - 0.2 * t + rng.normal(0, 0.05)),
               "lr": peak_lr * min(1.0, t / 3), "tokens_per_s": float(rng.uniform(1e4, 2e4))}
        if t % eval_every == eval_every - 1:
            rec["eval_loss"] = float(rec["loss"] + 0.1)
            rec["eval_accuracy"] = float(rng.uniform(0.2, 0.6))
        w = widths_at(t) if widths_at else widths
        rec["layers"] = [_layer(rng, w[i], on0[i]) for i in range(NUM_LAYERS)] if layers else []
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if truncate:  # an interrupted write: half of one more line
        extra = json.dumps({"step": 10 * NUM_STEPS, "loss": 1.0, "layers": []})
        text += extra[: len(extra) // 2]
    (run / "metrics.jsonl").write_text(text)
    return run


def read_jsonl(run: Path) -> list[dict]:
    """An independent reader: complete lines only."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def window(records: list[dict], k: int) -> list[dict]:
    return [r for r in records if r.get("layers")][-k:]


def expected(records: list[dict], k: int, key: str) -> np.ndarray:
    """Per-layer mean of `key` over the last k records with layers, with numpy."""
    return np.array([[layer[key] for layer in r["layers"]] for r in window(records, k)]).mean(0)


def parse_tables(md: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Markdown tables keyed by the '### ...' heading above them: (header, rows)."""
    tables, heading, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            heading = line[4:]
        elif line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            block = []
            for row in lines[i:]:
                if not row.startswith("|"):
                    break
                block.append([c.strip() for c in row.strip().strip("|").split("|")])
            tables[heading] = (block[0], block[2:])
    return tables


def section(md: str, name: str) -> str:
    """The '## name' section of tables.md."""
    start = md.index(f"## {name}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def by_prefix(tables: dict, prefix: str):
    (hit,) = [v for k, v in tables.items() if k.startswith(prefix)]
    return hit


# ---------------------------------------------------------------------------------------------
# Fixtures: report writing draws six figures, so each report is built once per module.


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    run = make_run(root, "base", seed=1, truncate=True)
    path = write_report([run], last_k=5)
    return run, path


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    run_a = make_run(root, "lr1e-3", seed=2, peak_lr=0.001, d_ff=64)
    run_b = make_run(root, "lr3e-3", seed=3, peak_lr=0.003, d_ff=[64, 32, 128])
    path = write_report([run_a, run_b], root / "cmp", last_k=4)
    return (run_a, run_b), path


# ---------------------------------------------------------------------------------------------
# One run


def test_single_run_writes_into_run_folder_with_three_tables(single):
    run, path = single
    assert path == run / "tables.md"
    md = path.read_text()
    assert "## base" in md
    tables = parse_tables(md)
    for prefix, header in [("Table 1", TABLE1_HEADER), ("Table 2", TABLE2_HEADER),
                           ("Table 3", TABLE3_HEADER)]:
        got_header, rows = by_prefix(tables, prefix)
        assert got_header == header, prefix
        assert len(rows) == NUM_LAYERS, prefix
        assert [r[0] for r in rows] == [str(i) for i in range(NUM_LAYERS)]
    # Constant, equal widths: no Width column.
    assert "Width" not in by_prefix(tables, "Table 2")[0]


@pytest.mark.parametrize("prefix, columns", [
    ("Table 1", [("token_use", "pct"), ("seq_use", "pct"), ("batch_use", "pct"),
                 ("token_per_seq", "ratio"), ("seq_per_batch", "ratio")]),
    ("Table 2", [("on0", "pct"), ("turned_on", "pct"), ("turned_off", "pct"), ("final", "pct"),
                 ("never_on", "pct")]),
    ("Table 3", [("p50", "pct"), ("p65", "pct"), ("p75", "pct"), ("p90", "pct")]),
])
def test_every_cell_recomputes_from_jsonl(single, prefix, columns):
    run, path = single
    records = read_jsonl(run)
    _, rows = by_prefix(parse_tables(path.read_text()), prefix)
    for col, (key, kind) in enumerate(columns, start=1):
        want = expected(records, 5, key)
        got = np.array([float(r[col]) for r in rows])
        if kind == "pct":
            np.testing.assert_allclose(got, 100 * want, atol=0.05 + 1e-9, err_msg=key)
        else:
            np.testing.assert_allclose(got, want, atol=0.0005 + 1e-12, err_msg=key)


def test_captions_state_window_and_columns(single):
    run, path = single
    md = path.read_text()
    steps = [r["step"] for r in window(read_jsonl(run), 5)]
    assert steps == [70, 80, 90, 100, 110]  # the truncated line (step 120) is not counted
    phrase = f"mean over the last 5 logged steps, {steps[0]}-{steps[-1]}"
    for n in (1, 2, 3):
        assert re.search(rf"\*Table {n}: {re.escape(phrase)}\. \S", md), n
    assert "Never On: units off in batch 0" in md


def test_summary_line_recomputes(single):
    run, path = single
    records = read_jsonl(run)
    md = path.read_text()
    summary = section(md, "base").splitlines()[2]
    assert f"steps: {records[-1]['step']} ({len(records)} logged)" in summary
    assert f"final train loss {records[-1]['loss']:.4f}" in summary
    last_eval = [r for r in records if "eval_loss" in r][-1]
    assert (f"last eval (step {last_eval['step']}): loss {last_eval['eval_loss']:.4f}, "
            f"accuracy {100 * last_eval['eval_accuracy']:.2f}%") in summary
    median = np.median([r["tokens_per_s"] for r in records])
    assert f"tokens/s median {median:,.0f}" in summary
    assert "peak LR 0.001" in summary and "d_ff 64 x 3 layers" in summary


def test_all_figures_exist_and_are_images(single):
    run, _ = single
    names = ["fig1_batch_use", "fig2_token_use_p50", "use_token_seq_batch", "percentiles",
             "unit_states", "loss"]
    for name in names:
        png = run / "plots" / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        img = matplotlib.image.imread(png)
        assert img.ndim in (2, 3) and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.05, name  # not a blank canvas


def test_load_metrics_skips_truncated_last_line(tmp_path, caplog):
    run = make_run(tmp_path, "t", truncate=True)
    with caplog.at_level(logging.WARNING, logger=reader.__name__):
        records = reader.read_metrics(run)
    assert len(records) == NUM_STEPS and records[-1]["step"] == 10 * (NUM_STEPS - 1)
    assert "truncated" in caplog.text


def test_load_metrics_rejects_corrupt_middle_line(tmp_path):
    run = make_run(tmp_path, "c")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 4"):
        reader.read_metrics(run)


def test_missing_metrics_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]metrics\.jsonl"):
        write_report([tmp_path / "empty"])
    assert not (tmp_path / "empty" / "tables.md").exists()


def test_final_means_uses_last_k_and_fewer_when_short():
    recs = [{"step": 0}] + [{"step": s, "layers": [{"a": float(s), "d_ff": 8}]} for s in (1, 2, 3)]
    assert numbers.final_means(recs, 2) == [{"a": 2.5, "d_ff": 8.0}]
    assert numbers.final_means(recs, 10) == [{"a": 2.0, "d_ff": 8.0}]
    assert numbers.final_means([{"step": 0, "layers": []}], 5) == []
    with pytest.raises(ValueError):
        numbers.final_means(recs, 0)


def test_short_window_caption_says_how_many(tmp_path):
    run = make_run(tmp_path, "short")
    md = tables.format_tables("short", reader.read_metrics(run), 50)
    assert f"mean over the last {NUM_STEPS} logged steps, 0-{10 * (NUM_STEPS - 1)}" in md
    assert "only 12 logged steps have per-layer metrics; 50 were asked for" in md


def test_width_columns_when_width_changes(tmp_path):
    # Compaction at step 60: the layers shrink to different widths.
    run = make_run(tmp_path, "compact", widths_at=lambda t: [64, 64, 64] if t < 6 else [40, 23, 64])
    path = write_report([run], tmp_path / "out", last_k=3)
    header, rows = by_prefix(parse_tables(path.read_text()), "Table 2")
    assert header[-2:] == ["Width", "Orig. Width"]
    assert [r[-2] for r in rows] == ["40", "23", "64"]
    assert [r[-1] for r in rows] == ["64", "64", "64"]
    assert "(at step 110: [40, 23, 64])" in path.read_text()


# ---------------------------------------------------------------------------------------------
# Several runs


def test_comparison_table_and_total(multi):
    (run_a, run_b), path = multi
    md = path.read_text()
    assert path == run_a.parent / "cmp" / "tables.md"
    for name in ("lr1e-3", "lr3e-3"):
        assert f"## {name}\n" in md
    header, rows = by_prefix(parse_tables(md), "Table 5")
    assert header == ["Layer", "Batch Use (%) (lr1e-3)", "Batch Use (%) (lr3e-3)"]
    assert len(rows) == NUM_LAYERS + 1 and rows[-1][0] == "**Total**"
    for col, run in enumerate((run_a, run_b), start=1):
        w = window(read_jsonl(run), 4)
        use = np.array([[layer["batch_use"] for layer in r["layers"]] for r in w])
        width = np.array([[layer["d_ff"] for layer in r["layers"]] for r in w], dtype=float)
        per_layer = np.array([float(r[col]) for r in rows[:-1]])
        np.testing.assert_allclose(per_layer, 100 * use.mean(0), atol=0.05 + 1e-9)
        total = (use * width).mean(0).sum() / width.mean(0).sum()
        assert float(rows[-1][col].strip("*")) == pytest.approx(100 * total, abs=0.05 + 1e-9)
        # The width-weighted total differs from the plain mean when widths differ (run B).
        if run is run_b:
            assert abs(total - use.mean()) > 1e-3
            # Widths vary by layer but never changed: a Width column, no Orig. Width.
            header_b = by_prefix(parse_tables(section(md, "lr3e-3")), "Table 2")[0]
            assert header_b[-1] == "Width" and "Orig. Width" not in header_b
        # Table 4: units used = batch_use * d_ff.
        _, units = by_prefix(parse_tables(md), "Table 4")
        got = np.array([float(r[col]) for r in units[:-1]])
        np.testing.assert_allclose(got, (use * width).mean(0), atol=0.5 + 1e-9)


def test_comparison_names_the_differing_keys(multi):
    _, path = multi
    line = [x for x in section(path.read_text(), "Comparison").splitlines() if "differ in" in x][0]
    assert "`train.peak_lr`: 0.001 / 0.003" in line
    assert "`model.d_ff`: 64 / [64, 32, 128]" in line
    assert "model.d_model" not in line and "`name`" not in line  # equal keys are not listed


def test_multi_run_figures_share_axes(multi, monkeypatch, tmp_path):
    (run_a, run_b), path = multi
    for name in ("fig1_batch_use", "unit_states", "loss"):
        png = path.parent / "plots" / f"{name}.png"
        assert png.stat().st_size > 10_000
        assert matplotlib.image.imread(png).ndim in (2, 3)
    # What Figure 1 draws: on one axes, every layer of both runs, a line style per run named in
    # the legend, each line the run's logged batch_use.
    from relu_sparsity.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_finish",
                        lambda fig, out, handles: drawn.setdefault(out.name, (fig, handles)))
    runs = [(run.name, reader.read_metrics(run)) for run in (run_a, run_b)]
    figures.write_plots(runs, tmp_path)
    fig, handles = drawn["fig1_batch_use.png"]
    (ax,) = [a for a in fig.axes if a.get_visible()]
    lines = ax.get_lines()
    assert len(lines) == 2 * NUM_LAYERS
    assert len({line.get_linestyle() for line in lines}) == 2
    assert {"lr1e-3", "lr3e-3"} <= {h.get_label() for h in handles}
    records = [r for r in runs[1][1] if r.get("layers")]
    want = [r["layers"][NUM_LAYERS - 1]["batch_use"] for r in records]
    assert any(np.allclose(line.get_ydata(), want) for line in lines)


def test_several_runs_need_out_dir(tmp_path):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", seed=5)]
    with pytest.raises(ValueError, match="out_dir"):
        write_report(runs)
    assert not (runs[0] / "tables.md").exists()


def test_config_differences_flattens_and_ignores_name():
    a = {"name": "a", "train": {"peak_lr": 1e-3, "steps": 10}, "model": {"d_ff": 64}}
    b = {"name": "b", "train": {"peak_lr": 3e-3, "steps": 10}, "model": {"d_ff": 64}, "x": 1}
    assert tables.config_differences([a, b]) == {"train.peak_lr": [1e-3, 3e-3], "x": [None, 1]}


# ---------------------------------------------------------------------------------------------
# Instrumentation off


def test_run_without_layers_still_gets_loss_plot(tmp_path):
    run = make_run(tmp_path, "off", layers=False)
    path = write_report([run])
    md = path.read_text()
    assert "Sparsity tables are unavailable" in md
    assert "Sparsity figures skipped" in md
    assert "Table 1" not in md
    assert (run / "plots" / "loss.png").stat().st_size > 10_000
    assert not (run / "plots" / "fig1_batch_use.png").exists()
    assert "final train loss" in md


def test_missing_config_falls_back_to_folder_name(tmp_path):
    run = make_run(tmp_path, "noconf")
    (run / "config.json").unlink()
    md = tables.format_tables(reader.run_name(run, reader.read_config_or_empty(run)),
                              reader.read_metrics(run), 5)
    assert md.startswith("## noconf\n")
    assert "d_ff 64 x 3 layers" in md  # widths taken from the metrics instead
    assert "peak LR 0.001" in md  # the largest logged lr


def test_reports_need_no_jax(tmp_path):
    # runs.reader and report are what a machine with only the run folders uses: with jax and
    # flax unimportable, a report still comes out.
    import subprocess
    import sys

    run = make_run(tmp_path, "nojax")
    code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
            "from relu_sparsity.report import write_report\n"
            f"print(write_report([{str(run)!r}], last_k=3))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("tables.md")


def caption(md: str, table: int) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"*Table {table}: "))


def test_pruned_captions_name_each_tables_own_base(tmp_path):
    run = make_run(tmp_path, "compact", widths_at=lambda t: [64, 64, 64] if t < 6 else [40, 23, 64])
    records = reader.read_metrics(run)
    records[5]["pruned"] = {"mode": "compact", "kept": [40, 23, 64]}
    md = tables.format_tables("compact", records, 3)
    first, second, third = (caption(md, k) for k in (1, 2, 3))
    assert "after the prune step 50" in first and "kept width" in first
    assert "Per-Batch of Orig." in first
    # Table 2 is of the original width: no "kept width"; Table 3 has no Per-Batch column.
    assert "after the prune step 50" in second and "kept width" not in second
    assert "percent of the layer's original width" in second
    assert "after the prune step 50" in third and "Per-Batch" not in third
    assert "kept width" not in third


def test_auto_prune_that_never_fired_is_said(tmp_path):
    run = make_run(tmp_path, "auto")
    config = {"train": {"prune": "compact", "prune_at": "auto", "prune_window": 200}}
    records = reader.read_metrics(run)
    md = tables.format_tables("auto", records, 3, config=config)
    assert "--prune-at auto never fired** (up to step 110)" in md
    assert "train.prune_window = 200" in md
    records[5]["pruned"] = {"mode": "compact", "kept": [40, 23, 64]}
    assert "never fired" not in tables.format_tables("auto", records, 3, config=config)
    assert "never fired" not in tables.format_tables("auto", records, 3, config={})
