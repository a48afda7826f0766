"""Fingerprints of the mosaic_gpu kernels as lowered for CUDA, runnable on a CPU: a refactor of
kernel.py that leaves every fingerprint unchanged emits the same Mosaic GPU kernels, so it needs
no new device measurement.

    JAX_PLATFORMS=cpu python3 -m relu_sparsity.bench.mosaic_fingerprint before.txt  # old commit
    JAX_PLATFORMS=cpu python3 -m relu_sparsity.bench.mosaic_fingerprint after.txt   # the change
    diff before.txt after.txt

Each line: a case (the three benchmark shapes with the committed tiles, with and without
statistics and token mask; ragged bf16 and f32 shapes with the test tiles of all schedules) and
a hash of its kernel's MLIR printed without source locations (which move with any edit) and
without the per-process counter in its dump name.
"""

import functools
import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import mosaic_gpu_dialect
from jax._src.lib.mlir import ir

from relu_sparsity.kernels.mosaic_gpu import ops
from relu_sparsity.kernels.mosaic_gpu.testing import SMALL, SMALL_N, SMALL_PP, SMALL_PP3
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN, BENCH_SHAPES


def cases():
    """(T, D, F, seq_len, dtype, config or None for the committed one, with_stats, token_mask)"""
    for T, D, F in BENCH_SHAPES:
        for with_stats, with_token_mask in ((False, False), (True, False), (True, True)):
            yield T, D, F, BENCH_SEQ_LEN, jnp.bfloat16, None, with_stats, with_token_mask
    for config in (SMALL, SMALL_N, SMALL_PP, SMALL_PP3):
        yield 600, 100, 1000, 24, jnp.bfloat16, config, True, True
        yield 640, 64, 330, 80, jnp.float32, config, True, True


def kernel_blobs(module) -> list[bytes]:
    """The serialized Mosaic GPU modules of the custom calls in a lowered StableHLO module."""
    blobs = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if (inner.name == "stablehlo.custom_call"
                            and "mhlo.backend_config" in inner.attributes):
                        config = inner.attributes["mhlo.backend_config"]
                        blobs.append(ir.StringAttr(config["module"]).value_bytes)
                    walk(inner)

    walk(module.operation)
    return blobs


def fingerprint(T, D, F, seq_len, dtype, config, with_stats, with_token_mask) -> str:
    fn = functools.partial(ops.forward, seq_len=seq_len, with_stats=with_stats,
                           with_token_mask=with_token_mask, config=config, interpret=False)
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((T, D), (D, F), (F,))]
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    texts = []
    with jax_mlir.make_ir_context() as ctx:
        mosaic_gpu_dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        for blob in kernel_blobs(module):
            kernel = ir.Module.parse(blob).operation
            # A per-process counter ("body_0", "body_1", ...) names the kernel's dump files.
            if "mosaic_gpu.dump_basename" in kernel.attributes:
                del kernel.attributes["mosaic_gpu.dump_basename"]
            texts.append(kernel.get_asm(enable_debug_info=False))
    if not texts:
        raise RuntimeError(f"no Mosaic GPU kernel in the lowering of {T}x{D}x{F}")
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def main():
    lines = []
    for case in cases():
        T, D, F, seq_len, dtype, config, with_stats, with_token_mask = case
        name = (f"{T}x{D}x{F} seq_len {seq_len} {jnp.dtype(dtype).name} "
                f"{config or 'committed'} stats={with_stats} token_mask={with_token_mask}")
        lines.append(f"{name} {fingerprint(*case)}")
        print(lines[-1], flush=True)
    Path(sys.argv[1]).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
