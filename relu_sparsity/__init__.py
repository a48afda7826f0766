"""relu-sparsity: fused-instrumentation ReLU MLP kernels and the training stack around them."""

import os

__version__ = "0.1.0"


def _skip_cuda_checks_without_a_driver() -> None:
    """jax's CUDA plugin (installed by the test extra, to lower the GPU kernels on a CPU) checks
    for cuDNN and the CUDA libraries when JAX starts and prints a long error on a machine
    without them. Where no NVIDIA driver is loaded no GPU can run anyway: skip the check there,
    and JAX starts on the CPU without a word. A machine with a driver keeps the check."""
    has_driver = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")
    if not has_driver:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


_skip_cuda_checks_without_a_driver()
