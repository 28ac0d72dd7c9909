#!/usr/bin/env bash
# The video token budget's accuracy (docs/embedded-default.md, "Fewer video tokens"): the shipped default answers a
# fresh held-out synthetic split (seed 23, never trained or tested on) with 0, 25, 50 and 75% of each video's tokens
# pruned (model.pruning), every rate on the same questions; accuracy per question type with Wilson's 95% interval,
# and each rate paired against rate 0 (bootstrap interval of the difference, McNemar's exact test).
# About 10 minutes on 2 CPU cores.
#
#     bash scripts/pruning_experiment.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/pruning-experiment}
RUNS=${RUNS:-runs/pruning-experiment}
FRAMES=${FRAMES:-16}
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
mkdir -p "$RUNS"
[ -f "$DATA/meta.json" ] || "$PY" -m jobs.make_synthetic --output "$DATA" --train 0 --val 0 --test 400 --seed 23 \
  --frames 32 --fps 8
for rate in 0 0.25 0.5 0.75; do
  baseline=()
  [ "$rate" != 0 ] && baseline=(--baseline "$RUNS/rate-0.json")
  [ -f "$RUNS/rate-$rate.json" ] || "$PY" -m jobs.eval --data "$DATA" --split test --frames "$FRAMES" \
    --video-pruning-rate "$rate" --json-out "$RUNS/rate-$rate.json" "${baseline[@]}" | tail -1 > "$RUNS/rate-$rate.figures.json"
done
"$PY" - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print(f"{'rate':>5} {'type':<10} {'n':>4} {'accuracy':>9} {'95% interval':>14} {'vs rate 0':>22} {'McNemar p':>10}")
for rate in ("0", "0.25", "0.5", "0.75"):
    result = json.loads((runs / f"rate-{rate}.json").read_text())
    paired = result.get("paired", {})
    for name in ("all", "color", "shape", "count", "direction"):
        f = result.get(name)
        if not f:
            continue
        low, high = f["accuracy_interval"]
        diff = paired.get("accuracy_difference") if name == "all" else None
        vs = f"{diff['value']:+.3f} ({diff['low']:+.3f}, {diff['high']:+.3f})" if diff else "-"
        p = f"{paired['mcnemar']['p_value']:.3f}" if diff else "-"
        print(f"{rate:>5} {name:<10} {f['n']:>4} {f['accuracy']:>9.3f} {low:>6.3f}-{high:<7.3f} {vs:>22} {p:>10}")
PY
