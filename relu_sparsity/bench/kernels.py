"""Kernel microbenchmarks: every built backend of `fused_mlp_up` against XLA's dot+bias+ReLU.

Times are the shared timer's (bench/timing.py): `repeats` rounds of `launches` back-to-back
calls after warm-up, on random (never zero) inputs, with the median and the spread over rounds;
ratios are of medians, against XLA dot+bias+ReLU measured in the same run.
"""

import json
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.kernels.backends import FUSED_BACKENDS, compiled_backends, config_device
from relu_sparsity.kernels.contract import check_seq_len
from relu_sparsity.kernels.mosaic_gpu import ops as mosaic_ops
from relu_sparsity.bench.timing import environment, kernel_round, measure
from relu_sparsity.kernels.testing import (
    BENCH_SEQ_LEN,
    BENCH_SHAPES,
    full_size_check,
    parse_shape,
    random_inputs,
    tolerance,
)
from relu_sparsity.kernels.tile_configs import tiles_source
from relu_sparsity.model.live import padded_width
from relu_sparsity.train.config import preset
from relu_sparsity.train.preflight import device_memory

log = logging.getLogger(__name__)

PAPER_SHAPES = tuple("x".join(map(str, shape)) for shape in BENCH_SHAPES)
CPU_SHAPES = ("1024x256x1024", "2048x256x2048")
# Fractions of a layer's units kept after compaction that `preset_shapes` lists widths for.
PRUNE_FRACTIONS = (0.25, 0.5, 0.7, 0.9)


def variants(seq_len: int, backends: list[str] | None = None) -> dict[str, Callable]:
    """XLA's dot+bias+ReLU (the baseline of every ratio), then with and without statistics the
    reference and every fused backend compiled here, or only the `backends` named (from
    "reference" and the compiled ones: `chosen_backends`)."""
    def xla_dot_bias_relu(x, w1, b1):
        # The plain expression in x's dtype: XLA folds bias and ReLU into the GEMM's epilogue.
        return jax.nn.relu(x @ w1 + b1)

    out = {"xla dot+bias+relu": jax.jit(xla_dot_bias_relu)}
    # An interpreted kernel would measure the interpreter: only compiled backends are timed.
    for name in chosen_backends(backends):
        for with_stats in (False, True):
            label = f"{name} {'+stats' if with_stats else 'no stats'}"
            if name == "reference":
                label = "xla relu+stats (reference)" if with_stats else "reference no stats"
            out[label] = jax.jit(lambda x, w1, b1, n=name, s=with_stats: fused_mlp_up(
                x, w1, b1, seq_len=seq_len, with_stats=s, backend=n))
    return out


def chosen_backends(backends: list[str] | None) -> list[str]:
    """"reference" and the fused backends compiled here, or those of them named in `backends`;
    a name among neither is refused."""
    available = ["reference", *compiled_backends()]
    if backends is None:
        return available
    unknown = [b for b in backends if b not in available]
    if unknown:
        raise ValueError(f"bench: --backends {' '.join(unknown)}: not compiled here (this "
                         f"machine times {', '.join(available)})")
    return [b for b in available if b in backends]


def seq_len_for(num_tokens: int, seq_len: int | None) -> int:
    """The sequence length a shape is timed at: `seq_len` (which must divide T), or by default
    the largest divisor of T up to the benchmark's 512."""
    if seq_len is None:
        return max(d for d in range(1, min(num_tokens, BENCH_SEQ_LEN) + 1)
                   if num_tokens % d == 0)
    try:
        check_seq_len(num_tokens, seq_len)
    except ValueError:
        raise ValueError(f"--seq-len {seq_len} must be a positive divisor of T = {num_tokens}; "
                         "leave it out to take the largest divisor up to 512") from None
    return seq_len


def run(shapes, *, seq_len: int | None, dtype: str, repeats: int,
        backends: list[str] | None = None) -> list[dict]:
    """Every variant at every shape; the shapes, sequence lengths and backends are checked
    before any timing."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    chosen_backends(backends)
    plans = []
    for shape in shapes:
        t, d, f = parse_shape(shape)
        check_fits(shape, t, d, f, dtype)
        plans.append((shape, t, d, f, seq_len_for(t, seq_len)))
    rows = []
    for shape, t, d, f, shape_seq_len in plans:
        x, w1, b1 = random_inputs(t, d, f, dtype)
        flops = 2.0 * t * d * f
        launches = launches_per_round(flops)
        base = None
        for name, fn in variants(shape_seq_len, backends).items():
            row = {"shape": shape, "seq_len": shape_seq_len, "variant": name,
                   "tiles": variant_tiles(name, (t, d, f), dtype)}
            try:
                check_variant(name, fn(x, w1, b1), (x, w1, b1), shape_seq_len)
            except AssertionError as err:  # timed only once it is right
                rows.append({**row, "error": str(err).splitlines()[0][:300]})
                log.error("%s at %s: %s", name, shape, rows[-1]["error"])
                continue
            timing = measure(kernel_round(fn, (x, w1, b1), launches), rounds=repeats,
                             calls_per_round=launches)
            ms = timing.median_ms
            base = base or ms
            rows.append({**row, "ms": ms, "min_ms": timing.min_ms, "iqr_ms": timing.iqr_ms,
                         "tflops": flops / ms / 1e9, "ratio": ms / base})
    return rows


def preset_shapes(presets: list[str], fractions=PRUNE_FRACTIONS) -> list[str]:
    """The MLP shapes "TxDxF" a preset's runs give the kernel: the train batch (T = batch_size x
    seq_len; evaluation runs the same batches) at the full width, and the widths compaction
    leaves when `fractions` of the units are kept, rounded up to train.prune_multiple as
    compaction rounds them. Distinct, in the order given."""
    shapes = []
    for name in presets:
        config = preset(name)
        m, t = config.model, config.train
        widths = m.d_ff if isinstance(m.d_ff, list) else [m.d_ff]
        tokens = t.batch_size * m.seq_len
        for d_ff in widths:
            kept = [padded_width(math.ceil(f * d_ff), t.prune_multiple, d_ff) for f in fractions]
            for width in (d_ff, *kept):
                shape = f"{tokens}x{m.d_model}x{width}"
                if shape not in shapes:
                    shapes.append(shape)
    return shapes


def requested_shapes(shapes: list[str] | None, presets: list[str]) -> list[str]:
    """The shapes named, then those of the presets' runs (`preset_shapes`), each once."""
    return list(dict.fromkeys([*(shapes or []), *preset_shapes(presets)]))


