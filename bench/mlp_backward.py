"""One MLP layer's forward and backward (loss, gradients in x and every parameter) at a model
shape, each instrument mode of `ReluMLP` beside the same MLP in plain `nn.Dense`: checked, then
timed, with the GEMMs' TFLOP/s (12 T D F flops: two GEMMs forward, four backward).

    python bench/mlp_backward.py [--tokens 8192] [--d-model 1024] [--d-ff 32768] [--seq-len 512]
                                 [--modes off xla fused] [--kernel auto]

Checks first: every variant's gradients against the same MLP in f32 on the same inputs; a mode
fails the check where it is further from f32 than plain nn.Dense (units within rounding of 0 flip
their ReLU mask in bf16, so neither is close everywhere).
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.bench.timing import kernel_round, measure
from relu_sparsity.model import ReluMLP


class PlainMLP(nn.Module):
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.d_ff, dtype=self.dtype, name="up")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(h)


def as_plain(params):
    """ReluMLP's parameters under PlainMLP's names."""
    return {"up": {"kernel": params["wi"], "bias": params["bi"]},
            "down": {"kernel": params["wo"], "bias": params["bo"]}}


def loss_and_grads(module, params, x, cotangent):
    def loss(params, x):
        y = module.apply({"params": params}, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def relative_error(got, want) -> float:
    got, want = np.float32(got), np.float32(want)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--modes", nargs="+", default=["off", "xla", "fused"])
    parser.add_argument("--kernel", default="auto", help="the fused mode's backend")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = jnp.bfloat16
    batch = args.tokens // args.seq_len
    kx, kp, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, args.seq_len, args.d_model), dtype)
    cotangent = jax.random.normal(kc, x.shape, jnp.float32)
    params = ReluMLP(args.d_ff, dtype=dtype).init(kp, x)["params"]
    params["bi"] = 0.1 * jax.random.normal(kp, params["bi"].shape)

    plain = jax.jit(functools.partial(loss_and_grads, PlainMLP(args.d_ff, dtype)))
    variants = {"plain nn.Dense": (plain, as_plain(params))}
    for mode in args.modes:
        module = ReluMLP(args.d_ff, instrument=mode, backend=args.kernel, dtype=dtype)
        variants[mode] = (jax.jit(functools.partial(loss_and_grads, module)), params)

    # The oracle: the same MLP in f32 on the same (bf16-valued) inputs.
    f32_params = jax.tree.map(lambda a: a.astype(jnp.float32), as_plain(params))
    _, (want, want_dx) = jax.jit(functools.partial(loss_and_grads, PlainMLP(
        args.d_ff, jnp.float32)))(f32_params, x.astype(jnp.float32), cotangent)
    plain_errors = {}
    for name, (fn, p) in variants.items():
        _, (got, got_dx) = fn(p, x, cotangent)
        got = got if name == "plain nn.Dense" else as_plain(got)
        errors = {"x": relative_error(got_dx, want_dx)}
        errors |= {f"{layer}.{leaf}": relative_error(got[layer][leaf], want[layer][leaf])
                   for layer in ("up", "down") for leaf in ("kernel", "bias")}
        plain_errors = plain_errors if name != "plain nn.Dense" else errors
        worse = [k for k, v in errors.items() if v > 1.5 * plain_errors[k] + 1e-3]
        print(f"check {name}: gradients' largest difference to f32, relative to the largest "
              "entry: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + (f"; FAILED: {worse} worse than plain nn.Dense's" if worse else "; ok"))

    flops = 12 * args.tokens * args.d_model * args.d_ff
    rows = []
    for name, (fn, p) in variants.items():
        timing = measure(kernel_round(fn, (p, x, cotangent), 20), rounds=args.repeats,
                         calls_per_round=20)
        rows.append((name, timing.median_ms, flops / timing.median_ms / 1e9))
    base = rows[0][1]
    print(f"\nMLP forward + backward, T {args.tokens} D {args.d_model} F {args.d_ff} bf16 "
          f"({jax.devices()[0].device_kind})")
    print("| variant | ms | / plain | TFLOP/s |\n| --- | ---: | ---: | ---: |")
    for name, ms, tflops in rows:
        print(f"| {name} | {ms:.3f} | {ms / base:.3f} | {tflops:.0f} |")


if __name__ == "__main__":
    main()
