"""One way to time device work, shared by `relu-sparsity bench` and the pytest-benchmark
benchmarks (tests/test_benchmarks.py): a round is a fixed number of back-to-back calls ended by
one `block_until_ready`, so that launch overhead overlaps device work as in training; rounds
follow a compile-and-warm-up round, and a result keeps the spread over rounds (min, median,
interquartile range) beside the environment that produced it."""

import importlib.metadata
import time
from collections.abc import Callable
from typing import Any

import jax

from relu_sparsity.report.numbers import Timing
from relu_sparsity.runs.metadata import git_commit


def kernel_round(fn: Callable, args, launches: int) -> Callable[[], Any]:
    """A round of `launches` back-to-back calls of fn(*args), waited for at its end."""
    def run_round():
        for _ in range(launches):
            out = fn(*args)
        return jax.block_until_ready(out)
    return run_round


def measure(run_round: Callable[[], Any], *, rounds: int, calls_per_round: int) -> Timing:
    """Time `rounds` calls of `run_round` (each doing `calls_per_round` calls and waiting for
    them) after one warm-up round, which also compiles."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    run_round()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_round()
        per_call.append((time.perf_counter() - start) / calls_per_round * 1e3)
    return Timing.from_rounds(per_call)


def median_ms(fn: Callable, args, *, repeats: int, launches: int) -> float:
    """The median milliseconds per call of fn(*args) (the device scripts' one number)."""
    return measure(kernel_round(fn, args, launches), rounds=repeats,
                   calls_per_round=launches).median_ms


def environment() -> dict[str, Any]:
    """What a timing depends on: device, package versions and the source commit."""
    device = jax.devices()[0]
    versions = {}
    for package in ("jax", "jaxlib", "triton", "jax-triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": device.device_kind, "platform": device.platform, **versions,
            "commit": git_commit()}
