#!/usr/bin/env bash
# The pipeline that produced the shipped embedded default (video_llava/assets/embedded): synthetic data -> SFT in
# stages -> AI-feedback preferences -> DPO -> a short caption stage, with an evaluation after each stage in $RUNS/eval-*.json. About 4 hours on
# 2 CPU cores. Stage names are those of docs/embedded-default.md; every stage starts from the one before, the first
# from `embedded-init` (the deterministic untrained build). The vision tower stays frozen throughout (training the
# tiny random tower erases shape information: python -m bench.probe_features). Jobs resume, so a rerun after a kill
# continues where it stopped.
#
#     make embedded-default            # or: bash scripts/embedded_default.sh  (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
RUNS=${RUNS:-runs/embedded}
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
FRAME_SIZES=112x112,150x112,200x112,112x150,224x224,320x240,426x240,240x320,480x360,640x360

job() { "$PY" -m "jobs.$1" "${@:2}"; }
sft() {  # sft NAME FROM DATA [flags]: 4-frame batches of 16 unless the flags say otherwise
  job sft --data "$3" --output "$RUNS" --name "$1" --model "$2" --frames 4 --batch-size 16 "${@:4}"
}
evaluate() {  # evaluate NAME DATA FRAMES [NEW_TOKENS]: greedy answers on DATA's test split (8 tokens: one-word answers)
  job eval --data "$2" --frames "$3" --max-new-tokens "${4:-8}" --model "$RUNS/$1/model" \
    --json-out "$RUNS/eval-$1-$(basename "$2")-$3.json"
}

# ---- data: fixed clips (112x112), varied clips, four-second clips, and varied clips at real frame sizes ----------
job make_synthetic --output "$DATA" --train 2000 --val 200 --test 200 --seed 0 --follow-ups
job make_synthetic --output "$DATA-more" --train 6000 --val 0 --test 0 --seed 1 --follow-ups
job make_synthetic --output "$DATA-varied" --train 6000 --val 0 --test 200 --seed 2 --follow-ups --varied
job make_synthetic --output "$DATA-varied2" --train 6000 --val 0 --test 0 --seed 3 --follow-ups --varied
job make_synthetic --output "$DATA-varied3" --train 6000 --val 0 --test 0 --seed 4 --follow-ups --varied
job make_synthetic --output "$DATA-varied-long" --train 3000 --val 0 --test 200 --seed 5 --frames 32 --fps 8 \
  --follow-ups --varied
job make_synthetic --output "$DATA-sizes" --train 4000 --val 0 --test 200 --seed 6 --frames 32 --fps 8 \
  --follow-ups --varied --frame-sizes "$FRAME_SIZES"
job make_synthetic --output "$DATA-captions" --train 3000 --val 0 --test 200 --seed 9 --frames 32 --fps 8 \
  --follow-ups --varied --frame-sizes "$FRAME_SIZES" --caption-first 0.3
job eval --data "$DATA" --frames 4 --max-new-tokens 8 --model embedded-init --json-out "$RUNS/eval-init-synthetic-4.json"

# ---- SFT 1: 4-frame clips, lr 2e-3 held, then decayed -----------------------------------------------------------
sft sft-1 embedded-init "$DATA" --lr 2e-3 --max-steps 1600 --decay-from 800 --checkpoint-every 200
evaluate sft-1 "$DATA" 4
# ---- SFT 2a-2c: lr 5e-4, where shape and then binding are learned; 2c on 6000 fresh clips (the 2000 are memorised)
sft sft-2a "$RUNS/sft-1/model" "$DATA" --lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 200
evaluate sft-2a "$DATA" 4
sft sft-2b "$RUNS/sft-2a/model" "$DATA" --lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
evaluate sft-2b "$DATA" 4
sft sft-2c "$RUNS/sft-2b/model" "$DATA-more" --lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
evaluate sft-2c "$DATA" 4
# ---- SFT 2d, 2e: the same on varied clips, so the binding also holds on clips unlike the first ones ---------------
sft sft-2d "$RUNS/sft-2c/model" "$DATA-varied" --lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
evaluate sft-2d "$DATA-varied" 4
sft sft-2e "$RUNS/sft-2d/model" "$DATA-varied2" --lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
evaluate sft-2e "$DATA-varied" 4
evaluate sft-2e "$DATA" 4
# ---- SFT 3, 3b, 3c: 4-32 frames per step, so it also answers at the frame counts serving samples; 3b on four-second
# clips (fast shapes wrap round the frame as in the bundled clip); 3c on clips of every frame size up to 640x360 ----
sft sft-3 "$RUNS/sft-2e/model" "$DATA-varied3" --frame-counts 4,8,16,32 --lr 5e-4 --max-steps 500 --decay-from 0 \
  --checkpoint-every 100
evaluate sft-3 "$DATA-varied" 4
sft sft-3b "$RUNS/sft-3/model" "$DATA-varied-long" --frame-counts 4,8,16,32 --lr 5e-4 --max-steps 400 --decay-from 0 \
  --checkpoint-every 100
evaluate sft-3b "$DATA-varied" 4
sft sft-3c "$RUNS/sft-3b/model" "$DATA-sizes" --frame-counts 4,8,16,32 --lr 5e-4 --max-steps 1200 --decay-from 600 \
  --checkpoint-every 200
evaluate sft-3c "$DATA-varied" 4
evaluate sft-3c "$DATA-sizes" 32

# ---- preferences from SFT 3c (1000 questions x 4 samples, caption judge), then DPO --------------------------------
job make_preferences --data "$DATA-sizes" --model "$RUNS/sft-3c/model" --output "$RUNS/prefs" --overwrite \
  --frames 4 --max-new-tokens 8 --samples 4 --limit 1000
job dpo --preferences "$RUNS/prefs" --model "$RUNS/sft-3c/model" --output "$RUNS" --name dpo \
  --frames 4 --beta 0.1 --lr 2e-5 --epochs 3 --batch-size 8
for data in "$DATA" "$DATA-varied" "$DATA-varied-long" "$DATA-sizes"; do
  for frames in 4 32; do evaluate dpo "$data" "$frames"; done
done
job eval --data "$DATA-sizes" --frames 32 --max-new-tokens 8 --binding --model "$RUNS/dpo/model" \
  --json-out "$RUNS/binding-dpo-synthetic-sizes-32.json"

# ---- SFT 4: the caption as a first answer. Every earlier record asks for it only as the last turn, after one-word
# answers, so asked first the model said "The video shows one" and stopped; 30% of these records ask only for it ------
sft sft-4 "$RUNS/dpo/model" "$DATA-captions" --frame-counts 4,8,16,32 --lr 2e-4 --max-steps 400 --decay-from 200 \
  --checkpoint-every 100
evaluate sft-4 "$DATA-sizes" 32
evaluate sft-4 "$DATA-captions" 32 64  # captions need the room
job eval --data "$DATA-sizes" --frames 32 --max-new-tokens 8 --binding --model "$RUNS/sft-4/model" \
  --json-out "$RUNS/binding-sft-4-synthetic-sizes-32.json"

rm -rf video_llava/assets/embedded && cp -r "$RUNS/sft-4/model" video_llava/assets/embedded
