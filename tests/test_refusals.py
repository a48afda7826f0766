"""Refusals before any work (one line on stderr, exit 2, nothing created or changed), one writer
per folder, and exit statuses that say when a part of a command failed.

Tests run as root, where permission bits do not stop reads or writes: the permission refusals
are tested through what the code checks, `os.access`, monkeypatched to deny."""

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relu_sparsity import cli, data
from relu_sparsity.runs import lock
from relu_sparsity.runs.folder import RunFolder

from tests.test_run_safety import SMALL, run_cli

prepare_module = importlib.import_module("relu_sparsity.data.prepare")
SHORT = ["train.steps=4", "train.checkpoint_every=2", "train.log_every=2",
         "train.eval_every=100"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under `folder` with its mtime and, for files, its bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def live_pid():
    """A process of this host that runs for the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(path: Path, pid: int, host: str | None = None) -> None:
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints 2 and 4) whose cache was named relative to the working
    directory; tests take a copy."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cwd = os.getcwd()
    os.chdir(cache_dir.parent)
    try:
        status = cli.main(["train", "--run-dir", str(run), "--cache", cache_dir.name,
                           "--no-progress", "--no-report", *SMALL, *SHORT])
    finally:
        os.chdir(cwd)
    assert status == 0
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# A refused resume changes nothing ----------------------------------------------------------------
def test_a_refused_resume_leaves_the_config_as_it_was(cache_dir, trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    config = run / "config.json"
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    time.sleep(0.01)
    status, err = run_cli(capsys, run, cache_dir, *SHORT, "--allow-config-change",
                          "model.d_ff=32")
    assert status == 2 and "does not fit this model" in one_line(err)
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    assert json.loads(config.read_bytes())["model"]["d_ff"] == 48


def test_a_run_written_before_newer_fields_resumes(cache_dir, trained, tmp_path, capsys):
    # Its config.json lacks fields added since (model.norm, ..., train.decay_steps): they ran
    # at their defaults, so the same command resumes it.
    run = copy_of(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    for name in ("norm", "norm_eps", "positions", "mlp", "output_bias", "init_from"):
        del config["model"][name]
    del config["train"]["decay_steps"]
    (run / "config.json").write_text(json.dumps(config))
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 0 and "another configuration" not in err, err
    assert RunFolder(run).checkpoint_steps()[-1] == 4  # complete: nothing more to train


def test_a_newest_checkpoint_without_read_permission_is_refused(cache_dir, trained, tmp_path,
                                                                capsys, monkeypatch):
    run = copy_of(trained, tmp_path)
    newest = run / "checkpoints" / "00000004" / "state" / "manifest.ocdbt"
    assert newest.is_file() and (run / "checkpoints" / "00000002").is_dir()
    before = snapshot(run)
    deny(monkeypatch, "relu_sparsity.runs.checkpoints", newest, os.R_OK)
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 2 and "no permission to read" in one_line(err) and "00000004" in err
    assert snapshot(run) == before  # no fallback to checkpoint 2, nothing rewritten


# One writer per folder ---------------------------------------------------------------------------
def test_a_second_writer_of_a_run_folder_is_refused(cache_dir, tmp_path, capsys, live_pid):
    run = tmp_path / "run"
    run.mkdir()
    write_lock(run / ".lock", live_pid)
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 2 and f"in use by process {live_pid}" in one_line(err)
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over_and_released(cache_dir, trained, tmp_path, capsys, caplog,
                                                 dead_pid):
    run = copy_of(trained, tmp_path)
    write_lock(run / ".lock", dead_pid)
    status, _ = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 0
    taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert len(taken) == 1 and f"process {dead_pid}" in taken[0]
    assert not (run / ".lock").exists()  # released at the end


def test_a_lock_of_another_host_is_not_taken_over(tmp_path, dead_pid):
    write_lock(tmp_path / "x.lock", dead_pid, host="another-host")
    with pytest.raises(lock.FolderLocked, match="on host another-host"):
        lock.acquire(tmp_path / "x.lock", "x")


def test_a_second_prepare_of_a_cache_is_refused(tmp_path, live_pid, monkeypatch):
    out = tmp_path / "cache"
    write_lock(tmp_path / "cache.lock", live_pid)
    monkeypatch.setattr(prepare_module, "_train_tokenizer", lambda *a: pytest.fail("trained"))
    with pytest.raises(lock.FolderLocked, match=f"in use by process {live_pid}"):
        data.prepare(out, [str(Path(__file__))], vocab_size=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.lock"]


def test_a_second_experiment_in_an_output_folder_is_refused(cache_dir, tmp_path, capsys,
                                                             live_pid):
    out = tmp_path / "exp"
    out.mkdir()
    write_lock(out / ".lock", live_pid)
    status = cli.main(["experiment", "masking", "--out", str(out), "--cache", str(cache_dir),
                       "--no-progress", *SMALL, *SHORT])
    assert status == 2 and f"in use by process {live_pid}" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# prepare: SIGTERM and stale builds -------------------------------------------------------------
SLOW_PREPARE = """
import importlib, sys, time
prepare = importlib.import_module("relu_sparsity.data.prepare")
def slow(*args):
    print("building", flush=True)
    time.sleep(60)
prepare._train_tokenizer = slow
prepare.prepare(sys.argv[1], [sys.argv[2]], vocab_size=512)
"""


def test_sigterm_stops_prepare_without_leaving_its_build(tmp_path):
    out = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(out), __file__],
                               cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "building"
        assert (tmp_path / f"cache.tmp-{process.pid}").is_dir()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert list(tmp_path.iterdir()) == []  # no build, no lock


def test_prepare_removes_a_stale_build(tmp_path, dead_pid):
    stale = tmp_path / f"cache.tmp-{dead_pid}"
    (stale / "sub").mkdir(parents=True)
    unrelated = tmp_path / "cache.tmp-notes"
    unrelated.mkdir()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text(Path(__file__).read_text())
    (corpus / "b.py").write_text(Path(cli.__file__).read_text())
    data.prepare(tmp_path / "cache", [str(corpus)], vocab_size=512, eval_fraction=0.5,
                 progress=False)
    assert not stale.exists() and unrelated.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cache.tmp-notes", "corpus"]


# Paths that cannot be used ---------------------------------------------------------------------
def test_a_file_as_run_folder_is_refused(cache_dir, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("mine")
    status, err = run_cli(capsys, path, cache_dir, *SHORT)
    assert status == 2 and "is a file" in one_line(err) and path.read_text() == "mine"
    status, err = run_cli(capsys, path / "run", cache_dir, *SHORT)
    assert status == 2 and "is a file" in one_line(err)


def test_a_file_as_report_out_is_refused(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "file"
    run.mkdir()
    out.write_text("mine")
    assert cli.main(["report", str(run), "--out", str(out)]) == 2
    assert "is a file" in one_line(capsys.readouterr().err) and out.read_text() == "mine"


def test_a_file_as_prepare_out_is_refused_before_the_tokenizer(tmp_path, capsys, monkeypatch):
    out = tmp_path / "file"
    out.write_text("mine")
    monkeypatch.setattr(prepare_module, "_train_tokenizer", lambda *a: pytest.fail("trained"))
    assert cli.main(["prepare", __file__, "--out", str(out), "--vocab-size", "512",
                     "--no-progress"]) == 2
    assert "is a file" in one_line(capsys.readouterr().err) and out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def deny(monkeypatch, module: str, path: Path, mode: int) -> None:
    """os.access, as `module` calls it, answers no for `mode` on `path`."""
    real = os.access

    def access(p, m, *args, **kwargs):
        if Path(p) == path and m & mode:
            return False
        return real(p, m, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module(module).os, "access", access)


def test_a_read_only_run_folder_is_refused(cache_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    deny(monkeypatch, "relu_sparsity.runs.folder", run, os.W_OK)
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 2 and "no write permission" in one_line(err)
    assert list(run.iterdir()) == []


def test_unreadable_checkpoints_folder_is_refused(cache_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    deny(monkeypatch, "relu_sparsity.runs.folder", run / "checkpoints", os.R_OK)
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 2 and "no read permission" in one_line(err)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


# Flags and values ------------------------------------------------------------------------------
def test_prune_at_without_prune_is_refused(cache_dir, tmp_path, capsys):
    status, err = run_cli(capsys, tmp_path / "run", cache_dir, "--prune-at", "2")
    assert status == 2 and "--prune-at" in one_line(err) and not (tmp_path / "run").exists()


def test_bench_shape_beyond_memory_is_refused(capsys):
    assert cli.main(["bench", "--shapes", "1048576x65536x1048576", "--repeats", "1"]) == 2
    assert "does not fit" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, field", [
    (["--train-step", "nosuch"], "nosuch"),
    (["--train-step", "tiny", "--set", "train.peak_lr=abc"], "train.peak_lr"),
])
def test_bench_bad_train_step_is_refused(capsys, monkeypatch, args, field):
    from relu_sparsity.bench import train_step

    monkeypatch.setattr(train_step, "run_isolated", lambda *a, **k: pytest.fail("ran"))
    assert cli.main(["bench", *args]) == 2
    assert field in one_line(capsys.readouterr().err)


def test_bench_with_a_failed_variant_exits_non_zero(capsys, monkeypatch):
    from relu_sparsity.bench import train_step

    rows = [{"config": "tiny", "instrument": "off", "prune": "none", "history": False,
             "error": ["RuntimeError: out of memory"]}]
    monkeypatch.setattr(train_step, "run_isolated", lambda *a, **k: rows)
    assert cli.main(["bench", "--train-step", "tiny", "--instruments", "off"]) == 1
    captured = capsys.readouterr()
    assert "failed: ['RuntimeError: out of memory']" in captured.out
    assert "1 of 1 train-step variants failed" in one_line(captured.err)


# Experiments -----------------------------------------------------------------------------------
def test_experiment_refusing_a_changed_run_names_its_own_flags(cache_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "lr=0.001").mkdir(parents=True)
    (out / "lr=0.001" / "config.json").write_text(json.dumps({"train": {"steps": 999}}))
    (out / "lr=0.001" / "metrics.jsonl").write_text('{"step": 0, "loss": 7.0}\n')  # it ran
    status = cli.main(["experiment", "sweep", *SMALL, *SHORT, "--out", str(out), "--cache",
                       str(cache_dir), "--no-progress", "--lr", "1e-3"])
    line = one_line(capsys.readouterr().err)
    assert status == 2 and "train.steps: 999 -> 4" in line and "--out" in line
    assert "--allow-config-change" not in line and "--run-dir" not in line


# Experiment outputs, caches and locks -----------------------------------------------------------
def test_a_file_as_experiment_out_is_refused(cache_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("mine")
    assert cli.main(["experiment", "masking", "--out", str(out), "--cache", str(cache_dir),
                     "--no-progress", *SMALL, *SHORT]) == 2
    assert "is a file" in one_line(capsys.readouterr().err) and out.read_text() == "mine"


def test_a_read_only_finished_cache_is_reused(cache_dir, monkeypatch):
    deny(monkeypatch, "relu_sparsity.runs.folder", cache_dir, os.W_OK)
    deny(monkeypatch, "relu_sparsity.runs.folder", cache_dir.parent, os.W_OK)
    before = snapshot(cache_dir.parent)
    paths = json.loads((cache_dir / "meta.json").read_text())["paths"]
    assert data.prepare(cache_dir, paths, vocab_size=512, eval_fraction=0.2,
                        progress=False) == cache_dir
    assert snapshot(cache_dir.parent) == before


LOCK_HOLDER = """
import sys, time
from relu_sparsity.runs import lock
with lock.held(sys.argv[1], "folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_held_by_another_process_refuses_until_it_is_gone(tmp_path, caplog):
    lock_file = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock_file)],
                              cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.FolderLocked, match=f"in use by process {holder.pid} on host "
                                                    f"{socket.gethostname()}"):
            lock.acquire(lock_file, "folder")
    finally:
        holder.kill()
        holder.wait()
    with lock.held(lock_file, "folder"):  # its process is gone: the lock is stale
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    assert [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()] == [
        f"folder: taking over the lock of process {holder.pid} on {socket.gethostname()}, "
        "which no longer runs"]


