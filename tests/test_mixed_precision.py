"""A 16-bit model's step runs its GEMMs in its compute dtype, as a plain Flax model's do: no GEMM
on f32 operands and no f32 [T, F] intermediate in the MLP's backward (checked in the traced
program); its gradients equal an f32 computation within bf16 rounding; the embedding's gradient
is summed in f32; attention is cuDNN's only where cuDNN can run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.model import ReluMLP, Transformer, TransformerConfig
from relu_sparsity.model import transformer as transformer_module
from relu_sparsity.model.transformer import attention_implementation


def primitives(jaxpr, name):
    """Every equation of primitive `name` in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += primitives(inner, name)
    return found


def dot_dtypes(fn, *args):
    """(operand dtypes, output dtype) of every dot_general fn traces."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [(tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype))
            for e in primitives(jaxpr, "dot_general")]


def inputs(t=128, d=32, f=256, dtype=jnp.bfloat16):
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (t, d), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
    b1 = (0.1 * jax.random.normal(kb, (f,), jnp.float32)).astype(dtype)
    return x, w1, b1


def test_bf16_backward_gemms_read_and_write_bf16():
    x, w1, b1 = inputs()
    loss = lambda x, w1, b1: jnp.sum(fused_mlp_up(x, w1, b1, seq_len=64)[0])  # noqa: E731
    dots = dot_dtypes(jax.grad(loss, argnums=(0, 1, 2)), x, w1, b1)
    # The reference's forward GEMM sums into f32 for its ReLU; the backward's two write bf16.
    assert len(dots) == 3 and dots[0][0] == ("bfloat16", "bfloat16")
    assert dots[1:] == [(("bfloat16", "bfloat16"), "bfloat16")] * 2, dots


def test_f32_backward_stays_f32_at_highest_precision():
    x, w1, b1 = inputs(dtype=jnp.float32)
    loss = lambda x, w1, b1: jnp.sum(fused_mlp_up(x, w1, b1, seq_len=64)[0])  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w1, b1).jaxpr
    dots = primitives(jaxpr, "dot_general")
    assert all(str(e.outvars[0].aval.dtype) == "float32" for e in dots)
    assert all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


def test_bf16_backward_matches_f32_on_the_same_inputs_and_mask():
    """The bf16 gradients against numpy's f32 ones on the bf16 inputs, under the mask of the
    returned h, within bf16's relative rounding of the outputs."""
    x, w1, b1 = inputs()
    g = jax.random.normal(jax.random.key(5), (x.shape[0], w1.shape[1]), jnp.float32)
    h, vjp = jax.vjp(lambda x, w1, b1: fused_mlp_up(x, w1, b1, seq_len=64)[0], x, w1, b1)
    dx, dw1, db1 = vjp(g.astype(jnp.bfloat16))
    dpre = np.where(np.float32(h) > 0, np.float32(g.astype(jnp.bfloat16)), 0.0)
    want = (dpre @ np.float32(w1).T, np.float32(x).T @ dpre, dpre.sum(0))
    for got, expected in zip((dx, dw1, db1), want, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got), expected, rtol=2e-2,
                                   atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("instrument", ["off", "xla"])
def test_bf16_mlp_step_runs_no_gemm_on_f32_operands(instrument):
    x = jax.random.normal(jax.random.key(0), (2, 64, 32), jnp.bfloat16)
    mlp = ReluMLP(256, instrument=instrument, dtype=jnp.bfloat16)
    params = mlp.init(jax.random.key(1), x)["params"]
    loss = lambda p, x: jnp.sum(mlp.apply({"params": p}, x).astype(jnp.float32))  # noqa: E731
    dots = dot_dtypes(jax.grad(loss, argnums=(0, 1)), params, x)
    assert len(dots) == 6 and all(ins == ("bfloat16", "bfloat16") for ins, _ in dots), dots
    # Only the reference's forward GEMM (instrument xla) sums into f32 for its ReLU.
    f32_outputs = [out for _, out in dots].count("float32")
    assert f32_outputs == (1 if instrument == "xla" else 0), dots


def test_bf16_embedding_gradient_is_an_f32_sum_of_rows():
    """Tokens repeated many times: the gradient of the lookup is the f32 sum of their rows
    (numpy), which a bf16 scatter into a bf16 table would round to 8 bits."""
    config = TransformerConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=2, d_ff=64,
                               max_len=256, instrument="off", dtype="bfloat16")
    embed = transformer_module.Embed(64, 32, jnp.bfloat16)
    params = embed.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    tokens = jax.random.randint(jax.random.key(1), (4, 256), 0, 4)  # 4 tokens, ~256 times each
    rows = jax.random.normal(jax.random.key(2), (4, 256, 32), jnp.bfloat16)
    grad = jax.grad(lambda p: jnp.sum((embed.apply(p, tokens) * rows).astype(jnp.float32)))(
        params)["params"]["embedding"]
    assert grad.dtype == jnp.float32
    want = np.zeros((64, 32), np.float32)
    np.add.at(want, np.asarray(tokens).ravel(), np.float32(rows).reshape(-1, 32))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-4)
    # The model's own parameter tree keeps nn.Embed's path (checkpoints load as before).
    model_params = Transformer(config).init(jax.random.key(0), tokens)["params"]
    assert model_params["embed"]["embedding"].shape == (64, 32)


def test_attention_implementation_choice(monkeypatch):
    # On this CPU: XLA's, and cuDNN asked for is refused with the reason.
    assert attention_implementation("auto", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="attention=cudnn cannot run here: the backend is cpu"):
        attention_implementation("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_implementation("flash", jnp.bfloat16, 64)
    # On a GPU: cuDNN for 16-bit types and head sizes it takes, XLA's otherwise.
    monkeypatch.setattr(transformer_module.jax, "default_backend", lambda: "gpu")
    assert attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention_implementation("auto", jnp.float16, 128) == "cudnn"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 60) == "xla"
    assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="takes bfloat16 or float16, not float32"):
        attention_implementation("cudnn", jnp.float32, 64)
