"""The mosaic_gpu backend compiled on a real Hopper GPU (marked `gpu`; run on the device): both
schedules (one SMEM ring split between the compute warpgroups, and ping-pong) against the
reference on ragged shapes with the own-h exactness rule, live columns, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import api
from relu_sparsity.kernels.mosaic_gpu import kernel, ops
from relu_sparsity.kernels.reference import stats_from_h

pytestmark = pytest.mark.gpu

CONFIGS = {
    "split-m": kernel.TileConfig(64, 256, 64, 4, "m", 32, "m", 8),
    "split-n": kernel.TileConfig(128, 128, 64, 4, "n", 32, "m", 8),
    "pingpong": kernel.TileConfig(128, 128, 64, 3, "pingpong", 32, "m", 16),
}
# (n_seq, seq_len, D, F): tiles spanning sequences, sequences spanning tiles, ragged F and D.
SHAPES = [(4, 512, 256, 1000), (3, 100, 72, 96), (16, 7, 40, 33), (2, 256, 1024, 4096)]


def inputs(seed, t, d, f, dtype):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (t, d), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
    b1 = (0.2 * jax.random.normal(kb, (f,), jnp.float32)).astype(dtype)
    return x, w1, b1


def check(h, stats, x, w1, b1, seq_len, live=None, with_token_mask=True):
    h_ref, _ = api.fused_mlp_up(x, w1, b1, seq_len=seq_len, live=live, backend="reference")
    tol = 1e-4 if x.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_ref, np.float32),
                               atol=tol, rtol=tol)
    own = stats_from_h(h, seq_len=seq_len, num_units=w1.shape[1],
                       live=live,
                       with_token_mask=with_token_mask)
    for name in own._fields:
        want = getattr(own, name)
        if want is None:
            continue
        got = getattr(stats, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_kernel_matches_reference(config, shape, dtype):
    n_seq, seq_len, d, f = shape
    x, w1, b1 = inputs(sum(shape), n_seq * seq_len, d, f, dtype)
    # f32 writes an f32 h: fewer stages where the doubled epilogue buffers need the room.
    config = kernel.fit_stages(config, jnp.bfloat16, dtype, True, True)
    run = jax.jit(lambda x, w1, b1: ops.mosaic_gpu_forward(
        x, w1, b1, seq_len=seq_len, live=None, with_stats=True, with_token_mask=True,
        config=config, interpret=False))
    h, stats = run(x, w1, b1)
    check(h, stats, x, w1, b1, seq_len)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_compiled_live_columns(config):
    x, w1, b1 = inputs(5, 1024, 128, 700, jnp.bfloat16)
    live = tuple(range(3, 700, 4))
    h, stats = jax.jit(lambda x, w1, b1: ops.mosaic_gpu_forward(
        x, w1, b1, seq_len=256, live=live, with_stats=True, with_token_mask=False,
        config=config, interpret=False))(x, w1, b1)
    check(h, stats, x, w1, b1, 256, live=live, with_token_mask=False)


def test_compiled_gradients_match_reference():
    x, w1, b1 = inputs(3, 1024, 256, 1000, jnp.float32)

    def grads(backend):
        def f(x, w1, b1):
            h, _ = api.fused_mlp_up(x, w1, b1, seq_len=256, backend=backend)
            return jnp.sum(jnp.sin(h))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w1, b1)

    for got, want in zip(grads("mosaic_gpu"), grads("reference")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)
