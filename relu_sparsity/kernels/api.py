"""`fused_mlp_up`: the one entry point of every backend, its input checks and its custom VJP.

Each backend supplies only a forward `(x, w1, b1, *, seq_len, live, with_stats, with_token_mask)
-> (h, stats)`; the backward (the ReLU mask from `h`, then three GEMMs) is shared here.
"""

import functools
import importlib
import logging
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.kernels.live import with_live_columns
from relu_sparsity.kernels.reference import SparsityStats, reference_forward

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[jax.Array, SparsityStats | None]]

KNOWN_BACKENDS = ("reference", "triton", "mosaic_gpu", "pallas_tpu")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


class FusedBackend(NamedTuple):
    platform: str  # where it compiles: "gpu" or "tpu"
    module: str  # provides the forward; imported on first use (Triton is optional and slow)
    forward: str
    interpretable: bool  # elsewhere it runs in an interpreter (slow, with a warning)
    install_hint: str  # what to install when the import fails


FUSED_BACKENDS = {
    "triton": FusedBackend("gpu", "relu_sparsity.kernels.triton.ops", "triton_forward", False,
                           "install the `gpu` extra: pip install 'relu-sparsity[gpu]'"),
    "mosaic_gpu": FusedBackend("gpu", "relu_sparsity.kernels.mosaic_gpu.ops",
                               "mosaic_gpu_forward", False,
                               "it needs jax with its CUDA plugin: pip install 'jax[cuda13]'"),
    "pallas_tpu": FusedBackend("tpu", "relu_sparsity.kernels.pallas_tpu.ops",
                               "pallas_tpu_forward", True,
                               "it needs only jax, so this jax install is incomplete"),
}
# Loaded forwards by name; the reference is always there. Its `live` goes through the same
# gather-then-scatter wrapper as the fused backends (no [T, F] temporaries);
# `reference_forward(live=...)` stays the plain oracle.
BACKENDS: dict[str, Forward] = {"reference": with_live_columns(reference_forward)}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this build or this machine cannot run."""


def preferred_backends(platform: str | None = None, device_kind: str | None = None
                       ) -> tuple[str, ...]:
    """DESIGN.md's fixed preference per platform, best first (built or not)."""
    if platform is None or device_kind is None:
        device = jax.devices()[0]
        platform, device_kind = device.platform, device.device_kind
    if platform in ("gpu", "cuda"):
        hopper = any(name in device_kind for name in ("H100", "H200", "H800", "GH200"))
        return ("mosaic_gpu", "triton") if hopper else ("triton",)
    if platform == "tpu":
        return ("pallas_tpu",)
    return ("reference",)


def preferred_backend(platform: str | None = None, device_kind: str | None = None) -> str:
    return preferred_backends(platform, device_kind)[0]


def load_backend(name: str, *, platform: str | None = None) -> Forward:
    """The forward of backend `name`, imported on first use. BackendUnavailableError says why a
    backend cannot run here (not built, missing package, wrong platform)."""
    if name in BACKENDS:
        return BACKENDS[name]
    if name not in FUSED_BACKENDS:
        raise BackendUnavailableError(f"backend {name!r} is not built yet; available: "
                                      f"{sorted(['reference', *FUSED_BACKENDS])}")
    spec = FUSED_BACKENDS[name]
    platform = platform or jax.devices()[0].platform
    if platform != spec.platform and not spec.interpretable:
        raise BackendUnavailableError(f"backend {name!r} runs on {spec.platform.upper()}s; this "
                                      f"device is {platform}")
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise BackendUnavailableError(f"backend {name!r} is not available: {err} "
                                      f"({spec.install_hint})") from err
    BACKENDS[name] = getattr(module, spec.forward)
    return BACKENDS[name]


def compiled_backends(platform: str | None = None) -> list[str]:
    """The fused backends that compile for this platform (not interpreted) and can be loaded."""
    platform = platform or jax.devices()[0].platform
    names = []
    for name, spec in FUSED_BACKENDS.items():
        if spec.platform != platform:
            continue
        try:
            load_backend(name, platform=platform)
        except BackendUnavailableError as err:
            log.warning("backend %s cannot run here: %s", name, err)
            continue
        names.append(name)
    return names


@functools.cache
def resolve_backend(backend: str) -> str:
    """Name of the backend that will run; logs the choice once. No silent fallback: `auto` on an
    accelerator whose preferred fused backend cannot run says so as a warning."""
    if backend not in KNOWN_BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + KNOWN_BACKENDS}, got {backend!r}")
    if backend != "auto":
        load_backend(backend)
        log.info("fused_mlp_up: backend %s", backend)
        return backend
    for wanted in preferred_backends():
        try:
            load_backend(wanted)
        except BackendUnavailableError as err:
            log.warning("fused_mlp_up: backend auto skips %s: %s", wanted, err)
            continue
        log.info("fused_mlp_up: backend auto -> %s", wanted)
        return wanted
    log.warning("fused_mlp_up: no fused backend can run on this device; backend auto runs the "
                "reference (XLA)")
    return "reference"


