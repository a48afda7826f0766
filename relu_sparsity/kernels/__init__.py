"""Fused ReLU MLP kernels that count activation sparsity, and their pure-JAX reference.

`contract` says what every backend computes, `api.fused_mlp_up` is the one entry point,
`backends` chooses and loads a backend, `reference` is the oracle, `bits` the mask layout, and
`testing` the kit that tests and benchmarks check and time every backend with.
"""

from relu_sparsity.kernels.api import fused_mlp_up
from relu_sparsity.kernels.backends import (
    BACKENDS,
    BackendUnavailableError,
    preferred_backend,
    resolve_backend,
    resolve_fused_backend,
)
from relu_sparsity.kernels.contract import SparsityStats

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SparsityStats",
    "fused_mlp_up",
    "preferred_backend",
    "resolve_backend",
    "resolve_fused_backend",
]
