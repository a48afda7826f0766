#!/usr/bin/env bash
# Training on 2 GPUs of one host against 1 (a machine of kind nvidia-h200-x2; device tool, carry
# [".whl", ".corpus"]): the `paper` model, per-device batches of 16 x 512 as the paper.
#   bash bench/multi_gpu.sh speed      data parallel on 1 and 2 GPUs, fused and off: tokens/s
#   bash bench/multi_gpu.sh stats      2 GPUs against 1 GPU holding the same global batch,
#                                      width-sharded (model axis 2) against 1 GPU, 2 processes
#                                      (one GPU each, jax.distributed) against 1 process with 2
#   bash bench/multi_gpu.sh compare    the tables (bench/compare_runs.py), printed last
# With DRY_RUN=1 the same stages run on the CPU, two simulated devices standing for the GPUs,
# with the `tiny` model: a check of the script, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-/tmp/multi_gpu}
STEPS=${STEPS:-150}
mkdir -p "$ROOT"
if [ "${DRY_RUN:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  config=(--config tiny "model.num_layers=2" "model.d_model=64" "model.d_ff=256"
          "model.seq_len=64" "data.vocab_size=512" "train.steps=$STEPS" "train.log_every=2"
          "train.eval_every=1000" "train.checkpoint_every=1000" "train.prune_multiple=64")
  batch=4
  fused=(--instrument fused --kernel pallas_tpu)  # the CPU interprets the TPU kernel
  devices_env() { echo "XLA_FLAGS=--xla_force_host_platform_device_count=$1"; }
else
  source bench/device_env.sh
  export RELU_SPARSITY_CACHE=/tmp/c
  cache=$(english_cache)
  config=(--config paper --cache "$cache" "train.steps=$STEPS" "train.log_every=10"
          "train.eval_every=100000" "train.checkpoint_every=100000")
  batch=16
  fused=(--instrument fused)
  devices_env() { [ "$1" = 1 ] && echo CUDA_VISIBLE_DEVICES=0 || echo CUDA_VISIBLE_DEVICES=0,1; }
fi
export PYTHONUNBUFFERED=1

# train NAME DEVICES [ARGS...]: one process seeing DEVICES devices.
train() {
  local name=$1 devices=$2; shift 2
  rm -rf "${ROOT:?}/$name"
  env $(devices_env "$devices") python3 -m relu_sparsity.cli train --run-dir "$ROOT/$name" \
    --no-report --no-progress "${config[@]}" "$@" 2>&1 | grep -E "error|Error|compiled" | tail -2
  echo "$name: exit ${PIPESTATUS[0]}"
}

# train_two_processes NAME [ARGS...]: two processes of one device each, through jax.distributed.
train_two_processes() {
  local name=$1 port=$((20000 + RANDOM % 20000)); shift
  rm -rf "${ROOT:?}/$name"
  for id in 0 1; do
    local visible; visible=$( [ "${DRY_RUN:-0}" = 1 ] && devices_env 1 || echo CUDA_VISIBLE_DEVICES=$id)
    env $visible python3 -m relu_sparsity.cli train --run-dir "$ROOT/$name" --no-report \
      --no-progress "${config[@]}" --coordinator-address "localhost:$port" --num-processes 2 \
      --process-id $id "$@" > "$ROOT/$name.$id.log" 2>&1 &
  done
  wait
  echo "$name: $(grep -hE "error|Error" "$ROOT/$name".*.log | head -2) done"
}

case "${1:-}" in
  speed)
    train dp1_fused 1 "${fused[@]}" "train.batch_size=$batch"
    train dp2_fused 2 "${fused[@]}" "train.batch_size=$batch"
    train dp1_off 1 --instrument off "train.batch_size=$batch"
    train dp2_off 2 --instrument off "train.batch_size=$batch" ;;
  stats)
    prune=("train.prune=compact" "train.prune_at=$((STEPS / 2))")
    train one_global 1 "${fused[@]}" "train.batch_size=$((2 * batch))" "${prune[@]}"
    train dp2_pruned 2 "${fused[@]}" "train.batch_size=$batch" "${prune[@]}"
    train one_device 1 "${fused[@]}" "train.batch_size=$batch"
    train model2 2 "${fused[@]}" "train.batch_size=$batch" "train.model_parallel=2"
    train_two_processes proc2 "${fused[@]}" "train.batch_size=$batch" ;;
  compare)
    c() { echo; echo "## $1"; python3 bench/compare_runs.py "${@:2}" | tail -12; }
    c "speed, fused: 2 devices (B) against 1 (A; half the global batch, so only tokens/s compare)" "$ROOT/dp1_fused" "$ROOT/dp2_fused"
    c "speed, off: 2 devices (B) against 1 (A; only tokens/s compare)" "$ROOT/dp1_off" "$ROOT/dp2_off"
    c "speed on 2 devices: fused (B) against off (A)" "$ROOT/dp2_off" "$ROOT/dp2_fused"
    c "one global batch: 2 devices (B) against 1 device holding it (A), compacted halfway" \
      "$ROOT/one_global" "$ROOT/dp2_pruned"
    c "width-sharded over 2 devices (B) against 1 device (A)" "$ROOT/one_device" "$ROOT/model2" \
      --same-device-batches
    c "2 processes of 1 device (B) against 1 process of 2 (A)" "$ROOT/dp2_fused" "$ROOT/proc2" \
      --same-device-batches ;;
  *) echo "usage: bench/multi_gpu.sh speed|stats|compare (DRY_RUN=1: on the CPU)" >&2; exit 2 ;;
esac
