"""The training loop end to end on a very small config: loss falls, the run folder holds what
docs/design.md §8 lists, resume is exact, config changes are refused, and the CLI works."""

import json
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from relu_sparsity import cli
from relu_sparsity.kernels.bits import np_unpack_bits
from relu_sparsity import data
from relu_sparsity.train.config import preset
from relu_sparsity.train.trainer import train
from relu_sparsity.train.metrics import METRIC_KEYS, UNIT_STATE_KEYS
from relu_sparsity.runs.folder import RunFolder

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def small_config(cache_dir: Path, *overrides: str):
    return preset("tiny", [
        f"data.cache={json.dumps(str(cache_dir))}", "model.num_layers=2", "model.d_model=32",
        "model.num_heads=2", "model.d_ff=[64,40]", "model.seq_len=32", "train.batch_size=4",
        "train.steps=24", "train.warmup_steps=4", "data.vocab_size=512", "train.log_every=4",
        "train.eval_every=12",
        "train.eval_batches=2", "train.checkpoint_every=8", "train.peak_lr=1e-2", *overrides])


def strip_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_train_writes_the_run_folder(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(cache_dir), run, progress=False)
    folder = RunFolder(run)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["d_ff"] == [64, 40] and config["corpus"]["corpus_hash"]
    assert config["runtime"]["kernel_backend"] == "reference" and config["git_commit"]
    records = folder.read_metrics()
    assert [r["step"] for r in records] == [0, 4, 8, 12, 16, 20, 23]
    for r in records:
        assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r)
        assert [layer["d_ff"] for layer in r["layers"]] == [64, 40]
        for layer in r["layers"]:
            assert set(METRIC_KEYS) | set(UNIT_STATE_KEYS) <= set(layer)
            assert all(0.0 <= layer[k] <= 1.0 for k in METRIC_KEYS if k.startswith(("p", "t")))
    assert {r["step"] for r in records if "eval_loss" in r} == {0, 12, 23}
    assert folder.mask_steps() == [0, 4, 8, 12, 16, 20, 23]
    assert folder.read_masks(0)[1].shape == (1, 2) and folder.read_masks(0)[1].dtype == np.uint32
    assert list(run.glob("events.out.tfevents.*"))
    assert folder.checkpoint_steps() == [16, 24]  # keep_checkpoints = 2
    # Loss falls well below its value at initialization (ln 512 = 6.24).
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 1.0


def test_unit_states_recompute_from_masks(cache_dir, tmp_path):
    # From the logged batch masks alone, on the host: batch use and the unit states, but
    # never_on, which the unit histories make exact over every step (units.npz).
    run = tmp_path / "run"
    train(small_config(cache_dir), run, progress=False)
    folder = RunFolder(run)
    records = folder.read_metrics()
    with np.load(run / "units.npz") as units:
        first_on = [units["first_on_0"], units["first_on_1"]]
    for layer, width in enumerate((64, 40)):
        on0 = np_unpack_bits(folder.read_masks(0)[layer][0], width)
        for r in records:
            used = np_unpack_bits(folder.read_masks(r["step"])[layer][0], width)
            got = r["layers"][layer]
            assert np.mean(used) == pytest.approx(got["batch_use"])
            want = {"on0": np.mean(on0), "turned_on": np.mean(~on0 & used),
                    "turned_off": np.mean(on0 & ~used), "final": np.mean(used)}
            assert {k: got[k] for k in want} == pytest.approx(want)
        assert records[-1]["layers"][layer]["never_on"] == np.mean(first_on[layer] < 0)
        assert set(UNIT_STATE_KEYS) == {*want, "never_on"}


