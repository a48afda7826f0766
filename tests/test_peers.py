"""The peer watch of a multi-process run (train/peers.py), on two CPU processes: a survivor
busy outside any collective when its peer dies ends with one line and its lock released, not
with the coordination service's C++ abort; processes that finish at different times all exit
cleanly."""

import os
import signal
import subprocess
import sys
import textwrap

from tests.test_multiprocess import finish, free_port

# Process 0 holds a lock and works outside any collective (a sleep) well past the heartbeat
# timeout; process 1 dies (kill) or finishes late (finish) after a first collective.
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from relu_sparsity import cli
    from relu_sparsity.runs import lock
    from relu_sparsity.train import parallel, peers

    address, pid, mode, lock_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    parallel.start_processes(address, 2, pid, heartbeat_timeout_s=2,
                             on_lost_peer=lambda what: cli.stop_process("test", what))
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    with lock.held(Path(lock_file), "folder", take=pid == 0):
        multihost_utils.process_allgather(jnp.ones(2))
        if pid == 1 and mode == "kill":
            os.kill(os.getpid(), 9)
        time.sleep(8 if mode == "kill" else 3 * pid)
        print("process", pid, "done", flush=True)
    peers.leave_together()
""")


def launch(mode: str, lock_file) -> list[tuple[int, str]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    address = f"localhost:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, address, str(i), mode,
                               str(lock_file)], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    return finish(procs)


def test_a_busy_survivor_of_a_killed_peer_stops_with_one_line(tmp_path):
    lock_file = tmp_path / ".lock"
    (status, out), (peer_status, _) = launch("kill", lock_file)
    assert peer_status == -signal.SIGKILL
    assert status == 1, out[-3000:]
    assert "Check failure stack trace" not in out and "Terminating process" not in out, out
    said = [line for line in out.splitlines() if line.startswith("relu-sparsity test:")]
    assert len(said) == 1 and "process 1 stopped sending heartbeats" in said[0], out[-3000:]
    assert "process 0 done" not in out  # stopped mid-work, not at its end
    assert not lock_file.exists()


def test_processes_finishing_at_different_times_exit_cleanly(tmp_path):
    results = launch("finish", tmp_path / ".lock")
    for i, (status, out) in enumerate(results):
        assert status == 0, out[-3000:]
        assert f"process {i} done" in out and "Terminating process" not in out, out[-3000:]
