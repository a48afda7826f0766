"""The numbers the paper's tables are made of, against hand computations and plain-numpy oracles
that share no code with the functions they check: per-batch metrics with a sequence that used no
unit, unit states, the units a prune keeps, the report's window means and the eval loss."""

import numpy as np
import pytest

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.kernels.bits import np_pack_bits
from relu_sparsity.report.numbers import final_means, used_units
from relu_sparsity.train.metrics import UnitStates, sparsity_metrics
from relu_sparsity.train.pruning import choose_units
from relu_sparsity.train.steps import evaluate

F = 64


def stats_of(token_units: list[list[set[int]]]) -> SparsityStats:
    """SparsityStats of a batch given, per sequence and token, the set of units with h > 0."""
    token_count = np.array([len(u) for seq in token_units for u in seq], np.int32)
    seq_count = np.zeros((len(token_units), F), np.int32)
    for s, seq in enumerate(token_units):
        for units in seq:
            seq_count[s, sorted(units)] += 1
    seq_mask = np.stack([np_pack_bits(row > 0) for row in seq_count])
    return SparsityStats(token_count, seq_count, seq_mask, None)


def test_batch_metrics_by_hand_with_a_sequence_that_used_no_unit():
    # Sequence 0 uses {0,1} then {1,2}; sequence 1 uses nothing; sequence 2 uses {5} then nothing.
    stats = stats_of([[{0, 1}, {1, 2}], [set(), set()], [{5}, set()]])
    m = sparsity_metrics(stats, num_units=F)
    assert m["token_use"] == pytest.approx((2 + 2 + 0 + 0 + 1 + 0) / 6 / F)
    assert m["seq_use"] == pytest.approx((3 + 0 + 1) / 3 / F)  # the empty sequence counts as 0
    assert m["batch_use"] == pytest.approx(4 / F)
    # Units per token / units per sequence, averaged over the sequences that used a unit: the
    # empty one has no ratio (0 / 0), and it must not count as 0 either.
    assert m["token_per_seq"] == pytest.approx(((2 / 3) + (0.5 / 1)) / 2)
    assert m["seq_per_batch"] == pytest.approx((4 / 3) / 4)


def test_unit_states_against_plain_numpy():
    rng = np.random.default_rng(3)
    masks = rng.random((6, F)) < np.linspace(0.9, 0.2, 6)[:, None]  # units turn off over time
    masks[3, 7] = True  # unit 7 off at batch 0, on later: turned on
    masks[0, 7] = False
    masks[:, 9] = False  # never on
    states = UnitStates(F)
    for t, used in enumerate(masks):
        got = states.update(np_pack_bits(used))
        on0, ever = masks[0], masks[:t + 1].any(axis=0)
        assert got == pytest.approx({"on0": on0.mean(), "turned_on": (~on0 & used).mean(),
                                     "turned_off": (on0 & ~used).mean(), "final": used.mean(),
                                     "never_on": (~ever).mean()})
    assert got["never_on"] >= 1 / F and got["turned_on"] >= 1 / F


