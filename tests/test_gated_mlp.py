"""GatedReluMLP, y = (relu(x @ wg + bg) * (x @ wu)) @ wd: the forward against numpy, the sown
statistics against the gate's own activations (docs/design.md §3), the fused kernel against the
reference, the gradients against jax.grad of the plain expression, live units against a module
at the kept width, compaction and width sharding of its parameters.

The width-sharding check needs XLA_FLAGS set before jax is imported, so it runs in a subprocess
that executes this file as a script: `python test_gated_mlp.py sharded`.
"""

import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from relu_sparsity.kernels.reference import stats_from_h
from relu_sparsity.model import GatedReluMLP, layer_stats
from relu_sparsity.train.pruning import compact_tree
from relu_sparsity.train.sharding import shard_state, state_shardings

B, L, D = 3, 5, 12  # three sequences of five tokens


def random_params(F: int, use_bias: bool, seed: int = 0) -> dict:
    """wg, wu [D, F], wd [F, D] (and bg [F]) of f32 normals; a non-zero bias so that it counts."""
    rng = np.random.default_rng(seed)
    p = {"wg": rng.normal(size=(D, F)) / np.sqrt(D), "wu": rng.normal(size=(D, F)) / np.sqrt(D),
         "wd": rng.normal(size=(F, D)) / np.sqrt(F)}
    if use_bias:
        p["bg"] = rng.normal(size=F) * 0.3
    return {"params": {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}}


def numpy_forward(p: dict, x) -> tuple[np.ndarray, np.ndarray]:
    """The oracle in float64: (gate [T, F], y [B, L, D])."""
    p = {k: np.asarray(v, np.float64) for k, v in p["params"].items()}
    t = np.asarray(x, np.float64).reshape(-1, D)
    gate = np.maximum(t @ p["wg"] + p.get("bg", 0.0), 0)
    return gate, (gate * (t @ p["wu"]) @ p["wd"]).reshape(x.shape)


def apply_capturing_gate(module, params, x):
    """(y, sown stats, the gate [T, F] as the module computed it)."""
    captured = []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "_hidden":
            captured.append(out[0])
        return out

    with nn.intercept_methods(capture):
        y, state = module.apply(params, x, mutable=["intermediates"])
    (stats,) = layer_stats(state["intermediates"])
    (gate,) = captured
    return y, stats, gate


