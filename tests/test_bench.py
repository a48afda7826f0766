"""The kernel benchmark runs every variant and reports ratios against XLA's plain expression."""

import pytest

from relu_sparsity.bench import kernels as bench


def test_bench_rows_and_table():
    rows = bench.run(["256x32x100"], seq_len=64, dtype="float32", repeats=1)
    variants = [r["variant"] for r in rows]
    assert variants[0] == "xla dot+bias+relu" and rows[0]["ratio"] == 1.0
    assert "xla relu+stats (reference)" in variants and "reference no stats" in variants
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "256x32x100" in table


@pytest.mark.parametrize("shape", ["256x32", "axbxc", "1x2x3x4"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="TxDxF"):
        bench.parse_shape(shape)


def test_seq_len_must_divide_tokens():
    with pytest.raises(ValueError, match="seq_len"):
        bench.run(["100x8x8"], seq_len=64, dtype="float32", repeats=1)
