"""The instrumented two-layer ReLU MLP: a Flax module to drop into any Transformer block."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from relu_sparsity.kernels import SparsityStats, fused_mlp_up, resolve_fused_backend
from relu_sparsity.model.live import check_live, live_weights, padded_width, stats_in_unit_ids

INSTRUMENT_MODES = ("off", "xla", "fused")


class ReluMLP(nn.Module):
    """y = relu(x @ wi + bi)[live] @ wo[live] + bo, with the hidden layer's sparsity stats sown.

    The hidden layer runs through `kernels.fused_mlp_up`; its `SparsityStats` go to
    `self.sow("intermediates", "stats", ...)`, so `apply(..., mutable=["intermediates"])` hands
    them to the caller with no extra pass.

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
        if self.instrument not in INSTRUMENT_MODES:
            raise ValueError(f"instrument must be one of {INSTRUMENT_MODES}, got {self.instrument!r}")
        batch, seq_len, d_model = x.shape
        init = nn.initializers.lecun_normal()
        wi = self.param("wi", init, (d_model, self.d_ff), self.param_dtype)
        bi = self.param("bi", nn.initializers.zeros, (self.d_ff,), self.param_dtype)
        wo = self.param("wo", init, (self.d_ff, d_model), self.param_dtype)
        bo = self.param("bo", nn.initializers.zeros, (d_model,), self.param_dtype)

        tokens = x.reshape(batch * seq_len, d_model).astype(self.dtype)
        if self.live is not None:
            live = check_live(self.live, self.d_ff)
            width = padded_width(len(live), self.live_multiple, self.d_ff)
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
        y = jnp.dot(h, wo.astype(self.dtype), preferred_element_type=jnp.float32)
        y = y.astype(self.dtype) + bo.astype(self.dtype)
        return y.reshape(batch, seq_len, d_model)

    def _hidden(self, tokens, wi, bi, *, seq_len: int, backend: str):
        """fused_mlp_up; under a mesh with a `data` axis of several devices (`jax.set_mesh`), a
        fused kernel is one device's custom call, so each device runs it on its own sequences
        inside shard_map (whole sequences per device: the statistics stay per sequence)."""
        call = functools.partial(fused_mlp_up, seq_len=seq_len, backend=backend)
        mesh = jax.sharding.get_abstract_mesh()
        if backend == "reference" or mesh.empty or mesh.shape.get("data", 1) == 1:
            return call(tokens, wi, bi)
        data, replicated = PartitionSpec("data"), PartitionSpec()
        stats_spec = SparsityStats(data, data, data, None)
        return jax.shard_map(call, mesh=mesh, in_specs=(data, replicated, replicated),
                             out_specs=(data, stats_spec), check_vma=False)(tokens, wi, bi)

