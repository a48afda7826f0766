"""What produced a run: its resolved configuration, the package version and git commit, the
corpus, and the runtime (jax version, device, kernel backend), written to config.json."""

import platform
import subprocess
from pathlib import Path
from typing import Any

import jax

import relu_sparsity

CORPUS_KEYS = ("source", "corpus_hash", "python_version", "files", "train_tokens",
               "eval_tokens", "vocab_size", "unigram_entropy_nats")


def git_commit() -> str:
    """The commit of the package's checkout, or "unknown" outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(relu_sparsity.__file__).parent, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_metadata(config_dict: dict[str, Any], cache_meta: dict[str, Any], cache_path: Path,
                 *, dtype: str, backend: str) -> dict[str, Any]:
    """config.json's contents: the configuration's fields, then what the run ran on."""
    device = jax.devices()[0]
    return {  # the keys after the configuration's are RUN_METADATA_KEYS (train/config.py)
        **config_dict,
        "version": relu_sparsity.__version__,
        "git_commit": git_commit(),
        "corpus": {k: cache_meta.get(k) for k in CORPUS_KEYS},
        "cache": str(cache_path),
        "runtime": {"jax": jax.__version__, "python": platform.python_version(),
                    "device": device.device_kind, "platform": device.platform,
                    "num_devices": jax.device_count(), "dtype": dtype,
                    "kernel_backend": backend},
    }