@pytest.mark.parametrize("stop", [8, 10])  # resuming at a logged step (8) and between (10)
def test_resume_gives_identical_metrics(cache_dir, tmp_path, stop):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small_config(cache_dir), straight, progress=False)
    train(small_config(cache_dir), resumed, progress=False, max_steps=stop)
    folder = RunFolder(resumed)
    assert folder.checkpoint_steps()[-1] == stop
    # A crash after the checkpoint leaves log lines the resume must drop, and a torn last line.
    with folder.metrics_file.open("a") as f:
        f.write(json.dumps({"step": 12, "loss": 99.0}) + "\n" + '{"step": 1')
    train(small_config(cache_dir), resumed, progress=False)
    assert strip_timing(RunFolder(resumed).read_metrics()) == strip_timing(
        RunFolder(straight).read_metrics())
    assert RunFolder(resumed).mask_steps() == RunFolder(straight).mask_steps()
    for step in RunFolder(straight).mask_steps():
        for a, b in zip(RunFolder(straight).read_masks(step), folder.read_masks(step),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    units, want = (np.load(f / "units.npz") for f in (resumed, straight))
    assert sorted(units.files) == sorted(want.files)
    for name in want.files:
        np.testing.assert_array_equal(units[name], want[name])


def test_evaluations_off_the_log_grid_are_logged(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(cache_dir, "train.eval_every=10", "train.steps=16"), run, progress=False)
    records = RunFolder(run).read_metrics()
    assert [r["step"] for r in records] == [0, 4, 8, 10, 12, 15]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 10, 15]
    assert all("layers" in r for r in records)


