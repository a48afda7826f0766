"""Kernel microbenchmarks: every built backend of `fused_mlp_up` against XLA's dot+bias+ReLU.

Times are medians over `repeats` rounds of `launches` back-to-back calls, after warm-up, on
random (never zero) inputs; ratios are against XLA dot+bias+ReLU measured in the same run.
"""

import json
import logging
from collections.abc import Callable

import jax

from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.kernels.backends import compiled_backends
from relu_sparsity.kernels.contract import check_seq_len
from relu_sparsity.kernels.testing import BENCH_SHAPES, parse_shape, random_inputs, time_fn

log = logging.getLogger(__name__)

PAPER_SHAPES = tuple("x".join(map(str, shape)) for shape in BENCH_SHAPES)
CPU_SHAPES = ("1024x256x1024", "2048x256x2048")


def variants(seq_len: int) -> dict[str, Callable]:
    def xla_dot_bias_relu(x, w1, b1):
        # The plain expression in x's dtype: XLA folds bias and ReLU into the GEMM's epilogue.
        return jax.nn.relu(x @ w1 + b1)

    out = {"xla dot+bias+relu": jax.jit(xla_dot_bias_relu)}
    # The reference and every fused backend compiled for this platform (an interpreted kernel
    # would measure the interpreter).
    for name in ["reference", *compiled_backends()]:
        for with_stats in (False, True):
            label = f"{name} {'+stats' if with_stats else 'no stats'}"
            if name == "reference":
                label = "xla relu+stats (reference)" if with_stats else "reference no stats"
            out[label] = jax.jit(lambda x, w1, b1, n=name, s=with_stats: fused_mlp_up(
                x, w1, b1, seq_len=seq_len, with_stats=s, backend=n))
    return out


def run(shapes, *, seq_len: int, dtype: str, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        t, d, f = parse_shape(shape)
        check_seq_len(t, seq_len)
        x, w1, b1 = random_inputs(t, d, f, dtype)
        flops = 2.0 * t * d * f
        # 50 back-to-back launches a round on accelerators; fewer on a CPU.
        launches = 50 if jax.default_backend() != "cpu" else max(1, min(20, int(2e10 / flops)))
        base = None
        for name, fn in variants(seq_len).items():
            ms = time_fn(fn, (x, w1, b1), repeats=repeats, launches=launches)
            base = base or ms
            rows.append({"shape": shape, "variant": name, "ms": ms,
                         "tflops": flops / ms / 1e9, "ratio": ms / base})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| shape T x D x F | variant | ms | TF/s | / xla dot+bias+relu |",
             "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(shapes=None, seq_len: int = 512, dtype: str | None = None, repeats: int = 5,
         out: str | None = None) -> list[dict]:
    accelerator = jax.default_backend() != "cpu"
    shapes = shapes or (PAPER_SHAPES if accelerator else CPU_SHAPES)
    dtype = dtype or ("bfloat16" if accelerator else "float32")
    device = jax.devices()[0].device_kind
    log.info("benchmarking on %s (%s), fused backends compiled here: %s", device, dtype,
             compiled_backends() or "none")
    rows = run(shapes, seq_len=seq_len, dtype=dtype, repeats=repeats)
    table = format_table(rows)
    print(f"device: {device}; dtype {dtype}; seq_len {seq_len}\n{table}")
    if out:
        with open(out, "w") as f:
            json.dump({"device": device, "dtype": dtype, "seq_len": seq_len, "rows": rows}, f,
                      indent=2)
    return rows
