"""Decoder-only ReLU Transformer as in the paper: pre-LayerNorm blocks, causal self-attention and
the instrumented ReLU MLP, learned positions, tied or untied embeddings. The options after
`attention` in `TransformerConfig` describe checkpoints trained elsewhere (OPT and ReLU-gated
Llama-architecture models, model/hf.py); their defaults are the paper's model."""

import dataclasses
import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from relu_sparsity.kernels import SparsityStats
from relu_sparsity.model.mlp import GatedReluMLP, ReluMLP


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
    attention: str = "auto"  # auto | xla | cudnn (attention_implementation)
    norm_eps: float = 1e-6  # the LayerNorms' epsilon
    post_norm: bool = False  # LayerNorm after each residual sum (OPT-350m), not before the branch
    final_norm: bool = True  # a LayerNorm after the last block
    position_offset: int = 0  # the position table's row of position 0 (OPT's is 2)
    embed_dim: int | None = None  # token embedding width where it differs from d_model: the
    # embeddings go through project_in [embed_dim, d_model], the output through project_out
    norm: str = "layernorm"  # layernorm | rmsnorm (Llama)
    positions: str = "learned"  # learned (a table) | rope (rotary, on queries and keys)
    rope_theta: float = 10000.0
    num_kv_heads: int | None = None  # grouped-query attention: separate q and kv projections
    attention_bias: bool = True
    mlp: str = "relu"  # relu (ReluMLP) | gated (GatedReluMLP, no biases)
    output_bias: bool = True  # a bias in the untied output layer (Hugging Face models have none)

    def layer_widths(self) -> tuple[int, ...]:
        if isinstance(self.d_ff, int):
            return (self.d_ff,) * self.num_layers
        if len(self.d_ff) != self.num_layers:
            raise ValueError(f"d_ff lists {len(self.d_ff)} widths for {self.num_layers} layers")
        return tuple(int(w) for w in self.d_ff)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(name: str, dtype, head_dim: int) -> str:
    """The `jax.nn.dot_product_attention` implementation to run: `auto` takes cuDNN's flash
    attention on a GPU for 16-bit types and head sizes it supports, XLA's elsewhere; `cudnn`
    where cuDNN cannot run is a ValueError, never a quiet switch to XLA."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    why_not = cudnn_unsupported(jnp.dtype(dtype), head_dim)
    if name == "cudnn" and why_not:
        raise ValueError(f"attention=cudnn cannot run here: {why_not}; use attention=xla")
    if name == "auto":
        return "xla" if why_not else "cudnn"
    return name


def cudnn_unsupported(dtype: jnp.dtype, head_dim: int) -> str:
    """Why cuDNN's fused attention cannot run this model here ("" when it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not a GPU"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN's flash attention takes bfloat16 or float16, not {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"head size {head_dim} is not a multiple of 8 up to 256"
    return ""


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention: one fused q/k/v projection, or with `num_kv_heads`
    (grouped-query attention) a q projection and a k/v one of num_kv_heads heads; with
    `rope_theta`, rotary positions on queries and keys."""

    num_heads: int
    dtype: jnp.dtype
    attention: str = "auto"
    num_kv_heads: int | None = None
    use_bias: bool = True
    rope_theta: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq_len, d_model = x.shape
        if d_model % self.num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {self.num_heads}")
        head_dim = d_model // self.num_heads
        dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, use_bias=self.use_bias)
        if self.num_kv_heads is None:
            qkv = dense((3, self.num_heads, head_dim), name="qkv")(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each
        else:
            q = dense((self.num_heads, head_dim), name="q")(x)
            kv = dense((2, self.num_kv_heads, head_dim), name="kv")(x)
            k, v = kv[:, :, 0], kv[:, :, 1]  # [B, T, K, H]
        if self.rope_theta is not None:
            q, k = rotary(q, self.rope_theta), rotary(k, self.rope_theta)
        implementation = attention_implementation(self.attention, self.dtype, head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           implementation=implementation)
        return dense(d_model, axis=(-2, -1), name="out")(out)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x [B, T, heads, H] in the half-split layout (Llama's
    `rotate_half`): dimension i pairs with i + H/2, rotated by position * theta^(-2i/H)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq  # [T, H/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[None, :, None]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[None, :, None]
    half1, half2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-half2, half1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Embed(nn.Module):
    """Token embeddings [vocab, d_model] (the parameter of `nn.Embed`, named alike), looked up
    in the parameter dtype and cast after the gather: the gradient is then a scatter-add of
    f32 rows, where a lookup in a 16-bit copy of the table would scatter 16-bit rows into it
    (slow atomics, and frequent tokens' sums rounded to 8 bits)."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype

    def setup(self):
        # Small embeddings (GPT-2's 0.02) keep tied logits near zero at initialization: loss ~ ln V.
        self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                    (self.num_embeddings, self.features))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied logits x @ embedding.T, the table cast to the compute dtype once."""
        return jnp.dot(x, self.embedding.astype(self.dtype).T)


class Block(nn.Module):
    config: TransformerConfig
    d_ff: int
    live: tuple[int, ...] | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        attn = CausalSelfAttention(
            cfg.num_heads, dtype, cfg.attention, num_kv_heads=cfg.num_kv_heads,
            use_bias=cfg.attention_bias,
            rope_theta=cfg.rope_theta if cfg.positions == "rope" else None, name="attn")
        mlp_class = {"relu": ReluMLP, "gated": GatedReluMLP}[cfg.mlp]
        mlp = mlp_class(self.d_ff, instrument=cfg.instrument, backend=cfg.backend,
                        live=self.live, live_multiple=cfg.live_multiple, dtype=dtype,
                        name="mlp")
        ln_attn, ln_mlp = norm(cfg, "ln_attn"), norm(cfg, "ln_mlp")
        if cfg.post_norm:
            x = ln_attn(x + attn(x))
            return ln_mlp(x + mlp(x))
        x = x + attn(ln_attn(x))
        return x + mlp(ln_mlp(x))


def norm(cfg: TransformerConfig, name: str) -> nn.Module:
    """The model's LayerNorm or RMSNorm (Llama's: a scale, no bias)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name=name)
    return nn.LayerNorm(cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name=name)


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
        embed_dim = cfg.embed_dim or cfg.d_model
        embed = Embed(cfg.vocab_size, embed_dim, dtype, name="embed")
        x = embed(tokens)
        if embed_dim != cfg.d_model:
            x = nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, name="project_in")(x)
        if cfg.positions == "learned":
            positions = self.param("pos_embed", nn.initializers.normal(0.02),
                                   (cfg.position_offset + cfg.max_len, cfg.d_model))
            start = cfg.position_offset
            x = x + positions[None, start:start + tokens.shape[1]].astype(dtype)
        widths = cfg.layer_widths()
        lives = cfg.live or (None,) * cfg.num_layers
        for i in range(cfg.num_layers):
            x = Block(cfg, widths[i], lives[i], name=f"block_{i}")(x)
        if cfg.final_norm:
            x = norm(cfg, "ln_final")(x)
        if embed_dim != cfg.d_model:
            x = nn.Dense(embed_dim, use_bias=False, dtype=dtype, name="project_out")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=cfg.output_bias, dtype=dtype,
                              name="unembed")(x)
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