# The cache, however it is named ----------------------------------------------------------------
def test_the_same_cache_by_another_path_resumes(cache_dir, trained, tmp_path, capsys,
                                                 monkeypatch):
    run = copy_of(trained, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["cache"] == str(cache_dir)  # absolute, whatever was typed
    metrics = (run / "metrics.jsonl").read_bytes()
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(capsys, run, Path(os.path.relpath(cache_dir, tmp_path)), *SHORT)
    assert status == 0, err
    # A config.json that names the cache relative to another working directory: the same
    # corpus is the same cache.
    saved["data"]["cache"] = cache_dir.name
    (run / "config.json").write_text(json.dumps(saved))
    status, err = run_cli(capsys, run, cache_dir, *SHORT)
    assert status == 0, err
    assert (run / "metrics.jsonl").read_bytes() == metrics  # complete: nothing retrained
    status, err = run_cli(capsys, run, cache_dir, *SHORT, "train.seed=1")
    assert status == 2 and "train.seed: 0 -> 1" in err and "data.cache" not in err


def test_train_config_of_a_run_resumes_that_run(trained, tmp_path, capsys, monkeypatch):
    run = copy_of(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metrics = (run / "metrics.jsonl").read_bytes()
    status = cli.main(["train", "--config", str(run / "config.json"), "--no-progress",
                       "--no-report"])
    assert status == 0, capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics  # complete: nothing retrained
    assert list(elsewhere.iterdir()) == []  # no runs/<name> here


def test_tune_with_a_shape_where_nothing_passed_exits_non_zero(capsys, monkeypatch):
    from relu_sparsity.bench import tune

    rows = {"256x128x512": [{"config": {}, "base": True, "error": "ValueError: inexact"}],
            "512x128x512": [{"config": {}, "base": True, "ms": 1.0}]}
    monkeypatch.setattr(tune, "main", lambda *a, **k: {"rows": rows})
    assert cli.main(["tune", "--backend", "pallas_tpu", "--shapes", "256x128x512",
                     "512x128x512"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "no candidate passed at 256x128x512:" in line and "512x128x512" not in line


@pytest.mark.parametrize("message, lost", [
    ("INTERNAL: Gloo all-reduce failed: Read error: Connection reset by peer", True),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate", False),
])
def test_a_multi_process_runtime_error_ends_in_one_line(tmp_path, capsys, monkeypatch, message,
                                                        lost):
    import jax

    def fail(args):
        raise jax.errors.JaxRuntimeError(message)

    def exit_now(status):  # os._exit, which skips the shutdown barrier, as an exception here
        raise SystemExit(status)

    monkeypatch.setattr(cli, "cmd_report", fail)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(tmp_path)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("relu-sparsity report: stopped: ") and message in last
    assert ("another process of the run is gone" in last) == lost
    assert ("Traceback" in err) == (not lost)


def test_a_lock_without_hard_links_is_made_exclusively(tmp_path, monkeypatch, live_pid):
    def no_links(src, dst):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(lock.os, "link", no_links)
    with lock.held(tmp_path / ".lock", "folder"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []
    write_lock(tmp_path / ".lock", live_pid)
    with pytest.raises(lock.FolderLocked, match=f"process {live_pid}"):
        lock.acquire(tmp_path / ".lock", "folder")
