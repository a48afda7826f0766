"""pytest-benchmark timings of the kernel variants (speed is judged from these and from
`relu-sparsity bench` on the device, never asserted). On a CPU: a small shape, the reference;
on a GPU also the Triton backend at a paper shape."""

import jax
import jax.numpy as jnp
import pytest

from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.kernels.testing import random_inputs

ON_GPU = jax.default_backend() == "gpu"
SHAPE = (8192, 1024, 32768) if ON_GPU else (512, 128, 512)
DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32


@pytest.fixture(scope="module")
def operands():
    return random_inputs(*SHAPE, DTYPE)


def run(benchmark, fn, operands):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*operands))  # compile outside the timing
    out = benchmark(lambda: jax.block_until_ready(fn(*operands)))
    assert out is not None


def test_xla_dot_bias_relu(benchmark, operands):
    run(benchmark, lambda x, w, b: jax.nn.relu(x @ w + b), operands)


def test_reference_with_stats(benchmark, operands):
    run(benchmark, lambda x, w, b: fused_mlp_up(x, w, b, seq_len=512, backend="reference"),
        operands)


@pytest.mark.gpu
@pytest.mark.parametrize("with_stats", [False, True])
def test_triton(benchmark, operands, with_stats):
    run(benchmark, lambda x, w, b: fused_mlp_up(x, w, b, seq_len=512, with_stats=with_stats,
                                                backend="triton"), operands)
