"""`experiment sweep`: a run per point, resumable, Table 5 and Figures 3 / 4, diverged points
shown as diverged."""

import json

from relu_sparsity import cli
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import preset
from relu_sparsity.train.sweep import point_config, run_sweep
from relu_sparsity.train.trainer import train

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=48",
         "model.seq_len=16", "train.batch_size=2", "train.steps=12", "train.warmup_steps=2",
         "train.log_every=3", "train.eval_every=6", "train.eval_batches=1",
         "train.checkpoint_every=4", "data.vocab_size=512"]


def base(cache_dir):
    return preset("tiny", [f"data.cache={json.dumps(str(cache_dir))}", *SMALL])


def strip_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def table5(path) -> str:
    text = path.read_text()
    return text[text.index("### Table 5"):text.index("### Table 4")]


def test_an_interrupted_sweep_ends_as_an_uninterrupted_one(cache_dir, tmp_path):
    axes = {"lr": [1e-3, 3e-3]}
    straight = run_sweep(base(cache_dir), tmp_path / "straight", axes, progress=False)
    # The second point killed after 5 of its 12 steps; the first finished.
    out = tmp_path / "resumed"
    first, second = (point_config(base(cache_dir), {"lr": lr}) for lr in (1e-3, 3e-3))
    train(first, out / "lr=0.001", progress=False)
    done_before = (out / "lr=0.001" / "metrics.jsonl").read_bytes()
    train(second, out / "lr=0.003", progress=False, max_steps=5)
    resumed = run_sweep(base(cache_dir), out, axes, progress=False)
    assert (out / "lr=0.001" / "metrics.jsonl").read_bytes() == done_before  # not retrained
    assert table5(resumed) == table5(straight)
    for name in ("lr=0.001", "lr=0.003"):
        assert strip_timing(RunFolder(out / name).read_metrics()) == \
            strip_timing(RunFolder(tmp_path / "straight" / name).read_metrics())


def test_sweep_over_width_draws_figure_3_and_marks_a_diverged_point(cache_dir, tmp_path,
                                                                    capsys):
    status = cli.main(["experiment", "sweep", *SMALL, "--out", str(tmp_path / "s"), "--cache",
                       str(cache_dir), "--no-progress", "--d-ff", "32", "64"])
    assert status == 0
    text = (tmp_path / "s" / "sweep.md").read_text()
    assert "dff=32 | finished" in text and "dff=64 | finished" in text
    assert "fig3_use_vs_d_ff.png" in text and (tmp_path / "s/plots/fig3_use_vs_d_ff.png").exists()
    status = cli.main(["experiment", "sweep", *SMALL, "train.clip_norm=0", "--out",
                       str(tmp_path / "d"), "--cache", str(cache_dir), "--no-progress",
                       "--lr", "1e30"])
    assert status == 3  # a diverged point ends the point, not the sweep; the status says so
    assert "1 sweep point(s) diverged: lr=1e+30" in capsys.readouterr().err
    text = (tmp_path / "d" / "sweep.md").read_text()
    assert "lr=1e+30 | **diverged at step" in text
    assert "diverged at step" in text[text.index("### Table 5"):]


def test_an_override_after_a_sweep_axis_is_refused_with_a_hint(capsys):
    try:
        cli.parse_args(["experiment", "sweep", "--out", "x", "--lr", "1e-3", "train.steps=3"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("the override was taken as a learning rate")
    assert "put overrides before --lr" in capsys.readouterr().err
    args = cli.parse_args(["experiment", "sweep", "--out", "x", "train.steps=3",
                              "--d-ff", "8", "16"])
    assert args.d_ff == [8, 16] and args.overrides == ["train.steps=3"]
