#!/usr/bin/env bash
# The video token budget's accuracy (docs/embedded-default.md, "Fewer video tokens"): the shipped default answers a
# fresh held-out synthetic split (seed 23, never trained or tested on) with 0, 25, 50 and 75% of each video's tokens
# pruned (model.pruning), every rate on the same questions; accuracy per question type with Wilson's 95% interval,
# and each rate paired against rate 0 (bootstrap interval of the difference, McNemar's exact test). Then two arms
# trained from the shipped default on fresh clips (seed 24), the same steps, rate and schedule: "pruned" with
# --video-prune-rates 0,0.25,0.5,0.75 and the control "whole" without; each answers the same test split at every rate,
# paired against the shipped default at that rate. About 40 minutes on 2 CPU cores; a rerun continues.
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
[ -f "$DATA-train/meta.json" ] || "$PY" -m jobs.make_synthetic --output "$DATA-train" --train 2000 --val 0 --test 0 \
  --seed 24 --frames 32 --fps 8
for arm in pruned whole; do
  rates=()
  [ "$arm" = pruned ] && rates=(--video-prune-rates 0,0.25,0.5,0.75)
  [ -f "$RUNS/$arm/model/config.json" ] || "$PY" -m jobs.sft --data "$DATA-train" --model embedded --output "$RUNS" \
    --name "$arm" --frames "$FRAMES" --batch-size 4 --lr 2e-4 --max-steps 300 --decay-from 150 --checkpoint-every 100 \
    "${rates[@]}"
  for rate in 0 0.25 0.5 0.75; do
    [ -f "$RUNS/$arm-rate-$rate.json" ] || "$PY" -m jobs.eval --data "$DATA" --split test --frames "$FRAMES" \
      --model "$RUNS/$arm/model" --video-pruning-rate "$rate" --json-out "$RUNS/$arm-rate-$rate.json" \
      --baseline "$RUNS/rate-$rate.json" | tail -1 > /dev/null
  done
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
print()
print(f"{'arm':<7} {'rate':>5} {'all':>6} {'count':>6} {'shape':>6} {'colour':>6}  vs the shipped default at that rate")
for arm in ("pruned", "whole"):
    for rate in ("0", "0.25", "0.5", "0.75"):
        path = runs / f"{arm}-rate-{rate}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        d = r["paired"]["accuracy_difference"]
        print(f"{arm:<7} {rate:>5} {r['all']['accuracy']:>6.3f} {r['count']['accuracy']:>6.3f} "
              f"{r['shape']['accuracy']:>6.3f} {r['color']['accuracy']:>6.3f}  {d['value']:+.3f} "
              f"({d['low']:+.3f}, {d['high']:+.3f}) McNemar p {r['paired']['mcnemar']['p_value']:.3f}")
PY
