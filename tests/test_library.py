"""The library from someone else's model: the README's example runs as written, `layer_stats`
finds every ReluMLP whatever the modules are named, and `ReluMLP` takes one sequence or a batch."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.model import ReluMLP, layer_stats

README = Path(__file__).parents[1] / "README.md"


def readme_library_example() -> str:
    text = README.read_text()
    start = text.index("The MLP is a Flax module you can use in your own model:")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readme_library_example_runs():
    scope: dict = {}
    exec(readme_library_example(), scope)
    figures = scope["figures"]
    assert len(figures) == 2 and all(0 < f["token_use"] <= f["batch_use"] <= 1 for f in figures)


class Encoder(nn.Module):
    # Names nothing like the package's Transformer, sorting against the call order (stage_c,
    # ffn2 runs first), so that an order by name fails the test.
    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((64, 96, 32)):
            x = x + nn.Sequential([nn.LayerNorm(), ReluMLP(d_ff=width, name=f"ffn{2 - i}")],
                                  name=f"stage_{chr(99 - i)}")(x)
        return x


def test_layer_stats_finds_every_mlp_in_call_order():
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    params = Encoder().init(jax.random.key(1), x)
    _, state = Encoder().apply(params, x, mutable=["intermediates"])
    stats = layer_stats(state["intermediates"])
    assert [s.seq_count.shape for s in stats] == [(2, 64), (2, 96), (2, 32)]
    assert layer_stats({}) == []
    with pytest.raises(ValueError, match="no ReluMLP statistics"):
        layer_stats({"other": {"thing": (jnp.ones(3),)}})


def test_relu_mlp_takes_one_sequence_or_a_batch():
    mlp = ReluMLP(d_ff=64)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    params = mlp.init(jax.random.key(1), x)
    y, state = mlp.apply(params, x, mutable=["intermediates"])
    y3, state3 = mlp.apply(params, x[None], mutable=["intermediates"])
    assert y.shape == (8, 16)
    np.testing.assert_allclose(y, y3[0], rtol=1e-6)
    (a,), (b,) = layer_stats(state["intermediates"]), layer_stats(state3["intermediates"])
    np.testing.assert_array_equal(a.seq_count, b.seq_count)
    with pytest.raises(ValueError, match="ReluMLP takes"):
        mlp.apply(params, x[None, None])
