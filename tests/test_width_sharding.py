"""The MLP's width split over a `model` mesh axis (tensor parallelism for d_ff): the shardings of
the state, and on simulated CPU meshes (data x model 2 x 2 and 1 x 4) the same outputs, the same
statistics and the same training as on one device.

The multi-device checks need XLA_FLAGS set before jax is imported, so each runs in a subprocess
that executes this file as a script: `python test_width_sharding.py <check> <n_data> <n_model>`.
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from relu_sparsity.kernels.reference import reference_forward
from relu_sparsity.kernels.testing import integer_inputs
from relu_sparsity.model import ReluMLP, Transformer
from relu_sparsity.model.mlp import width_sharded_up
from relu_sparsity.train import steps
from relu_sparsity.train.config import preset
from relu_sparsity.train.sharding import shard_state, state_shardings

P = PartitionSpec
MESHES = [(2, 2), (1, 4)]
# Sizes that trace and run in a few seconds; d_ff is a multiple of 32 * 4 (whole mask words per
# shard on the 1 x 4 mesh).
SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=128",
         "model.seq_len=16", "train.batch_size=4", "train.steps=4", "train.warmup_steps=1",
         "train.peak_lr=1e-2", "data.vocab_size=64"]
VOCAB = 64


def make_mesh(n_data: int, n_model: int) -> jax.sharding.Mesh:
    return jax.make_mesh((n_data, n_model), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def small_state(config, model):
    optimizer = steps.make_optimizer(config)
    widths = model.config.layer_widths()
    # Jitted: one compilation instead of one per eager op of the initializers.
    return optimizer, jax.jit(lambda: steps.init_state(model, optimizer, config, widths))()


def assert_stats_equal(got, want):
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# --- in this process ------------------------------------------------------------------------


def test_state_shardings_split_the_mlp_weights_only():
    config = preset("tiny", SMALL)
    model = Transformer(steps.model_config(config, VOCAB))
    _, state = small_state(config, model)
    shardings = state_shardings(state, make_mesh(1, 1))
    specs = {jax.tree_util.keystr(path): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
    assert len(specs) == len(jax.tree.leaves(state))
    width = {"wi": P(None, "model"), "bi": P("model"), "wo": P("model", None)}
    split = {}
    for i in range(1):
        for name, spec in width.items():
            split[f".params['block_{i}']['mlp']['{name}']"] = spec
            for moment in ("mu", "nu"):  # AdamW's moments mirror the params' paths
                split[f".opt_state[1][0].{moment}['block_{i}']['mlp']['{name}']"] = spec
    assert {k: v for k, v in specs.items() if v != P()} == split
    # Replicated: the output bias, attention, embeddings, counts, the unit histories.
    for path in (".params['block_0']['mlp']['bo']", ".params['block_0']['attn']['qkv']['kernel']",
                 ".params['embed']['embedding']", ".opt_state[1][0].count", ".step",
                 ".units[0].on_steps", ".first_nonfinite"):
        assert specs[path] == P(), path
    # The params dict alone gets the same specs.
    params = state_shardings(state.params, make_mesh(1, 1))
    assert params["block_0"]["mlp"]["wi"].spec == P(None, "model")
    assert params["embed"]["embedding"].spec == P()
    # Abstract shapes (reading a checkpoint onto the devices) get the same specs.
    shapes = state_shardings(jax.eval_shape(lambda: state), make_mesh(1, 1))
    assert shapes.opt_state[1][0].nu["block_0"]["mlp"]["bi"].spec == P("model")
    placed = shard_state(state.params, make_mesh(1, 1))
    assert placed["block_0"]["mlp"]["wo"].sharding.spec == P("model", None)


def test_state_shardings_without_a_model_axis_replicate():
    params = {"block_0": {"mlp": {"wi": jnp.zeros((4, 32))}}}
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert state_shardings(params, mesh)["block_0"]["mlp"]["wi"].spec == P()


def abstract_mesh(n_data: int, n_model: int):
    return jax.sharding.AbstractMesh((n_data, n_model), ("data", "model"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("d_ff, n_model", [(96, 2), (64, 4), (100, 4)])
def test_width_not_in_whole_words_per_shard_is_an_error(d_ff, n_model):
    # Traced only (eval_shape under an abstract mesh): the check comes before any device work.
    x = jnp.zeros((2, 8, 16))
    with jax.sharding.use_abstract_mesh(abstract_mesh(1, n_model)):
        with pytest.raises(ValueError, match=f"d_ff {d_ff} .* model axis of size {n_model}"):
            jax.eval_shape(ReluMLP(d_ff).init, jax.random.key(0), x)


def test_live_units_with_a_model_axis_is_an_error():
    x = jnp.zeros((2, 8, 16))
    with jax.sharding.use_abstract_mesh(abstract_mesh(1, 2)):
        with pytest.raises(ValueError, match="live units.*model"):
            jax.eval_shape(ReluMLP(64, live=(0, 5)).init, jax.random.key(0), x)


def run_check(name: str, n_data: int, n_model: int) -> None:
    """This file as a script in a subprocess with n_data * n_model simulated CPU devices."""
    # Optimization level 0: both sides of each comparison compile with it, in half the time.
    flags = f"--xla_force_host_platform_device_count={n_data * n_model} " \
            "--xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    done = subprocess.run([sys.executable, __file__, name, str(n_data), str(n_model)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ok {name}" in done.stdout


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_mlp_matches_one_device(mesh):
    run_check("mlp", *mesh)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_train_steps_match_one_device(mesh):
    run_check("train", *mesh)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_fused_kernel_matches_reference(mesh):
    run_check("fused", *mesh)


# --- in the subprocess (n_data * n_model devices) -------------------------------------------


def sharded_apply(module, params, x, mesh):
    """module.apply on `mesh`: the params placed by state_shardings, x [B, L, D] by sequences."""
    placed = shard_state(params, mesh)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        return jax.jit(lambda p, x: module.apply(p, x, mutable=["intermediates"]))(placed, x)


def check_width_sharded_up(mesh, x, w1, b1, *, seq_len: int, backend: str, exact_h: bool):
    """width_sharded_up's h and statistics (token mask included) against the reference on the
    full width."""
    n_data, n_model = mesh.shape["data"], mesh.shape["model"]
    call = jax.jit(lambda x, w, b: width_sharded_up(x, w, b, seq_len=seq_len, backend=backend,
                                                    mesh=mesh, with_token_mask=True))
    with jax.set_mesh(mesh):
        h, stats = call(x, w1, b1)
    # h [T, F] comes out split by sequences and by width.
    assert h.sharding.shard_shape(h.shape) == (x.shape[0] // n_data, w1.shape[1] // n_model)
    want_h, want = reference_forward(x, w1, b1, seq_len=seq_len, with_stats=True,
                                     with_token_mask=True)
    if exact_h:
        np.testing.assert_array_equal(np.asarray(h), np.asarray(want_h))
    else:
        np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), rtol=1e-5, atol=1e-5)
    assert_stats_equal(stats, want)
    assert np.asarray(want.token_count).min() > 0 and (np.asarray(want.seq_count) == 0).any()


def check_mlp(mesh):
    # (a) ReluMLP split over the model axis: the unsharded module's output and sown statistics.
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    module = ReluMLP(128)
    params = module.init(jax.random.key(1), x)
    y1, s1 = module.apply(params, x, mutable=["intermediates"])
    y2, s2 = sharded_apply(module, params, x, mesh)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-5, atol=1e-6)
    got, want = s2["intermediates"]["stats"][0], s1["intermediates"]["stats"][0]
    assert_stats_equal(got, want)
    n_seq, F = want.seq_count.shape
    assert got.seq_count.sharding.shard_shape((n_seq, F)) == (
        n_seq // mesh.shape["data"], F // mesh.shape["model"])
    # (b) the shards' statistics put together are the reference's on the full width.
    tokens = x.reshape(-1, 16)
    p = params["params"]
    check_width_sharded_up(mesh, tokens, p["wi"], p["bi"], seq_len=8, backend="reference",
                           exact_h=False)
    check_width_sharded_up(mesh, *integer_inputs(32, 16, 128, jnp.float32), seq_len=8,
                           backend="reference", exact_h=True)


def run_steps(train_step, state, tokens, n: int):
    losses, all_stats = [], []
    for _ in range(n):
        state, scalars, stats = train_step(state, tokens)
        losses.append(float(scalars["loss"]))
        all_stats.append(jax.device_get(stats))
    return state, losses, all_stats


def check_train(mesh):
    # (c) a few train steps with the state split by state_shardings: the one-device losses,
    # statistics and unit histories.
    config = preset("tiny", SMALL)
    model = Transformer(steps.model_config(config, VOCAB))
    tokens = jax.random.randint(jax.random.key(2), (4, 17), 0, VOCAB)
    optimizer, state = small_state(config, model)
    state = jax.device_get(state)  # host copies: each run's step donates its own buffers
    one, losses1, stats1 = run_steps(steps.make_train_step(model, optimizer),
                                     jax.tree.map(jnp.asarray, state), tokens, 3)
    placed_tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        train_step = steps.make_train_step(model, optimizer)
        two, losses2, stats2 = run_steps(train_step, shard_state(state, mesh), placed_tokens, 3)
    np.testing.assert_allclose(losses2, losses1, rtol=1e-5)
    for got, want in zip(stats2, stats1, strict=True):
        for g, w in zip(got, want, strict=True):
            assert_stats_equal(g, w)
    for a, b in zip(jax.tree.leaves(two.units), jax.tree.leaves(one.units), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wi = two.params["block_0"]["mlp"]["wi"]
    assert wi.sharding.shard_shape(wi.shape) == (32, 128 // mesh.shape["model"])


def check_fused(mesh):
    # (d) the interpreted pallas_tpu kernel per width shard: the reference's statistics.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpreting
        x = jax.random.normal(jax.random.key(3), (4, 8, 16))
        fused = ReluMLP(128, instrument="fused", backend="pallas_tpu")
        params = fused.init(jax.random.key(4), x)
        y1, s1 = ReluMLP(128, instrument="xla").apply(params, x, mutable=["intermediates"])
        y2, s2 = sharded_apply(fused, params, x, mesh)
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-4, atol=1e-5)
        assert_stats_equal(s2["intermediates"]["stats"][0], s1["intermediates"]["stats"][0])
        check_width_sharded_up(mesh, *integer_inputs(32, 16, 128, jnp.float32), seq_len=8,
                               backend="pallas_tpu", exact_h=True)


CHECKS = {"mlp": check_mlp, "train": check_train, "fused": check_fused}

if __name__ == "__main__":
    name, n_data, n_model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert jax.device_count() == n_data * n_model, jax.devices()
    CHECKS[name](make_mesh(n_data, n_model))
    print(f"ok {name}")
