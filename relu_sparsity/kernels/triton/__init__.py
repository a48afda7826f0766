"""The Triton backend: `kernel.py` (Triton only, no JAX) and its jax-triton wrapper `ops.py`."""
