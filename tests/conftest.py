import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# tests/interpreter runs in the Triton side environment (Python 3.11 + torch), launched by
# tests/test_triton_interpreter.py; tests/seqio in the seqio side environment (TensorFlow,
# TFDS, seqio), launched by tests/test_seqio.py.
collect_ignore = ["interpreter", "seqio"]

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


CORPUS_FILES = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "shlex.py"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A token cache of five standard-library modules (vocabulary 512, eval fraction 0.2)."""
    from relu_sparsity import data

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
    out = tmp_path_factory.mktemp("cache") / "cache"
    data.prepare(out, [str(corpus)], vocab_size=512, eval_fraction=0.2)
    return out
