"""Checks that every fused backend's tests share."""

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels import api


def assert_grads_match_plain_expression(backend: str, x, w1, b1, *, seq_len: int, live,
                                        tol: float) -> None:
    """Gradients of fused_mlp_up(backend=...) in x, w1 and b1 equal jax.grad of the plain
    expression relu(x @ w1[:, live] + b1[live]) under a random cotangent, with the ReLU's
    derivative taken where the backend's own h is positive (the backward's contract). A unit
    whose pre-activation is within rounding of 0 may fall on either side in the backend (bf16x3
    splits, other summation orders): one such flip changes a whole row of dx by about w1's
    scale, so the two masks are compared separately, allowing a flip only where |pre| <= tol."""
    T, F = x.shape[0], w1.shape[1]
    cols = slice(None) if live is None else np.asarray(live)
    weight = jax.random.normal(jax.random.key(7), (T, F))[:, cols]

    def fused_loss(x, w1, b1):
        h, stats = api.fused_mlp_up(x, w1, b1, seq_len=seq_len, live=live, backend=backend)
        return jnp.sum(h * weight) + 0.0 * jnp.sum(stats.token_count)

    def pre_activation(x, w1, b1):
        return jnp.dot(x, w1[:, cols], precision="highest") + b1[cols]

    h, _ = api.fused_mlp_up(x, w1, b1, seq_len=seq_len, live=live, backend=backend)
    used = np.asarray(h) > 0
    pre = np.asarray(pre_activation(x, w1, b1), np.float32)
    flipped = used != (pre > 0)
    assert flipped.mean() < 1e-4, f"{flipped.sum()} units differ from the plain ReLU's mask"
    assert np.all(np.abs(pre[flipped]) <= tol), "a unit far from 0 differs in the ReLU mask"

    def plain_loss(x, w1, b1):
        return jnp.sum(jnp.where(used, pre_activation(x, w1, b1), 0.0) * weight)

    got = jax.grad(fused_loss, argnums=(0, 1, 2))(x, w1, b1)
    want = jax.grad(plain_loss, argnums=(0, 1, 2))(x, w1, b1)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)
    assert float(jnp.abs(got[1]).sum()) > 0


def random_inputs(T: int, D: int, F: int, dtype, seed: int = 0):
    """x [T, D], w1 [D, F] (scaled by 1/sqrt(D)), b1 [F] of dtype: fresh, never zero."""
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    b1 = (0.1 * jax.random.normal(kb, (F,), jnp.float32)).astype(dtype)
    return x, w1, b1


def assert_matches_reference(h, stats, x, w1, b1, *, seq_len: int, live, with_token_mask: bool,
                             tol: float) -> None:
    """`h` close to the reference's; the integer outputs equal, bit for bit, the statistics
    recomputed from this `h` (DESIGN.md's exactness rule); and not vacuous."""
    from relu_sparsity.kernels.reference import reference_forward, stats_from_h

    ref_h, _ = reference_forward(x, w1, b1, seq_len=seq_len, live=live, with_stats=False,
                                 with_token_mask=False)
    assert h.shape == ref_h.shape and h.dtype == ref_h.dtype
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(ref_h, np.float32),
                               rtol=tol, atol=tol)
    own = stats_from_h(h, seq_len=seq_len, num_units=w1.shape[1], live=live,
                       with_token_mask=with_token_mask)
    for name, got, want in zip(own._fields, stats, own, strict=True):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert 0 < int(jnp.sum(stats.token_count)) < h.size  # some units fire, some do not
