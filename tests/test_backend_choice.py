"""`backend="auto"` picks the backend docs/design.md §9 documents for each device kind (Hopper:
mosaic_gpu then triton; other NVIDIA GPUs: triton; TPUs: pallas_tpu; else the reference), with
the device faked, checked against an explicit table of device kinds as JAX reports them."""

import logging
from types import SimpleNamespace

import jax
import pytest

from relu_sparsity.kernels import backends

# (platform, device kind) -> the backend auto must run when every backend loads.
DOCUMENTED = [
    ("gpu", "NVIDIA H100 80GB HBM3", "mosaic_gpu"),
    ("gpu", "NVIDIA H100 PCIe", "mosaic_gpu"),
    ("gpu", "NVIDIA H200", "mosaic_gpu"),
    ("gpu", "NVIDIA H200 NVL", "mosaic_gpu"),
    ("gpu", "NVIDIA H800", "mosaic_gpu"),
    ("gpu", "NVIDIA GH200 480GB", "mosaic_gpu"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "triton"),
    ("gpu", "NVIDIA L4", "triton"),
    ("gpu", "NVIDIA GeForce RTX 4090", "triton"),
    ("gpu", "Tesla V100-SXM2-16GB", "triton"),
    ("tpu", "TPU v5 lite", "pallas_tpu"),
    ("tpu", "TPU v4", "pallas_tpu"),
    ("cpu", "cpu", "reference"),
]


@pytest.fixture
def fake_device(monkeypatch):
    """Makes jax.devices() report one device of the given platform and kind, and backend loading
    succeed except for the names in `missing`; returns a setter and the list of loads tried."""
    tried: list[str] = []
    missing: set[str] = set()

    def load(name, *, platform=None):
        tried.append(name)
        if name in missing:
            raise backends.BackendUnavailableError(f"{name} is not installed (test)")
        return lambda *args, **kwargs: None

    def use(platform: str, kind: str, unavailable=()):
        device = SimpleNamespace(platform=platform, device_kind=kind)
        monkeypatch.setattr(jax, "devices", lambda *args: [device])
        missing.clear()
        missing.update(unavailable)
        tried.clear()
        backends.resolve_backend.cache_clear()

    monkeypatch.setattr(backends, "load_backend", load)
    backends.resolve_backend.cache_clear()
    yield use, tried
    backends.resolve_backend.cache_clear()  # no choice made on a fake device outlives the test


@pytest.mark.parametrize("platform, kind, want", DOCUMENTED, ids=[k for _, k, _ in DOCUMENTED])
def test_auto_picks_the_documented_backend(fake_device, platform, kind, want):
    """resolve_backend('auto') on a faked device against the documented table."""
    use, _ = fake_device
    use(platform, kind)
    assert backends.resolve_backend("auto") == want
    assert backends.preferred_backend() == want
    assert backends.preferred_backend(platform, kind) == want


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_hopper_without_mosaic_gpu_takes_triton_and_says_so(fake_device, caplog, kind):
    """On Hopper, auto tries mosaic_gpu first and, when it cannot load, runs triton, with a
    warning naming mosaic_gpu."""
    use, tried = fake_device
    use("gpu", kind, unavailable={"mosaic_gpu"})
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert backends.resolve_backend("auto") == "triton"
    assert tried == ["mosaic_gpu", "triton"]
    assert any("skips mosaic_gpu" in r.getMessage() for r in caplog.records)


def test_other_nvidia_gpu_never_tries_mosaic_gpu(fake_device, caplog):
    """An A100 tries triton only; without it, auto runs the reference with a warning."""
    use, tried = fake_device
    use("gpu", "NVIDIA A100-SXM4-80GB", unavailable={"triton"})
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert backends.resolve_backend("auto") == "reference"
    assert tried == ["triton"]
    assert any("runs the reference" in r.getMessage() for r in caplog.records)
