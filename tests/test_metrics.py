"""The paper's metrics: hand-worked A.6 examples, a plain numpy recomputation, unit states."""

import numpy as np
import pytest

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.kernels.bits import np_pack_bits
from relu_sparsity.train.metrics import (
    UnitStates,
    batch_mask,
    percentile_used_dimension_count,
    sparsity_metrics,
)


def stats_from_used(used: np.ndarray) -> SparsityStats:
    """used: bool [n_seq, seq_len, F] -> the kernel's statistics."""
    n_seq, seq_len, f = used.shape
    seq_count = used.sum(1).astype(np.int32)
    return SparsityStats(used.reshape(-1, f).sum(1).astype(np.int32), seq_count,
                         np_pack_bits(seq_count > 0), None)


def test_hand_worked_example():
    # 2 sequences of 4 tokens, 4 units.
    # seq 0: unit 0 on tokens 0,1; unit 2 on every token; units 1, 3 never.
    # seq 1: unit 1 on token 3 only; others never.
    used = np.zeros((2, 4, 4), bool)
    used[0, :2, 0] = True
    used[0, :, 2] = True
    used[1, 3, 1] = True
    m = sparsity_metrics(stats_from_used(used), num_units=4)
    # token counts: seq 0: 2,2,1,1 -> mean 1.5; seq 1: 0,0,0,1 -> 0.25; overall 7/8 over 4 units.
    assert m["token_use"] == pytest.approx(7 / 8 / 4)
    # seq dims: 2 and 1 -> mean 1.5 of 4.
    assert m["seq_use"] == pytest.approx(1.5 / 4)
    # batch: units 0, 1, 2.
    assert m["batch_use"] == pytest.approx(3 / 4)
    # token/seq per sequence: 1.5/2 and 0.25/1 -> mean 0.5.
    assert m["token_per_seq"] == pytest.approx(0.5)
    assert m["seq_per_batch"] == pytest.approx(1.5 / 3)
    # A.6.1 on seq 0: counts [2, 0, 4, 0], half the units used: rescaled p50 = 75 ->
    # numpy linear percentile of [0, 0, 2, 4] at 75 = 2.5 tokens -> 2.5 / 4.
    # seq 1: counts [0, 1, 0, 0], a quarter used: rescaled p50 = 87.5 -> position 2.625 of
    # [0, 0, 0, 1] -> 0.625 tokens -> 0.625 / 4.
    assert m["p50"] == pytest.approx((2.5 / 4 + 0.625 / 4) / 2)
    # p90 on seq 0: rescaled 95 -> position 2.85 of [0, 0, 2, 4] -> 3.7 tokens.
    # seq 1: rescaled 97.5 -> position 2.925 -> 0.925 tokens.
    assert m["p90"] == pytest.approx((3.7 / 4 + 0.925 / 4) / 2)


def test_paper_pseudocode_on_activations():
    # A.6.1's own pseudocode (summing activation values) agrees with ours when the activations
    # are 0/1, which is how we apply it.
    rng = np.random.default_rng(0)
    seq = (rng.random((16, 40)) < 0.2).astype(np.float64)

    def paper(seq, percentile):
        seq_dim = seq.shape[0]
        use_count_by_dimension = np.sum(seq, axis=0)
        frac = np.sum(use_count_by_dimension > 0) / use_count_by_dimension.shape[0]
        new_percentile = percentile * frac + 100 * (1 - frac)
        return np.percentile(use_count_by_dimension, new_percentile) / seq_dim

    for p in (50, 65, 75, 90):
        ours = percentile_used_dimension_count(seq.sum(0)[None], 16, p)[0]
        assert ours == pytest.approx(paper(seq, p))


