"""Runs tests/interpreter (the Triton kernel under Triton's interpreter, against numpy) in the
side environment that scripts/install.sh makes: Python 3.11 with a CPU build of torch, which
Triton's interpreter needs and Python 3.12 has no CPU wheel of."""

import os
from pathlib import Path

from side_env import ROOT, run_side_tests

SIDE_PYTHON = Path(os.environ.get("RELU_SPARSITY_TRITON_PYTHON",
                                  ROOT / ".venv-triton" / "bin" / "python"))


def test_triton_kernel_under_the_interpreter():
    run_side_tests(SIDE_PYTHON, ROOT / "tests" / "interpreter",
                   "run `bash scripts/install.sh test` (or point RELU_SPARSITY_TRITON_PYTHON at "
                   "a Python with torch, triton, numpy, pytest)", env={"TRITON_INTERPRET": "1"})
