"""A run never lies (the command line, end to end): a diverging run stops with its exit status
and keeps only finite checkpoints, bad input is refused before anything is created, lost
checkpoints stop the run instead of restarting it, and the commands print no GPU plugin errors
on a CPU machine."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from relu_sparsity import cli, data
from relu_sparsity.runs.checkpoints import read_on_host
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import SECTIONS, Config
from relu_sparsity.train.trainer import EXIT_STATUS

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=48",
         "model.seq_len=32", "train.batch_size=4", "train.eval_batches=1", "data.vocab_size=512"]


def run_cli(capsys, run: Path, cache: Path, *args: str) -> tuple[int, str]:
    status = cli.main(["train", "--run-dir", str(run), "--cache", str(cache), "--no-progress",
                       "--no-report", *SMALL, *args])
    return status, capsys.readouterr().err


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_checkpoints_finite(run: Path) -> bool:
    folder = RunFolder(run)
    leaves = []
    for step in folder.checkpoint_steps():
        state, _ = read_on_host(folder.checkpoints, step)
        leaves += [np.asarray(x) for x in jax.tree.leaves(state)]  # optimizer state too
    return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


DIVERGING = ["train.peak_lr=1e30", "train.clip_norm=0", "train.warmup_steps=0",
             "train.steps=20", "train.log_every=1", "train.checkpoint_every=1",
             "train.eval_every=100"]


def test_divergence_stops_the_run_and_keeps_finite_checkpoints(cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    status, err = run_cli(capsys, run, cache_dir, *DIVERGING)
    assert status == EXIT_STATUS["diverged"] == 3
    assert "diverged at step 1" in err and "the last checkpoint, step 1" in err
    records = strict_json_lines(run / "metrics.jsonl")  # no bare NaN
    assert records[-1] == {"step": 1, "diverged": {"detected_at": 1, "on_nonfinite": "stop",
                                                   "last_checkpoint": 1}}
    assert RunFolder(run).checkpoint_steps() == [1] and all_checkpoints_finite(run)
    assert cli.main(["report", str(run)]) == 0
    report = capsys.readouterr().out
    assert "DIVERGED at step 1" in report


def test_skip_mode_skips_updates_then_stops(cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    status, err = run_cli(capsys, run, cache_dir, *DIVERGING, "train.on_nonfinite=skip",
                          "train.max_skips=2")
    assert status == 3 and "diverged at step 3" in err
    records = strict_json_lines(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("update_skipped")]
    assert [r["step"] for r in skipped] == [1, 2]
    assert [r["skipped_updates"] for r in skipped] == [1, 2]
    # A step whose loss is not finite has no per-layer metrics (they would read as 0% use).
    assert all(r["loss"] is None and "layers" not in r for r in skipped)
    assert records[-1]["diverged"]["on_nonfinite"] == "skip" and all_checkpoints_finite(run)


@pytest.mark.parametrize("override, field", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("model.d_ff=[48,\"a\"]", "model.d_ff"),
    ("train.b1=1.5", "train.b1"),
    ("train.peak_lr=NaN", "train.peak_lr"),
    ("train.peak_lr=Infinity", "train.peak_lr"),
    ("train.on_nonfinite=retry", "train.on_nonfinite"),
    (f"model.d_ff={10 ** 12}", "model.d_ff"),  # does not fit in memory
    ("kernel=pallas_tpu", "kernel"),  # without --instrument fused
])
def test_bad_input_is_refused_before_any_work(cache_dir, tmp_path, capsys, override, field):
    run = tmp_path / "run"
    status, err = run_cli(capsys, run, cache_dir, override)
    assert status == EXIT_STATUS["refused"] == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in err, err
    assert not run.exists()


def test_missing_cache_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    status, err = run_cli(capsys, run, tmp_path / "nonexistent")
    assert status == 2 and "no token cache" in err and not run.exists()


@pytest.fixture(scope="module")
def one_document_cache(tmp_path_factory) -> Path:
    """One document cut near 95% / 5%: a long train split and a short eval split."""
    corpus = tmp_path_factory.mktemp("doc")
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py", corpus / "textwrap.py")
    out = tmp_path_factory.mktemp("cache") / "cache"
    data.prepare(out, [str(corpus)], vocab_size=512, eval_fraction=0.05)
    return out


@pytest.mark.parametrize("split", ["train", "eval"])
def test_seq_len_longer_than_a_split_is_refused(one_document_cache, tmp_path, capsys, split):
    cache = data.TokenCache(one_document_cache)
    seq_len = cache.num_tokens(split) - 1
    assert cache.num_tokens("train") > cache.num_tokens("eval") + 2
    status, err = run_cli(capsys, tmp_path / "run", one_document_cache,
                          f"model.seq_len={seq_len}", "train.batch_size=1", "model.num_heads=1",
                          "model.num_layers=1")
    assert status == 2 and f"{split} split" in err and "model.seq_len" in err
    assert not (tmp_path / "run").exists()


def test_unreadable_checkpoints_stop_the_run(cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    short = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=2",
             "train.eval_every=100"]
    assert run_cli(capsys, run, cache_dir, *short, "train.steps=6")[0] == 0
    folder = RunFolder(run)
    for path in folder.checkpoints.rglob("*"):
        if path.is_file() and path.parent.name == "d":  # every checkpoint's array data files
            path.write_bytes(path.read_bytes()[:50])
    metrics = folder.metrics_file.read_bytes()
    status, err = run_cli(capsys, run, cache_dir, *short, "train.steps=6")
    assert status == 2 and "no checkpoint" in err and "--start-over" in err
    assert folder.metrics_file.read_bytes() == metrics  # nothing rewritten
    status, _ = run_cli(capsys, run, cache_dir, *short, "train.steps=6", "--start-over")
    assert status == 0 and folder.read_metrics()[-1]["step"] == 5


def test_config_change_refusal_lists_each_field(cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    short = ["train.checkpoint_every=4", "train.log_every=2", "train.eval_every=100"]
    assert run_cli(capsys, run, cache_dir, *short, "train.steps=4")[0] == 0
    status, err = run_cli(capsys, run, cache_dir, *short, "train.steps=6", "train.seed=3")
    assert status == 2
    assert "train.steps: 4 -> 6" in err and "train.seed: 0 -> 3" in err


def test_help_lists_every_field_with_type_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for section, cls in [("", Config), *SECTIONS.items()]:
        for name in cls.__dataclass_fields__:
            if name not in SECTIONS and name != "name":
                key = f"{section}.{name}" if section else name
                assert f"  {key} " in text, key
    assert "train.max_skips" in text and "int" in text and "exit status" in text


def without_jax_platform_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}


def test_a_cpu_machine_prints_no_gpu_plugin_error(tmp_path):
    # The test extra installs jax's CUDA plugin; a command must not print its start-up error
    # where there is no GPU. `bench --shapes 256x128x512` also runs as typed (seq_len 256).
    done = subprocess.run(
        [sys.executable, "-m", "relu_sparsity.cli", "bench", "--shapes", "256x128x512",
         "--repeats", "1"], env=without_jax_platform_env(), capture_output=True, text=True,
        timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "plugin configuration error" not in done.stderr
    assert "| 256x128x512 | 256 |" in done.stdout


def test_bench_seq_len_that_does_not_divide_names_the_flag(capsys):
    assert cli.main(["bench", "--shapes", "256x128x512", "--seq-len", "100"]) == 2
    assert "--seq-len 100" in capsys.readouterr().err


def test_auto_prune_that_never_fired_says_so(cache_dir, tmp_path, capsys, caplog):
    status, _ = run_cli(capsys, tmp_path / "run", cache_dir, "train.steps=4", "train.log_every=2",
                        "train.eval_every=100", "train.checkpoint_every=4", "--prune", "compact",
                        "--prune-at", "auto")
    assert status == 0
    said = [r.getMessage() for r in caplog.records if "never fired" in r.getMessage()]
    assert len(said) == 1 and "no logged step up to 3" in said[0]
