"""Unit life histories (train/history.py): the device-side accumulators equal a host-side
recomputation from every step's batch mask, survive a resume exactly, and follow compaction."""

import json

import numpy as np
import pytest

from relu_sparsity.kernels.bits import np_unpack_bits
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import preset
from relu_sparsity.train.history import HISTORY_FIELDS
from relu_sparsity.train.trainer import train


def every_step_config(cache_dir, *overrides):
    return preset("tiny", [
        f"data.cache={json.dumps(str(cache_dir))}", "data.vocab_size=512", "model.num_layers=2",
        "model.d_model=32", "model.num_heads=2", "model.d_ff=[40,24]", "model.seq_len=16",
        "train.batch_size=2", "train.steps=20", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=100", "train.eval_batches=1", "train.checkpoint_every=10",
        "train.peak_lr=3e-2", "train.prune_multiple=1", *overrides])


def recomputed(folder: RunFolder, layer: int, width: int, window: int = 200
               ) -> dict[str, np.ndarray]:
    """The histories from the batch masks of every step (all logged), on the host."""
    first = np.full(width, -1)
    last = np.full(width, -1)
    count = np.zeros(width, int)
    longest = np.zeros(width, int)
    returned = np.full(width, -1)
    for step in folder.mask_steps():
        used = np_unpack_bits(np.bitwise_or.reduce(folder.read_masks(step)[layer], axis=0),
                              width)
        came_back = used & (last >= 0)
        longest = np.where(came_back, np.maximum(longest, step - last - 1), longest)
        returned = np.where(came_back & (step - last - 1 >= window), step, returned)
        first = np.where(used & (first < 0), step, first)
        last = np.where(used, step, last)
        count += used
    return {"first_on": first, "last_on": last, "on_steps": count, "longest_off": longest,
            "last_return": returned}


def units(run) -> dict[str, np.ndarray]:
    with np.load(run / "units.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def straight(cache_dir, tmp_path_factory):
    """A run of 20 steps, every one logged."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(every_step_config(cache_dir, "train.prune_window=3"), run, progress=False)
    return run


def test_histories_equal_every_step_recomputation(straight):
    got, folder = units(straight), RunFolder(straight)
    assert int(got["step"]) == 19 and folder.mask_steps() == list(range(20))
    for layer, width in enumerate((40, 24)):
        want = recomputed(folder, layer, width, window=3)
        for field in HISTORY_FIELDS:
            np.testing.assert_array_equal(got[f"{field}_{layer}"], want[field], err_msg=field)
    # Not vacuous: some unit was off for a while and came back, one after 3 steps or more.
    assert max(got["longest_off_0"].max(), got["longest_off_1"].max()) > 0
    assert max(got["last_return_0"].max(), got["last_return_1"].max()) >= 0
    # never_on is exact: the units never used at any step.
    last = folder.read_metrics()[-1]["layers"]
    assert last[0]["never_on"] == np.mean(got["first_on_0"] < 0)


def test_resume_keeps_histories(cache_dir, straight, tmp_path):
    resumed = tmp_path / "resumed"
    config = every_step_config(cache_dir, "train.prune_window=3")
    train(config, resumed, progress=False, max_steps=9)
    train(config, resumed, progress=False)
    a, b = units(straight), units(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_histories_keep_original_ids_after_compaction(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(every_step_config(cache_dir, "train.prune=compact", "train.prune_at=8"), run,
          progress=False)
    got, folder = units(run), RunFolder(run)
    for layer, width in enumerate((40, 24)):
        assert got[f"first_on_{layer}"].shape == (width,)
        want = recomputed(folder, layer, width)
        np.testing.assert_array_equal(got[f"on_steps_{layer}"], want["on_steps"])
    # The units the prune step's batch did not use are removed: never on again.
    for layer, width in enumerate((40, 24)):
        mask = np.bitwise_or.reduce(folder.read_masks(8)[layer], axis=0)
        removed = ~np_unpack_bits(mask, width)
        assert removed.any() or layer == 1
        assert (got[f"last_on_{layer}"][removed] < 8).all()


def arrays(last_on, last_return):
    return {"last_on_0": np.asarray(last_on), "last_return_0": np.asarray(last_return)}


def test_auto_prune_waits_for_a_stable_unused_set():
    from relu_sparsity.train.history import auto_prune_ready

    window = 10
    # At step 40: unit 2 last used at step 25 (unused for 15 steps), no return: ready.
    assert auto_prune_ready(arrays([40, 39, 25], [-1, -1, -1]), 40, window)
    # Every unit used within the window: nothing to prune.
    assert not auto_prune_ready(arrays([40, 39, 31], [-1, -1, -1]), 40, window)
    # Unit 1 came back at step 35 after 10 steps off: not stable yet.
    assert not auto_prune_ready(arrays([40, 39, 25], [-1, 35, -1]), 40, window)
    # ... and stable again once that return is more than a window ago.
    assert auto_prune_ready(arrays([46, 45, 25], [-1, 35, -1]), 46, window)
    # Too early to have seen a whole window twice.
    assert not auto_prune_ready(arrays([12, 1, 0], [-1, -1, -1]), 12, window)


def test_auto_prune_fires_where_units_die(cache_dir, tmp_path):
    run = tmp_path / "run"
    config = every_step_config(cache_dir, "train.steps=40", "train.prune=compact",
                               "train.prune_at=auto", "train.prune_window=8")
    train(config, run, progress=False)
    records = RunFolder(run).read_metrics()
    pruned = [r for r in records if "pruned" in r]
    assert len(pruned) == 1
    step, entry = pruned[0]["step"], pruned[0]["pruned"]
    assert entry["auto"]["window"] == 8 and "came back" in entry["auto"]["why"]
    assert sum(entry["kept"]) < 40 + 24
    # Every unit removed was unused over the window before the step.
    with np.load(run / "units.npz") as f:
        for layer in range(2):
            kept = entry["kept"][layer]
            assert (f[f"last_on_{layer}"] >= step - 7).sum() <= kept
    assert records[-1]["layers"][0]["d_ff"] == entry["kept"][0]
