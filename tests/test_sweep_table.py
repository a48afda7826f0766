"""`sweep.md`'s eval columns against each point's own `metrics.jsonl`: the last record with an
evaluation, read back with json and formatted here, for points whose final evaluations differ
and whose last logged step carries none."""

import json
import re

from relu_sparsity.train import sweep
from relu_sparsity.train.config import preset, to_dict
from relu_sparsity.train.metrics import METRIC_KEYS, UNIT_STATE_KEYS

# Per point: (step, eval_loss, eval_accuracy) of its evaluations; every point logs steps 0-5.
EVALS = {
    0.001: [(0, 6.25, 0.015625), (3, 4.123456, 0.123456)],
    0.002: [(0, 6.5, 0.03125), (2, 5.0, 0.25), (4, 3.987654, 0.3456789)],
    0.003: [(0, 7.0, 0.0), (5, 2.5, 0.5)],
}


def fake_train(config, run_dir, *, progress=True):
    """A point's run folder as train leaves it, with the evaluations of EVALS."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config)))
    evals = {step: (loss, acc) for step, loss, acc in EVALS[config.train.peak_lr]}
    layer = {"d_ff": 32, **{k: 0.5 for k in METRIC_KEYS}, **{k: 0.25 for k in UNIT_STATE_KEYS}}
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(6):
            record = {"step": step, "loss": 7.0 - step / 2, "grad_norm": 1.0, "lr": 1e-3,
                      "tokens_per_s": 100.0, "layers": [layer]}
            if step in evals:
                record["eval_loss"], record["eval_accuracy"] = evals[step]
            f.write(json.dumps(record) + "\n")
    return run_dir


def test_sweep_table_eval_columns_are_each_points_last_evaluation(tmp_path, monkeypatch):
    """Each row's final eval loss and accuracy against the last evaluated record of that
    point's metrics.jsonl (loss to 4 places, accuracy as a percentage to 2)."""
    monkeypatch.setattr(sweep, "train", fake_train)
    config = preset("tiny", ["train.steps=6", "model.num_layers=1", "model.d_ff=32"])
    table = sweep.run_sweep(config, tmp_path / "sweep", {"lr": list(EVALS)}, progress=False)
    rows = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"lr=[0-9.e+-]+", cells[0]):
            rows[cells[0]] = cells
    assert len(rows) == len(EVALS)
    for lr in EVALS:
        name = f"lr={lr:g}"
        records = [json.loads(line) for line in
                   (tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "eval_loss" in r][-1]
        assert rows[name][1] == "finished"  # its last step, 5, is the run's last
        assert rows[name][2] == f"{last['eval_loss']:.4f}", name
        assert rows[name][3] == f"{100 * last['eval_accuracy']:.2f}%", name
    # The values by hand, so that the recomputation above cannot agree with a wrong table.
    assert rows["lr=0.001"][2:] == ["4.1235", "12.35%"]
    assert rows["lr=0.002"][2:] == ["3.9877", "34.57%"]
    assert rows["lr=0.003"][2:] == ["2.5000", "50.00%"]
