import os
import shutil

# tests/interpreter runs in the Triton side environment (Python 3.11 + torch), launched by
# tests/test_triton_interpreter.py.
collect_ignore = ["interpreter"]

# The test extra installs jax's CUDA plugin so that GPU kernels can be lowered here; on a machine
# without a GPU it would only complain at start-up that it finds no CUDA.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
