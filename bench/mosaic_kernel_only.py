"""How much of mosaic_gpu's "+stats" time is the kernel, and how much the JAX steps around it.

    OUT=/tmp/out PYTHONPATH=$PWD python3 bench/mosaic_kernel_only.py

At each benchmark shape (bf16, seq_len 512, committed tiles), in one process: XLA dot+bias+ReLU,
the backend forward without and with statistics (what `relu-sparsity bench` times), and the
kernel alone without and with statistics: `build_call` on the same operands, which with
statistics includes what the compiled kernel needs around it (zero-filling the counts, unpacking
the sequence-count words) but not the forward's slicing and mask packing (`ops.finish_statistics`).
Median of 5 x 50 launches. The forward with statistics is first checked at full size (h against
the reference, integer outputs by the own-h exactness rule). Also prints, at the last shape, the
forward's compiled HLO: its fusions and custom calls are the kernels it launches.
"""

import functools

import jax
import jax.numpy as jnp

from relu_sparsity.kernels.mosaic_gpu import kernel as mk
from relu_sparsity.kernels.mosaic_gpu import ops
from relu_sparsity.kernels.testing import BENCH_SEQ_LEN as SEQ_LEN
from relu_sparsity.kernels.testing import BENCH_SHAPES, full_size_check, random_inputs
from relu_sparsity.bench.timing import median_ms


def time_ms(fn, *args) -> float:
    return median_ms(fn, args, repeats=5, launches=50)


def forward_fn(config, with_stats):
    return jax.jit(functools.partial(ops.forward, seq_len=SEQ_LEN, with_stats=with_stats,
                                     with_token_mask=False, config=config, interpret=False))


def main():
    device = jax.devices()[0]
    rows = []
    for T, D, F in BENCH_SHAPES:
        shape = f"{T}x{D}x{F}"
        x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
        config = ops.tile_config(device.device_kind, (T, D, F), "bfloat16")
        plan = mk.make_plan(T, D, F, SEQ_LEN, config)
        assert (plan.Tp, plan.Dp, plan.Fp) == (T, D, F), "no padding at the benchmark shapes"
        h, stats = forward_fn(config, True)(x, w1, b1)
        full_size_check(h, stats, x, w1, b1, seq_len=SEQ_LEN, with_token_mask=False)
        print(f"{shape}: checked", flush=True)
        times = {"xla dot+bias+relu": time_ms(
            jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b)), x, w1, b1)}
        for with_stats in (False, True):
            label = "+stats" if with_stats else "no stats"
            times[f"forward {label}"] = time_ms(
                forward_fn(config, with_stats), x, w1, b1)
            call = mk.build_call(plan, jnp.bfloat16, jnp.bfloat16, with_stats=with_stats,
                                 with_token_mask=False, num_sms=device.core_count)
            times[f"kernel alone {label}"] = time_ms(jax.jit(call), x, w1, b1)
        if (T, D, F) == BENCH_SHAPES[-1]:
            hlo = forward_fn(config, True).lower(x, w1, b1).compile().as_text()
            print("\n".join(line.strip()[:140] for line in hlo.splitlines()
                            if "fusion(" in line or "custom-call(" in line or "ENTRY" in line))
        base = times["xla dot+bias+relu"]
        for name, ms in times.items():
            rows.append((shape, name, ms, ms / base))
            print(f"{shape} {name}: {ms:.4f} ms", flush=True)
    print(f"\n{'shape':16s} {'variant':24s} {'ms':>7s} {'/ xla':>6s}")
    for shape, name, ms, ratio in rows:
        print(f"{shape:16s} {name:24s} {ms:7.4f} {ratio:6.3f}")


if __name__ == "__main__":
    main()
