#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl", ".devcache"]): the train step against the plain
# Flax/optax model of the same shape, each stage one device call of under ten minutes, checks
# first, tables last. Files for bench/RESULTS.md are written to $OUT.
#   bash bench/device_step.sh step      GPU checks (fused gradients, cuDNN attention), one MLP
#                                       layer's forward + backward against nn.Dense, and the
#                                       `paper` step (off, fused) against the baseline, with
#                                       cuDNN attention and with XLA's
#   bash bench/device_step.sh profile   the `paper` step profiled (fused and off): device time by
#                                       model part and phase; `paper8k` and `small` against their
#                                       baselines
#   bash bench/device_step.sh parts     the `paper` step (off, fused; full and mask) and the
#                                       baseline, each profiled: device time by model part
#   bash bench/device_step.sh prune     the `paper` step after pruning to 70% (compact, mask)
#   bash bench/device_step.sh mask      mask against compact: the live units' gradient as a
#                                       gather against XLA's scatter-add (bench/ab_live_gradient.py),
#                                       one MLP layer (70% live), then the `paper` step
# .devcache/stdlib32k is a token cache with a 32k vocabulary (here: `relu-sparsity prepare --out
# .devcache/stdlib32k --vocab-size 32768 --max-tokens 1500000 --tokenizer-sample-mb 4`); the
# profiled runs need real batches, the benchmarks random ones.
# A dry run on a CPU: CONFIG=tiny MLP="--tokens 256 --d-model 64 --d-ff 512 --seq-len 64
# --kernel pallas_tpu" OUT=/tmp/out bash bench/device_step.sh step
set -uo pipefail
[ -d .whl ] && source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
OUT=${OUT:-/tmp/out}
CONFIG=${CONFIG:-paper}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
git rev-parse HEAD 2>/dev/null || true
steps() {  # steps NAME CONFIG [bench options]: one bench --train-step table, kept as JSON
  local name=$1 config=$2; shift 2
  $PY -m relu_sparsity.cli bench --train-step "$config" --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -E "^\|" | tee "$OUT/$name.md"
}
case "${1:-}" in
  step)
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_gpu.py \
      tests/test_mosaic_gpu_device.py -k "attention or gradients" 2>&1 | tail -3
    $PY bench/mlp_backward.py ${MLP:-} 2>&1 | grep -E "^check|^\||^MLP" | tee "$OUT/mlp.md"
    steps step_xla_attention "$CONFIG" --instruments off fused --set model.attention=xla
    steps step "$CONFIG" --instruments off fused --baseline flax ;;
  profile)
    for mode in fused off; do
      run=/tmp/runs/profile-$mode
      $PY -m relu_sparsity.cli train --config "$CONFIG" --cache .devcache/stdlib32k \
        --run-dir "$run" --instrument $mode --no-report --no-progress --start-over \
        --profile-steps 20:25 train.steps=30 train.log_every=5 train.eval_every=1000 \
        train.eval_batches=1 train.checkpoint_every=1000 2>&1 | grep -vE "^\s*$" | tail -3
      $PY -m relu_sparsity.cli profile "$run" --top 20 | tee "$OUT/profile-$mode.md"
      cp "$run/profile/summary.json" "$OUT/profile-$mode.json"
    done
    steps step_paper8k paper8k --instruments off fused --baseline flax
    steps step_small small --instruments off fused --baseline flax ;;
  parts)
    steps parts "$CONFIG" --instruments off fused --prune none mask --baseline flax \
      --profile /tmp/parts
    for variant in /tmp/parts/*; do
      echo "## $(basename "$variant")"
      $PY -m relu_sparsity.cli profile "$variant" --top 12
    done > "$OUT/parts_profiles.md" 2>&1
    awk '/^top / {skip=1} /^## / {skip=0} !skip && /^## |^device|^\| [A-Za-z]/' \
      "$OUT/parts_profiles.md" ;;
  prune)
    steps step_prune "$CONFIG" --instruments off fused --prune none compact mask --baseline flax ;;
  mask)
    $PY -m pytest -q -p no:cacheprovider tests/test_live.py 2>&1 | tail -1
    $PY bench/ab_live_gradient.py 2>&1 | grep -E "^check|^\||^wi" | tee "$OUT/ab_live.md"
    $PY bench/mlp_backward.py --modes off fused --live-fraction 0.7 --repeats 5 ${MLP:-} 2>&1 \
      | grep -E "^check|^\||^MLP" | tee "$OUT/mlp_mask.md"
    steps step_mask "$CONFIG" --instruments off fused --prune compact mask ;;
  *) echo "usage: device_step.sh step|profile|parts|prune|mask" >&2; exit 2 ;;
esac
