"""`relu-sparsity tune`: search a fused backend's tile configurations at the shapes a user trains,
on this device, and write the fastest into the backend's configuration file.

Every candidate is first checked by the exactness rule (`full_size_check`, docs/design.md §3) on
fresh random inputs: a configuration that computes wrong statistics, does not compile or does not
fit is reported and never chosen. The rest are timed with the shared timer (bench/timing.py) and
ranked by median. The search space is a small grid per backend around its tuned configurations;
the configured (or default) one is always a candidate, so it is replaced only by one measured
faster.
"""

import dataclasses
import itertools
import json
import logging
import random
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.bench.kernels import seq_len_for
from relu_sparsity.bench.timing import environment, kernel_round, measure
from relu_sparsity.kernels.backends import FUSED_BACKENDS, backend_module, config_device
from relu_sparsity.kernels.testing import full_size_check, parse_shape, random_inputs, tolerance
from relu_sparsity.kernels.tile_configs import CONFIG_DIR, shape_key

log = logging.getLogger(__name__)

# Per backend: the TileConfig fields searched and their values (the others keep the base's).
SEARCH_SPACES = {
    "mosaic_gpu": {"tile_n": (128, 256), "tile_k": (64, 128), "stages": (3, 4, 5, 6),
                   "wg_dim": ("pingpong", "m"), "ordered": (False, True), "epi_slots": (2, 4)},
    "triton": {"block_m": (64, 128), "block_n": (128, 256), "block_k": (32, 64),
               "num_warps": (4, 8), "num_stages": (3, 4), "seq_programs": (False, True)},
    "pallas_tpu": {"block_m": (256, 512), "block_n": (256, 512, 1024), "block_k": (512, 1024)},
}


def backend_ops(backend: str):
    if backend not in SEARCH_SPACES:
        raise ValueError(f"tune: backend must be one of {sorted(SEARCH_SPACES)}, got {backend!r}")
    return backend_module(backend)


def candidates(backend: str, base, limit: int, seed: int = 0) -> list:
    """`base` first, then up to limit - 1 other points of the search space (seeded order)."""
    space = SEARCH_SPACES[backend]
    points = [dataclasses.replace(base, **dict(zip(space, values)))
              for values in itertools.product(*space.values())]
    points = [p for p in points if p != base and _plausible(p)]
    random.Random(seed).shuffle(points)
    return [base, *points[:max(limit - 1, 0)]]


def _plausible(config) -> bool:
    """Mosaic-GPU's ordered schedule exists only for ping-pong."""
    return not (getattr(config, "ordered", False) and getattr(config, "wg_dim", "") != "pingpong")


def tune_shape(backend: str, shape: tuple[int, int, int], dtype: str, *, seq_len: int,
               limit: int, repeats: int, launches: int, interpret=None) -> list[dict]:
    """One row per candidate: the config, and its median / min / IQR ms or why it failed."""
    ops = backend_ops(backend)
    x, w1, b1 = random_inputs(*shape, dtype, seed=1)
    base = ops.tile_config(config_device(backend), shape, jnp.dtype(dtype).name)
    rows = []
    for config in candidates(backend, base, limit):
        row = {"config": dataclasses.asdict(config), "base": config == base}
        try:
            fn = jax.jit(lambda x, w, b, c=config: ops.forward(
                x, w, b, seq_len=seq_len, with_stats=True, with_token_mask=False, config=c,
                interpret=interpret))
            h, stats = fn(x, w1, b1)
            full_size_check(h, stats, x, w1, b1, seq_len=seq_len, with_token_mask=False,
                            tol=tolerance(dtype))
            timing = measure(kernel_round(fn, (x, w1, b1), launches), rounds=repeats,
                             calls_per_round=launches)
            row.update(ms=timing.median_ms, min_ms=timing.min_ms, iqr_ms=timing.iqr_ms)
        except Exception as err:  # compile errors, resource limits, the exactness check
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
        log.info("%s %s: %s", backend, config, row.get("ms", row.get("error")))
    return rows


def best(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if "ms" in r]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def write_best(path: Path, key: str, entries: dict[str, dict]) -> None:
    """Merge `entries` ("TxDxF:dtype" -> TileConfig fields) under `key` into the JSON at `path`."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(key, {}).update(entries)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(backend: str, shapes: list[str], *, dtype: str = "bfloat16", seq_len: int | None = None,
         limit: int = 24, repeats: int = 5, out: str | None = None,
         allow_interpreted: bool = False) -> dict:
    """Tune every shape; write the winners to `out` (default: the package's configuration
    file). An interpreted backend (no device for it here) is refused unless
    `allow_interpreted`, since its times say nothing about the kernel."""
    plans = [(s, parse_shape(s)) for s in shapes]  # bad shapes refused before any work
    backend_ops(backend)  # an unknown backend is refused here
    platform = FUSED_BACKENDS[backend].platform
    interpreted = jax.default_backend() != platform
    if interpreted and not allow_interpreted:
        raise ValueError(f"tune: {backend} runs on {platform.upper()}s and this machine has "
                         f"none; tune on the device (its times here would be an interpreter's)")
    key, winners, report = config_device(backend), {}, {}
    for name, shape in plans:
        rows = tune_shape(backend, shape, dtype, seq_len=seq_len_for(shape[0], seq_len),
                          limit=limit, repeats=repeats, launches=1 if interpreted else 20,
                          interpret=True if interpreted else None)
        report[name] = rows
        winner = best(rows)
        if winner is None:
            log.warning("tune: no candidate passed at %s; the configuration file is unchanged",
                        name)
            continue
        winners[shape_key(shape, jnp.dtype(dtype).name)] = winner["config"]
        base_ms = next((r.get("ms") for r in rows if r["base"]), None)
        print(f"{name}: best {winner['ms']:.3f} ms" + (
            f" (the configured one: {base_ms:.3f} ms)" if base_ms else "") + f" {winner['config']}")
    path = Path(out) if out else CONFIG_DIR / f"{backend}.json"
    if winners:
        write_best(path, key, winners)
        print(f"wrote {len(winners)} configuration(s) under {key!r} to {path}")
    return {**environment(), "backend": backend, "dtype": dtype, "rows": report}
