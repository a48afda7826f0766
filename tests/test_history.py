"""Unit life histories (train/history.py): the device-side accumulators equal a host-side
recomputation from every step's batch mask, survive a resume exactly, and follow compaction."""

import json

import numpy as np

from relu_sparsity.kernels.bits import np_unpack_bits
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import preset
from relu_sparsity.train.history import HISTORY_FIELDS
from relu_sparsity.train.trainer import train


def every_step_config(cache_dir, *overrides):
    return preset("tiny", [
        f"data.cache={json.dumps(str(cache_dir))}", "data.vocab_size=512", "model.num_layers=2",
        "model.d_model=32", "model.num_heads=2", "model.d_ff=[40,24]", "model.seq_len=16",
        "train.batch_size=2", "train.steps=30", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=100", "train.eval_batches=1", "train.checkpoint_every=10",
        "train.peak_lr=3e-2", "train.prune_multiple=1", *overrides])


def recomputed(folder: RunFolder, layer: int, width: int) -> dict[str, np.ndarray]:
    """The histories from the batch masks of every step (all logged), on the host."""
    first = np.full(width, -1)
    last = np.full(width, -1)
    count = np.zeros(width, int)
    longest = np.zeros(width, int)
    for step in folder.mask_steps():
        used = np_unpack_bits(np.bitwise_or.reduce(folder.read_masks(step)[layer], axis=0),
                              width)
        came_back = used & (last >= 0)
        longest = np.where(came_back, np.maximum(longest, step - last - 1), longest)
        first = np.where(used & (first < 0), step, first)
        last = np.where(used, step, last)
        count += used
    return {"first_on": first, "last_on": last, "on_steps": count, "longest_off": longest}


def units(run) -> dict[str, np.ndarray]:
    with np.load(run / "units.npz") as f:
        return {k: f[k] for k in f.files}


def test_histories_equal_every_step_recomputation(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(every_step_config(cache_dir), run, progress=False)
    got, folder = units(run), RunFolder(run)
    assert int(got["step"]) == 29 and folder.mask_steps() == list(range(30))
    for layer, width in enumerate((40, 24)):
        want = recomputed(folder, layer, width)
        for field in HISTORY_FIELDS:
            np.testing.assert_array_equal(got[f"{field}_{layer}"], want[field], err_msg=field)
    # Not vacuous: some unit was off for a while and came back.
    assert max(got["longest_off_0"].max(), got["longest_off_1"].max()) > 0
    # never_on is exact: the units never used at any step.
    last = folder.read_metrics()[-1]["layers"]
    assert last[0]["never_on"] == np.mean(got["first_on_0"] < 0)


def test_resume_keeps_histories(cache_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(every_step_config(cache_dir), straight, progress=False)
    train(every_step_config(cache_dir), resumed, progress=False, max_steps=13)
    train(every_step_config(cache_dir), resumed, progress=False)
    a, b = units(straight), units(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_histories_keep_original_ids_after_compaction(cache_dir, tmp_path):
    run = tmp_path / "run"
    train(every_step_config(cache_dir, "train.prune=compact", "train.prune_at=12"), run,
          progress=False)
    got, folder = units(run), RunFolder(run)
    for layer, width in enumerate((40, 24)):
        assert got[f"first_on_{layer}"].shape == (width,)
        want = recomputed(folder, layer, width)
        np.testing.assert_array_equal(got[f"on_steps_{layer}"], want["on_steps"])
    # The units the prune step's batch did not use are removed: never on again.
    for layer, width in enumerate((40, 24)):
        mask = np.bitwise_or.reduce(folder.read_masks(12)[layer], axis=0)
        removed = ~np_unpack_bits(mask, width)
        assert removed.any() or layer == 1
        assert (got[f"last_on_{layer}"][removed] < 12).all()
