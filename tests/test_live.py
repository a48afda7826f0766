"""model/live.py: the live units' weights, their statistics back in the layer's unit ids (against
a numpy oracle on the dense statistics), and the checks on `live`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels.bits import np_pack_bits
from relu_sparsity.kernels.reference import reference_forward, stats_from_h
from relu_sparsity.kernels.testing import random_inputs
from relu_sparsity.model.live import (
    check_live,
    live_weights,
    padded_width,
    scatter_token_mask,
    stats_in_unit_ids,
)


@pytest.mark.parametrize("width_extra", [0, 9])  # exact width, and zero padding units after
def test_stats_in_unit_ids_equal_the_dense_statistics_with_dead_units_off(width_extra):
    T, D, F, seq_len = 12, 8, 70, 4
    x, w1, b1 = random_inputs(T, D, F, jnp.float32, seed=11)
    wo = jnp.ones((F, 3))
    live = (0, 5, 31, 32, 33, 40, 63, 64, 69)  # words 0, 1 and 2, with gaps
    wi, bi, _ = live_weights(w1, b1, wo, live, len(live) + width_extra)
    h, stats = reference_forward(x, wi, bi, seq_len=seq_len, with_stats=True,
                                 with_token_mask=True)
    got = stats_in_unit_ids(stats, live, F)

    full, _ = reference_forward(x, w1, b1, seq_len=seq_len, with_stats=False,
                                with_token_mask=False)
    np.testing.assert_allclose(np.asarray(h)[:, :len(live)], np.asarray(full)[:, live],
                               rtol=1e-6, atol=1e-6)
    assert not np.asarray(h)[:, len(live):].any()  # padding units never fire
    # The oracle: the computed h placed at the layer's unit ids, dead units zero.
    dense = np.zeros((T, F), np.float32)
    dense[:, live] = np.asarray(h)[:, :len(live)]
    want = stats_from_h(jnp.asarray(dense), seq_len=seq_len, with_token_mask=True)
    for name, a, b in zip(want._fields, got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_scatter_token_mask_puts_each_bit_at_its_unit():
    rng = np.random.default_rng(0)
    live = (1, 2, 33, 34, 64, 95, 96, 99)
    used_live = rng.random((5, len(live))) < 0.5
    used = np.zeros((5, 100), bool)
    used[:, live] = used_live
    got = scatter_token_mask(jnp.asarray(np_pack_bits(used_live)), live, 100)
    np.testing.assert_array_equal(np.asarray(got), np_pack_bits(used))


def test_live_weights_gather_and_pad():
    wi, bi, wo = jnp.arange(12.0).reshape(2, 6), jnp.arange(6.0), jnp.arange(18.0).reshape(6, 3)
    a, b, c = live_weights(wi, bi, wo, (1, 4), 3)
    np.testing.assert_array_equal(a, [[1, 4, 0], [7, 10, 0]])
    np.testing.assert_array_equal(b, [1, 4, 0])
    np.testing.assert_array_equal(c, [[3, 4, 5], [12, 13, 14], [0, 0, 0]])


def test_live_gradients_land_on_the_full_width():
    # Each live unit's gradient lands on it, the padding's (which reads unit 0) nowhere; the
    # gradients are gathers, not scatter-adds.
    wi, bi, wo = jnp.ones((2, 6)), jnp.ones(6), jnp.ones((6, 3))
    scale = jnp.arange(1.0, 6.0)  # a distinct weight per padded column

    def loss(wi, bi, wo):
        a, b, c = live_weights(wi, bi, wo, (1, 3, 4), 5)
        return (a * scale).sum() + (b * scale).sum() + (c * scale[:, None]).sum()

    forward = jax.make_jaxpr(loss)(wi, bi, wo)
    assert str(forward).count("gather[") == 3 and "pad[" not in str(forward)
    backward = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(wi, bi, wo))
    assert "scatter" not in backward
    gwi, gbi, gwo = jax.grad(loss, argnums=(0, 1, 2))(wi, bi, wo)
    want = np.array([0, 1, 0, 2, 3, 0], np.float32)
    np.testing.assert_array_equal(gbi, want)
    np.testing.assert_array_equal(gwi, np.stack([want, want]))
    np.testing.assert_array_equal(gwo, np.repeat(want[:, None], 3, axis=1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_live_gradients_on_random_units_equal_a_numpy_placement(dtype):
    rng = np.random.default_rng(5)
    D, F, width = 7, 300, 256
    live = tuple(np.sort(rng.choice(F, 201, replace=False)).tolist())
    wi = jnp.asarray(rng.normal(size=(D, F)), dtype)
    bi = jnp.asarray(rng.normal(size=F), dtype)
    wo = jnp.asarray(rng.normal(size=(F, D)), dtype)
    cots = [jnp.asarray(rng.normal(size=s), dtype) for s in [(D, width), (width,), (width, D)]]

    def loss(*weights):
        gathered = live_weights(*weights, live, width)
        return sum((g * c).astype(jnp.float32).sum() for g, c in zip(gathered, cots))

    grads = jax.grad(loss, argnums=(0, 1, 2))(wi, bi, wo)
    for grad, cot, axis in zip(grads, cots, (1, 0, 0)):
        want = np.zeros(grad.shape, np.float32)
        index = (slice(None),) * axis + (list(live),)
        want[index] = np.take(np.asarray(cot, np.float32), np.arange(len(live)), axis=axis)
        assert grad.dtype == dtype
        np.testing.assert_array_equal(np.asarray(grad, np.float32), want)


@pytest.mark.parametrize("num_live, multiple, limit, want", [
    (5, 256, 1024, 256), (256, 256, 1024, 256), (1000, 256, 1000, 1000), (900, 256, 1000, 1000),
    (7, 1, 100, 7)])
def test_padded_width(num_live, multiple, limit, want):
    assert padded_width(num_live, multiple, limit) == want


@pytest.mark.parametrize("live", [
    np.array([3, 1]), np.array([3, 1], np.uint32),  # unsigned: a wrapped difference
    np.array([1, 1, 2]), np.array([0, 8]), np.array([-1, 2]), np.zeros((2, 2), int), [],
    np.array([0.0, 1.0])])
def test_bad_live_raises(live):
    with pytest.raises(ValueError, match="live"):
        check_live(live, 8)


def test_traced_live_is_refused_at_trace_time():
    with pytest.raises((ValueError, jax.errors.TracerArrayConversionError)):
        jax.jit(lambda live: check_live(live, 8))(jnp.arange(3))
