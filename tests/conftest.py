import os
import shutil

# tests/interpreter runs in the Triton side environment (Python 3.11 + torch), launched by
# tests/test_triton_interpreter.py.
collect_ignore = ["interpreter"]

# The test extra installs jax's CUDA plugin so that GPU kernels can be lowered here; on a machine
# without a GPU it would only complain at start-up that it finds no CUDA.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _has_gpu() -> bool:
    try:
        import jax
    except ImportError:  # the Triton side environment has no JAX
        return False
    return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a GPU: on a machine without one they are deselected (and counted
    in pytest's summary as deselected), not skipped; the device runs them."""
    if _has_gpu():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; runs on the lent device")
