"""Runs tests/interpreter (the Triton kernel under Triton's interpreter, against numpy) in the
side environment that scripts/install.sh makes: Python 3.11 with a CPU build of torch, which
Triton's interpreter needs and Python 3.12 has no CPU wheel of."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDE_PYTHON = Path(os.environ.get("RELU_SPARSITY_TRITON_PYTHON",
                                  ROOT / ".venv-triton" / "bin" / "python"))


def test_triton_kernel_under_the_interpreter():
    assert SIDE_PYTHON.exists(), (
        f"no Triton side environment at {SIDE_PYTHON}: run `bash scripts/install.sh test` "
        "(or point RELU_SPARSITY_TRITON_PYTHON at a Python with torch, triton, numpy, pytest)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # --confcutdir: tests/conftest.py belongs to the JAX suite, not to the side environment.
    folder = ROOT / "tests" / "interpreter"
    done = subprocess.run([str(SIDE_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--confcutdir", str(folder), str(folder)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
