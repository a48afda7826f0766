"""`report --paper`: a run's Tables 1, 2, 3 and 5 beside the paper's numbers, which ship with
the package (report/paper.py). The shipped numbers are checked against the paper's own
arithmetic, and the comparison's cells against the run's metrics.jsonl."""

import json

import numpy as np
import pytest

from relu_sparsity import cli
from relu_sparsity.report import paper

RUN_BATCH_USE = [0.25, 0.5, 0.75, 0.875, 0.9, 0.95]


def test_the_shipped_numbers_agree_with_the_papers_own_arithmetic():
    # Table 5's first column is Table 1's Per-Batch column, its Total the layers' mean.
    assert paper.TABLE5[3e-3] == tuple(row[2] for row in paper.TABLE1)
    for lr, column in paper.TABLE5.items():
        assert np.mean(column) == pytest.approx(paper.TABLE5_TOTAL[lr], abs=0.05)
    # Table 2: Final Use = On Batch 0 + Turned On - Turned Off (to its rounding) and equals
    # Table 1's Per-Batch use within 0.1.
    for (on0, turned_on, turned_off, final), row1 in zip(paper.TABLE2, paper.TABLE1):
        assert on0 + turned_on - turned_off == pytest.approx(final, abs=0.35)
        assert final == pytest.approx(row1[2], abs=0.11)


def write_run(folder, peak_lr: float):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"name": "r", "train": {"peak_lr": peak_lr}, "model": {"d_ff": 64}}))
    layers = [{"d_ff": 64, "token_use": u / 10, "seq_use": u / 2, "batch_use": u, "on0": 1.0,
               "turned_on": 0.0, "turned_off": 1 - u, "final": u, "p50": 0.1, "p65": 0.2,
               "p75": 0.3, "p90": 0.4} for u in RUN_BATCH_USE]
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 3.0,
                                                      "layers": layers}) + "\n")


def section(text: str, title: str) -> list[list[str]]:
    """The rows (cells) of the table under a '#### title' heading."""
    block = text[text.index(f"#### {title}"):].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_report_paper_sets_the_run_beside_the_paper(tmp_path, capsys):
    write_run(tmp_path / "run", 3e-3)
    assert cli.main(["report", str(tmp_path / "run"), "--paper", "--last-k", "1"]) == 0
    text = (tmp_path / "run" / "tables.md").read_text()
    table1 = section(text, "Table 1")
    for layer, (row, use) in enumerate(zip(table1, RUN_BATCH_USE)):
        assert row[0] == str(layer)
        assert row[5:7] == [f"{100 * use:.1f}", f"{paper.TABLE1[layer][2]:.1f}"]
    assert section(text, "Table 2")[0][3:5] == ["0.0", "0.05"]  # printed as the paper did
    table5 = section(text, "Table 5")
    assert [row[2] for row in table5[:6]] == [f"{v:.1f}" for v in paper.TABLE5[3e-3]]
    assert table5[-1][1:] == [f"{100 * np.mean(RUN_BATCH_USE):.1f}", "69.7"]


def test_a_learning_rate_the_paper_did_not_run_gets_all_its_columns(tmp_path):
    write_run(tmp_path / "run", 4e-4)
    assert cli.main(["report", str(tmp_path / "run"), "--paper", "--last-k", "1"]) == 0
    header = (tmp_path / "run" / "tables.md").read_text().split("#### Table 5")[1]
    assert all(f"paper (LR={lr:g})" in header for lr in paper.TABLE5)


def test_several_runs_share_one_batch_use_table_and_figure(tmp_path):
    write_run(tmp_path / "a", 3e-3)
    write_run(tmp_path / "b", 3e-3)
    # Run b: 8 layers, its last two beyond the paper's six.
    lines = (tmp_path / "b" / "metrics.jsonl").read_text()
    record = json.loads(lines)
    record["layers"] += [dict(record["layers"][0], batch_use=0.5)] * 2
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "both"
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                     "--paper", "--last-k", "1"]) == 0
    text = (out / "tables.md").read_text()
    block = text[text.index("Per-batch use (%) by layer"):].split("\n\n")[1].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block]
    assert rows[0] == ["run", *map(str, range(8))]
    assert rows[2][1:] == [f"{100 * u:.1f}" for u in RUN_BATCH_USE] + ["—", "—"]
    assert rows[3][7:] == ["50.0", "50.0"]
    assert rows[4] == ["paper (Table 1)", *(f"{row[2]:.1f}" for row in paper.TABLE1), "—", "—"]
    assert (out / "plots" / "paper_batch_use.png").stat().st_size > 10_000
    assert "plots/paper_batch_use.png" in text
