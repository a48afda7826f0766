"""The kernel contract on the reference backend: numpy oracle, exactness rule, VJP, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import BackendUnavailableError, SparsityStats, fused_mlp_up
from relu_sparsity.kernels import bits

# (n_seq, seq_len, D, F): ragged F (not a multiple of 32), one sequence, several, F < 32.
SHAPES = [(1, 8, 16, 32), (3, 5, 7, 37), (4, 16, 24, 100), (2, 3, 5, 1), (5, 4, 9, 65)]


def numpy_stats(h: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The contract's statistics, straight from the definition, with plain numpy."""
    used = np.asarray(h, np.float32) > 0
    t, f = used.shape
    seq_count = used.reshape(t // seq_len, seq_len, f).sum(1).astype(np.int32)
    w = (f + 31) // 32

    def pack(b):
        words = np.zeros(b.shape[:-1] + (w,), np.uint64)
        for j in range(f):
            words[..., j // 32] |= b[..., j].astype(np.uint64) << np.uint64(j % 32)
        return words.astype(np.uint32)

    return {"token_count": used.sum(1).astype(np.int32), "seq_count": seq_count,
            "seq_mask": pack(seq_count > 0), "token_mask": pack(used)}


def random_inputs(seed, t, d, f, dtype):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (t, d), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
    b1 = (0.3 * jax.random.normal(kb, (f,), jnp.float32)).astype(dtype)
    return x, w1, b1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_numpy(shape, dtype):
    n_seq, seq_len, d, f = shape
    x, w1, b1 = random_inputs(hash(shape) % 1000, n_seq * seq_len, d, f, dtype)
    h, stats = fused_mlp_up(x, w1, b1, seq_len=seq_len, with_token_mask=True,
                            backend="reference")
    assert h.shape == (n_seq * seq_len, f) and h.dtype == dtype
    want_h = np.maximum(np.asarray(x, np.float64) @ np.asarray(w1, np.float64)
                        + np.asarray(b1, np.float64), 0)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(h, np.float64), want_h, atol=tol, rtol=tol)
    # Exactness rule: integer outputs equal the statistics of the returned h, bit for bit.
    want = numpy_stats(np.asarray(h, np.float32), seq_len)
    assert isinstance(stats, SparsityStats)
    for name, value in want.items():
        got = np.asarray(getattr(stats, name))
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_stats_shapes_and_no_stats_path():
    x, w1, b1 = random_inputs(0, 12, 8, 70, jnp.float32)
    h, stats = fused_mlp_up(x, w1, b1, seq_len=4)
    assert stats.token_count.shape == (12,) and stats.seq_count.shape == (3, 70)
    assert stats.seq_mask.shape == (3, 3) and stats.seq_mask.dtype == jnp.uint32
    assert stats.token_mask is None
    h2, none = fused_mlp_up(x, w1, b1, seq_len=4, with_stats=False)
    assert none is None
    np.testing.assert_array_equal(h, h2)


def test_small_integer_inputs_are_exact():
    # Small integers: every sum is exact, so h itself is exact, zeros included.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, (12, 6)), jnp.float32)
    w1 = jnp.asarray(rng.integers(-2, 3, (6, 40)), jnp.float32)
    b1 = jnp.asarray(rng.integers(-2, 3, (40,)), jnp.float32)
    h, stats = fused_mlp_up(x, w1, b1, seq_len=3, with_token_mask=True)
    want_h = np.maximum(np.asarray(x) @ np.asarray(w1) + np.asarray(b1), 0)
    np.testing.assert_array_equal(np.asarray(h), want_h)
    assert (want_h == 0).any() and (want_h > 0).any()
    np.testing.assert_array_equal(stats.seq_count, numpy_stats(want_h, 3)["seq_count"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vjp_matches_plain_expression(dtype):
    x, w1, b1 = random_inputs(7, 12, 10, 40, dtype)
    cot = jax.random.normal(jax.random.key(9), (12, 40))

    def fused(x, w1, b1):
        h, _ = fused_mlp_up(x, w1, b1, seq_len=4)
        return jnp.sum(h.astype(jnp.float32) * cot)

    def plain(x, w1, b1):
        pre = jnp.dot(x.astype(jnp.float32), w1.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) + b1.astype(jnp.float32)
        return jnp.sum(jax.nn.relu(pre).astype(dtype).astype(jnp.float32) * cot)

    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(x, w1, b1)
    want = jax.grad(plain, argnums=(0, 1, 2))(x, w1, b1)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for g, w, arg in zip(got, want, (x, w1, b1)):
        assert g.dtype == arg.dtype and g.shape == arg.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol)


def test_relu_derivative_at_zero_is_zero():
    x = jnp.ones((2, 1), jnp.float32)
    w1 = jnp.asarray([[1.0, -1.0, 0.0]])
    b1 = jnp.asarray([-1.0, 1.0, 0.0])  # pre-activations exactly 0 for every unit
    grads = jax.grad(lambda w, b: fused_mlp_up(x, w, b, seq_len=1)[0].sum(), (0, 1))(w1, b1)
    assert not np.asarray(grads[0]).any() and not np.asarray(grads[1]).any()


def test_bit_helpers_round_trip():
    rng = np.random.default_rng(0)
    for f in (1, 31, 32, 33, 100):
        b = rng.random((3, f)) < 0.4
        words = bits.pack_bits(jnp.asarray(b))
        np.testing.assert_array_equal(words, bits.np_pack_bits(b))
        np.testing.assert_array_equal(bits.unpack_bits(words, f), b)
        np.testing.assert_array_equal(bits.np_unpack_bits(np.asarray(words), f), b)
        np.testing.assert_array_equal(bits.popcount(words), b.sum(1))
        np.testing.assert_array_equal(bits.np_popcount(np.asarray(words)), b.sum(1))
        np.testing.assert_array_equal(bits.or_rows(words), bits.np_pack_bits(b.any(0)))
        np.testing.assert_array_equal(bits.np_or_rows(np.asarray(words)),
                                      bits.np_pack_bits(b.any(0)))
    # LSB first: unit 0 is bit 0 of word 0, unit 33 bit 1 of word 1.
    b = np.zeros(40, bool)
    b[[0, 33]] = True
    np.testing.assert_array_equal(bits.np_pack_bits(b), [1, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=jnp.zeros((4, 3, 2))), "x must be"),
    (dict(w1=jnp.zeros((5, 8))), "w1 must be"),
    (dict(b1=jnp.zeros((7,))), "b1 must be"),
    (dict(w1=jnp.zeros((3, 8), jnp.bfloat16)), "w1 must have"),
    (dict(x=jnp.zeros((4, 3), jnp.int32)), "x must be"),
    (dict(seq_len=3), "seq_len"),
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=2.0), "seq_len"),
    (dict(seq_len=True), "seq_len"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(x=jnp.zeros((4, 3)), w1=jnp.zeros((3, 8)), b1=jnp.zeros((8,)), seq_len=2)
    args.update(kwargs)
    x, w1, b1 = args.pop("x"), args.pop("w1"), args.pop("b1")
    with pytest.raises(ValueError, match=match):
        fused_mlp_up(x, w1, b1, **args)


def test_unbuilt_backend_is_an_error_not_a_fallback():
    x, w1, b1 = jnp.zeros((4, 3)), jnp.zeros((3, 8)), jnp.zeros((8,))
    with pytest.raises(BackendUnavailableError, match="triton"):
        fused_mlp_up(x, w1, b1, seq_len=2, backend="triton")
