"""A/B of Triton kernel versions and tile configurations in one process on an NVIDIA GPU.

    mkdir -p /tmp/before
    git show REV:relu_sparsity/kernels/triton/kernel.py > /tmp/before/kernel.py
    OUT=/tmp/out PYTHONPATH=$PWD python3 bench/ab_triton.py /tmp/before [/tmp/other ...]

Each folder holds a kernel.py (named in the table by the folder's name), timed at the committed
configuration (relu_sparsity/kernels/configs/triton.json); the working tree's kernel ("tree") is
timed at every configuration of CANDIDATES (None: the committed one) after each was checked at
full size (h against the reference, integer outputs exact by the
own-h rule, with the token mask). At each benchmark shape (bf16, seq_len 512): XLA dot+bias+ReLU,
XLA ReLU plus statistics, then every version and configuration without and with statistics
(median of 5 x 50 launches), ms and ratios to XLA. Writes $OUT/ab_triton.json.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import triton

from relu_sparsity.kernels import backends, fused_mlp_up
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, full_size_check, random_inputs
from relu_sparsity.bench.timing import median_ms
from relu_sparsity.kernels.triton import ops

CANDIDATES = {"committed": None}  # the working tree's TileConfigs to time; None: committed


def load_ops(folder: Path):
    """A copy of ops bound to the kernel.py in `folder` (compiled, not interpreted)."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_kernel", folder / "kernel.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    spec = importlib.util.spec_from_file_location(f"{folder.name}_ops", ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.triton_kernel = old
    module.COMPILED_KERNEL = triton.jit(old.fused_mlp_up_kernel)
    return module


def time_ms(fn, args):
    return median_ms(fn, args, repeats=5, launches=50)


def forward_fn(ops_module, config, with_stats, with_token_mask=False):
    """One version's backend forward, jitted; config None: the committed one."""
    return jax.jit(lambda x, w, b: ops_module.forward(
        x, w, b, seq_len=SEQ_LEN, with_stats=with_stats, with_token_mask=with_token_mask,
        config=config))


def main():
    backends.load_backend("triton")
    versions = [(Path(a).name, load_ops(Path(a))) for a in sys.argv[1:]]
    rows = []
    for T, D, F in BENCH_SHAPES:
        shape = f"{T}x{D}x{F}"
        x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
        runs = [(name, None, module) for name, module in versions]
        for name, config in CANDIDATES.items():
            h, stats = forward_fn(ops, config, True, True)(x, w1, b1)
            figures = full_size_check(h, stats, x, w1, b1, seq_len=SEQ_LEN,
                                      with_token_mask=True)  # raises on a mismatch
            print(f"{shape} {name}: checked {figures}", flush=True)
            runs.append((f"tree {name}", config, ops))
        base = time_ms(jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b)), (x, w1, b1))
        xla_stats = time_ms(jax.jit(lambda x, w, b: fused_mlp_up(
            x, w, b, seq_len=SEQ_LEN, backend="reference")), (x, w1, b1))
        rows.append(dict(shape=shape, version="xla dot+bias+relu", ms=base, ms_stats=None))
        rows.append(dict(shape=shape, version="xla relu+stats", ms=None, ms_stats=xla_stats))
        for name, config, module in runs:
            print(f"timing {shape} {name}", flush=True)
            ms = [time_ms(forward_fn(module, config, s), (x, w1, b1))
                  for s in (False, True)]
            rows.append(dict(shape=shape, version=name, ms=ms[0], ms_stats=ms[1]))
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_triton.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'shape':16s} {'version':30s} {'ms':>7s} {'+stats':>7s} {'/xla':>6s} "
          f"{'+st/xla':>7s} {'st/nost':>7s} {'st/xlast':>8s}")
    for r in rows:
        base = next(q["ms"] for q in rows if q["shape"] == r["shape"] and q["ms"])
        xs = next(q["ms_stats"] for q in rows
                  if q["shape"] == r["shape"] and q["version"] == "xla relu+stats")
        f = lambda v: f"{v:7.3f}" if v else " " * 7  # noqa: E731
        ratio = lambda a, b: f"{a / b:7.3f}" if a and b else " " * 7  # noqa: E731
        print(f"{r['shape']:16s} {r['version']:30s} {f(r['ms'])} {f(r['ms_stats'])} "
              f"{ratio(r['ms'], base)[1:]} {ratio(r['ms_stats'], base)} "
              f"{ratio(r['ms_stats'], r['ms'])} {ratio(r['ms_stats'], xs)}")


if __name__ == "__main__":
    main()
