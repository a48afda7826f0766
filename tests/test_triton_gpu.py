"""The Triton backend on a real GPU (marked `gpu`; run on the device): against the reference on
ragged shapes with the own-h exactness rule, gradients, and a training step. The model's live
units on this backend: tests/test_model.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.kernels.testing import assert_matches_reference, random_inputs, tolerance

pytestmark = pytest.mark.gpu

# (n_seq, seq_len, D, F): tiles spanning sequences, sequences spanning tiles, ragged F and D.
SHAPES = [(4, 512, 256, 1000), (3, 100, 72, 96), (16, 7, 40, 33), (2, 256, 1024, 4096),
          (5, 64, 128, 1)]


def inputs(seed, t, d, f, dtype):
    return random_inputs(t, d, f, dtype, seed=seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_matches_reference(shape, dtype):
    n_seq, seq_len, d, f = shape
    x, w1, b1 = inputs(sum(shape), n_seq * seq_len, d, f, dtype)
    h, stats = fused_mlp_up(x, w1, b1, seq_len=seq_len, with_token_mask=True, backend="triton")
    assert_matches_reference(h, stats, x, w1, b1, seq_len=seq_len, with_token_mask=True,
                             tol=tolerance(dtype))
    h2, none = fused_mlp_up(x, w1, b1, seq_len=seq_len, with_stats=False, backend="triton")
    assert none is None
    np.testing.assert_array_equal(np.asarray(h2, np.float32), np.asarray(h, np.float32))


@pytest.mark.parametrize("shape", [(4, 512, 256, 1000), (2, 256, 1024, 4096), (3, 128, 72, 96)])
def test_triton_seq_programs_match_own_h(shape):
    # One program per (sequence, column tile): column counts kept in registers over the
    # sequence's row tiles, seq_count / seq_mask written once without atomics (the committed
    # tiles and the default); its exactness on the GPU at ragged shapes.
    from relu_sparsity.kernels.triton import kernel, ops

    n_seq, seq_len, d, f = shape
    x, w1, b1 = inputs(sum(shape), n_seq * seq_len, d, f, jnp.bfloat16)
    for config in (kernel.TileConfig(128, 256, 64, 8, 8, 3, seq_programs=True),
                   kernel.TileConfig(128, 128, 64, 8, 8, 3, seq_programs=True)):
        plan = kernel.launch_plan(n_seq * seq_len, d, f, seq_len, config, True, True)
        assert plan.constexprs["SEQ_PROGRAMS"]
        h, stats = jax.jit(lambda x, w, b, c=config: ops.forward(
            x, w, b, seq_len=seq_len, with_stats=True, with_token_mask=True,
            config=c))(x, w1, b1)
        assert_matches_reference(h, stats, x, w1, b1, seq_len=seq_len, with_token_mask=True,
                                 tol=2e-2)


def test_triton_gradients_match_reference():
    x, w1, b1 = inputs(3, 1024, 256, 1000, jnp.float32)

    def loss(backend):
        def f(x, w1, b1):
            h, _ = fused_mlp_up(x, w1, b1, seq_len=256, backend=backend)
            return jnp.sum(jnp.sin(h))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    for got, want in zip(loss("triton")(x, w1, b1), loss("reference")(x, w1, b1)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)


def test_fused_training_step(tmp_path):
    from relu_sparsity.bench.train_step import time_train_step

    overrides = ["model.num_layers=2", "model.d_model=256", "model.num_heads=4",
                 "model.d_ff=[2048,1000]", "model.seq_len=256", "train.batch_size=4",
                 "data.vocab_size=512", "kernel=triton"]
    row = time_train_step("tiny", "fused", overrides, rounds=1, steps_per_round=3)
    assert row["kernel"] == "triton" and row["ms"] > 0
