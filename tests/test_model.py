"""The Flax model: causality, sown statistics, per-layer widths, instrumentation modes."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import BackendUnavailableError
from relu_sparsity.model import ReluMLP, Transformer, TransformerConfig, layer_stats

CONFIG = TransformerConfig(vocab_size=50, num_layers=3, d_model=32, num_heads=4,
                           d_ff=(48, 70, 33), max_len=12)


def init(config, tokens):
    return Transformer(config).init(jax.random.key(0), tokens)


def test_causal():
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
    params = init(CONFIG, tokens)
    logits = Transformer(CONFIG).apply(params, tokens)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 50)
    logits2 = Transformer(CONFIG).apply(params, changed)
    np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert np.abs(np.asarray(logits[:, 7:] - logits2[:, 7:])).max() > 1e-4


def test_sown_stats_per_layer_match_hidden_activations():
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, 50)
    params = init(CONFIG, tokens)
    _, state = Transformer(CONFIG).apply(params, tokens, mutable=["intermediates"])
    stats = layer_stats(state["intermediates"])
    assert [s.seq_count.shape for s in stats] == [(3, 48), (3, 70), (3, 33)]

    # Recompute layer 1's hidden activations by hand from its input.
    captured = {}

    def capture(next_fun, args, kwargs, context):
        if context.module.name == "mlp" and context.method_name == "__call__":
            captured.setdefault(context.module.parent.name, args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        Transformer(CONFIG).apply(params, tokens)
    mlp = params["params"]["block_1"]["mlp"]
    x = captured["block_1"].reshape(-1, 32)
    h = np.maximum(np.asarray(x @ mlp["wi"] + mlp["bi"]), 0)
    np.testing.assert_array_equal(stats[1].token_count, (h > 0).sum(1))
    np.testing.assert_array_equal(stats[1].seq_count, (h > 0).reshape(3, 12, 70).sum(1))


def test_lecun_normal_mlp_kernels():
    d_model, d_ff = 256, 1024
    params = ReluMLP(d_ff).init(jax.random.key(0), jnp.zeros((1, 4, d_model)))["params"]
    assert np.std(np.asarray(params["wi"])) == pytest.approx(1 / np.sqrt(d_model), rel=0.05)
    assert np.std(np.asarray(params["wo"])) == pytest.approx(1 / np.sqrt(d_ff), rel=0.05)
    assert not np.asarray(params["bi"]).any()


def test_instrument_off_sows_nothing_and_matches():
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 50)
    params = init(CONFIG, tokens)
    off = TransformerConfig(**{**CONFIG.__dict__, "instrument": "off"})
    logits_off, state = Transformer(off).apply(params, tokens, mutable=["intermediates"])
    assert layer_stats(state.get("intermediates", {})) == []
    np.testing.assert_allclose(logits_off, Transformer(CONFIG).apply(params, tokens), atol=1e-6)


def test_parameters_do_not_depend_on_the_instrument():
    # train/steps.init_state initializes through the model without statistics, which must give
    # the instrumented model's own parameters (tree and values), live units and all.
    tokens = jnp.zeros((1, 12), jnp.int32)
    live = TransformerConfig(**{**CONFIG.__dict__, "live": ((0, 5), (1, 2, 69), (7,))})
    for config in (CONFIG, live):
        off = TransformerConfig(**{**config.__dict__, "instrument": "off"})
        jax.tree.map(np.testing.assert_array_equal, init(config, tokens)["params"],
                     init(off, tokens)["params"])


def test_fused_without_gpu_backend_is_a_clear_error():
    tokens = jnp.zeros((1, 12), jnp.int32)
    fused = TransformerConfig(**{**CONFIG.__dict__, "instrument": "fused", "backend": "triton"})
    with pytest.raises(BackendUnavailableError, match="triton"):
        init(fused, tokens)
    fused_ref = TransformerConfig(**{**CONFIG.__dict__, "instrument": "fused",
                                     "backend": "reference"})
    with pytest.raises(ValueError, match="fused"):
        init(fused_ref, tokens)
    # auto on a CPU resolves to the reference: still an error, not a silent fallback.
    fused_auto = TransformerConfig(**{**CONFIG.__dict__, "instrument": "fused", "backend": "auto"})
    with pytest.raises(ValueError, match="instrument xla"):
        init(fused_auto, tokens)


def test_live_units_zero_the_dead_ones():
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    full = ReluMLP(40)
    params = full.init(jax.random.key(5), x)
    live = (0, 3, 17, 39)
    with jax.default_matmul_precision("highest"):  # f32 GEMMs, not TF32, on GPUs
        y_live = ReluMLP(40, live=live).apply(params, x)
    p = params["params"]
    h = np.maximum(np.asarray(x).reshape(-1, 16) @ np.asarray(p["wi"]) + np.asarray(p["bi"]), 0)
    dead = np.setdiff1d(np.arange(40), live)
    h[:, dead] = 0
    want = (h @ np.asarray(p["wo"]) + np.asarray(p["bo"])).reshape(2, 6, 16)
    np.testing.assert_allclose(y_live, want, atol=1e-5)


def test_bfloat16_compute():
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 50)
    bf16 = TransformerConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
    params = init(bf16, tokens)
    logits, state = Transformer(bf16).apply(params, tokens, mutable=["intermediates"])
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert layer_stats(state["intermediates"])[0].seq_count.dtype == jnp.int32


@pytest.mark.parametrize("with_fused", [False, True])
def test_live_units_padded_width_changes_nothing(with_fused):
    # Live units computed at a width padded to 16 (zero units) give the same output, the same
    # statistics in the layer's unit ids, and the same gradients as at their exact width.
    x = jax.random.normal(jax.random.key(0), (2, 8, 12))
    live = (0, 3, 4, 9, 31, 32, 40)
    kwargs = dict(d_ff=45, live=live, instrument="xla")
    if with_fused:  # the interpreted TPU kernel stands for a fused backend here
        kwargs.update(instrument="fused", backend="pallas_tpu")
    exact, padded = ReluMLP(**kwargs, live_multiple=1), ReluMLP(**kwargs, live_multiple=16)
    params = exact.init(jax.random.key(1), x)

    def run(module, p):
        y, state = module.apply(p, x, mutable=["intermediates"])
        return y, state["intermediates"]["stats"][0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpreting
        (y1, s1), (y2, s2) = run(exact, params), run(padded, params)
        g1 = jax.grad(lambda p: jnp.sum(run(exact, p)[0] ** 2))(params)
        g2 = jax.grad(lambda p: jnp.sum(run(padded, p)[0] ** 2))(params)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert s1.seq_count.shape == (2, 45)
    assert not np.any(np.asarray(s1.seq_count)[:, np.setdiff1d(np.arange(45), live)])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_live_units_on_a_fused_gpu_backend_match_xla(backend):
    # The model's live units (gathered, padded to 256, statistics put back in the layer's unit
    # ids) through a compiled GPU kernel: the same statistics as the reference on its own h.
    x = jax.random.normal(jax.random.key(0), (4, 256, 128), jnp.bfloat16)
    live = tuple(range(3, 700, 4))
    fused = ReluMLP(700, instrument="fused", backend=backend, live=live, dtype=jnp.bfloat16)
    xla = ReluMLP(700, instrument="xla", live=live, dtype=jnp.bfloat16)
    params = fused.init(jax.random.key(1), x)
    (y1, s1), (y2, s2) = [m.apply(params, x, mutable=["intermediates"]) for m in (fused, xla)]
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                               rtol=5e-2, atol=5e-2)
    got, want = s1["intermediates"]["stats"][0], s2["intermediates"]["stats"][0]
    assert got.seq_count.shape == (4, 700)
    dead = np.setdiff1d(np.arange(700), live)
    assert not np.asarray(got.seq_count)[:, dead].any()
    # bf16 h may round differently near 0 in the two GEMMs: nearly all counts agree.
    agree = np.mean(np.asarray(got.seq_count) == np.asarray(want.seq_count))
    assert agree > 0.99, agree
