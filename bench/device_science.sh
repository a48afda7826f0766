#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl", ".corpus"]): the science runs of bench/RESULTS.md
# on the English corpus of bench/build_english_corpus.py. Each stage resumes where a previous call
# stopped (the machine keeps /tmp while it stays warm), so a stage longer than one call is run again.
#   bash bench/device_science.sh run      the paper8k run: 9000 steps, 5000 warm-up, LR 3e-3
#   bash bench/device_science.sh sweep    the LR sweep: 1e-3 2e-3 3e-3 5e-3, 3000 steps, 1000 warm-up
# Each stage stops itself (SIGTERM, checkpointed) after STAGE_SECONDS (default 480) and copies its
# run folders without checkpoints to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
OUT=${OUT:-/tmp/out}
seconds=${STAGE_SECONDS:-480}
run_settings="train.log_every=100 train.eval_every=1000 train.checkpoint_every=3000"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cache=$(english_cache)
case "$1" in
  run)
    timeout -s TERM "$seconds" python3 -m relu_sparsity.cli train --config paper8k --cache "$cache" \
      --run-dir /tmp/runs/p8 --instrument fused --no-report --no-progress \
      train.steps=9000 $run_settings 2>&1 | grep -vE "^\s*$" | tail -25
    echo "exit ${PIPESTATUS[0]}"
    python3 -m relu_sparsity.cli report /tmp/runs/p8 | tail -30
    folder=p8 ;;
  sweep)
    timeout -s TERM "$seconds" python3 -m relu_sparsity.cli experiment sweep --config paper8k \
      --cache "$cache" --out /tmp/runs/lr --instrument fused --no-progress \
      train.steps=3000 train.warmup_steps=1000 $run_settings --lr 1e-3 2e-3 3e-3 5e-3 \
      2>&1 | grep -vE "^\s*$" | tail -40
    echo "exit ${PIPESTATUS[0]}"
    folder=lr ;;
  *) echo "usage: device_science.sh run|sweep" >&2; exit 2 ;;
esac
tar czf "$OUT/$folder.tgz" -C /tmp/runs --exclude=checkpoints "$folder"
