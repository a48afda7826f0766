"""cuDNN's flash attention in the Transformer on a real GPU (marked `gpu`; run on the device):
`auto` picks it for bf16, and its logits and gradients agree with XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.model import Transformer, TransformerConfig
from relu_sparsity.model.transformer import attention_implementation

pytestmark = pytest.mark.gpu


def test_auto_takes_cudnn_for_bf16_and_xla_for_f32():
    assert attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"


def test_cudnn_attention_matches_xla():
    def model(attention):
        return Transformer(TransformerConfig(vocab_size=512, num_layers=2, d_model=256,
                                             num_heads=4, d_ff=512, max_len=256,
                                             instrument="off", dtype="bfloat16",
                                             attention=attention))

    tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, 512)
    params = model("xla").init(jax.random.key(1), tokens)["params"]

    def loss(params, attention):
        logits = model(attention).apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    (_, want), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                    static_argnums=1)(params, "xla")
    (_, got), got_grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                  static_argnums=1)(params, "cudnn")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-2, rtol=3e-2)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        scale = float(jnp.max(jnp.abs(w))) + 1e-12
        assert float(jnp.max(jnp.abs(g - w))) <= 5e-2 * scale
