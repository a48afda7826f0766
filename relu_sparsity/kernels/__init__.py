"""Fused ReLU MLP kernels that count activation sparsity, and their pure-JAX reference."""

from relu_sparsity.kernels.api import (
    BACKENDS,
    BackendUnavailableError,
    fused_mlp_up,
    preferred_backend,
    resolve_backend,
    resolve_fused_backend,
)
from relu_sparsity.kernels.reference import SparsityStats

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SparsityStats",
    "fused_mlp_up",
    "preferred_backend",
    "resolve_backend",
    "resolve_fused_backend",
]
