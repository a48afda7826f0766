"""relu_sparsity.bench.mosaic_fingerprint: the hash names the kernel, not the Python source
positions."""

import jax.numpy as jnp

from relu_sparsity.bench import mosaic_fingerprint
from relu_sparsity.kernels.mosaic_gpu.testing import SMALL_PP


def test_same_kernel_same_fingerprint_other_kernel_other():
    case = (96, 40, 70, 24, jnp.bfloat16, SMALL_PP)
    with_stats = mosaic_fingerprint.fingerprint(*case, True, True)
    assert mosaic_fingerprint.fingerprint(*case, True, True) == with_stats
    assert mosaic_fingerprint.fingerprint(*case, True, False) != with_stats
    assert mosaic_fingerprint.fingerprint(*case, False, False) != with_stats
