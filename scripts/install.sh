#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs relu-sparsity into it, pinned to the versions of the
# GPU image (constraints.txt). `install.sh test` adds the test tools. Python 3.12 is looked for on
# PATH, then under pyenv; a pyenv shim that cannot run (no version selected) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "test" ] && extras="[test]"

# side_env DIR PYTHON MINOR: DIR made (or kept) as a venv of PYTHON 3.MINOR, pip upgraded.
side_env() {
  local dir=$1 from=$2 minor=$3
  if [ ! -x "$dir/bin/python" ] || ! works "$dir/bin/python" "$minor"; then
    rm -rf "$dir"
    "$from" -m venv "$dir"
  fi
  echo "install.sh: $("$dir/bin/python" --version) in $dir (from $from)"
  "$dir/bin/python" -m pip install -q --upgrade pip
}

# works PYTHON MINOR: true when PYTHON runs and is 3.MINOR.
works() { "$1" -c "import sys; assert sys.version_info[:2] == (3, $2)" >/dev/null 2>&1; }

# find_python MINOR [OVERRIDE]: PATH first, then pyenv's versions (the newest wins).
find_python() {
  local minor=$1 candidate path found=""
  for candidate in "${2:-}" "python3.$minor" python3; do
    [ -n "$candidate" ] || continue
    path=$(command -v "$candidate" 2>/dev/null) || continue
    if works "$path" "$minor"; then echo "$path"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for path in "$(pyenv root)"/versions/3."$minor"*/bin/python3."$minor"; do
      if [ -x "$path" ] && works "$path" "$minor"; then found=$path; fi
    done
  fi
  [ -n "$found" ] && echo "$found"
}

python=$(find_python 12 "${PYTHON:-}") || true
if [ -z "$python" ]; then
  echo "install.sh: no Python 3.12 found (tried \$PYTHON, python3.12 and python3 on PATH, then" \
       "pyenv's versions). Install Python 3.12 or set PYTHON=/path/to/python3.12." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ] || ! works .venv/bin/python 12; then
  rm -rf .venv
  "$python" -m venv .venv
fi
echo "install.sh: $(.venv/bin/python --version) in .venv (from $python)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"

# The tests run the Triton kernel under Triton's interpreter, which needs torch tensors. A CPU
# build of torch exists for Python 3.11 (not 3.12), so it gets a side environment of its own:
# Python 3.11, torch (CPU), the GPU image's Triton, numpy and pytest; the kernel module imports
# no JAX.
if [ "${1:-}" = "test" ]; then
  python311=$(find_python 11 "${PYTHON311:-}") || true
  if [ -z "$python311" ]; then
    echo "install.sh: the Triton interpreter tests need Python 3.11 (for a CPU build of torch);" \
         "none found on PATH or under pyenv. Install it or set PYTHON311=/path/to/python3.11." >&2
    exit 1
  fi
  side_env .venv-triton "$python311" 11
  # Where a CPU wheel of torch 2.13.0 is provided locally pip takes it; elsewhere PyPI's build
  # (large, CUDA-enabled) works as well for the interpreter. numpy 2.4 breaks Triton 3.6's
  # interpreter ("only 0-dimensional arrays can be converted to Python scalars").
  .venv-triton/bin/python -m pip install -q "torch==2.13.0"
  .venv-triton/bin/python -m pip install -q -c constraints.txt triton "numpy<2.4" pytest
fi

# The TFDS source (relu_sparsity/data/tfds.py) reads through seqio, which needs TensorFlow; the
# main environment stays free of it, so its tests (tests/seqio, launched by tests/test_seqio.py)
# run in a side environment: Python 3.12, TensorFlow (CPU), TFDS, seqio, and the few packages
# relu_sparsity.data imports. seqio imports clu, flax and jax at start-up: -c constraints.txt
# holds them to this repo's versions. tensorflow-text declares `tensorflow`, whose module
# tensorflow-cpu provides: it and seqio install without their declared dependencies (listed
# here instead), so the tensorflow wheel (573 MB, with GPU kernels; tensorflow-cpu's is 274 MB)
# stays out.
if [ "${1:-}" = "test" ]; then
  side_env .venv-seqio "$python" 12
  .venv-seqio/bin/python -m pip install -q -c constraints.txt "tensorflow-cpu==2.21.*" \
    "tensorflow-datasets==4.9.*" clu absl-py editdistance pyglove packaging numpy \
    "sentencepiece>=0.2.0" tqdm pytest
  .venv-seqio/bin/python -m pip install -q --no-deps "tensorflow-text==2.21.*" "seqio==0.0.20"
fi

# The Hugging Face tests (tests/test_hf_import.py) compare against `transformers` itself, which
# needs torch: a side environment of Python 3.11 with torch's CPU build (as .venv-triton's) and
# transformers. The main environment reads checkpoints with `safetensors` alone.
if [ "${1:-}" = "test" ]; then
  side_env .venv-hf "$python311" 11
  .venv-hf/bin/python -m pip install -q "torch==2.13.0"
  .venv-hf/bin/python -m pip install -q "transformers==5.25.*" "safetensors>=0.4" "numpy<2.4"
fi
