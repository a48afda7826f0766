"""Counts past the ranges of narrow integers: more than 255 and more than 65,535 units used on
one token, in one sequence or in one batch, and a unit used on more than 65,535 tokens of one
sequence, in the reference backend, the bit helpers and the metrics, each against a plain numpy
count of the use pattern."""

import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import SparsityStats, fused_mlp_up
from relu_sparsity.kernels import bits
from relu_sparsity.train.metrics import UnitStates, layer_records, sparsity_metrics

WIDE = 65_600  # units: past 65,535 (16 bits) and 255 (8 bits); 65,600 % 256 = 64, % 65536 = 64
LONG = 65_600  # tokens in one sequence


def wide_pattern() -> np.ndarray:
    """bool [4, WIDE]: 2 sequences of 2 tokens. Token 0 uses every unit, token 1 uses 300;
    token 2 uses units [0, 40000), token 3 units [30000, WIDE), so sequence 1 uses every unit
    with no token of it above 40,000."""
    used = np.zeros((4, WIDE), bool)
    used[0] = True
    used[1, np.arange(300) * 200] = True
    used[2, :40_000] = True
    used[3, 30_000:] = True
    return used


def numpy_words(used: np.ndarray) -> np.ndarray:
    """Bit j % 32 of word j // 32: each word the sum of its units' powers of two, in 64 bits."""
    *lead, f = used.shape
    w = (f + 31) // 32
    padded = np.zeros((*lead, w * 32), np.uint64)
    padded[..., :f] = used
    powers = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (padded.reshape(*lead, w, 32) * powers).sum(axis=-1).astype(np.uint32)


def test_reference_counts_past_16_bits_on_tokens_and_sequences():
    """The reference's token counts, sequence counts and masks at 65,600 units against numpy
    sums of the use pattern."""
    used = wide_pattern()
    # x = identity, b1 = 0: h = relu(w1), so w1's sign pattern is the use pattern.
    x = jnp.eye(4, dtype=jnp.float32)
    w1 = jnp.asarray(np.where(used, 1.0, -1.0), jnp.float32)
    h, stats = fused_mlp_up(x, w1, jnp.zeros(WIDE, jnp.float32), seq_len=2,
                            with_token_mask=True, backend="reference")
    token_count = np.asarray(stats.token_count)
    assert token_count.tolist() == [65_600, 300, 40_000, 35_600]
    assert token_count.tolist() == used.sum(axis=1).tolist()
    seq_count = np.asarray(stats.seq_count)
    np.testing.assert_array_equal(seq_count, used.reshape(2, 2, WIDE).sum(axis=1))
    assert seq_count.dtype == np.int32 and token_count.dtype == np.int32
    # Sequence 0 and 1 each use all 65,600 units.
    np.testing.assert_array_equal(np.asarray(stats.seq_mask),
                                  numpy_words(used.reshape(2, 2, WIDE).any(axis=1)))
    np.testing.assert_array_equal(np.asarray(stats.token_mask), numpy_words(used))
    assert int(np.asarray(bits.popcount(stats.seq_mask))[1]) == 65_600


def test_reference_counts_one_unit_on_more_than_65535_tokens_of_a_sequence():
    """A sequence of 65,600 tokens: the sequence count of a unit used on every token, and of one
    used on 300, against numpy sums."""
    x = jnp.ones((LONG, 1), jnp.float32)
    # Unit 0: every token; unit 1: never; unit 2: the 300 tokens whose x is raised to 2.
    x = x.at[np.arange(300) * 7, 0].set(2.0)
    w1 = jnp.asarray([[1.0, -1.0, 1.0]], jnp.float32)
    b1 = jnp.asarray([0.0, 0.0, -1.5], jnp.float32)
    _, stats = fused_mlp_up(x, w1, b1, seq_len=LONG, backend="reference")
    used = np.zeros((LONG, 3), bool)
    used[:, 0] = True
    used[np.arange(300) * 7, 2] = True
    assert np.asarray(stats.seq_count).tolist() == [used.sum(axis=0).tolist()] \
        == [[65_600, 0, 300]]
    assert np.asarray(stats.token_count).tolist() == used.sum(axis=1).tolist()