def assert_stats_equal(got, want):
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("F, use_bias", [(45, False), (130, True)])
def test_forward_and_stats_f32(F, use_bias):
    x = jax.random.normal(jax.random.key(F), (B, L, D))
    params = random_params(F, use_bias)
    with jax.default_matmul_precision("highest"):  # f32 GEMMs, not TF32, on GPUs
        y, stats, gate = apply_capturing_gate(GatedReluMLP(F, use_bias=use_bias), params, x)
    want_gate, want_y = numpy_forward(params, x)
    np.testing.assert_allclose(gate, want_gate, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    # The statistics count the gate's units (the exactness rule, on its own activations) ...
    assert_stats_equal(stats, stats_from_h(gate, seq_len=L, with_token_mask=False))
    assert stats.seq_count.shape == (B, F)
    # ... which the numpy gate confirms, and not vacuously: some units off, some on.
    np.testing.assert_array_equal(stats.token_count, (want_gate > 0).sum(1))
    assert 0 < np.asarray(stats.token_count).sum() < B * L * F


def test_forward_bfloat16():
    F = 70
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    params = random_params(F, use_bias=True)
    module = GatedReluMLP(F, use_bias=True, dtype=jnp.bfloat16)
    y, stats, gate = apply_capturing_gate(module, params, x)
    assert y.dtype == gate.dtype == jnp.bfloat16
    _, want_y = numpy_forward(params, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=5e-2, atol=5e-2)
    assert_stats_equal(stats, stats_from_h(gate, seq_len=L, with_token_mask=False))


def test_one_sequence_and_instrument_off():
    F = 45
    x = jax.random.normal(jax.random.key(2), (L, D))
    params = random_params(F, use_bias=True)
    y_xla, state = GatedReluMLP(F, use_bias=True).apply(params, x, mutable=["intermediates"])
    assert y_xla.shape == (L, D)
    assert layer_stats(state["intermediates"])[0].seq_count.shape == (1, F)
    y_off, state = GatedReluMLP(F, use_bias=True, instrument="off").apply(
        params, x, mutable=["intermediates"])
    assert layer_stats(state.get("intermediates", {})) == []
    np.testing.assert_allclose(y_off, y_xla, rtol=1e-5, atol=1e-6)


def test_init_shapes_and_no_bias_by_default():
    params = jax.eval_shape(GatedReluMLP(40).init, jax.random.key(0), jnp.zeros((1, 4, D)))
    assert {k: v.shape for k, v in params["params"].items()} == {"wg": (D, 40), "wu": (D, 40),
                                                               "wd": (40, D)}
    with_bias = jax.jit(GatedReluMLP(40, use_bias=True).init)(jax.random.key(0),
                                                              jnp.zeros((4, D)))
    assert with_bias["params"]["bg"].shape == (40,) and not with_bias["params"]["bg"].any()


def plain_loss(p: dict, x, r):
    """sum(y * r) of the plain f32 expression; the ReLU written as a select on the gate's
    pre-activation, so relu'(0) = 0 and the mask comes from the gate."""
    t = x.reshape(-1, D)
    dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    pre = dot(t, p["wg"]) + p.get("bg", 0.0)
    gate = jnp.where(pre > 0, pre, 0.0)
    return jnp.sum(dot(gate * dot(t, p["wu"]), p["wd"]).reshape(x.shape) * r)


@pytest.mark.parametrize("use_bias", [True, False])
def test_gradients_match_the_plain_expression(use_bias):
    F = 45
    x = jax.random.normal(jax.random.key(3), (B, L, D))
    r = jax.random.normal(jax.random.key(4), (B, L, D))
    params = random_params(F, use_bias)
    module = GatedReluMLP(F, use_bias=use_bias)
    with jax.default_matmul_precision("highest"):
        got_p, got_x = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * r), (0, 1)))(
            params, x)
    want_p, want_x = jax.grad(plain_loss, (0, 1))(params["params"], x, r)
    assert set(got_p["params"]) == set(want_p)
    for name, g in got_p["params"].items():
        assert np.abs(np.asarray(g)).max() > 0, name
        np.testing.assert_allclose(g, want_p[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)


def integer_params(F: int, seed: int = 5) -> dict:
    """Small-integer weights: every sum is exact, so backends agree bit for bit, gate zeros (and
    relu'(0) = 0) included."""
    rng = np.random.default_rng(seed)
    shapes = {"wg": (D, F), "wu": (D, F), "wd": (F, D), "bg": (F,)}
    return {"params": {k: jnp.asarray(rng.integers(-2, 3, s), jnp.float32)
                       for k, s in shapes.items()}}


def test_fused_backend_equals_xla():
    # The interpreted TPU kernel stands for a fused backend here; tiny shapes, it is slow.
    F, x = 45, jnp.asarray(np.random.default_rng(6).integers(-2, 3, (2, 4, D)), jnp.float32)
    params = integer_params(F)
    fused = GatedReluMLP(F, use_bias=True, instrument="fused", backend="pallas_tpu")
    xla = GatedReluMLP(F, use_bias=True, instrument="xla")

    def run(module):
        y, state = module.apply(params, x, mutable=["intermediates"])
        return y, layer_stats(state["intermediates"])[0]

    def loss(module, p):
        return jnp.sum(module.apply(p, x) * jnp.arange(D, dtype=jnp.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpreting
        (y1, s1), (y2, s2) = run(fused), run(xla)
        g1 = jax.grad(lambda p: loss(fused, p))(params)
    g2 = jax.grad(lambda p: loss(xla, p))(params)
    np.testing.assert_array_equal(y1, y2)
    assert_stats_equal(s1, s2)
    assert 0 < np.asarray(s1.token_count).sum() < 8 * F
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)


LIVE = (0, 3, 4, 9, 31, 32, 40)


@pytest.mark.parametrize("use_bias", [True, False])
def test_live_units_equal_a_module_at_the_kept_width(use_bias):
    # Live units padded to 16 (zero units) against a dense module holding only the kept columns
    # of wg and wu and rows of wd: the same output, statistics in the layer's unit ids, the
    # same gradients on the kept units and zero on the dead ones.
    F, n = 45, len(LIVE)
    x = jax.random.normal(jax.random.key(7), (B, L, D))
    r = jax.random.normal(jax.random.key(8), (B, L, D))
    params = random_params(F, use_bias)
    live = GatedReluMLP(F, live=LIVE, live_multiple=16, use_bias=use_bias)
    axes = {"wg": 1, "wu": 1, "wd": 0, "bg": 0}
    kept = {"params": {k: jnp.take(v, jnp.asarray(LIVE), axis=axes[k])
                       for k, v in params["params"].items()}}
    small = GatedReluMLP(n, use_bias=use_bias)

    def run(module, p, x):
        y, state = module.apply(p, x, mutable=["intermediates"])
        return y, layer_stats(state["intermediates"])[0]

    def loss(module, p, x):
        return jnp.sum(run(module, p, x)[0] * r)

    def outputs(module, p):  # one compilation per module rather than op-by-op dispatch
        return run(module, p, x), jax.grad(lambda p, x: loss(module, p, x), (0, 1))(p, x)

    with jax.default_matmul_precision("highest"):
        (y1, s1), (g1, gx1) = jax.jit(outputs, static_argnums=0)(live, params)
        (y2, s2), (g2, gx2) = jax.jit(outputs, static_argnums=0)(small, kept)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-6)

    dead = np.setdiff1d(np.arange(F), LIVE)
    assert s1.seq_count.shape == (B, F)
    np.testing.assert_array_equal(s1.token_count, s2.token_count)
    np.testing.assert_array_equal(np.asarray(s1.seq_count)[:, LIVE], s2.seq_count)
    assert not np.asarray(s1.seq_count)[:, dead].any()
    assert np.asarray(s2.seq_count).any()

    for name, axis in axes.items():
        if name not in params["params"]:
            continue
        g_full, g_kept = np.asarray(g1["params"][name]), np.asarray(g2["params"][name])
        np.testing.assert_allclose(np.take(g_full, LIVE, axis=axis), g_kept, rtol=1e-5,
                                   atol=1e-6, err_msg=name)
        assert not np.take(g_full, dead, axis=axis).any(), name
        assert np.abs(g_kept).max() > 0, name


@pytest.mark.parametrize("kwargs, field", [
    (dict(instrument="fast"), "instrument"), (dict(live=(3, 1)), "live"),
    (dict(live=(0, 45)), "live")])
def test_bad_configuration_is_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(GatedReluMLP(45, **kwargs).init, jax.random.key(0), jnp.zeros((1, 4, D)))


def test_bad_input_rank_is_a_value_error():
    with pytest.raises(ValueError, match="GatedReluMLP takes"):
        jax.eval_shape(GatedReluMLP(45).init, jax.random.key(0), jnp.zeros((D,)))


def test_live_units_with_a_model_axis_is_an_error():
    mesh = jax.sharding.AbstractMesh((1, 2), ("data", "model"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.sharding.use_abstract_mesh(mesh):
        with pytest.raises(ValueError, match="live units.*model"):
            jax.eval_shape(GatedReluMLP(64, live=(0, 5)).init, jax.random.key(0),
                           jnp.zeros((2, 8, D)))


def test_compact_tree_cuts_the_gated_weights_like_a_live_module():
    # The kept columns of wg and wu, entries of bg and rows of wd, in params and in a moment
    # shaped like them, zero-padded to 16; the compacted module computes what the live one does.
    F = 45
    params = random_params(F, use_bias=True)["params"]
    tree = {"params": {"block_0": {"mlp": params}},
            "mu": {"block_0": {"mlp": jax.tree.map(lambda a: a * 2, params)}},
            "embed": jnp.ones((4, F))}  # not an MLP weight: passes through
    keep = (np.asarray(LIVE),)
    out = compact_tree(tree, keep, widths=(16,))
    cut = out["params"]["block_0"]["mlp"]
    n = len(LIVE)
    for name, axis in {"wg": 1, "wu": 1, "bg": 0, "wd": 0}.items():
        assert cut[name].shape[axis] == 16, name
        kept = np.take(np.asarray(cut[name]), np.arange(n), axis=axis)
        np.testing.assert_array_equal(kept, np.take(np.asarray(params[name]), LIVE, axis=axis),
                                      err_msg=name)
        assert not np.take(np.asarray(cut[name]), np.arange(n, 16), axis=axis).any(), name
        np.testing.assert_array_equal(out["mu"]["block_0"]["mlp"][name], 2 * cut[name])
    np.testing.assert_array_equal(out["embed"], tree["embed"])

    x = jax.random.normal(jax.random.key(9), (B, L, D))
    def run(module, p):
        return module.apply({"params": p}, x, mutable=["intermediates"])

    with jax.default_matmul_precision("highest"):
        y_live, s_live = jax.jit(run, static_argnums=0)(
            GatedReluMLP(F, live=LIVE, use_bias=True), params)
        y_cut, s_cut = jax.jit(run, static_argnums=0)(GatedReluMLP(16, use_bias=True), cut)
    np.testing.assert_allclose(y_cut, y_live, rtol=1e-5, atol=1e-6)
    counts = np.asarray(layer_stats(s_cut["intermediates"])[0].seq_count)
    np.testing.assert_array_equal(
        counts[:, :n], np.asarray(layer_stats(s_live["intermediates"])[0].seq_count)[:, LIVE])
    assert not counts[:, n:].any()  # padding units stay dead


def test_state_shardings_split_the_gated_weights_by_width():
    params = {"block_0": {"mlp": random_params(64, use_bias=True)["params"]}}
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {k: v.spec for k, v in state_shardings(params, mesh)["block_0"]["mlp"].items()}
    P = PartitionSpec
    assert specs == {"wg": P(None, "model"), "wu": P(None, "model"), "bg": P("model"),
                     "wd": P("model", None)}


def test_sharded_gated_mlp_matches_one_device():
    # 2 x 2 simulated CPU devices (data x model); level 0 compiles both sides in half the time.
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    done = subprocess.run([sys.executable, __file__, "sharded"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok sharded" in done.stdout


def check_sharded():
    """In the subprocess: the module with its weights placed by state_shardings on a 2 x 2
    mesh (the gate's width split by `width_sharded_up`): the one-device output, statistics and
    gradients."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    F = 128  # 64 units, two whole mask words, per shard
    module = GatedReluMLP(F, use_bias=True)
    params = {"block_0": {"mlp": random_params(F, use_bias=True)["params"]}}
    x = jax.random.normal(jax.random.key(10), (4, L, D))
    r = jax.random.normal(jax.random.key(11), (4, L, D))

    def run(p, x):
        y, state = module.apply({"params": p["block_0"]["mlp"]}, x, mutable=["intermediates"])
        grads = jax.grad(lambda p: jnp.sum(module.apply(
            {"params": p["block_0"]["mlp"]}, x) * r))(p)
        return y, layer_stats(state["intermediates"])[0], grads

    y1, s1, g1 = jax.jit(run)(params, x)
    placed = shard_state(params, mesh)
    assert placed["block_0"]["mlp"]["wu"].sharding.shard_shape((D, F)) == (D, F // 2)
    with jax.set_mesh(mesh):
        y2, s2, g2 = jax.jit(run)(placed, jax.device_put(x, NamedSharding(mesh, PartitionSpec(
            "data"))))
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-5, atol=1e-6)
    assert_stats_equal(s2, s1)
    assert s2.seq_count.sharding.shard_shape(s2.seq_count.shape) == (2, F // 2)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    assert sys.argv[1:] == ["sharded"] and jax.device_count() == 4, jax.devices()
    check_sharded()
    print("ok sharded")
