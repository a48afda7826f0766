"""The backend protocol and registry (docs/design.md §9).

A fused backend is a module `relu_sparsity.kernels.<name>.ops` that provides

    forward(x, w1, b1, *, seq_len, with_stats, with_token_mask, config=None, interpret=None)
        -> (h, SparsityStats | None)      # inputs already checked by fused_mlp_up
    tile_config(device_kind, shape, dtype) -> that backend's TileConfig
        # shape (T, D, F), dtype a numpy name; the committed entry of configs/<name>.json, else
        # the backend's default

`interpret` has one spelling everywhere: None compiles on the backend's platform and interprets
elsewhere (with a warning); False always compiles (to lower for a GPU or TPU from a CPU); an
interpreter-parameters object (plgpu.InterpretGPUParams, pltpu.InterpretParams) interprets with
it. `resolve_interpret` turns it into the parameters, or None to compile.
"""

import functools
import importlib
import logging
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax

from relu_sparsity.kernels.contract import SparsityStats
from relu_sparsity.kernels.reference import reference_forward

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[jax.Array, SparsityStats | None]]

KNOWN_BACKENDS = ("reference", "triton", "mosaic_gpu", "pallas_tpu")
# The config key used when lowering for a GPU on a machine without one.
DEFAULT_GPU_KIND = "NVIDIA H200"


class FusedBackend(NamedTuple):
    platform: str  # where it compiles: "gpu" or "tpu"
    interpretable: bool  # elsewhere it runs in an interpreter (slow, with a warning)
    install_hint: str  # what to install when the import fails


FUSED_BACKENDS = {
    "triton": FusedBackend("gpu", False,
                           "install the `gpu` extra: pip install 'relu-sparsity[gpu]'"),
    "mosaic_gpu": FusedBackend("gpu", False,
                               "it needs jax with its CUDA plugin: pip install 'jax[cuda13]'"),
    "pallas_tpu": FusedBackend("tpu", True,
                               "it needs only jax, so this jax install is incomplete"),
}
# Loaded forwards by name; the reference is always there.
BACKENDS: dict[str, Forward] = {"reference": reference_forward}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this build or this machine cannot run."""


def resolve_interpret(interpret, *, backend: str, platform: str, make_params: Callable):
    """The interpreter parameters to run with, or None to compile (see the module docstring)."""
    if interpret is False:
        return None
    if interpret is not None:
        return interpret
    if jax.default_backend() == platform:
        return None
    warnings.warn(f"{backend}: no {platform.upper()} here; interpreting the kernel on the "
                  f"{jax.default_backend()}, which is slow", stacklevel=3)
    return make_params()


def config_device(backend: str) -> str:
    """The device key a fused backend's tile configurations are filed under
    (kernels/tile_configs.py): "tpu" for pallas_tpu, whose one entry serves every TPU; else
    this machine's device kind."""
    return "tpu" if backend == "pallas_tpu" else device_kind(FUSED_BACKENDS[backend].platform)


def device_kind(platform: str) -> str:
    """The device kind tile configurations are looked up by: this machine's device on
    `platform`, else the kind lowering from a CPU targets."""
    device = jax.devices()[0]
    if device.platform == platform:
        return device.device_kind
    return DEFAULT_GPU_KIND if platform == "gpu" else "tpu"


def preferred_backends(platform: str | None = None, kind: str | None = None
                       ) -> tuple[str, ...]:
    """The fixed preference per platform, best first (built or not)."""
    if platform is None or kind is None:
        device = jax.devices()[0]
        platform, kind = device.platform, device.device_kind
    if platform in ("gpu", "cuda"):
        hopper = any(name in kind for name in ("H100", "H200", "H800", "GH200"))
        return ("mosaic_gpu", "triton") if hopper else ("triton",)
    if platform == "tpu":
        return ("pallas_tpu",)
    return ("reference",)


def preferred_backend(platform: str | None = None, kind: str | None = None) -> str:
    return preferred_backends(platform, kind)[0]


def backend_module(name: str):
    """The ops module of fused backend `name` (imported on first use: Triton is optional and
    slow to import)."""
    spec = FUSED_BACKENDS[name]
    try:
        return importlib.import_module(f"relu_sparsity.kernels.{name}.ops")
    except ImportError as err:
        raise BackendUnavailableError(f"backend {name!r} is not available: {err} "
                                      f"({spec.install_hint})") from err


def load_backend(name: str, *, platform: str | None = None) -> Forward:
    """The forward of backend `name`. BackendUnavailableError says why a backend cannot run
    here (not built, missing package, wrong platform)."""
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
    BACKENDS[name] = backend_module(name).forward
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
        kind = jax.devices()[0].device_kind
        raise ValueError(f"instrument 'fused' needs a fused kernel backend (triton, mosaic_gpu or "
                         f"pallas_tpu), and kernel={backend!r} gives none on this device "
                         f"({kind}); use --instrument xla for the reference statistics")
    return name
