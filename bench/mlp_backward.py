"""One MLP layer's forward and backward (loss, gradients in x and every parameter) at a model
shape, each instrument mode of `ReluMLP` (`--gated`: `GatedReluMLP`) beside the same MLP in plain
`nn.Dense`: checked, then timed (`--forward`: the forward alone, statistics included), with the
GEMMs' TFLOP/s.

    python bench/mlp_backward.py [--tokens 8192] [--d-model 1024] [--d-ff 32768] [--seq-len 512]
                                 [--modes off xla fused] [--kernel auto] [--gated] [--forward]
                                 [--live-fraction P]

Checks first: every variant's gradients against the same MLP in f32 on the same inputs; a mode
fails the check where it is further from f32 than plain nn.Dense (units within rounding of 0 flip
their ReLU mask in bf16, so neither is close everywhere).

`--live-fraction P` times, for each mode, the two ways to train a pruned layer instead: `mask`
(the full-width parameters, P of the units live, at a width padded to 256) against `compact`
(parameters of that width alone). Its check: mask's gradients at the live units equal
compact's, and are zero elsewhere.
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.bench.timing import kernel_round, measure
from relu_sparsity.model import GatedReluMLP, ReluMLP
from relu_sparsity.model.live import live_units, padded_width


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
    parser.add_argument("--live-fraction", type=float,
                        help="time mask against compact with this fraction of the units live")
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

    if args.live_fraction is not None:
        return mask_against_compact(args, mlp, params, x, cotangent)
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

    timed_variants = {name: (functools.partial(timed, *fn.args), p)
                      for name, (fn, p) in variants.items()}
    what = ("gated MLP" if args.gated else "MLP") + (" forward" if args.forward
                                                    else " forward + backward")
    print_table(args, what, args.d_ff, time_variants(args, timed_variants, x, cotangent))


def time_variants(args, variants: dict, x, cotangent) -> list[tuple[str, float]]:
    """(name, median ms) of each variant's fn(params, x, cotangent), in order."""
    rows = []
    for name, (fn, p) in variants.items():
        timing = measure(kernel_round(jax.jit(fn), (p, x, cotangent), 20),
                         rounds=args.repeats, calls_per_round=20)
        rows.append((name, timing.median_ms))
    return rows


def print_table(args, what: str, d_ff: int, rows, against: str = "plain") -> None:
    """The rows as a table, each against the first row (`against` "plain") or against the
    row before it ("compact": mask against compact); TFLOP/s of the GEMMs at width d_ff."""
    gemms = (3 if args.gated else 2) * (1 if args.forward else 3)
    flops = 2 * gemms * args.tokens * args.d_model * d_ff
    print(f"\n{what}, T {args.tokens} D {args.d_model} F {args.d_ff} bf16 "
          f"({jax.devices()[0].device_kind})")
    print(f"| variant | ms | / {against} | TFLOP/s at width {d_ff} |\n"
          "| --- | ---: | ---: | ---: |")
    for i, (name, ms) in enumerate(rows):
        base = rows[0][1] if against == "plain" else rows[i - i % 2][1]
        print(f"| {name} | {ms:.3f} | {ms / base:.3f} | {flops / ms / 1e9:.0f} |")


def mask_against_compact(args, mlp, params, x, cotangent) -> None:
    """Each mode's layer trained in mask mode (full-width parameters, some units live) and in
    compact mode (parameters of the live width alone): checked, then timed."""
    rng = np.random.default_rng(0)
    num_live = round(args.live_fraction * args.d_ff)
    live = tuple(np.sort(rng.choice(args.d_ff, num_live, replace=False)).tolist())
    width = padded_width(num_live, 256, args.d_ff)
    axes = {"wi": 1, "bi": 0, "wo": 0, "wg": 1, "wu": 1, "wd": 0, "bg": 0}
    names = [k for k in params if k in axes]
    compact_params = dict(params)
    compact_params.update(zip(names, live_units(tuple(params[k] for k in names),
                                                tuple(axes[k] for k in names), live, width)))
    variants = {}
    for mode in args.modes:
        compact = mlp(width, instrument=mode, backend=args.kernel, dtype=jnp.bfloat16)
        mask = mlp(args.d_ff, instrument=mode, backend=args.kernel, live=live,
                   dtype=jnp.bfloat16)
        variants[f"{mode}, compact"] = (functools.partial(loss_and_grads, compact),
                                        compact_params)
        variants[f"{mode}, mask"] = (functools.partial(loss_and_grads, mask), params)
        _, (got_compact, _) = jax.jit(variants[f"{mode}, compact"][0])(compact_params, x,
                                                                       cotangent)
        _, (got_mask, _) = jax.jit(variants[f"{mode}, mask"][0])(params, x, cotangent)
        placed = [k for k in names
                  if not np.array_equal(*place_live(got_mask[k], got_compact[k], live, axes[k]))]
        print(f"check {mode}: mask's gradients at the live units equal compact's, zero "
              f"elsewhere: " + (f"FAILED for {placed}" if placed else "ok"))
    print_table(args, f"{'gated MLP' if args.gated else 'MLP'} forward + backward, "
                f"{num_live} live units computed at width {width}", width,
                time_variants(args, variants, x, cotangent), against="compact")


def place_live(mask_grad, compact_grad, live, axis) -> tuple[np.ndarray, np.ndarray]:
    """(mask's full-width gradient, compact's gradient placed at the live units' ids)."""
    mask_grad = np.asarray(mask_grad, np.float32)
    want = np.zeros_like(mask_grad)
    index = (slice(None),) * axis + (list(live),)
    want[index] = np.take(np.asarray(compact_grad, np.float32), np.arange(len(live)), axis)
    return mask_grad, want


if __name__ == "__main__":
    main()