def test_a_layer_that_used_no_unit_keeps_one():
    empty, some = np.zeros(2, np.uint32), np_pack_bits(np.arange(F) % 3 == 0)
    pruning = choose_units("compact", [empty, some], (F, F), step=4, seed=0)
    assert [len(k) for k in pruning.keep] == [1, (F + 2) // 3]


def test_random_pruning_is_seeded_by_seed_and_step():
    masks = [np_pack_bits(np.arange(F) < 20)]
    pick = lambda seed, step: choose_units("random", masks, (F,), step, seed).keep[0]  # noqa: E731
    np.testing.assert_array_equal(pick(0, 4), pick(0, 4))  # a resumed run picks the same units
    assert len(pick(0, 4)) == 20 and np.all(np.diff(pick(0, 4)) > 0)  # sorted unit ids
    assert not np.array_equal(pick(0, 4), pick(1, 4))
    assert not np.array_equal(pick(0, 4), pick(0, 5))


def layer_record(batch_use, d_ff):
    return {"layers": [{"batch_use": batch_use, "d_ff": d_ff}]}


def test_window_means_skip_a_bad_record_and_use_each_records_width():
    records = [layer_record(0.5, 100), layer_record(float("nan"), 100), layer_record(0.8, 50)]
    # The NaN record is left out of the mean, not allowed to blank the cell.
    assert final_means(records, 3)[0]["batch_use"] == pytest.approx((0.5 + 0.8) / 2)
    # Units used: each record's use times its own width (the width changed inside the window).
    assert used_units(records, 3) == [pytest.approx((0.5 * 100 + 0.8 * 50) / 2)]


def test_eval_loss_is_per_target_token():
    # Two batches of 2 sequences of 5 tokens: 4 targets each, 16 in all.
    batches = [np.zeros((2, 5), np.int32), np.ones((2, 5), np.int32)]
    sums = iter([(8.0, 3), (4.0, 5)])  # (summed cross-entropy, correct predictions) per batch

    def eval_step(params, tokens):
        return next(sums)

    got = evaluate(eval_step, None, batches, place=lambda t: t, fetch=lambda x: x)
    assert got == {"eval_loss": pytest.approx(12.0 / 16), "eval_accuracy": pytest.approx(8 / 16)}


def test_mask_and_compact_report_the_same_figures_for_the_same_model():
    # 40 of 64 units kept; compact computes them at a padded width of 48 (8 zero padding units),
    # mask at the full 64 (24 dead units). The same use must give the same figures, percentiles
    # included: neither padding nor dead units count as units of the layer.
    from relu_sparsity.train.metrics import layer_records
    from relu_sparsity.train.pruning import Pruning

    rng = np.random.default_rng(5)
    keep = np.sort(rng.choice(F, 40, replace=False))
    seq_len, n_seq = 4, 3
    kept_units = [[set(np.flatnonzero(rng.random(40) < 0.3).tolist()) for _ in range(seq_len)]
                  for _ in range(n_seq)]
    in_original_ids = [[{int(keep[u]) for u in tok} for tok in seq] for seq in kept_units]
    compact_stats = stats_of(kept_units)  # columns 0..39 the kept units, 40.. padding
    compact_stats = compact_stats._replace(seq_count=compact_stats.seq_count[:, :48],
                                           seq_mask=compact_stats.seq_mask[:, :2])
    records = {}
    for mode, stats in (("compact", compact_stats), ("mask", stats_of(in_original_ids))):
        pruning = Pruning(mode, 0, (keep,), (F,), 16)
        records[mode], _ = layer_records([stats], [UnitStates(F)], pruning)
    assert records["compact"][0] == pytest.approx(records["mask"][0])
    assert records["compact"][0]["d_ff"] == 40


def test_a_pruned_run_is_reported_on_one_base(tmp_path, monkeypatch):
    # 64 units until the prune step 8, 40 kept after it. The window holds only steps after the
    # prune (one width), Table 1 gives both bases, Figure 1 marks the prune step.
    from relu_sparsity.report.figures import write_plots
    from relu_sparsity.report.numbers import last_layer_records
    from relu_sparsity.report.tables import format_tables

    def rec(step, d_ff, use, **extra):
        return {"step": step, "loss": 1.0, **extra,
                "layers": [{"d_ff": d_ff, "batch_use": use, "token_use": use / 10}]}

    records = [rec(0, 64, 1.0), rec(4, 64, 0.8), rec(8, 64, 0.625, pruned={"mode": "compact"}),
               rec(12, 40, 0.9), rec(16, 40, 1.0)]
    assert [r["step"] for r in last_layer_records(records, 5)] == [12, 16]
    assert final_means(records, 5)[0]["batch_use"] == pytest.approx(0.95)
    assert used_units(records, 5) == [pytest.approx(38.0)]  # what --widths-from takes
    table1 = format_tables("run", records, 5).split("### Table 2")[0]
    assert "| 0 | 9.5 | n/a | 95.0 | n/a | n/a | 59.4 |" in table1  # 0.95 x 40 / 64 = 59.4%
    assert "after the prune step 8" in table1
    from relu_sparsity.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_finish",
                        lambda fig, path, handles: drawn.setdefault(path.name, (fig, handles)))
    write_plots([("run", records)], tmp_path)
    fig, handles = drawn["fig1_batch_use.png"]
    (ax,) = [a for a in fig.axes if a.get_visible()]
    verticals = [line for line in ax.get_lines() if list(line.get_xdata()) == [8, 8]]
    assert len(verticals) == 1 and any("prune step" in h.get_label() for h in handles)
    assert ax.get_ylabel() == "fraction of current d_ff"


def test_masking_table_gives_step_times_with_their_spread(tmp_path):
    import json

    from relu_sparsity.train.experiments import masking_table

    # 1000 tokens a step; tokens/s 1e5 -> 10 ms. Before the prune step (4): 10, 10, 20 ms
    # (median 10, IQR 5); after it (from step 6): 5, 5, 5 ms.
    speeds = {0: 1e3, 2: 1e5, 3: 1e5, 4: 5e4, 5: 7e4, 6: 2e5, 8: 2e5, 10: 2e5}
    run = tmp_path / "compact"
    run.mkdir()
    records = [{"step": s, "tokens_per_s": v, "layers": [{"d_ff": 10}]} for s, v in speeds.items()]
    records[3]["pruned"] = {"kept": [6]}
    records[-1].update(eval_loss=2.0, eval_accuracy=0.5)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = next(line for line in masking_table({"compact": run}, 4, 1000).splitlines()
               if line.startswith("| compact"))
    assert row == "| compact | 6 / 10 (60.0%) | 2.0000 | 50.00% | 10.00 (5.00, 3) | 5.00 (0.00, 3) | 0.500 |"