def numpy_metrics(h: np.ndarray) -> dict[str, float]:
    """Section 2.1 and A.6 straight from activations h [n_seq, seq_len, F]."""
    n_seq, seq_len, f = h.shape
    used = h > 0
    token_dims = used.sum(2)  # [n_seq, seq_len]
    seq_dims = np.array([(s.sum(0) > 0).sum() for s in h])
    batch_dims = (h.reshape(-1, f).sum(0) > 0).sum()
    ratios = [token_dims[i].mean() / seq_dims[i] for i in range(n_seq) if seq_dims[i] > 0]
    out = {"token_use": token_dims.mean() / f, "seq_use": seq_dims.mean() / f,
           "batch_use": batch_dims / f, "token_per_seq": np.mean(ratios),
           "seq_per_batch": seq_dims.mean() / batch_dims}
    for p in (50, 65, 75, 90):
        vals = []
        for s in used:
            counts = s.sum(0)
            frac = (counts > 0).mean()
            vals.append(np.percentile(counts, p * frac + 100 * (1 - frac)) / seq_len)
        out[f"p{p}"] = np.mean(vals)
    return out


@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 16, 100), (1, 32, 64)])
def test_against_numpy_on_random_activations(shape):
    rng = np.random.default_rng(sum(shape))
    # Mostly-negative pre-activations with per-unit offsets, so use varies by unit.
    h = np.maximum(rng.normal(size=shape) - rng.uniform(0.5, 2.5, shape[-1]), 0)
    got = sparsity_metrics(stats_from_used(h > 0), num_units=shape[-1])
    want = numpy_metrics(h)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_live_units_use_current_width():
    rng = np.random.default_rng(3)
    used = rng.random((2, 8, 64)) < 0.3
    live = np.arange(0, 64, 2)
    used[:, :, np.setdiff1d(np.arange(64), live)] = False  # dead units count zero
    got = sparsity_metrics(stats_from_used(used), num_units=len(live), units=live)
    want = sparsity_metrics(stats_from_used(used[:, :, live]), num_units=len(live))
    assert got == pytest.approx(want)


def test_empty_batch_gives_zeros_not_nan():
    m = sparsity_metrics(stats_from_used(np.zeros((2, 4, 40), bool)), num_units=40)
    assert all(v == 0.0 for v in m.values()), m


def test_unit_states_on_hand_made_masks():
    f = 6
    states = UnitStates(f)
    masks = [
        [1, 1, 1, 0, 0, 0],  # step 0: on0 = {0, 1, 2}
        [1, 0, 1, 1, 0, 0],  # 1 off, 3 on
        [0, 0, 1, 0, 0, 0],  # 0, 1 off; 3 back off
    ]
    got = [states.update(np_pack_bits(np.array(m, bool))) for m in masks]
    assert got[0] == pytest.approx({"on0": 3 / 6, "turned_on": 0, "turned_off": 0,
                                    "final": 3 / 6, "never_on": 3 / 6})
    assert got[1] == pytest.approx({"on0": 3 / 6, "turned_on": 1 / 6, "turned_off": 1 / 6,
                                    "final": 3 / 6, "never_on": 2 / 6})
    # Unit 3 was on at step 1, so it is not never_on even though it is off now.
    assert got[2] == pytest.approx({"on0": 3 / 6, "turned_on": 0, "turned_off": 2 / 6,
                                    "final": 1 / 6, "never_on": 2 / 6})
    for g in got:  # the paper's identity: final = on0 + turned_on - turned_off
        assert g["final"] == pytest.approx(g["on0"] + g["turned_on"] - g["turned_off"])
    restored = UnitStates.from_state_dict(f, states.state_dict())
    assert restored.update(np_pack_bits(np.array(masks[0], bool))) == pytest.approx(
        states.update(np_pack_bits(np.array(masks[0], bool))))


def test_batch_mask_is_or_of_sequences():
    used = np.zeros((3, 2, 40), bool)
    used[0, 0, 1] = used[1, 1, 33] = used[2, 0, 39] = True
    want = np.zeros(40, bool)
    want[[1, 33, 39]] = True
    np.testing.assert_array_equal(batch_mask(stats_from_used(used)), np_pack_bits(want))
