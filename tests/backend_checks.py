"""Checks that every fused backend's tests share."""

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels import api


def assert_grads_match_plain_expression(backend: str, x, w1, b1, *, seq_len: int, live,
                                        tol: float) -> None:
    """Gradients of fused_mlp_up(backend=...) in x, w1 and b1 equal jax.grad of the plain
    expression relu(x @ w1[:, live] + b1[live]) under a random cotangent."""
    T, F = x.shape[0], w1.shape[1]
    cols = slice(None) if live is None else np.asarray(live)
    weight = jax.random.normal(jax.random.key(7), (T, F))[:, cols]

    def fused_loss(x, w1, b1):
        h, stats = api.fused_mlp_up(x, w1, b1, seq_len=seq_len, live=live, backend=backend)
        return jnp.sum(h * weight) + 0.0 * jnp.sum(stats.token_count)

    def plain_loss(x, w1, b1):
        h = jax.nn.relu(jnp.dot(x, w1[:, cols], precision="highest") + b1[cols])
        return jnp.sum(h * weight)

    got = jax.grad(fused_loss, argnums=(0, 1, 2))(x, w1, b1)
    want = jax.grad(plain_loss, argnums=(0, 1, 2))(x, w1, b1)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)
    assert float(jnp.abs(got[1]).sum()) > 0
