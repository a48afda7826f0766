"""The `triton` backend: `kernel.fused_mlp_up_kernel` called from JAX through jax-triton.

Tile configurations are data (`kernels/configs/triton.json`, per device kind and shape, tuned on
the device); shapes not listed there take the nearest listed shape's
(`tile_configs.tuned_entry`), else `kernel.DEFAULT_CONFIG`. Triton's interpreter runs the
kernel in its own environment (tests/interpreter), so `interpret` must be False or None here.
"""

import jax
import jax.numpy as jnp
import jax_triton
import triton

from relu_sparsity.kernels.backends import device_kind
from relu_sparsity.kernels.contract import SparsityStats
from relu_sparsity.kernels.tile_configs import tuned_entry
from relu_sparsity.kernels.triton import kernel as triton_kernel

COMPILED_KERNEL = triton.jit(triton_kernel.fused_mlp_up_kernel)
# None: jax-triton asks GPU 0. Lowering for CUDA on a machine without a GPU sets it (90 = Hopper).
COMPUTE_CAPABILITY: int | None = None


def tile_config(device_kind: str, shape: tuple[int, int, int], dtype: str
                ) -> triton_kernel.TileConfig:
    """The committed configuration for this device and shape (T, D, F) or the nearest tuned
    one, else the default."""
    entry = tuned_entry("triton", device_kind, shape, dtype)
    return triton_kernel.TileConfig(**entry) if entry else triton_kernel.DEFAULT_CONFIG


def forward(x, w1, b1, *, seq_len, with_stats, with_token_mask,
            config: triton_kernel.TileConfig | None = None, interpret=None):
    """The backend forward (kernels/backends.py)."""
    if interpret not in (None, False):
        raise ValueError("triton: the interpreter runs in tests/interpreter, not through JAX")
    T, D = x.shape
    F = w1.shape[1]
    if config is None:
        config = tile_config(device_kind("gpu"), (T, D, F), jnp.dtype(x.dtype).name)
    plan = triton_kernel.launch_plan(T, D, F, seq_len, config, with_stats, with_token_mask)
    dtypes = {"same-as-x": x.dtype, "int32": jnp.int32, "uint32": jnp.uint32}
    out_shape = [jax.ShapeDtypeStruct(o.shape, dtypes[o.dtype]) for o in plan.outputs]
    h, token_count, seq_count, seq_mask, token_mask = jax_triton.triton_call(
        x, w1, b1, kernel=COMPILED_KERNEL, out_shape=out_shape, grid=plan.grid,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        zeroed_outputs=plan.zeroed_outputs, compute_capability=COMPUTE_CAPABILITY,
        name="fused_mlp_up", **plan.constexprs)
    if not with_stats:
        return h, None
    return h, SparsityStats(token_count, seq_count, seq_mask,
                            token_mask if with_token_mask else None)
