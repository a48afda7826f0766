#!/usr/bin/env bash
# On the lent H200 (device tool, carry [".whl", ".corpus", ".ab_old"]): the `paper` train step
# through the training loop of this tree against the loop of an older tree in .ab_old/
# (`git archive <commit> relu_sparsity | tar -x -C .ab_old`), interleaved, one process, fused
# statistics: tokens/s and every logged per-layer metric compared. Prints a table last.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1 RELU_SPARSITY_CACHE=/tmp/c
steps=${STEPS:-150}
cache=$(english_cache)
site=${PYTHONPATH%%:*}
for round in 1 2; do
  for tree in old new; do
    root=$PWD; [ "$tree" = old ] && root=$PWD/.ab_old
    rm -rf "/tmp/ab/$tree$round"
    PYTHONPATH=$site:$root python3 -m relu_sparsity.cli train --config paper --cache "$cache" \
      --run-dir "/tmp/ab/$tree$round" --instrument fused --no-report --no-progress \
      train.steps=$steps train.log_every=10 train.eval_every=100000 \
      train.checkpoint_every=100000 2>&1 | grep -E "compiled|error|Error" | tail -2
  done
done
python3 - <<'PY'
import json, statistics
def load(name):
    return [json.loads(l) for l in open(f"/tmp/ab/{name}/metrics.jsonl")]
def differences(a, b):
    """(largest per-layer metric difference, largest loss difference) of two runs."""
    metric = max(abs(x[k] - y[k]) for ra, rb in zip(a, b) for x, y in
                 zip(ra["layers"], rb["layers"]) for k in x if isinstance(x[k], float))
    return metric, max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
rows = []
for r in (1, 2):
    old, new = load(f"old{r}"), load(f"new{r}")
    tps = [statistics.median(x["tokens_per_s"] for x in recs[2:]) for recs in (old, new)]
    same0 = old[0]["layers"] == new[0]["layers"]
    rows.append((r, tps[0], tps[1], tps[1] / tps[0], same0, *differences(old, new)))
print("round | old tokens/s | new tokens/s | new/old | step-0 metrics equal | max metric diff | max loss diff")
for row in rows:
    print("%d | %.0f | %.0f | %.4f | %s | %.2e | %.2e" % row)
# The GPU's own run-to-run spread, the scale the differences above are judged by.
for tree in ("old", "new"):
    print("%s round 1 vs round 2: max metric diff %.2e, max loss diff %.2e"
          % (tree, *differences(load(f"{tree}1"), load(f"{tree}2"))))
PY
