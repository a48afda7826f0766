"""The instrumented ReLU MLPs, Flax modules to drop into any Transformer block: the two-layer
`ReluMLP` and the gated `GatedReluMLP` of ReLU-gated Llama-architecture models."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from relu_sparsity.kernels import SparsityStats, fused_mlp_up, resolve_fused_backend
from relu_sparsity.kernels.bits import BITS_PER_WORD
from relu_sparsity.model.live import (
    check_live,
    live_units,
    live_weights,
    padded_width,
    stats_in_unit_ids,
)

INSTRUMENT_MODES = ("off", "xla", "fused")


class ReluMLP(nn.Module):
    """y = relu(x @ wi + bi)[live] @ wo[live] + bo, with the hidden layer's sparsity stats sown.
    x is [batch, seq_len, d_model] or one sequence [seq_len, d_model]; the statistics count per
    sequence.

    The hidden layer runs through `kernels.fused_mlp_up`; its `SparsityStats` go to
    `self.sow("intermediates", "stats", ...)`, so `apply(..., mutable=["intermediates"])` hands
    them to the caller with no extra pass. Under a mesh with a `model` axis (`jax.set_mesh`),
    the hidden layer's width is split over it (`width_sharded_up`): wi, bi and wo sharded along
    F (train/sharding.py), and XLA adds up the shards' parts of h @ wo.

    Attributes:
      d_ff: hidden width F.
      instrument: "off" (no statistics: XLA's plain expression), "xla" (the reference backend
        computes them), "fused" (a fused kernel backend computes them in the GEMM epilogue).
      backend: kernel backend for "fused" ("auto" or a name); "off"/"xla" use the reference.
      live: optional sorted tuple of hidden-unit ids to compute; the others are dead (zero),
        and the statistics keep the layer's unit ids (model/live.py).
      live_multiple: the live units are computed at a width padded up to this multiple.
      dtype: compute dtype; parameters stay in `param_dtype`.
    """

    d_ff: int
    instrument: str = "xla"
    backend: str = "auto"
    live: tuple[int, ...] | None = None
    live_multiple: int = 256
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_instrument(self.instrument)
        x, one_sequence = as_sequences(x, "ReluMLP")
        batch, seq_len, d_model = x.shape
        init = nn.initializers.lecun_normal()
        wi = self.param("wi", init, (d_model, self.d_ff), self.param_dtype)
        bi = self.param("bi", nn.initializers.zeros, (self.d_ff,), self.param_dtype)
        wo = self.param("wo", init, (self.d_ff, d_model), self.param_dtype)
        bo = self.param("bo", nn.initializers.zeros, (d_model,), self.param_dtype)

        tokens = x.reshape(batch * seq_len, d_model).astype(self.dtype)
        if self.live is not None:
            live, width = live_and_width(self.live, self.d_ff, self.live_multiple)
            wi, bi, wo = live_weights(wi, bi, wo, live, width)
        if self.instrument == "off":
            # The plain model, the baseline the instrumented modes are measured against: XLA's
            # own expression, which folds bias and ReLU into the GEMM's epilogue.
            h = jax.nn.relu(tokens @ wi.astype(self.dtype) + bi.astype(self.dtype))
        else:
            backend = resolve_fused_backend(self.backend) if self.instrument == "fused" \
                else "reference"
            h, stats = self._hidden(tokens, wi.astype(self.dtype), bi.astype(self.dtype),
                                    seq_len=seq_len, backend=backend)
            if self.live is not None:
                stats = stats_in_unit_ids(stats, live, self.d_ff)
            self.sow("intermediates", "stats", stats)
        # Output in the compute dtype, as XLA's GEMMs accumulate in f32 anyway: an f32 output
        # would make the backward's two GEMMs through wo f32 GEMMs on an upcast [T, F] h.
        y = jnp.dot(h, wo.astype(self.dtype)) + bo.astype(self.dtype)
        y = y.reshape(batch, seq_len, d_model)
        return y[0] if one_sequence else y

    def _hidden(self, tokens, wi, bi, *, seq_len: int, backend: str):
        """`instrumented_up`, as a method so that the hidden layer has its own name in the
        profile's op names (`mlp._hidden`)."""
        return instrumented_up(tokens, wi, bi, seq_len=seq_len, backend=backend)


