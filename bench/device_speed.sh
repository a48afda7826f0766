#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl", ".corpus"]): the measurements of "fast at every
# shape", each stage one device call of under ten minutes, tables printed last.
#   bash bench/device_speed.sh kernels   GPU tests of the unpadded edges, the live path against
#                                        full width, every variant at the benchmark grid
#   bash bench/device_speed.sh tune      `relu-sparsity tune` over the grid's shapes (mosaic_gpu)
# Files for bench/RESULTS.md are written to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
OUT=${OUT:-/tmp/out}
GRID="8192x1024x32768 8192x2048x16384 8192x512x8192 8192x1024x23040 4096x768x3000 6000x1024x8192"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git rev-parse HEAD 2>/dev/null || true
case "$1" in
  kernels)
    python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_mosaic_gpu_device.py 2>&1 | tail -3
    python3 bench/live_path.py 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/live_path.md"
    python3 -m pytest -q -p no:cacheprovider tests/test_benchmarks.py --benchmark-only \
      --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,iqr,rounds \
      2>&1 | tail -80 ;;
  tune)
    python3 -m relu_sparsity.cli tune --backend mosaic_gpu --shapes $GRID \
      --report "$OUT/tune_mosaic.json" 2>&1 | tail -20
    cp relu_sparsity/kernels/configs/mosaic_gpu.json "$OUT/" ;;
  *) echo "usage: device_speed.sh kernels|tune" >&2; exit 2 ;;
esac
