#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl", ".corpus"]): the science runs of bench/RESULTS.md
# on the English corpus of bench/build_english_corpus.py. Each stage resumes where a previous call
# stopped (the machine keeps /tmp while it stays warm), so a stage longer than one call is run again.
#   bash bench/device_science.sh run      the paper8k run: 9000 steps, 5000 warm-up to 3e-3, the
#                                         cosine ending at step 9000 (about 4 minutes)
#   bash bench/device_science.sh sweep    the LR sweep: 1e-3 2e-3 3e-3 5e-3, 3000 steps, 1000 warm-up
#   bash bench/device_science.sh width    d_ff 4096 8192 16384 32768 (the paper's Figure 3 axis),
#                                         9000 steps each on the paper's schedule: 5000 warm-up to
#                                         3e-3 of a 1M-step cosine (train.decay_steps), so the LR
#                                         stays at its peak after the warm-up (about 19 minutes)
#   bash bench/device_science.sh long     paper8k on the paper's schedule for LONG_STEPS (default
#                                         45000) steps (about 22 minutes)
#   bash bench/device_science.sh tables   report --paper of each factor, written to $OUT/<factor>:
#                                         width (the four width points), schedule (run against the
#                                         width stage's d_ff 8192 point: the same 9000 steps, the
#                                         cosine ending there or the paper's), length (long against
#                                         that point: the same schedule, 9000 steps or LONG_STEPS)
# Each training stage stops itself (SIGTERM, checkpointed) after STAGE_SECONDS (default 480) and
# copies its run folders without checkpoints to $OUT.
# A dry run on a CPU (each stage stopped after 30 s, then resumed by running it again):
#   CACHE=<a token cache> CONFIG=tiny INSTRUMENT=xla WIDTHS="256 1024" STAGE_SECONDS=30 \
#   LONG_STEPS=200 POINT=256 OUT=/tmp/out bash bench/device_science.sh width  (then run, long, tables)
set -uo pipefail
[ -d .whl ] && source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
seconds=${STAGE_SECONDS:-480}
run_settings="train.log_every=100 train.eval_every=1000 train.checkpoint_every=1000"
# SEED=1 (any but 0): a second seed of each stage, under /tmp/runs-seed1 and with files named so.
tag=""
if [ "${SEED:-0}" != 0 ]; then tag=-seed$SEED; run_settings="$run_settings train.seed=$SEED"; fi
runs=/tmp/runs$tag
paper_schedule="train.decay_steps=1000000"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
git rev-parse HEAD 2>/dev/null || true
cache=${CACHE:-$(english_cache)}
CONFIG=${CONFIG:-paper8k}
instrument=${INSTRUMENT:-fused}
train() {  # train RUN_DIR [overrides]: one run, stopped after $seconds, then its report
  local run=$1; shift
  timeout -s TERM "$seconds" $PY -m relu_sparsity.cli train --config "$CONFIG" --cache "$cache" \
    --run-dir "$run" --instrument "$instrument" --no-report --no-progress $run_settings "$@" 2>&1 \
    | grep -vE "^\s*$" | tail -25
  echo "exit ${PIPESTATUS[0]}"
  $PY -m relu_sparsity.cli report "$run" | tail -30
}
case "${1:-}" in
  run)
    train $runs/p8 train.steps=9000 name=cosine-9k
    folder=p8 ;;
  sweep)
    timeout -s TERM "$seconds" $PY -m relu_sparsity.cli experiment sweep --config "$CONFIG" \
      --cache "$cache" --out $runs/lr --instrument "$instrument" --no-progress \
      train.steps=3000 train.warmup_steps=1000 $run_settings --lr 1e-3 2e-3 3e-3 5e-3 \
      2>&1 | grep -vE "^\s*$" | tail -40
    echo "exit ${PIPESTATUS[0]}"
    folder=lr ;;
  width)
    timeout -s TERM "$seconds" $PY -m relu_sparsity.cli experiment sweep --config "$CONFIG" \
      --cache "$cache" --out $runs/width --instrument "$instrument" --no-progress \
      train.steps=9000 $paper_schedule $run_settings --d-ff ${WIDTHS:-4096 8192 16384 32768} \
      2>&1 | grep -vE "^\s*$" | tail -40
    echo "exit ${PIPESTATUS[0]}"
    folder=width ;;
  long)
    train $runs/long train.steps="${LONG_STEPS:-45000}" $paper_schedule name=long \
      train.checkpoint_every=2000
    folder=long ;;
  tables)
    point=$(ls -d "$runs/width/dff=${POINT:-8192}" 2>/dev/null)
    factor() {  # factor NAME RUN...: report --paper of these runs into $OUT/NAME
      local name=$1; shift
      $PY -m relu_sparsity.cli report "$@" --out "$OUT/$name$tag" --paper >/dev/null \
        && awk '/^## Against the paper/,/^### /' "$OUT/$name$tag/tables.md" | grep "^|" \
        | sed "1i ## $name"
    }
    factor width $runs/width/dff=*
    [ -n "$point" ] && [ -d $runs/p8 ] && factor schedule $runs/p8 "$point"
    [ -n "$point" ] && [ -d $runs/long ] && factor length "$point" $runs/long
    exit 0 ;;
  *) echo "usage: device_science.sh run|sweep|width|long|tables" >&2; exit 2 ;;
esac
tar czf "$OUT/$folder$tag.tgz" -C "$runs" --exclude=checkpoints "$folder"
