"""pytest-benchmark timings of every kernel variant of `relu-sparsity bench` (speed is judged
from these and from `relu-sparsity bench` on the device, never asserted), through the same timer
(bench/timing.py: a round of back-to-back launches), grouped by shape; each variant's output is
first checked against the reference. On a CPU: two small shapes, XLA and the reference; on a GPU
a grid of training shapes and every compiled backend. `pytest tests/test_benchmarks.py
--benchmark-only --benchmark-json=FILE` keeps a history."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.bench.kernels import (
    PAPER_SHAPES,
    check_variant,
    launches_per_round,
    seq_len_for,
    variant_tiles,
    variants,
)
from relu_sparsity.bench.timing import environment, kernel_round
from relu_sparsity.kernels.testing import parse_shape, random_inputs

ON_GPU = jax.default_backend() == "gpu"
# T x D x F (:seq_len): the benchmark shapes, a compacted paper width, and shapes past the
# tiles' edges: ragged F (mosaic_gpu pads w1; h stays unpadded at F = 3000, a multiple of 8, and
# is sliced at F = 4100) and ragged T with an aligned F (nothing padded).
GPU_GRID = [*PAPER_SHAPES, "8192x1024x23040", "4096x768x3000", "6000x512x4100:1000",
            "6000x1024x8192:1000"]
CPU_GRID = ["512x128x512", "384x96x200:96"]
GRID = GPU_GRID if ON_GPU else CPU_GRID
DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32
LABELS = list(variants(512))  # the same variants at every sequence length
ROUNDS = 5


def parse(point: str) -> tuple[tuple[int, int, int], int]:
    shape, _, seq_len = point.partition(":")
    t, d, f = parse_shape(shape)
    return (t, d, f), seq_len_for(t, int(seq_len) if seq_len else None)


@pytest.fixture(scope="module", params=GRID)
def point(request):
    (t, d, f), seq_len = parse(request.param)
    return request.param, (t, d, f), seq_len, random_inputs(t, d, f, DTYPE)


@pytest.mark.parametrize("label", LABELS)
def test_kernel_variant(benchmark, point, label):
    name, (t, d, f), seq_len, operands = point
    fn = variants(seq_len)[label]
    check_variant(label, fn(*operands), operands, seq_len)
    launches = launches_per_round(2.0 * t * d * f)
    benchmark.group = f"{name} {jnp.dtype(DTYPE).name}"
    benchmark.extra_info.update(environment(), seq_len=seq_len, calls_per_round=launches,
                                tiles=variant_tiles(label, (t, d, f), jnp.dtype(DTYPE).name))
    out = benchmark.pedantic(kernel_round(fn, operands, launches), rounds=ROUNDS,
                             warmup_rounds=1)
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(out)[0], np.float32)))
