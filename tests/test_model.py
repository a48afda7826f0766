"""The Flax model: causality, sown statistics, per-layer widths, instrumentation modes."""

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
