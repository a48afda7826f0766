"""Decoder-only ReLU Transformer as in the paper: pre-LayerNorm blocks, causal self-attention and
the instrumented ReLU MLP, learned positions, tied or untied embeddings."""

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.model.mlp import ReluMLP


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    num_layers: int = 6
    d_model: int = 512
    num_heads: int = 8
    d_ff: int | tuple[int, ...] = 2048  # one width for all layers, or one per layer
    max_len: int = 512
    tie_embeddings: bool = True
    instrument: str = "xla"  # off | xla | fused
    backend: str = "auto"  # kernel backend for instrument="fused"
    live: tuple[tuple[int, ...] | None, ...] | None = None  # per-layer live unit ids (mask mode)
    live_multiple: int = 256  # live units are computed at a width padded to this multiple
    dtype: str = "float32"  # compute dtype; parameters are float32

    def layer_widths(self) -> tuple[int, ...]:
        if isinstance(self.d_ff, int):
            return (self.d_ff,) * self.num_layers
        if len(self.d_ff) != self.num_layers:
            raise ValueError(f"d_ff lists {len(self.d_ff)} widths for {self.num_layers} layers")
        return tuple(int(w) for w in self.d_ff)


class CausalSelfAttention(nn.Module):
    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq_len, d_model = x.shape
        if d_model % self.num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {self.num_heads}")
        head_dim = d_model // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return nn.DenseGeneral(d_model, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class Block(nn.Module):
    config: TransformerConfig
    d_ff: int
    live: tuple[int, ...] | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = x + CausalSelfAttention(cfg.num_heads, dtype, name="attn")(
            nn.LayerNorm(dtype=dtype, name="ln_attn")(x))
        return x + ReluMLP(self.d_ff, instrument=cfg.instrument, backend=cfg.backend,
                           live=self.live, live_multiple=cfg.live_multiple, dtype=dtype,
                           name="mlp")(
            nn.LayerNorm(dtype=dtype, name="ln_mlp")(x))


class Transformer(nn.Module):
    """tokens [B, T] int -> logits [B, T, vocab] float32. Stats are sown per layer under
    `intermediates/block_{i}/mlp/stats`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {cfg.max_len}")
        # Small embeddings (GPT-2's 0.02) keep tied logits near zero at initialization: loss ~ ln V.
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        positions = self.param("pos_embed", nn.initializers.normal(0.02),
                               (cfg.max_len, cfg.d_model))
        x = embed(tokens) + positions[None, : tokens.shape[1]].astype(dtype)
        widths = cfg.layer_widths()
        lives = cfg.live or (None,) * cfg.num_layers
        for i in range(cfg.num_layers):
            x = Block(cfg, widths[i], lives[i], name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=dtype, name="ln_final")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=dtype, name="unembed")(x)
        return logits.astype(jnp.float32)


def layer_stats(intermediates) -> list:
    """Every `ReluMLP`'s `SparsityStats` sown in one apply (`mutable=["intermediates"]`), in the
    order the MLPs ran (a Transformer's layer order), whatever the modules around them are
    named. The order is the dict's, which the apply writes in call order; a dict passed out
    through a JAX transform (returned from jax.jit) comes back with its keys sorted, so take
    the statistics inside the transform, as the train step does. Raises a ValueError when the intermediates hold none (an MLP run with
    instrument="off", or `intermediates` not taken from the apply); an empty dict gives []."""
    found = []

    def walk(node):
        for key, value in node.items():
            if key == "stats" and isinstance(value, tuple):
                found.extend(v for v in value if isinstance(v, SparsityStats))
            elif isinstance(value, Mapping):
                walk(value)

    walk(intermediates)
    if intermediates and not found:
        raise ValueError("no ReluMLP statistics in these intermediates (looked for the "
                         "`stats` ReluMLP sows, at any depth): is the MLP's instrument 'off'?")
    return found
