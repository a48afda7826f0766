"""One-off A/B: mask mode's gather of the live units and its gradient, with the gradient as
XLA's transpose of the gather (a scatter-add) against `gather_units`' gather of positions.
wi [D, F] and wo [F, D] in f32, 70% of the units live, computed at the width padded to 256,
cast to bf16 as the model does; checked bit-equal, then timed interleaved."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.bench.timing import median_ms
from relu_sparsity.model.live import live_units, padded_width, take_units


def scatter_gradient_units(weights, axes, live, width):
    ids = np.zeros(width, np.int32)
    ids[:len(live)] = live
    real = np.arange(width) < len(live)
    out = []
    for w, axis in zip(weights, axes):
        shape = [1] * w.ndim
        shape[axis] = width
        out.append(jnp.where(jnp.asarray(real.reshape(shape)),
                             take_units(w, jnp.asarray(ids), axis), 0))
    return tuple(out)


def grads(gather, weights, cots, live, width):
    def loss(weights):
        parts = gather(weights, (1, 0), live, width)
        return sum(jnp.sum(p.astype(jnp.bfloat16).astype(jnp.float32) * c)
                   for p, c in zip(parts, cots))
    return jax.grad(loss)(weights)


def main() -> None:
    D, F = int(os.environ.get("D", 1024)), int(os.environ.get("F", 32768))
    rng = np.random.default_rng(0)
    live = tuple(np.sort(rng.choice(F, round(0.7 * F), replace=False)).tolist())
    width = padded_width(len(live), 256, F)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    weights = (jax.random.normal(k1, (D, F)), jax.random.normal(k2, (F, D)))
    cots = (jax.random.normal(k3, (D, width)), jax.random.normal(k4, (width, D)))
    variants = {name: jax.jit(functools.partial(grads, gather, live=live, width=width))
                for name, gather in [("scatter-add (XLA's transpose)", scatter_gradient_units),
                                     ("gather of positions", live_units)]}
    results = [fn(weights, cots) for fn in variants.values()]
    same = all(np.array_equal(a, b) for a, b in zip(*results))
    print(f"check: gradients bit-equal: {'ok' if same else 'FAILED'}")
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            times[name].append(median_ms(fn, (weights, cots), repeats=5, launches=20))
    print(f"\nwi and wo of one layer, D {D} F {F}, {len(live)} live at width {width} "
          f"({jax.devices()[0].device_kind}); forward gathers and gradients")
    print("| gradient | ms (3 interleaved runs) | / scatter-add |\n| --- | --- | ---: |")
    base = np.median(times["scatter-add (XLA's transpose)"])
    for name, t in times.items():
        print(f"| {name} | {' / '.join(f'{x:.3f}' for x in t)} | {np.median(t) / base:.3f} |")


if __name__ == "__main__":
    main()
