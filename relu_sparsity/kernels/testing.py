"""The kernel test kit: the benchmark shapes, fresh random inputs, the exactness check against a
backend's own h (docs/design.md §3), the gradient check and the timer. The tests, the `bench`
CLI and the scripts in bench/ check and time every backend with these.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels.api import fused_mlp_up
from relu_sparsity.kernels.reference import reference_forward, stats_from_h

# T x D x F: the paper model's MLP (16 x 512 tokens, d_model 1024, d_ff 32768) and two shapes of
# the same GEMM work with a wider or narrower model.
BENCH_SHAPES = ((8192, 1024, 32768), (8192, 2048, 16384), (8192, 512, 8192))
BENCH_SEQ_LEN = 512


def parse_shape(text: str) -> tuple[int, int, int]:
    """'8192x1024x32768' -> (8192, 1024, 32768)."""
    try:
        t, d, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must be TxDxF, e.g. 8192x1024x32768, got {text!r}") from None
    if min(t, d, f) < 1:
        raise ValueError(f"shape sizes must be positive, got {text!r}")
    return t, d, f


def tolerance(dtype) -> float:
    """h's tolerance against the reference: bf16 rounding, or f32 summation order."""
    return 2e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-4


def random_inputs(T: int, D: int, F: int, dtype, seed: int = 0):
    """x [T, D], w1 [D, F] (scaled by 1/sqrt(D)), b1 [F] of dtype: fresh, never zero."""
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    b1 = (0.1 * jax.random.normal(kb, (F,), jnp.float32)).astype(dtype)
    return x, w1, b1


def integer_inputs(T: int, D: int, F: int, dtype, seed: int = 1):
    """x, w1, b1 of small integers in [-2, 2]: every product and sum is exact in bf16 and f32,
    so any backend's h, zeros included, and its statistics equal the reference's."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.integers(-2, 3, shape), dtype)
                 for shape in ((T, D), (D, F), (F,)))


def assert_matches_reference(h, stats, x, w1, b1, *, seq_len: int, with_token_mask: bool,
                             tol: float) -> None:
    """`h` close to the reference's; the integer outputs equal, bit for bit, the statistics
    recomputed from this `h` (the exactness rule); and not vacuous."""
    ref_h, _ = reference_forward(x, w1, b1, seq_len=seq_len, with_stats=False,
                                 with_token_mask=False)
    assert h.shape == ref_h.shape and h.dtype == ref_h.dtype
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(ref_h, np.float32),
                               rtol=tol, atol=tol)
    own = stats_from_h(h, seq_len=seq_len, with_token_mask=with_token_mask)
    for name, got, want in zip(own._fields, stats, own, strict=True):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert 0 < int(jnp.sum(stats.token_count)) < h.size  # some units fire, some do not


@functools.partial(jax.jit, static_argnames=("seq_len", "with_token_mask", "tol"))
def _full_size_figures(h, stats, x, w1, b1, *, seq_len, with_token_mask, tol):
    ref_h, _ = reference_forward(x, w1, b1, seq_len=seq_len, with_stats=False,
                                 with_token_mask=False)
    hf, rf = h.astype(jnp.float32), ref_h.astype(jnp.float32)
    own = stats_from_h(h, seq_len=seq_len, with_token_mask=with_token_mask)
    figures = {"h_max_abs_diff": jnp.max(jnp.abs(hf - rf)),
               # The mean of the misses, not 1 - the mean of the hits: that rounds below 0.
               "h_frac_not_close": jnp.mean(~jnp.isclose(hf, rf, rtol=tol, atol=tol)),
               "used_differs_from_reference_frac": jnp.mean((hf > 0) != (rf > 0))}
    for name, got, want in zip(own._fields, stats, own, strict=True):
        if want is not None:
            figures[f"{name}_exact"] = (got.shape == want.shape) and jnp.array_equal(got, want)
    return figures


def full_size_check(h, stats, x, w1, b1, *, seq_len: int, with_token_mask: bool,
                    tol: float = 2e-2) -> dict:
    """The exactness check at sizes too large to copy [T, F] arrays to the host: computed on the
    device, returned as figures (h's distance to the reference's h, each statistic exact or
    not). Raises AssertionError, with the figures, on a mismatch."""
    figures = _full_size_figures(h, stats, x, w1, b1, seq_len=seq_len,
                                 with_token_mask=with_token_mask, tol=tol)
    result = {k: (bool(v) if k.endswith("_exact") else float(v)) for k, v in figures.items()}
    result["ok"] = result["h_frac_not_close"] == 0.0 and all(
        v for k, v in result.items() if k.endswith("_exact"))
    if not result["ok"]:
        raise AssertionError(f"full-size check failed: {result}")
    return result


def assert_grads_match_plain_expression(backend: str, x, w1, b1, *, seq_len: int,
                                        tol: float) -> None:
    """Gradients of fused_mlp_up(backend=...) in x, w1 and b1 equal jax.grad of the plain
    expression relu(x @ w1 + b1) under a random cotangent, with the ReLU's derivative taken
    where the backend's own h is positive (the backward's contract). A unit whose
    pre-activation is within rounding of 0 may fall on either side in the backend (bf16x3
    splits, other summation orders): one such flip changes a whole row of dx by about w1's
    scale, so the two masks are compared separately, allowing a flip only where |pre| <= tol."""
    weight = jax.random.normal(jax.random.key(7), (x.shape[0], w1.shape[1]))

    def fused_loss(x, w1, b1):
        h, stats = fused_mlp_up(x, w1, b1, seq_len=seq_len, backend=backend)
        return jnp.sum(h * weight) + 0.0 * jnp.sum(stats.token_count)

    def pre_activation(x, w1, b1):
        return jnp.dot(x, w1, precision="highest") + b1

    h, _ = fused_mlp_up(x, w1, b1, seq_len=seq_len, backend=backend)
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
