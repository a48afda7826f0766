#!/usr/bin/env bash
# On the lent H200 (device tool): kernel tests on the GPU, the kernel benchmark, and the `small`
# config with --instrument xla. Writes logs and a tarball of the run folder (no checkpoints) to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/relu-sparsity-cache
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
git rev-parse HEAD 2>/dev/null || true
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_reference.py tests/test_model.py 2>&1 | tail -3
python3 -m relu_sparsity.cli bench --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
run=/tmp/runs/small
python3 -m relu_sparsity.cli train --config small --run-dir "$run" --instrument xla --no-progress "$@" \
  2>&1 | tee "$OUT/train.log" | grep -vE "^\s*$" | tail -60
tar czf "$OUT/small_run.tgz" -C /tmp/runs --exclude=checkpoints small
cp "$run/tables.md" "$run/metrics.jsonl" "$OUT/" 2>/dev/null
python3 - "$run/metrics.jsonl" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_s"] for r in recs[1:]]
print("logged", len(recs), "last step", recs[-1]["step"], "median tokens/s", statistics.median(tps))
PY
