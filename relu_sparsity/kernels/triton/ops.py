"""The `triton` backend: `kernel.fused_mlp_up_kernel` called from JAX through jax-triton.

Tile configurations are data (`kernels/configs/triton.json`, per device kind and shape, tuned on
the device); shapes not listed there use `kernel.DEFAULT_CONFIG`.
"""

import logging

import jax
import jax.numpy as jnp
import jax_triton
import triton

from relu_sparsity.kernels.live import with_live_columns
from relu_sparsity.kernels.reference import SparsityStats
from relu_sparsity.kernels.tile_configs import tuned_entry
from relu_sparsity.kernels.triton import kernel as triton_kernel

log = logging.getLogger(__name__)

COMPILED_KERNEL = triton.jit(triton_kernel.fused_mlp_up_kernel)
# None: jax-triton asks GPU 0. Lowering for CUDA on a machine without a GPU sets it (90 = Hopper).
COMPUTE_CAPABILITY: int | None = None


def tile_config(device_kind: str, T: int, D: int, F: int, dtype: str) -> triton_kernel.TileConfig:
    """The committed configuration for this device and shape, else the default."""
    entry = tuned_entry("triton", device_kind, T, D, F, dtype)
    return triton_kernel.TileConfig(**entry) if entry else triton_kernel.DEFAULT_CONFIG


def _device_kind() -> str:
    device = jax.devices()[0]
    return device.device_kind if device.platform == "gpu" else "NVIDIA H200"


def triton_dense_forward(x, w1, b1, *, seq_len, live, with_stats, with_token_mask,
                         config: triton_kernel.TileConfig | None = None):
    """Every column of w1; `live` is handled by `triton_forward`."""
    assert live is None
    T, D = x.shape
    F = w1.shape[1]
    if config is None:
        config = tile_config(_device_kind(), T, D, F, jnp.dtype(x.dtype).name)
    plan = triton_kernel.launch_plan(T, D, F, seq_len, config, with_stats, with_token_mask)
    dtypes = {"same-as-x": x.dtype, "int32": jnp.int32, "uint32": jnp.uint32}
    out_shape = [jax.ShapeDtypeStruct(o.shape, dtypes[o.dtype]) for o in plan.outputs]
    h, token_count, seq_count, seq_mask, token_mask = jax_triton.triton_call(
        x, w1, b1, *plan.scalars, kernel=COMPILED_KERNEL, out_shape=out_shape, grid=plan.grid,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        zeroed_outputs=plan.zeroed_outputs, compute_capability=COMPUTE_CAPABILITY,
        name="fused_mlp_up", **plan.constexprs)
    if not with_stats:
        return h, None
    return h, SparsityStats(token_count, seq_count, seq_mask,
                            token_mask if with_token_mask else None)


# The backend forward of the kernel contract (see api.fused_mlp_up): with `live`, the live columns
# are gathered and the kernel runs at their width.
triton_forward = with_live_columns(triton_dense_forward)