def resolve_fused_backend(backend: str) -> str:
    """The fused backend that `instrument="fused"` will run; an error where there is none, since
    the reference statistics are what `instrument="xla"` asks for."""
    name = resolve_backend(backend)
    if name == "reference":
        device = jax.devices()[0].device_kind
        raise ValueError(f"instrument 'fused' needs a fused kernel backend (triton, mosaic_gpu or "
                         f"pallas_tpu), and kernel={backend!r} gives none on this device "
                         f"({device}); use --instrument xla for the reference statistics")
    return name


def _check_live(live, num_units: int) -> tuple[int, ...] | None:
    if live is None:
        return None
    if isinstance(live, jax.core.Tracer):
        raise ValueError("live must be a concrete array of unit ids, not a traced value "
                         "(it fixes the output width, so it cannot change inside jit)")
    arr = np.asarray(live)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"live must be a non-empty 1-D integer array, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    if np.any(np.diff(arr.astype(np.int64)) <= 0):  # int64: unsigned differences wrap
        raise ValueError("live must be strictly increasing (sorted, no repeats)")
    if arr[0] < 0 or arr[-1] >= num_units:
        raise ValueError(f"live must lie in [0, {num_units}), got [{arr[0]}, {arr[-1]}]")
    return tuple(int(i) for i in arr)


def _check_inputs(x, w1, b1, seq_len) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if w1.ndim != 2 or w1.shape[0] != x.shape[1]:
        raise ValueError(f"w1 must be [D, F] with D = {x.shape[1]}, got shape {w1.shape}")
    if b1.ndim != 1 or b1.shape[0] != w1.shape[1]:
        raise ValueError(f"b1 must be [F] with F = {w1.shape[1]}, got shape {b1.shape}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    for name, arr in (("w1", w1), ("b1", b1)):
        if arr.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype} (the caller casts), "
                             f"got {arr.dtype}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if x.shape[0] % seq_len:
        raise ValueError(f"seq_len must divide the token count T = {x.shape[0]}, got {seq_len}")


def fused_mlp_up(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    *,
    seq_len: int,
    live=None,
    with_stats: bool = True,
    with_token_mask: bool = False,
    backend: str = "auto",
) -> tuple[jax.Array, SparsityStats | None]:
    """h = relu(x @ w1 + b1) ([T, F], or [T, F_live] with `live`) and its sparsity statistics.

    See DESIGN.md, "The kernel contract". Differentiable in x, w1 and b1.
    """
    _check_inputs(x, w1, b1, seq_len)
    live_ids = _check_live(live, w1.shape[1])
    name = resolve_backend(backend)
    return _fused(x, w1, b1, int(seq_len), live_ids, bool(with_stats), bool(with_token_mask), name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _fused(x, w1, b1, seq_len, live, with_stats, with_token_mask, backend):
    # Loaded by resolve_backend (or, to lower for a GPU on a CPU, by load_backend(platform=...)).
    return BACKENDS[backend](x, w1, b1, seq_len=seq_len, live=live, with_stats=with_stats,
                             with_token_mask=with_token_mask)


def _fused_fwd(x, w1, b1, seq_len, live, with_stats, with_token_mask, backend):
    h, stats = _fused(x, w1, b1, seq_len, live, with_stats, with_token_mask, backend)
    return (h, stats), (x, w1, h)


def _fused_bwd(seq_len, live, with_stats, with_token_mask, backend, residuals, cotangents):
    del seq_len, with_stats, with_token_mask, backend
    x, w1, h = residuals
    dh, _ = cotangents  # integer statistics carry no cotangent
    # relu'(0) = 0: a unit that is exactly zero passes no gradient.
    dpre = jnp.where(h > 0, dh, jnp.zeros_like(dh))
    w1_live = w1 if live is None else w1[:, jnp.asarray(live)]
    # HIGHEST keeps f32 GEMMs in f32 on GPUs (not TF32); bf16 GEMMs are unaffected.
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    dx = dot(dpre, w1_live.T).astype(x.dtype)
    dw1 = dot(x.T, dpre).astype(w1.dtype)
    db1 = jnp.sum(dpre, axis=0, dtype=jnp.float32).astype(w1.dtype)
    if live is not None:
        idx = jnp.asarray(live)
        dw1 = jnp.zeros_like(w1).at[:, idx].set(dw1)
        db1 = jnp.zeros(w1.shape[1], w1.dtype).at[idx].set(db1)
    return dx, dw1, db1


_fused.defvjp(_fused_fwd, _fused_bwd)
