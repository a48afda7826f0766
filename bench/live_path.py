"""On the device: the `live` path (pruning's mask and random modes: only the live units are
computed, model/live.py) against the full-width kernel, per fused backend, at the paper's MLP
shape with 70% of the units live. Checks the kernel at the live width against the reference on
the gathered weights, and the live path's h against it; times each with the shared timer and
prints a table.

    source bench/device_env.sh; python3 bench/live_path.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.bench.kernels import variants
from relu_sparsity.bench.timing import median_ms
from relu_sparsity.kernels import fused_mlp_up
from relu_sparsity.kernels.backends import compiled_backends
from relu_sparsity.kernels.testing import full_size_check, random_inputs
from relu_sparsity.model.live import live_weights, padded_width, stats_in_unit_ids

T, D, F, SEQ_LEN, KEEP, MULTIPLE = 8192, 1024, 32768, 512, 0.7, 256


def main() -> None:
    x, w1, b1 = random_inputs(T, D, F, jnp.bfloat16)
    wo = jnp.zeros((F, D), jnp.bfloat16)
    rng = np.random.default_rng(0)
    live = tuple(int(i) for i in np.sort(rng.choice(F, int(KEEP * F), replace=False)))
    width = padded_width(len(live), MULTIPLE, F)
    wl, bl, _ = live_weights(w1, b1, wo, live, width)
    time = functools.partial(median_ms, repeats=5, launches=20)
    xla = variants(SEQ_LEN)["xla dot+bias+relu"]
    print(f"{jax.devices()[0].device_kind}; {T}x{D}x{F}, {len(live)} live units "
          f"({KEEP:.0%}) computed at width {width}; XLA dot+bias+relu full "
          f"{time(xla, (x, w1, b1)):.3f} ms, at the live width {time(xla, (x, wl, bl)):.3f} ms")
    print("| backend | full width ms | kernel at live width ms | live path ms | live / full |"
          "\n| --- | ---: | ---: | ---: | ---: |", flush=True)
    for backend in compiled_backends():
        kernel = jax.jit(lambda x, w, b, n=backend: fused_mlp_up(x, w, b, seq_len=SEQ_LEN,
                                                                   backend=n))

        @jax.jit
        def live_path(x, w, b, n=backend):
            wl, bl, _ = live_weights(w, b, wo, live, width)
            h, stats = fused_mlp_up(x, wl, bl, seq_len=SEQ_LEN, backend=n)
            return h, stats_in_unit_ids(stats, live, F)

        h, stats = kernel(x, wl, bl)
        full_size_check(h, stats, x, wl, bl, seq_len=SEQ_LEN, with_token_mask=False)
        assert bool(jnp.array_equal(live_path(x, w1, b1)[0], h)), f"{backend}: live path's h"
        t_full, t_width = time(kernel, (x, w1, b1)), time(kernel, (x, wl, bl))
        t_live = time(live_path, (x, w1, b1))
        print(f"| {backend} | {t_full:.3f} | {t_width:.3f} | {t_live:.3f} | "
              f"{t_live / t_full:.3f} |", flush=True)


if __name__ == "__main__":
    main()