class GatedReluMLP(nn.Module):
    """y = (relu(x @ wg + bg) * (x @ wu))[live] @ wd[live], the gated MLP of ReLU-gated
    Llama-architecture models (ReluLLaMA, ProSparse), with the gate's sparsity stats sown.
    x is [batch, seq_len, d_model] or one sequence [seq_len, d_model]; the statistics count per
    sequence.

    The gate relu(x @ wg + bg) [T, F] runs through `kernels.fused_mlp_up` (a zero bias without
    `use_bias`), which counts its units: a unit is used where the gate is > 0, the only places
    the product h can be non-zero. The up-projection x @ wu, the product and the down-projection
    run in XLA. The statistics are sown as ReluMLP sows them (`layer_stats` finds them). Under a
    mesh with a `model` axis the gate's width is split over it (`width_sharded_up`): wg, wu
    and bg sharded along F like ReluMLP's wi and bi, wd like wo (train/sharding.py).

    Attributes:
      d_ff: hidden width F.
      instrument: "off" (no statistics: XLA's plain expression), "xla" (the reference backend
        computes them), "fused" (a fused kernel backend computes them in the GEMM epilogue).
      backend: kernel backend for "fused" ("auto" or a name); "off"/"xla" use the reference.
      live: optional sorted tuple of hidden-unit ids to compute; a dead unit drops its column
        of wg and of wu and its row of wd, and the statistics keep the layer's unit ids.
      live_multiple: the live units are computed at a width padded up to this multiple.
      use_bias: whether the gate has a bias bg [F] (Llama's MLPs have none).
      dtype: compute dtype; parameters stay in `param_dtype`.
    """

    d_ff: int
    instrument: str = "xla"
    backend: str = "auto"
    live: tuple[int, ...] | None = None
    live_multiple: int = 256
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_instrument(self.instrument)
        x, one_sequence = as_sequences(x, "GatedReluMLP")
        batch, seq_len, d_model = x.shape
        init = nn.initializers.lecun_normal()
        wg = self.param("wg", init, (d_model, self.d_ff), self.param_dtype)
        wu = self.param("wu", init, (d_model, self.d_ff), self.param_dtype)
        wd = self.param("wd", init, (self.d_ff, d_model), self.param_dtype)
        bg = self.param("bg", nn.initializers.zeros, (self.d_ff,), self.param_dtype) \
            if self.use_bias else None

        tokens = x.reshape(batch * seq_len, d_model).astype(self.dtype)
        if self.live is not None:
            live, width = live_and_width(self.live, self.d_ff, self.live_multiple)
            if bg is None:
                wg, wu, wd = live_units((wg, wu, wd), (1, 1, 0), live, width)
            else:
                wg, wu, wd, bg = live_units((wg, wu, wd, bg), (1, 1, 0, 0), live, width)
        wg, wu, wd = (w.astype(self.dtype) for w in (wg, wu, wd))
        if self.instrument == "off":
            pre = tokens @ wg if bg is None else tokens @ wg + bg.astype(self.dtype)
            gate = jax.nn.relu(pre)
        else:
            backend = resolve_fused_backend(self.backend) if self.instrument == "fused" \
                else "reference"
            # The kernel always takes a bias; without one the gate's is zero.
            bias = jnp.zeros((wg.shape[1],), self.dtype) if bg is None else bg.astype(self.dtype)
            gate, stats = self._hidden(tokens, wg, bias, seq_len=seq_len, backend=backend)
            if self.live is not None:
                stats = stats_in_unit_ids(stats, live, self.d_ff)
            self.sow("intermediates", "stats", stats)
        # Every GEMM writes the compute dtype (f32 accumulation inside the GEMM), as in ReluMLP:
        # an f32 output would make the backward's GEMMs f32 GEMMs on upcast [T, F] operands.
        h = gate * jnp.dot(tokens, wu)
        y = jnp.dot(h, wd).reshape(batch, seq_len, d_model)
        return y[0] if one_sequence else y

    def _hidden(self, tokens, wg, bg, *, seq_len: int, backend: str):
        """`instrumented_up` on the gate, as a method so that it has its own name in the
        profile's op names (`mlp._hidden`)."""
        return instrumented_up(tokens, wg, bg, seq_len=seq_len, backend=backend)


def check_instrument(instrument: str) -> None:
    if instrument not in INSTRUMENT_MODES:
        raise ValueError(f"instrument must be one of {INSTRUMENT_MODES}, got {instrument!r}")


