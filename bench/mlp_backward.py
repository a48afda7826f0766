"""One MLP layer's forward and backward (loss, gradients in x and every parameter) at a model
shape, each instrument mode of `ReluMLP` (`--gated`: `GatedReluMLP`) beside the same MLP in plain
`nn.Dense`: checked, then timed (`--forward`: the forward alone, statistics included), with the
GEMMs' TFLOP/s.

    python bench/mlp_backward.py [--tokens 8192] [--d-model 1024] [--d-ff 32768] [--seq-len 512]
                                 [--modes off xla fused] [--kernel auto] [--gated] [--forward]

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
from relu_sparsity.model import GatedReluMLP, ReluMLP


class PlainMLP(nn.Module):
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.d_ff, dtype=self.dtype, name="up")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(h)


class PlainGatedMLP(nn.Module):
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        gate = nn.relu(nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="gate")(x))
        up = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="up")(x)
        return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="down")(gate * up)


def as_plain(params):
    """ReluMLP's or GatedReluMLP's parameters under PlainMLP's or PlainGatedMLP's names."""
    if "wg" in params:
        return {"gate": {"kernel": params["wg"]}, "up": {"kernel": params["wu"]},
                "down": {"kernel": params["wd"]}}
    return {"up": {"kernel": params["wi"], "bias": params["bi"]},
            "down": {"kernel": params["wo"], "bias": params["bo"]}}


def forward(module, params, x, cotangent):
    """The forward alone, with the statistics the module sows (so none is left out)."""
    del cotangent
    return module.apply({"params": params}, x, mutable=["intermediates"])


def loss_and_grads(module, params, x, cotangent):
    def loss(params, x):
        y = module.apply({"params": params}, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def leaves_by_name(tree) -> dict:
    """{"up.kernel": leaf, ...} of a parameter tree."""
    return {".".join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
    parser.add_argument("--gated", action="store_true", help="GatedReluMLP against a plain "
                        "gated nn.Dense MLP, relu(x Wg) * (x Wu) @ Wd")
    parser.add_argument("--forward", action="store_true", help="time the forward alone")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = jnp.bfloat16
    batch = args.tokens // args.seq_len
    kx, kp, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, args.seq_len, args.d_model), dtype)
    cotangent = jax.random.normal(kc, x.shape, jnp.float32)
    mlp, plain_mlp = (GatedReluMLP, PlainGatedMLP) if args.gated else (ReluMLP, PlainMLP)
    params = mlp(args.d_ff, dtype=dtype).init(kp, x)["params"]
    if "bi" in params:
        params["bi"] = 0.1 * jax.random.normal(kp, params["bi"].shape)

    timed = forward if args.forward else loss_and_grads
    plain = functools.partial(loss_and_grads, plain_mlp(args.d_ff, dtype))
    variants = {"plain nn.Dense": (plain, as_plain(params))}
    for mode in args.modes:
        module = mlp(args.d_ff, instrument=mode, backend=args.kernel, dtype=dtype)
        variants[mode] = (functools.partial(loss_and_grads, module), params)

    # The oracle: the same MLP in f32 on the same (bf16-valued) inputs.
    f32_params = jax.tree.map(lambda a: a.astype(jnp.float32), as_plain(params))
    _, (want, want_dx) = jax.jit(functools.partial(loss_and_grads, plain_mlp(
        args.d_ff, jnp.float32)))(f32_params, x.astype(jnp.float32), cotangent)
    want = dict(leaves_by_name(want), x=want_dx)
    plain_errors = {}
    for name, (fn, p) in variants.items():
        _, (got, got_dx) = jax.jit(fn)(p, x, cotangent)
        got = dict(leaves_by_name(got if name == "plain nn.Dense" else as_plain(got)), x=got_dx)
        errors = {k: relative_error(got[k], want[k]) for k in want}
        plain_errors = plain_errors if name != "plain nn.Dense" else errors
        worse = [k for k, v in errors.items() if v > 1.5 * plain_errors[k] + 1e-3]
        print(f"check {name}: gradients' largest difference to f32, relative to the largest "
              "entry: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + (f"; FAILED: {worse} worse than plain nn.Dense's" if worse else "; ok"))

    gemms = (3 if args.gated else 2) * (1 if args.forward else 3)
    flops = 2 * gemms * args.tokens * args.d_model * args.d_ff
    rows = []
    for name, (fn, p) in variants.items():
        fn = jax.jit(functools.partial(timed, *fn.args))  # the module, forward or with grads
        timing = measure(kernel_round(fn, (p, x, cotangent), 20), rounds=args.repeats,
                         calls_per_round=20)
        rows.append((name, timing.median_ms, flops / timing.median_ms / 1e9))
    base = rows[0][1]
    what = ("gated MLP" if args.gated else "MLP") + (" forward" if args.forward
                                                    else " forward + backward")
    print(f"\n{what}, T {args.tokens} D {args.d_model} F {args.d_ff} bf16 "
          f"({jax.devices()[0].device_kind})")
    print("| variant | ms | / plain | TFLOP/s |\n| --- | ---: | ---: | ---: |")
    for name, ms, tflops in rows:
        print(f"| {name} | {ms:.3f} | {ms / base:.3f} | {tflops:.0f} |")


if __name__ == "__main__":
    main()
