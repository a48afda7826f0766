import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from relu_sparsity.runs.checkpoints import (
    CheckpointDenied,
    CheckpointMismatch,
    Checkpoints,
    check_not_legacy,
    read_on_host,
)

LOGGER = "relu_sparsity.runs.checkpoints"



@struct.dataclass
class State:
    """The fields of train.steps.TrainState."""
    step: jax.Array
    params: dict
    opt_state: object
    first_nonfinite: jax.Array
    units: tuple


def make_state(width: int = 8, step: int = 5) -> State:
    params = {"mlp": {"wi": jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width),
                      "bi": jnp.full((width,), 0.5)},
              "embed": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    optimizer = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0),
                                                  optax.adamw(1e-3)), 3)
    opt_state = optimizer.init(params)
    units = ({"alive": jnp.arange(width) % 3 == 0, "last_on": jnp.arange(width, dtype=jnp.int32)},)
    return State(jnp.int32(step), params, opt_state, jnp.int32(-1), units)


def make_meta(width: int = 8, pruning: dict | None = None) -> dict:
    rng = np.random.default_rng(0)
    units = {str(i): {"on0": rng.random(width) < 0.5, "ever_on": rng.random(width) < 0.7}
             for i in range(2)}
    return {"unit_states": units, "pruning": {} if pruning is None else pruning}


def abstract(state: State) -> State:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state)


