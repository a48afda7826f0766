"""Fingerprints of the Triton kernels as jax-triton compiles them for CUDA sm_90, runnable on a
CPU: a refactor of triton/kernel.py that leaves every fingerprint unchanged emits the same PTX,
so it needs no new device measurement.

    JAX_PLATFORMS=cpu python3 -m relu_sparsity.bench.triton_fingerprint before.txt  # old commit
    JAX_PLATFORMS=cpu python3 -m relu_sparsity.bench.triton_fingerprint after.txt   # the change
    diff before.txt after.txt

Each line: a case (the benchmark shapes with the committed tiles, a ragged bf16 and f32 shape,
both epilogue paths of explicit tiles; without statistics, with, and with the token mask) and a
hash of its PTX without debug information (source lines and file names move with any edit, and
inlined helpers add debug labels).
"""

import hashlib
import re
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.testing import BENCH_SEQ_LEN, BENCH_SHAPES
from relu_sparsity.kernels.triton import kernel, ops

STATS = ((False, False), (True, False), (True, True))


def cases():
    """(T, D, F, seq_len, dtype, config or None for the committed one)"""
    for T, D, F in BENCH_SHAPES:
        yield T, D, F, BENCH_SEQ_LEN, jnp.bfloat16, None
    yield 1024, 64, 1000, 100, jnp.bfloat16, None
    yield 640, 64, 330, 80, jnp.float32, None
    yield 1024, 256, 2048, 512, jnp.bfloat16, kernel.TileConfig(128, 128, 64, 8, 8, 3)
    yield 1024, 256, 2048, 512, jnp.bfloat16, kernel.TileConfig(128, 256, 64, 8, 8, 3, True)


def _unescape(match) -> bytes:
    code = match.group(1)
    return code if code in (b"\\", b'"') else bytes([int(code, 16)])


def ptx_of(backend_config: str) -> bytes:
    """The PTX inside a triton_kernel_call's backend config (an MLIR-escaped, zlib-compressed
    proto), without debug sections, .loc / .file lines and debug labels."""
    data = zlib.decompress(re.sub(rb'\\(\\|"|[0-9A-Fa-f]{2})', _unescape,
                                  backend_config.encode("latin1")))
    start = data.find(b".version")
    ptx = data[start:data.find(b"// -- End function", start)]
    ptx = re.sub(rb"\.section\s+\.debug\w*\s*\{.*?\n\s*\}", b"", ptx, flags=re.S)
    lines = [line for line in ptx.split(b"\n")
             if not re.search(rb"\.loc\b|\.file\b", line)
             and not re.fullmatch(rb"\$L__tmp\d+:", line.strip())]
    return re.sub(rb"\$L__tmp\d+", b"$L", b"\n".join(lines))


def fingerprint(T, D, F, seq_len, dtype, config, with_stats, with_token_mask) -> str:
    def fn(x, w1, b1):
        return ops.forward(x, w1, b1, seq_len=seq_len, with_stats=with_stats,
                           with_token_mask=with_token_mask, config=config)

    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((T, D), (D, F), (F,))]
    saved, ops.COMPUTE_CAPABILITY = ops.COMPUTE_CAPABILITY, 90  # Hopper, with or without a GPU
    try:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        ops.COMPUTE_CAPABILITY = saved
    configs = re.findall(r'backend_config = "([^"]*)"', text)
    if not configs:
        raise RuntimeError(f"no Triton kernel in the lowering of {T}x{D}x{F}")
    return hashlib.sha256(b"".join(ptx_of(c) for c in configs)).hexdigest()[:16]


def main():
    lines = []
    for T, D, F, seq_len, dtype, config in cases():
        for with_stats, with_token_mask in STATS:
            name = (f"{T}x{D}x{F} seq_len {seq_len} {jnp.dtype(dtype).name} "
                    f"{config or 'committed'} stats={with_stats} token_mask={with_token_mask}")
            digest = fingerprint(T, D, F, seq_len, dtype, config, with_stats, with_token_mask)
            lines.append(f"{name} {digest}")
            print(lines[-1], flush=True)
    Path(sys.argv[1]).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
