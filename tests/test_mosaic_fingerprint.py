"""bench/mosaic_fingerprint.py: the hash names the kernel, not the Python source positions."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp

from test_mosaic_gpu import SMALL_PP

spec = importlib.util.spec_from_file_location(
    "mosaic_fingerprint", Path(__file__).parents[1] / "bench" / "mosaic_fingerprint.py")
mosaic_fingerprint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mosaic_fingerprint)


def test_same_kernel_same_fingerprint_other_kernel_other():
    case = (96, 40, 70, 24, jnp.bfloat16, SMALL_PP)
    with_stats = mosaic_fingerprint.fingerprint(*case, True, True)
    assert mosaic_fingerprint.fingerprint(*case, True, True) == with_stats
    assert mosaic_fingerprint.fingerprint(*case, True, False) != with_stats
    assert mosaic_fingerprint.fingerprint(*case, False, False) != with_stats