def test_resume_skips_a_corrupted_checkpoint(cache_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small_config(cache_dir), straight, progress=False)
    train(small_config(cache_dir), resumed, progress=False, max_steps=16)
    folder = RunFolder(resumed)
    assert folder.checkpoint_steps() == [8, 16]
    for path in (folder.checkpoints / "00000016" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            with path.open("r+b") as f:
                f.truncate(path.stat().st_size // 2)  # torn by a crash
    train(small_config(cache_dir), resumed, progress=False)  # resumes from step 8
    assert strip_timing(folder.read_metrics()) == strip_timing(RunFolder(straight).read_metrics())


def test_config_change_is_refused_unless_allowed(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(cache_dir, "train.steps=8"), run, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train(small_config(cache_dir, "train.steps=12"), run, progress=False)
    train(small_config(cache_dir, "train.steps=12"), run, progress=False,
          allow_config_change=True)
    assert RunFolder(run).read_metrics()[-1]["step"] == 11


def test_bad_overrides_raise():
    with pytest.raises(ValueError, match="no config field"):
        preset("tiny", ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="divisible"):
        preset("tiny", ["model.num_heads=3"])
    with pytest.raises(ValueError, match="widths"):
        preset("tiny", ["model.d_ff=[10,20]"])
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge")


def test_cli_end_to_end(cache_dir, tmp_path, capsys):
    run = tmp_path / "cli_run"
    args = ["train", "--config", "tiny", "--run-dir", str(run), "--cache", str(cache_dir),
            "--no-progress", "model.num_layers=2", "model.d_model=32", "model.num_heads=2",
            "model.d_ff=48", "model.seq_len=16", "train.batch_size=2", "train.steps=6",
            "train.log_every=2", "train.eval_every=3", "train.eval_batches=1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "Table 3" in out
    assert (run / "tables.md").exists()
    assert (run / "plots" / "fig1_batch_use.png").stat().st_size > 5000
    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "tables.md").read_text() == (run / "tables.md").read_text()
    # Bad input: a clear message and exit status 2, not a traceback.
    assert cli.main(["train", "--run-dir", str(run), "train.nope=1"]) == 2
    assert "no config field" in capsys.readouterr().err
    assert cli.main(["train", "--cache", str(tmp_path / "missing"), "--run-dir",
                     str(tmp_path / "r2")]) == 2
    assert "prepare" in capsys.readouterr().err
    # No fused kernel exists for a CPU: a clear error, never a silent fallback.
    assert cli.main(["train", "--cache", str(cache_dir), "--run-dir", str(tmp_path / "r3"),
                     "--instrument", "fused"]) == 2
    assert "--instrument xla" in capsys.readouterr().err
    assert cli.main(["train", "--cache", str(cache_dir), "--run-dir", str(tmp_path / "r4"),
                     "--instrument", "fused", "--kernel", "triton"]) == 2
    assert "GPU" in capsys.readouterr().err


def test_cli_prepare(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((STDLIB / "textwrap.py").read_text())
    assert cli.main(["prepare", str(corpus), "--out", str(tmp_path / "c"), "--vocab-size",
                     "512"]) == 0
    assert data.TokenCache(tmp_path / "c").vocab_size == 512


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and schedulers
def test_interrupt_checkpoints_and_resumes(cache_dir, tmp_path, stop):
    run = tmp_path / "run"
    overrides = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=48",
                 "model.seq_len=32", "train.batch_size=4", "train.steps=100000",
                 "train.log_every=5", "train.eval_every=100000", "train.eval_batches=1",
                 "train.checkpoint_every=100000", "data.vocab_size=512"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "relu_sparsity.cli", "train", "--run-dir", str(run), "--cache",
         str(cache_dir), "--no-progress", "--no-report", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(stop)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output  # interrupted, resumable
    assert "resume" in output
    folder = RunFolder(run)
    stopped = folder.checkpoint_steps()[-1]
    assert 10 < stopped < 100000
    assert max(r["step"] for r in folder.read_metrics()) < stopped
    config = preset("tiny", [f"data.cache={json.dumps(str(cache_dir))}", *overrides])
    train(config, run, progress=False, max_steps=7)
    assert folder.checkpoint_steps()[-1] == stopped + 7
    steps = [r["step"] for r in folder.read_metrics()]
    assert steps == sorted(set(steps)) and steps == list(range(0, steps[-1] + 1, 5))


def test_loss_falls_on_the_tiny_config(cache_dir, tmp_path):
    # The default job's model and optimizer (6 layers, d_ff 1024, peak LR 3e-3), a short run.
    config = preset("tiny", [f"data.cache={json.dumps(str(cache_dir))}", "data.vocab_size=512",
                             "train.steps=40", "train.warmup_steps=10", "train.eval_every=39",
                             "train.eval_batches=1"])
    assert config.model.num_layers == 6 and config.model.d_ff == 1024
    train(config, tmp_path / "run", progress=False)
    records = RunFolder(tmp_path / "run").read_metrics()
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 1.0


@pytest.mark.parametrize("instrument", ["xla", "fused"])
def test_data_parallel_on_two_devices_matches_one(cache_dir, tmp_path, instrument):
    # Two simulated CPU devices with 2 sequences each see the global batch that one device with
    # 4 sequences sees: the same losses; metrics per device, masks [2, W], union beside. fused:
    # the kernel (pallas_tpu, interpreted) runs per device inside shard_map.
    one, two = tmp_path / "one", tmp_path / "two"
    overrides = ["train.steps=9", "train.eval_every=8", f"instrument={instrument}",
                 "kernel=" + ("pallas_tpu" if instrument == "fused" else "auto")]
    train(small_config(cache_dir, "train.batch_size=4", *overrides), one, progress=False)
    script = (
        "import json, sys\n"
        "from relu_sparsity.train.config import preset\n"
        "from relu_sparsity.train.trainer import train\n"
        "import jax; assert jax.device_count() == 2, jax.devices()\n"
        "train(preset('tiny', json.loads(sys.argv[2])), sys.argv[1], progress=False)\n")
    config_overrides = [
        f"data.cache={json.dumps(str(cache_dir))}", "model.num_layers=2", "model.d_model=32",
        "model.num_heads=2", "model.d_ff=[64,40]", "model.seq_len=32", "train.batch_size=2",
        "train.steps=24", "train.warmup_steps=4", "data.vocab_size=512", "train.log_every=4",
        "train.eval_batches=2", "train.checkpoint_every=8", "train.peak_lr=1e-2", *overrides]
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", script, str(two), json.dumps(config_overrides)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = RunFolder(one).read_metrics(), RunFolder(two).read_metrics()
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
        if "eval_loss" in ra:
            assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-4)
        for la, lb in zip(ra["layers"], rb["layers"], strict=True):
            assert lb["batch_use"] <= lb["batch_use_all_devices"] == pytest.approx(
                la["batch_use"], abs=1e-9)
            assert lb["token_use"] == pytest.approx(la["token_use"], rel=1e-4, abs=1e-6)
    masks = RunFolder(two).read_masks(8)
    assert [m.shape for m in masks] == [(2, 2), (2, 2)]
    # The union of the two devices' masks is the one-device batch mask.
    for m2, m1 in zip(masks, RunFolder(one).read_masks(8), strict=True):
        np.testing.assert_array_equal(np.bitwise_or.reduce(m2, axis=0), m1[0])


def test_profile_steps_record_a_trace_of_those_steps(cache_dir, tmp_path, monkeypatch):
    from relu_sparsity.train import steps, trainer

    run = tmp_path / "run"
    with pytest.raises(ValueError, match="--profile-steps"):
        train(small_config(cache_dir, "train.steps=6"), run, progress=False,
              profile_steps=(4, 9))
    assert not run.exists()  # refused before the folder is made
    options = []  # each compile's XLA options: a profiled run's step has no command buffers
    build = trainer.build_program
    monkeypatch.setattr(trainer, "build_program",
                        lambda *a: (options.append(a[-1]), build(*a))[1])
    train(small_config(cache_dir, "train.steps=6"), run, progress=False, profile_steps=(2, 4))
    assert options == [steps.NO_COMMAND_BUFFERS]
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert RunFolder(run).read_metrics()[-1]["step"] == 5  # training went on after the trace
    # `relu-sparsity profile`: the trace's kernels put in the model's parts by their HLO.
    assert cli.main(["profile", str(run), "--top", "3"]) == 0
    summary = json.loads((run / "profile" / "summary.json").read_text())
    parts = summary["parts"]
    assert summary["steps"] == 2 and summary["device_ms_per_step"] > 0
    assert summary["command_buffers"] == "off" and 0.75 < summary["attributed"] <= 1.0
    for part in ("MLP", "attention", "layer norms", "loss", "optimizer"):
        assert parts[part]["total"] > 0, part
    assert parts["MLP"]["forward"] > 0 and parts["MLP"]["backward"] > 0
    assert parts["optimizer"].keys() == {"update", "total"}
    unknown = sum(parts.get(p, {}).get("total", 0) for p in ("other", "unattributed"))
    assert unknown < 0.25 * summary["device_ms_per_step"], parts


def test_a_prune_inside_the_profiled_steps_starts_a_profile_of_the_rebuilt_step(
        cache_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    hlo = run / "profile" / "train_step.hlo.txt"
    calls = []  # ("start", when the HLO beside the trace was written) and ("stop", None)
    start, stop = jax.profiler.start_trace, jax.profiler.stop_trace
    monkeypatch.setattr(jax.profiler, "start_trace",
                        lambda d: (calls.append(("start", hlo.stat().st_mtime_ns)), start(d)))
    monkeypatch.setattr(jax.profiler, "stop_trace",
                        lambda: (calls.append(("stop", None)), stop()))
    config = small_config(cache_dir, "train.steps=7", "train.prune=compact", "train.prune_at=3",
                          "train.prune_multiple=32")
    train(config, run, progress=False, profile_steps=(2, 6))
    assert [c[0] for c in calls] == ["start", "stop", "start", "stop"]
    assert json.loads((run / "profile" / "steps.json").read_text()) == {
        "first": 4, "stop": 6, "command_buffers": "off"}
    # The HLO was written again, for the rebuilt step, when its trace began.
    assert calls[0][1] < calls[2][1] == hlo.stat().st_mtime_ns


def test_a_runs_config_json_gives_back_its_configuration(cache_dir, tmp_path, capsys):
    from relu_sparsity.train.config import from_file, load, to_dict

    config = small_config(cache_dir, "train.steps=2", "train.eval_every=100")
    train(config, tmp_path / "run", progress=False)
    again = load(str(tmp_path / "run" / "config.json"), ["train.steps=4"])
    assert to_dict(again) == {**to_dict(config), "train": {**to_dict(config)["train"], "steps": 4}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match="unknown train fields"):
        from_file(str(bad))
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--config", "notes.txt"])
    assert "neither a preset" in capsys.readouterr().err