def as_sequences(x: jax.Array, module: str) -> tuple[jax.Array, bool]:
    """x [batch, seq_len, d_model], or one sequence [seq_len, d_model] given a batch axis of 1;
    and whether it was one sequence."""
    if x.ndim not in (2, 3):
        raise ValueError(f"{module} takes [seq_len, d_model] (one sequence) or [batch, "
                         f"seq_len, d_model], got shape {x.shape}")
    return (x[None], True) if x.ndim == 2 else (x, False)


def live_and_width(live, d_ff: int, multiple: int) -> tuple[tuple[int, ...], int]:
    """The checked live unit ids and the padded width they are computed at; refused under a
    `model` mesh axis, whose shards would each need their own live set."""
    if model_axis_size(jax.sharding.get_abstract_mesh()) > 1:
        raise ValueError("live units (pruning modes mask and random) do not run with the "
                         "width split over a `model` mesh axis; use a mesh without one")
    live = check_live(live, d_ff)
    return live, padded_width(len(live), multiple, d_ff)


def instrumented_up(tokens, w, b, *, seq_len: int, backend: str
                    ) -> tuple[jax.Array, SparsityStats]:
    """fused_mlp_up(tokens [T, D], w [D, F], b [F]) -> h [T, F] and its statistics, per device
    under a mesh (`jax.set_mesh`): a fused kernel is one device's custom call. With a `model`
    axis of several devices each runs its slice of the width (`width_sharded_up`); else, with a
    `data` axis of several devices, each runs the whole width on its own sequences inside
    shard_map (whole sequences per device: the statistics stay per sequence)."""
    mesh = jax.sharding.get_abstract_mesh()
    if model_axis_size(mesh) > 1:
        return width_sharded_up(tokens, w, b, seq_len=seq_len, backend=backend, mesh=mesh)
    call = functools.partial(fused_mlp_up, seq_len=seq_len, backend=backend)
    if backend == "reference" or mesh.empty or mesh.shape.get("data", 1) == 1:
        return call(tokens, w, b)
    data, replicated = PartitionSpec("data"), PartitionSpec()
    stats_spec = SparsityStats(data, data, data, None)
    return jax.shard_map(call, mesh=mesh, in_specs=(data, replicated, replicated),
                         out_specs=(data, stats_spec), check_vma=False)(tokens, w, b)


def model_axis_size(mesh) -> int:
    """Devices along the mesh's `model` axis (1 without a mesh or without the axis)."""
    return 1 if mesh.empty else mesh.shape.get("model", 1)


def check_width_split(d_ff: int, n_model: int) -> None:
    """The mask words of the shards concatenate to the full width's only if every shard holds
    whole words: F / n_model must be a whole multiple of 32."""
    if d_ff % (n_model * BITS_PER_WORD):
        raise ValueError(f"d_ff {d_ff} does not split over the model axis of size {n_model}: "
                         f"each shard's width must be a multiple of {BITS_PER_WORD}, so d_ff "
                         f"must be a multiple of {n_model * BITS_PER_WORD}")


def width_sharded_up(tokens, wi, bi, *, seq_len: int, backend: str, mesh,
                     with_token_mask: bool = False) -> tuple[jax.Array, SparsityStats]:
    """fused_mlp_up with the width F split over the mesh's `model` axis (and the sequences over
    its `data` axis when that has several devices): tokens [T, D], wi [D, F], bi [F] -> h [T, F]
    sharded (data, model), and the full width's statistics.

    Each shard counts its own F / n_model units; the counts are put together as the contract
    defines them over all F: token_count [T] is the sum over the shards, seq_count [n_seq, F]
    and the mask words [., W] are the shards' side by side (whole words per shard)."""
    n_model = model_axis_size(mesh)
    check_width_split(wi.shape[1], n_model)
    rows = "data" if mesh.shape.get("data", 1) > 1 else None
    tok, cols = PartitionSpec(rows), PartitionSpec(rows, "model")
    mask_spec = cols if with_token_mask else None
    stats_spec = SparsityStats(tok, cols, cols, mask_spec)

    def shard(x, w, b):  # x [T / n_data, D], w [D, F / n_model], b [F / n_model]
        h, stats = fused_mlp_up(x, w, b, seq_len=seq_len, backend=backend,
                                with_token_mask=with_token_mask)
        return h, stats._replace(token_count=jax.lax.psum(stats.token_count, "model"))

    return jax.shard_map(shard, mesh=mesh,
                         in_specs=(tok, PartitionSpec(None, "model"), PartitionSpec("model")),
                         out_specs=(cols, stats_spec), check_vma=False)(tokens, wi, bi)