def check_variant(label: str, out, operands, seq_len: int) -> None:
    """Raises AssertionError unless the variant's output `out` is relu(x @ w1 + b1) and, for a
    fused backend, its statistics are exact (`full_size_check`). The reference's statistics are
    the check's own oracle, so of the reference only h is checked."""
    x, w1, b1 = operands
    h, stats = out if isinstance(out, tuple) else (out, None)
    tol = tolerance(x.dtype)
    if stats is not None and label != "xla relu+stats (reference)":
        full_size_check(h, stats, x, w1, b1, seq_len=seq_len, with_token_mask=False, tol=tol)
        return
    want = jax.nn.relu(x.astype(jnp.float32) @ w1.astype(jnp.float32) + b1.astype(jnp.float32))
    close = jnp.isclose(h.astype(jnp.float32), want, rtol=tol, atol=tol)
    assert float(jnp.mean(close)) > 0.999, f"{label}: h is not relu(x @ w1 + b1)"


def check_fits(shape: str, t: int, d: int, f: int, dtype: str) -> None:
    """Refuses a shape whose inputs and output alone (x, w1, b1 and h) exceed the device's
    memory."""
    need = (t * d + d * f + f + t * f) * jax.numpy.dtype(dtype).itemsize
    where, capacity = device_memory()
    if capacity is not None and need > capacity:
        raise ValueError(f"shape {shape} does not fit: x, w1, b1 and h alone take "
                         f"{need / 2**30:.1f} GiB in {dtype} and the {where} memory is "
                         f"{capacity / 2**30:.1f} GiB; choose a smaller T x D x F")


def variant_tiles(variant: str, shape: tuple[int, int, int], dtype: str) -> str | None:
    """A fused backend's tiles at this shape (tile_configs.tiles_source) and, for mosaic_gpu,
    the copies its edges take (`edge_copies`); None for XLA's."""
    backend = variant.split()[0]
    if backend not in FUSED_BACKENDS:
        return None
    source = tiles_source(backend, config_device(backend), shape, jax.numpy.dtype(dtype).name)
    copies = mosaic_ops.edge_copies(shape, dtype) if backend == "mosaic_gpu" else ""
    return f"{source}; {copies}" if copies else source


def launches_per_round(flops: float) -> int:
    """50 back-to-back launches a round on accelerators; fewer on a CPU."""
    return 50 if jax.default_backend() != "cpu" else max(1, min(20, int(2e10 / flops)))


def format_table(rows: list[dict]) -> str:
    lines = ["| shape T x D x F | seq_len | variant | median ms | min ms | IQR ms | TF/s | "
             "/ xla dot+bias+relu | tiles |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    return "\n".join(lines + [_table_row(r) for r in rows])


def _table_row(r: dict) -> str:
    """One variant's row; a variant that failed its check shows the error in place of times."""
    figures = (f"{r['ms']:.3f} | {r['min_ms']:.3f} | {r['iqr_ms']:.3f} | {r['tflops']:.1f} | "
               f"{r['ratio']:.2f}" if "ms" in r else f"failed: {r['error']} | | | |")
    return (f"| {r['shape']} | {r['seq_len']} | {r['variant']} | {figures} | "
            f"{r.get('tiles') or ''} |")


def main(shapes=None, seq_len: int | None = None, dtype: str | None = None, repeats: int = 5,
         out: str | None = None, backends: list[str] | None = None) -> list[dict]:
    accelerator = jax.default_backend() != "cpu"
    shapes = shapes or (PAPER_SHAPES if accelerator else CPU_SHAPES)
    dtype = dtype or ("bfloat16" if accelerator else "float32")
    device = jax.devices()[0].device_kind
    log.info("benchmarking on %s (%s), fused backends compiled here: %s", device, dtype,
             compiled_backends() or "none")
    rows = run(shapes, seq_len=seq_len, dtype=dtype, repeats=repeats, backends=backends)
    table = format_table(rows)
    env = environment()
    print(f"device: {device}; dtype {dtype}; jax {env['jax']}, jaxlib {env['jaxlib']}, "
          f"triton {env['triton']}; commit {env['commit']}\n{table}")
    if out:
        with open(out, "w") as f:
            json.dump({**env, "dtype": dtype, "repeats": repeats, "rows": rows}, f, indent=2)
    return rows
