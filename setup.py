import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in relu_sparsity/__init__.py alone; read here without importing the package.
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (Path(__file__).parent / "relu_sparsity" / "__init__.py").read_text()).group(1)

setup(
    name="relu-sparsity",
    version=VERSION,
    description="Watch and exploit activation sparsity in ReLU Transformers while they train.",
    packages=find_packages(include=["relu_sparsity", "relu_sparsity.*"]),
    package_data={"relu_sparsity": ["kernels/configs/*.json"]},
    python_requires=">=3.11",
    # Ranges wide enough for the GPU image (jax 0.11.x, flax 0.12.10, optax 0.2.8) and the CPU
    # machines; CI pins the GPU image's versions through the test extra.
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "sentencepiece>=0.2.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.4",  # Hugging Face checkpoints (model/hf.py)
        "tokenizers>=0.15",  # their tokenizers (data/hf_tokenizer.py)
    ],
    extras_require={
        # The GPU kernels' tests lower them for CUDA on a CPU machine: that needs jax-triton,
        # Triton and jax's CUDA plugin (not a GPU).
        "test": ["pytest>=8", "pytest-benchmark>=4", "jax-triton>=0.3.1", "triton>=3.6.0",
                 "jax-cuda13-plugin"],
        # A working NVIDIA install: CUDA jax (its plugin and pjrt, for CUDA 13) and the Triton
        # backend, in ranges; the exact versions CI and the GPU image use are constraints.txt's.
        "gpu": ["jax[cuda13]>=0.10.0", "jax-triton>=0.3.1", "triton>=3.6.0"],
        "seqio": ["seqio", "tensorflow-datasets"],
    },
    entry_points={"console_scripts": ["relu-sparsity=relu_sparsity.cli:main"]},
)
