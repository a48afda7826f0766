"""The model a user would write by hand: a configuration's Transformer in stock Flax and optax
(`nn.Embed`, `nn.MultiHeadDotProductAttention`, `nn.Dense`, `nn.LayerNorm`, AdamW), with no statistics.

`relu-sparsity bench --train-step CONFIG --baseline flax` times its train step beside ours, so
that every step claim is a ratio against what a user would otherwise run.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from relu_sparsity.train.config import Config
from relu_sparsity.train.steps import compute_dtype, make_optimizer


class PlainMLP(nn.Module):
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.d_ff, dtype=self.dtype, name="up")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(h)


class PlainBlock(nn.Module):
    """Named as the Transformer's parts are, so that `relu-sparsity profile` sorts both alike."""

    num_heads: int
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                                name="attn")(y, mask=mask)
        y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        return x + PlainMLP(self.d_ff, self.dtype, name="mlp")(y)


class PlainTransformer(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab] f32: pre-LN blocks, learned positions, tied
    embeddings; parameters f32, compute in `dtype`."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    max_len: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        positions = self.param("pos_embed", nn.initializers.normal(0.02),
                               (self.max_len, self.d_model))
        x = embed(tokens) + positions[None, : tokens.shape[1]].astype(self.dtype)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_layers):
            x = PlainBlock(self.num_heads, self.d_ff, self.dtype, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        return embed.attend(x).astype(jnp.float32)


def plain_model(config: Config, vocab_size: int) -> PlainTransformer:
    """The configuration's model shape in plain Flax (one width for every layer)."""
    m = config.model
    if not isinstance(m.d_ff, int):
        raise ValueError(f"the plain baseline takes one model.d_ff for every layer, got {m.d_ff}")
    return PlainTransformer(vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff, m.seq_len,
                            jnp.dtype(compute_dtype(config)))


def plain_train_step(model: PlainTransformer, optimizer: optax.GradientTransformation):
    """(params, opt_state, tokens [B, L + 1]) -> (params, opt_state, loss): next-token
    cross-entropy, one optimizer update; jitted, donating the parameters and optimizer state."""
    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        with jax.named_scope("loss"):  # named as the train step's parts, for profiles
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

    return step


def plain_setup(config: Config, vocab_size: int, seed: int = 0):
    """The plain model's step, parameters and optimizer state, with the run's optimizer
    (`make_optimizer`: the same schedule, clipping and AdamW)."""
    model = plain_model(config, vocab_size)
    optimizer = make_optimizer(config)
    tokens = jnp.zeros((1, config.model.seq_len), jnp.int32)
    params = model.init(jax.random.key(seed), tokens)["params"]
    return plain_train_step(model, optimizer), params, optimizer.init(params)