@pytest.mark.parametrize("num_units", [300, 65_536, WIDE])
def test_bit_helpers_count_past_16_bits(num_units):
    """pack / unpack / popcount / OR of rows, jax and numpy versions, against Python counts of
    the bits set."""
    rng = np.random.default_rng(num_units)
    used = np.zeros((3, num_units), bool)
    used[0] = True  # every unit
    used[1, rng.choice(num_units, 257, replace=False)] = True  # 257 units
    used[2, num_units // 2:] = True  # the upper half
    want_counts = [num_units, 257, num_units - num_units // 2]
    words = numpy_words(used)
    np.testing.assert_array_equal(bits.np_pack_bits(used), words)
    np.testing.assert_array_equal(np.asarray(bits.pack_bits(jnp.asarray(used))), words)
    np.testing.assert_array_equal(bits.np_unpack_bits(words, num_units), used)
    np.testing.assert_array_equal(np.asarray(bits.unpack_bits(jnp.asarray(words), num_units)),
                                  used)
    assert bits.np_popcount(words).tolist() == want_counts
    assert np.asarray(bits.popcount(jnp.asarray(words))).tolist() == want_counts
    union = used[1] | used[2]
    np.testing.assert_array_equal(bits.np_or_rows(words[1:]), numpy_words(union[None])[0])
    np.testing.assert_array_equal(np.asarray(bits.or_rows(jnp.asarray(words[1:]))),
                                  numpy_words(union[None])[0])
    assert int(bits.np_popcount(bits.np_or_rows(words[1:]))) == int(union.sum())


def stats_of_used(used: np.ndarray, seq_len: int) -> SparsityStats:
    """The contract's statistics of a use pattern [T, F], by numpy sums and Python bit packing."""
    t, f = used.shape
    seq_count = used.reshape(t // seq_len, seq_len, f).sum(axis=1).astype(np.int32)
    return SparsityStats(used.sum(axis=1).astype(np.int32), seq_count,
                         numpy_words(seq_count > 0), None)


def test_metrics_past_16_bits():
    """sparsity_metrics and the unit states at 65,600 units against the use pattern's counts
    worked out by hand."""
    used = wide_pattern()
    m = sparsity_metrics(stats_of_used(used, 2), num_units=WIDE)
    token_counts = [65_600, 300, 40_000, 35_600]
    assert m["token_use"] == pytest.approx(sum(token_counts) / 4 / WIDE, rel=1e-12)
    assert m["seq_use"] == pytest.approx(1.0, rel=1e-12)  # both sequences use every unit
    assert m["batch_use"] == pytest.approx(1.0, rel=1e-12)
    per_seq = [(65_600 + 300) / 2 / 65_600, (40_000 + 35_600) / 2 / 65_600]
    assert m["token_per_seq"] == pytest.approx(np.mean(per_seq), rel=1e-12)
    assert m["seq_per_batch"] == pytest.approx(1.0, rel=1e-12)
    # p50: sequence 0's counts are 300 twos and 65,300 ones; sequence 1's 10,000 twos and
    # 55,600 ones; every unit is used, so the 50th percentile is 1 token of 2.
    assert m["p50"] == pytest.approx(0.5, rel=1e-12)
    states = UnitStates(WIDE)
    first = states.update(numpy_words(used[2][None])[0])  # on0: units [0, 40000)
    assert first["on0"] == pytest.approx(40_000 / WIDE, rel=1e-12)
    later = states.update(numpy_words(used[3][None])[0])  # units [30000, WIDE)
    assert later["turned_on"] == pytest.approx(25_600 / WIDE, rel=1e-12)
    assert later["turned_off"] == pytest.approx(30_000 / WIDE, rel=1e-12)
    assert later["never_on"] == 0.0


def test_metrics_of_a_sequence_longer_than_65535_tokens():
    """Per-token and percentile figures of one 65,600-token sequence, by hand: unit 0 on every
    token, unit 2 on 300 tokens."""
    used = np.zeros((LONG, 3), bool)
    used[:, 0] = True
    used[:300, 2] = True
    m = sparsity_metrics(stats_of_used(used, LONG), num_units=3)
    assert m["token_use"] == pytest.approx((LONG + 300) / LONG / 3, rel=1e-12)
    assert m["seq_use"] == pytest.approx(2 / 3, rel=1e-12)
    # Used units' counts [65600, 300]; p90 rescaled to 90 * 2/3 + 100/3 = 93.33 over
    # [0, 300, 65600]: position 1.8667 -> 300 + 0.8667 * 65300 tokens.
    q = 90 * 2 / 3 + 100 / 3
    position = q / 100 * 2
    want = 300 + (position - 1) * (LONG - 300)
    assert m["p90"] == pytest.approx(want / LONG, rel=1e-9)


def test_layer_records_union_of_devices_past_16_bits():
    """Two devices, each using 40,000 of 65,600 units, together all of them: per-device batch
    use, the union's use and the mask rows, against the hand counts."""
    used = np.zeros((4, WIDE), bool)  # device 0: tokens 0-1 (one sequence); device 1: 2-3
    used[0, :40_000] = True
    used[2, 25_600:] = True
    records, masks = layer_records([stats_of_used(used, 2)], [UnitStates(WIDE)], None,
                                   num_devices=2)
    r = records[0]
    assert r["batch_use"] == pytest.approx(40_000 / WIDE, rel=1e-12)
    assert r["batch_use_all_devices"] == pytest.approx(1.0, rel=1e-12)
    assert r["final"] == pytest.approx(1.0, rel=1e-12)
    assert bits.np_popcount(masks[0]).tolist() == [40_000, 40_000]
