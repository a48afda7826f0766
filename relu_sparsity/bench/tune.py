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
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from relu_sparsity.bench.kernels import seq_len_for
from relu_sparsity.bench.timing import environment, kernel_round, measure
from relu_sparsity.kernels.backends import FUSED_BACKENDS, backend_module, config_device
from relu_sparsity.kernels.testing import full_size_check, parse_shape, random_inputs, tolerance
from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
from relu_sparsity.kernels.tile_configs import CONFIG_DIR, parse_key, shape_key, tuned_configs

log = logging.getLogger(__name__)

# Per backend: the TileConfig fields searched and their values (the others keep the base's).
SEARCH_SPACES = {
    "mosaic_gpu": {"tile_m": (64, 128), "tile_n": (128, 256), "tile_k": (64, 128),
                   "stages": (3, 4, 5, 6),
                   "wg_dim": ("pingpong", "m"), "ordered": (False, True), "epi_slots": (2, 4),
                   "epi_tile_n": (32, 64, 128)},
    "triton": {"block_m": (64, 128), "block_n": (128, 256), "block_k": (32, 64),
               "num_warps": (4, 8), "num_stages": (3, 4), "seq_programs": (False, True)},
    "pallas_tpu": {"block_m": (256, 512), "block_n": (256, 512, 1024), "block_k": (512, 1024)},
}


def backend_ops(backend: str):
    if backend not in SEARCH_SPACES:
        raise ValueError(f"tune: backend must be one of {sorted(SEARCH_SPACES)}, got {backend!r}")
    return backend_module(backend)


def candidates(backend: str, base, limit: int, seed: int = 0, *, seeds=(),
               dtype: str = "bfloat16") -> list:
    """`base` first, then the `seeds` (configurations tuned at other shapes), then points of the
    search space in a seeded order: up to `limit` in all, each once, none the backend would
    refuse before compiling (`_plausible`)."""
    space = SEARCH_SPACES[backend]
    points = [dataclasses.replace(base, **dict(zip(space, values)))
              for values in itertools.product(*space.values())]
    random.Random(seed).shuffle(points)
    chosen = [base]
    for point in (*seeds, *points):
        if len(chosen) >= limit:
            break
        if point not in chosen and _plausible(backend, point, dtype):
            chosen.append(point)
    return chosen


def _plausible(backend: str, config, dtype: str) -> bool:
    """Whether `config` can run at all: mosaic_gpu refuses invalid tiles (`validate`: the
    ordered schedule only for ping-pong, at most 128 accumulator registers a thread) and rings
    that overflow shared memory, before any compile; a candidate slot spent on one is wasted."""
    if backend != "mosaic_gpu":
        return True
    try:
        config.validate()
        mgpu_kernel.check_smem(config, jnp.bfloat16, jnp.dtype(dtype))
    except ValueError:
        return False
    return True


def tuned_elsewhere(backend: str, base, dtype: str) -> list:
    """The configurations this device has tuned at other shapes of this dtype, as `base`'s
    type: good first candidates at a shape near them."""
    entries = tuned_configs(backend).get(config_device(backend), {})
    return [type(base)(**entry) for key, entry in sorted(entries.items())
            if parse_key(key)[1] == jnp.dtype(dtype).name]


def tune_shape(backend: str, shape: tuple[int, int, int], dtype: str, *, seq_len: int,
               limit: int, repeats: int, launches: int, interpret=None) -> list[dict]:
    """One row per candidate: the config, and its median / min / IQR ms or why it failed."""
    ops = backend_ops(backend)
    x, w1, b1 = random_inputs(*shape, dtype, seed=1)
    base = ops.tile_config(config_device(backend), shape, jnp.dtype(dtype).name)
    rows = []
    seeds = tuned_elsewhere(backend, base, dtype)
    for config in candidates(backend, base, limit, seeds=seeds, dtype=dtype):
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
         limit: int = 24, repeats: int = 5, out: str | None = None, report: str | None = None,
         resume: bool = False, time_limit: float | None = None,
         allow_interpreted: bool = False) -> dict:
    """Tune every shape, each shape's winner written to `out` (default: the package's
    configuration file) and every candidate's row to `report` (JSON) as soon as the shape is
    done, so an interrupted tune keeps what it finished. `resume`: skip the shapes `report`
    already holds. `time_limit` (seconds): start no shape after it; the result's "not_tuned"
    lists those left. An interpreted backend (no device for it here) is refused unless
    `allow_interpreted`, since its times say nothing about the kernel."""
    plans = [(s, parse_shape(s)) for s in shapes]  # bad shapes refused before any work
    backend_ops(backend)  # an unknown backend is refused here
    platform = FUSED_BACKENDS[backend].platform
    interpreted = jax.default_backend() != platform
    if interpreted and not allow_interpreted:
        raise ValueError(f"tune: {backend} runs on {platform.upper()}s and this machine has "
                         f"none; tune on the device (its times here would be an interpreter's)")
    result = {**environment(), "backend": backend, "dtype": dtype,
              "rows": earlier_rows(report, backend, dtype) if resume else {}}
    path = Path(out) if out else CONFIG_DIR / f"{backend}.json"
    started = time.monotonic()
    todo = [(name, shape) for name, shape in plans if name not in result["rows"]]
    if len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} shape(s) already tuned in {report}")
    for i, (name, shape) in enumerate(todo):
        if time_limit is not None and time.monotonic() - started > time_limit:
            result["not_tuned"] = [n for n, _ in todo[i:]]
            break
        rows = tune_shape(backend, shape, dtype, seq_len=seq_len_for(shape[0], seq_len),
                          limit=limit, repeats=repeats, launches=1 if interpreted else 20,
                          interpret=True if interpreted else None)
        result["rows"][name] = rows
        record_winner(path, backend, name, shape, dtype, rows)
        if report:
            Path(report).write_text(json.dumps(result, indent=2) + "\n")
    return result


def earlier_rows(report: str | None, backend: str, dtype: str) -> dict:
    """The rows of an earlier tune's report, to resume it; refused unless it tuned the same
    backend and dtype."""
    if not report:
        raise ValueError("tune: --resume needs --report, the file that says what is done")
    if not Path(report).exists():
        return {}
    earlier = json.loads(Path(report).read_text())
    if (earlier.get("backend"), earlier.get("dtype")) != (backend, dtype):
        raise ValueError(f"tune: {report} tuned {earlier.get('backend')} in "
                         f"{earlier.get('dtype')}, not {backend} in {dtype}; resume it with "
                         "those or write a new report")
    return earlier.get("rows", {})


def record_winner(path: Path, backend: str, name: str, shape, dtype: str, rows: list[dict]
                  ) -> None:
    """The fastest exact candidate of `rows` into the configuration file, with a line."""
    winner = best(rows)
    if winner is None:
        log.warning("tune: no candidate passed at %s; the configuration file is unchanged",
                    name)
        return
    write_best(path, config_device(backend),
               {shape_key(shape, jnp.dtype(dtype).name): winner["config"]})
    base_ms = next((r.get("ms") for r in rows if r["base"]), None)
    print(f"{name}: best {winner['ms']:.3f} ms" + (
        f" (the configured one: {base_ms:.3f} ms)" if base_ms else "") +
        f" {winner['config']}; written to {path}", flush=True)
