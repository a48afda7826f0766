"""A/B of versions of the mosaic_gpu kernel in one process on a Hopper GPU.

    mkdir -p /tmp/before && for f in kernel ops; do
      git show REV:relu_sparsity/kernels/mosaic_gpu/$f.py > /tmp/before/$f.py; done
    OUT=/tmp/out PYTHONPATH=$PWD python3 bench/ab_mosaic.py /tmp/before [/tmp/other ...]

Each folder holds a kernel.py and ops.py (named in the table by the folder's name); the working
tree's version is "tree". An argument `tree:FIELD=VALUE,...` adds the working tree's kernel with
those TileConfig fields changed (Python literals, e.g. `tree:ordered=True,stages=5`), checked at
full size like the tree. SHAPES=TxDxF[,...] in the environment limits the run to those shapes.
At each benchmark shape (bf16, seq_len 512) with the working tree's committed configuration:
checks the working tree's kernel at full size (h against the reference, integer outputs by the
own-h exactness rule, with and without the token mask), then times XLA dot+bias+ReLU and every
version without statistics, with, and with the token mask (median of 5 x 50 launches; for each
variant the versions one after another), and prints ms and ratios to XLA. Writes
$OUT/ab_mosaic.json. With MOSAIC_GPU_DUMP_PTXAS=1 set, ptxas reports each kernel's registers and
spills after the "timing ..." line that compiles it.
"""

import ast
import dataclasses
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.mosaic_gpu import ops
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, full_size_check, random_inputs
from relu_sparsity.bench.timing import median_ms

VARIANTS = (("no stats", False, False), ("stats", True, False), ("stats+token mask", True, True))


def load_version(folder: Path):
    """The ops module in `folder`, bound to the kernel module beside it."""
    modules = {}
    for name in ("kernel", "ops"):
        spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}",
                                                      folder / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    modules["ops"].mgpu_kernel = modules["kernel"]
    return modules["ops"]


def time_ms(fn, *args) -> float:
    return median_ms(fn, args, repeats=5, launches=50)


@functools.cache
def forward_fn(ops_module, config, with_stats, with_token_mask):
    """One version's backend forward, jitted."""
    return jax.jit(functools.partial(ops_module.forward, seq_len=SEQ_LEN, with_stats=with_stats,
                                     with_token_mask=with_token_mask, config=config,
                                     interpret=False))


def parse_version(arg: str):
    """(name, ops module, TileConfig overrides) of one command-line argument."""
    if arg.startswith("tree:"):
        fields = dict(item.split("=", 1) for item in arg[len("tree:"):].split(","))
        return arg, ops, {k: ast.literal_eval(v) for k, v in fields.items()}
    return Path(arg).name, load_version(Path(arg)), {}


def main():
    versions = [parse_version(a) for a in sys.argv[1:]]
    versions.append(("tree", ops, {}))
    kind = jax.devices()[0].device_kind
    rows = []
    only = os.environ.get("SHAPES")
    for T, D, F in BENCH_SHAPES:
        shape = f"{T}x{D}x{F}"
        if only and shape not in only.split(","):
            continue
        x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
        config = ops.tile_config(kind, (T, D, F), "bfloat16")
        for name, module, overrides in versions:
            if module is ops:
                checked = dataclasses.replace(config, **overrides)
                for with_token_mask in (False, True):  # raises on a mismatch
                    h, stats = forward_fn(ops, checked, True, with_token_mask)(x, w1, b1)
                    full_size_check(h, stats, x, w1, b1, seq_len=SEQ_LEN,
                                    with_token_mask=with_token_mask)
                print(f"{shape}: {name} checked ({checked})", flush=True)
        base = time_ms(jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b)), x, w1, b1)
        rows.append(dict(shape=shape, variant="xla dot+bias+relu", version="", ms=base))
        for label, with_stats, with_token_mask in VARIANTS:
            for version, module, overrides in versions:
                print(f"timing {shape} {label} {version}", flush=True)
                fn = forward_fn(module, dataclasses.replace(config, **overrides), with_stats,
                                with_token_mask)
                ms = time_ms(fn, x, w1, b1)
                rows.append(dict(shape=shape, variant=label, version=version, ms=ms))
    for row in rows:
        base = next(r["ms"] for r in rows if r["shape"] == row["shape"] and not r["version"])
        row["ratio"] = row["ms"] / base
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_mosaic.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'shape':18s} {'variant':18s} {'version':24s} {'ms':>7s} {'/ xla':>6s}")
    for r in rows:
        print(f"{r['shape']:18s} {r['variant']:18s} {r['version']:24s} {r['ms']:7.3f} "
              f"{r['ratio']:6.3f}")


if __name__ == "__main__":
    main()