def assert_same(a, b) -> None:
    """Equal nested dicts / lists / arrays, array dtypes included."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        assert a == b and type(a) is type(b)


def assert_states_equal(a: State, b: State) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert_same(np.asarray(x), np.asarray(y))


def corrupt(directory: Path, step: int, how: str) -> None:
    """Damage checkpoint `step`'s array files (the OCDBT data files of its `state` item)."""
    files = [p for p in (directory / f"{step:08d}" / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        if how == "truncate":
            with path.open("r+b") as f:
                f.truncate(path.stat().st_size // 2)
        else:
            path.unlink()


PRUNING = {"mode": "compact", "step": 40,
           "keep": {"0": np.array([0, 3, 5], np.int32), "1": np.array([1, 2, 4, 6, 7], np.int32)},
           "original_widths": np.array([8, 8], np.int32), "multiple": 1}


@pytest.mark.parametrize("pruning", [None, PRUNING], ids=["unpruned", "pruned"])
def test_round_trip(tmp_path, pruning):
    state, meta = make_state(), make_meta(pruning=pruning)
    meta["misc"] = {"scalar": np.float32(1.5), "nested": [1, "two", None, 3.25, True]}
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        checkpoints.save(8, state, meta)
        checkpoints.wait()
        assert checkpoints.steps() == [8]
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        seen = []
        step, restored, restored_meta = checkpoints.restore_latest(
            lambda m: seen.append(m) or abstract(state))
    assert step == 8 and len(seen) == 1
    assert type(restored) is State and isinstance(restored.step, jax.Array)
    assert_states_equal(restored, state)
    assert_same(meta, restored_meta)
    assert isinstance(restored_meta["misc"]["scalar"], np.float32)


def test_a_relative_folder_works(tmp_path, monkeypatch):
    # Run folders are often relative (runs/tiny); orbax itself takes absolute paths only.
    monkeypatch.chdir(tmp_path)
    state = make_state()
    with Checkpoints("runs/x/checkpoints", keep=2) as checkpoints:
        checkpoints.save(4, state, make_meta())
    with Checkpoints("runs/x/checkpoints", keep=2) as checkpoints:
        step, restored, _ = checkpoints.restore_latest(lambda m: abstract(state))
    assert step == 4
    assert_states_equal(restored, state)
    assert read_on_host("runs/x/checkpoints", 4)[1]["pruning"] == {}


def test_restore_into_shapes_chosen_from_the_meta(tmp_path):
    # After compaction the checkpoint holds widths 3 (the configured model: 8); the template reads
    # the width from the meta before any array is read.
    compacted = make_state(width=3)
    with Checkpoints(tmp_path, keep=2) as checkpoints:
        checkpoints.save(40, compacted, make_meta(pruning=PRUNING))
    configured = make_state(width=8)

    def template(meta):
        width = len(meta["pruning"]["keep"]["0"]) if meta["pruning"] else 8
        return abstract(make_state(width=width))

    with Checkpoints(tmp_path, keep=2) as checkpoints:
        step, restored, _ = checkpoints.restore_latest(template)
        assert step == 40 and restored.params["mlp"]["wi"].shape == (4, 3)
        assert_states_equal(restored, compacted)
        # A template at the configured widths does not fit: an error, not a fallback.
        with pytest.raises(CheckpointMismatch, match=r"mlp/wi: template \(4, 8\), checkpoint"):
            checkpoints.restore_latest(lambda meta: abstract(configured))


def test_keeps_the_newest(tmp_path):
    state = make_state()
    with Checkpoints(tmp_path, keep=2) as checkpoints:
        for step in (4, 8, 12, 16):
            checkpoints.save(step, state, make_meta())
        checkpoints.wait()
        assert checkpoints.steps() == [12, 16]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == [
        "00000012", "00000016"]


def test_async_save_survives_donation(tmp_path):
    # save returns once the arrays are off the devices: the caller's next step may donate them.
    state, meta = make_state(), make_meta()
    expected = jax.tree.map(np.asarray, state)
    with Checkpoints(tmp_path, keep=2) as checkpoints:
        checkpoints.save(3, state, meta)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        meta["unit_states"]["0"]["on0"][:] = True  # the caller's arrays change too
        checkpoints.wait()
        step, restored, restored_meta = checkpoints.restore_latest(
            lambda m: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                expected))
    assert step == 3
    assert_states_equal(restored, expected)
    assert not restored_meta["unit_states"]["0"]["on0"].all()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupted_newest_falls_back(tmp_path, caplog, how):
    states = {step: make_state(step=step) for step in (4, 8)}
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        for step, state in states.items():
            checkpoints.save(step, state, make_meta())
    corrupt(tmp_path, 8, how)
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpoints(tmp_path, 3) as checkpoints:
        step, restored, _ = checkpoints.restore_latest(lambda m: abstract(states[4]))
        assert step == 4
        assert_states_equal(restored, states[4])
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert len(warnings) == 1 and warnings[0].startswith("checkpoint 8 cannot be read (")
        assert "\n" not in warnings[0] and "TensorStore(" not in warnings[0]  # one line
        # Resuming from 4 saves 8 again: the unreadable one is replaced.
        checkpoints.save(8, states[8], make_meta())
        assert checkpoints.restore_latest(lambda m: abstract(states[8]))[0] == 8


def random_state(step: int) -> State:
    """make_state with random weights: stored uncompressed, where a changed byte goes unnoticed
    by the compression."""
    state = make_state(width=512, step=step)
    wi = jax.random.normal(jax.random.key(step), state.params["mlp"]["wi"].shape)
    return state.replace(params={**state.params, "mlp": {**state.params["mlp"], "wi": wi}})


def test_bytes_changed_in_place_fall_back(tmp_path, caplog):
    states = {step: random_state(step) for step in (4, 8)}
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        for step, state in states.items():
            checkpoints.save(step, state, make_meta())
    files = [p for p in (tmp_path / "00000008" / "state").rglob("*") if p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(b ^ 0xFF for b in data[middle:middle + 400])
    largest.write_bytes(bytes(data))  # the same size
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpoints(tmp_path, 3) as checkpoints:
        step, restored, _ = checkpoints.restore_latest(lambda m: abstract(states[4]))
    assert step == 4
    assert_states_equal(restored, states[4])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "does not match its checksum" in warnings[0]


def test_newest_without_read_permission_is_refused(tmp_path, caplog, monkeypatch):
    # Tests run as root, which reads any file: the check is what the code asks, os.access.
    from relu_sparsity.runs import checkpoints as module

    state = make_state()
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        for step in (4, 8):
            checkpoints.save(step, state, make_meta())
    denied = tmp_path / "00000008" / "state" / "manifest.ocdbt"
    real = os.access
    monkeypatch.setattr(module.os, "access",
                        lambda p, mode: Path(p) != denied and real(p, mode))
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        with pytest.raises(CheckpointDenied, match="no permission to read .*manifest.ocdbt; fix "
                                                   "its permissions") as err:
            checkpoints.restore_latest(lambda m: abstract(state))
    assert "\n" not in str(err.value)
    assert not [r for r in caplog.records if r.name == LOGGER]  # no fallback to checkpoint 4


DAMAGED_RESTORE = """
import gc, sys, time
from pathlib import Path
from tests.test_checkpoints import abstract, corrupt, make_meta, make_state
from relu_sparsity.runs.checkpoints import Checkpoints
states = {step: make_state(step=step) for step in (4, 8)}
with Checkpoints(sys.argv[1], keep=3) as checkpoints:
    for step, state in states.items():
        checkpoints.save(step, state, make_meta())
if sys.argv[2:] == ["unsealed"]:  # as if its process stopped right after the save
    (Path(sys.argv[1]) / "00000008" / "checksums.json").unlink()
corrupt(Path(sys.argv[1]), 8, "truncate")
with Checkpoints(sys.argv[1], keep=3) as checkpoints:
    print("restored", checkpoints.restore_latest(lambda m: abstract(states[4]))[0])
time.sleep(1)  # the late reads report now
gc.collect()
"""


def test_a_damaged_checkpoint_leaves_no_event_loop_error(tmp_path):
    # Damage is found before TensorStore reads: a read failing inside it leaves orbax's other
    # reads finishing into a closed event loop, which Python reports at exit.
    output = finish(run_python(DAMAGED_RESTORE, str(tmp_path), devices=1), timeout=120)
    assert "restored 4" in output and "Event loop is closed" not in output, output[-3000:]


def test_a_torn_checkpoint_without_checksums_is_one_warning_line(tmp_path):
    # TensorStore finds the damage (run apart: its failed reads end in a closed event loop), and
    # its message goes on with the whole array spec, which the warning leaves out.
    output = finish(run_python(DAMAGED_RESTORE, str(tmp_path), "unsealed", devices=1),
                    timeout=120)
    lines = output.splitlines()
    start = [i for i, line in enumerate(lines) if "checkpoint 8 cannot be read (" in line]
    assert len(start) == 1 and "restored 4" in output, output[-3000:]
    warning = lines[start[0]]
    assert warning.endswith("trying the one before") and "tensorstore_spec" not in warning


def test_nothing_readable_raises(tmp_path, caplog):
    state = make_state()
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        assert checkpoints.restore_latest(lambda m: abstract(state)) is None
        for step in (4, 8):
            checkpoints.save(step, state, make_meta())
    corrupt(tmp_path, 4, "truncate")
    (tmp_path / "00000008" / "meta" / "metadata").write_text('{"unit_st')
    with Checkpoints(tmp_path, keep=3) as checkpoints, caplog.at_level(logging.WARNING):
        with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(tried steps "
                                             r"\[4, 8\]"):
            checkpoints.restore_latest(lambda m: abstract(state))
    assert [r.getMessage()[:24] for r in caplog.records if r.name == LOGGER] == [
        "checkpoint 8 cannot be r", "checkpoint 4 cannot be r"]


def test_legacy_folder_refused(tmp_path):
    (tmp_path / "ckpt_00000008.msgpack").write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"earlier version of relu-sparsity \(msgpack: "
                                         r"ckpt_00000008.msgpack\); .* --start-over") as err:
        Checkpoints(tmp_path, keep=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        check_not_legacy(tmp_path)
    with Checkpoints(tmp_path, keep=2, start_over=True) as checkpoints:
        assert checkpoints.steps() == [] and not list(tmp_path.glob("*.msgpack"))


def test_delete_all(tmp_path):
    state = make_state()
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        checkpoints.save(1, state, make_meta())
        checkpoints.save(2, state, make_meta())
        checkpoints.delete_all()
        assert checkpoints.steps() == []
        assert checkpoints.restore_latest(lambda m: abstract(state)) is None
    with Checkpoints(tmp_path, keep=3) as checkpoints:
        assert checkpoints.steps() == []


def test_meta_refuses_what_json_would_change(tmp_path):
    with Checkpoints(tmp_path, keep=1) as checkpoints:
        with pytest.raises(TypeError, match=r"meta\['pruning'\]: a meta dict needs string keys"):
            checkpoints.save(1, make_state(), {"pruning": {0: 1}})
        assert checkpoints.steps() == []


# Several devices and processes, in subprocesses (the device count is fixed when jax starts) ----
COMMON = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from relu_sparsity.runs.checkpoints import Checkpoints

def make(mesh, scale):
    rows = NamedSharding(mesh, P("data", None))
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) * scale
    wi = jax.make_array_from_callback(full.shape, rows, lambda index: full[index])
    bias = jax.device_put(np.full(3, scale, np.float32), NamedSharding(mesh, P()))
    step = jax.device_put(np.int32(scale), NamedSharding(mesh, P()))
    return {"params": {"wi": wi, "bias": bias}, "step": step}, full

def check(state, full, scale, sharding):
    assert state["params"]["wi"].sharding == sharding, state["params"]["wi"].sharding
    for shard in state["params"]["wi"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    assert int(np.asarray(state["step"].addressable_data(0))) == scale
"""

TWO_DEVICES = COMMON + """
assert jax.device_count() == 2, jax.devices()
mesh = jax.make_mesh((2,), ("data",))
state, full = make(mesh, 3)
abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state)
with Checkpoints(Path(sys.argv[1]), keep=2) as checkpoints:
    checkpoints.save(3, state, {"pruning": {}})
with Checkpoints(Path(sys.argv[1]), keep=2) as checkpoints:
    step, restored, meta = checkpoints.restore_latest(lambda meta: abstract)
assert step == 3 and meta == {"pruning": {}}
check(restored, full, 3, state["params"]["wi"].sharding)
print("restored on", len(restored["params"]["wi"].addressable_shards), "devices")
"""

TWO_PROCESSES = COMMON + """
port, pid, folder = sys.argv[2], int(sys.argv[3]), Path(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", 2, pid)
assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
mesh = jax.make_mesh((4,), ("data",))
states = {scale: make(mesh, scale) for scale in (1, 2)}
abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        states[1][0])
with Checkpoints(folder, keep=2) as checkpoints:
    for scale, (state, _) in states.items():
        checkpoints.save(scale, state, {"process": pid, "units": np.arange(3) < pid})
with Checkpoints(folder, keep=2) as checkpoints:
    step, restored, meta = checkpoints.restore_latest(lambda meta: abstract)
    assert step == 2 and meta["process"] == 0, (step, meta)  # process 0 writes the meta
    check(restored, states[2][1], 2, abstract["params"]["wi"].sharding)
    # Checkpoint 2 does not read on process 1 alone: both processes take checkpoint 1.
    if pid == 1:
        read = checkpoints._read
        checkpoints._read = lambda step, t: 1 / 0 if step == 2 else read(step, t)
    step, restored, meta = checkpoints.restore_latest(lambda meta: abstract)
    assert step == 1, step
    check(restored, states[1][1], 1, abstract["params"]["wi"].sharding)
print("process", pid, "ok")
"""


def run_python(script: str, *args: str, devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                            cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"timed out:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


CRASH_MID_SAVE = """
import os, sys, time
from pathlib import Path
from tests.test_checkpoints import make_meta, make_state
from relu_sparsity.runs.checkpoints import Checkpoints
checkpoints = Checkpoints(sys.argv[1], keep=1)
checkpoints.save(4, make_state(step=4), make_meta())
checkpoints.wait()
checkpoints.save(8, make_state(step=8, width=400_000), make_meta())
# orbax makes the temporary folder from a background thread: exit once it exists, while
# step 8 is being written.
tmp, deadline = Path(sys.argv[1]) / "00000008.orbax-checkpoint-tmp", time.time() + 60
while not tmp.is_dir() and time.time() < deadline:
    time.sleep(0.001)
os._exit(0)
"""


def test_crash_mid_save_keeps_the_previous(tmp_path):
    finish(run_python(CRASH_MID_SAVE, str(tmp_path), devices=1), timeout=120)
    assert (tmp_path / "00000008.orbax-checkpoint-tmp").is_dir()
    state = make_state(step=4)
    with Checkpoints(tmp_path, keep=1) as checkpoints:
        assert checkpoints.steps() == [4]
        step, restored, _ = checkpoints.restore_latest(lambda m: abstract(state))
        assert step == 4
        assert_states_equal(restored, state)
        checkpoints.save(8, make_state(step=8), make_meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000008"]


def test_sharded_over_two_devices(tmp_path):
    output = finish(run_python(TWO_DEVICES, str(tmp_path), devices=2), timeout=120)
    assert "restored on 2 devices" in output


def test_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [run_python(TWO_PROCESSES, str(tmp_path), str(port), str(pid), devices=2)
                 for pid in (0, 1)]
    try:
        outputs = [finish(p, timeout=180) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for pid, output in enumerate(outputs):
        assert f"process {pid} ok" in output
