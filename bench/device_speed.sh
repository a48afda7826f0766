#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl"]): the measurements of "kernels at cuBLAS speed at
# every shape", each stage one device call of under ten minutes, tables printed last.
#   bash bench/device_speed.sh tune      `relu-sparsity tune` (mosaic_gpu) over every preset's
#                                        shapes and the named ones; stops itself after
#                                        TUNE_SECONDS (default 450) and resumes in the next call
#                                        while the machine stays warm (/tmp/tune)
#   bash bench/device_speed.sh tests     GPU tests of the kernels (ragged T, F, seq_len; every
#                                        schedule, bf16 and f32), with the tune stage's tiles
#   bash bench/device_speed.sh grid      mosaic_gpu against XLA at every shape of the grid (each
#                                        checked exact first), with the tune stage's tiles
#   bash bench/device_speed.sh kernels   the live path against full width, every variant at the
#                                        benchmark shapes (pytest-benchmark)
# One period's plan (30 minutes of device time): tune twice (about 15 minutes: 20 shapes of 8
# candidates, each compiled, checked at full size, then timed), tests, grid.
# Files for bench/RESULTS.md are written to $OUT; the tune stage's configuration file too
# ($OUT/mosaic_gpu.json, to commit as relu_sparsity/kernels/configs/mosaic_gpu.json).
set -uo pipefail
[ -d .whl ] && source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
PRESETS="small paper8k paper"
# Beside the presets' shapes: a benchmark shape, three past the tiles' edges, and the MLPs of two
# models users bring (OPT-125m's 768 x 3072; a Llama-7B-like 4096 x 11008, its gate and up
# projections) at 16 x 512 tokens.
NAMED="8192x2048x16384 4096x768x3000 6000x512x4100 6000x1024x8192 8192x768x3072 8192x4096x11008"
TUNED=/tmp/tune/mosaic_gpu.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
git rev-parse HEAD 2>/dev/null || true
case "${1:-}" in
  tune)
    mkdir -p /tmp/tune
    # The tune writes into a copy of the committed file, which the device's next call would
    # otherwise overwrite with the working tree's.
    [ -f "$TUNED" ] || cp relu_sparsity/kernels/configs/mosaic_gpu.json "$TUNED"
    $PY -m relu_sparsity.cli tune --backend mosaic_gpu --presets $PRESETS --shapes $NAMED \
      --candidates "${CANDIDATES:-8}" --time-limit "${TUNE_SECONDS:-450}" --out "$TUNED" \
      --report /tmp/tune/report.json --resume 2>&1 | grep -v "^W0000\|^I0000" | tail -30
    echo "exit ${PIPESTATUS[0]}"
    cp /tmp/tune/*.json "$OUT/" ;;
  tests)
    if [ -f "$TUNED" ]; then cp "$TUNED" relu_sparsity/kernels/configs/mosaic_gpu.json; fi
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_mosaic_gpu_device.py \
      tests/test_triton_gpu.py 2>&1 | tail -5 ;;
  grid)
    if [ -f "$TUNED" ]; then cp "$TUNED" relu_sparsity/kernels/configs/mosaic_gpu.json; fi
    $PY -m relu_sparsity.cli bench --backends mosaic_gpu --presets $PRESETS --shapes $NAMED \
      --out "$OUT/grid.json" \
      2>&1 | grep -E "^\||^device" | tee "$OUT/grid.md" ;;
  kernels)
    $PY bench/live_path.py 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/live_path.md"
    $PY -m pytest -q -p no:cacheprovider tests/test_benchmarks.py --benchmark-only \
      --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,iqr,rounds \
      2>&1 | tail -80 ;;
  *) echo "usage: device_speed.sh tune|tests|grid|kernels" >&2; exit 2 ;;
esac
