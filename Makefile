# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch first, pinned: 2.14.1 + torchvision 0.29.1 is the pair with a working torchvision on our machines
# (transformers' LLaVA-NeXT-Video video processor needs torchvision).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
QUESTION ?= What color is the circle?

.PHONY: install demo test test-fast bench embedded-default clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(PY) -m video_llava.demo --question "$(QUESTION)"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/decode.py

# The pipeline that produced the shipped embedded default (video_llava/assets/embedded): synthetic data ->
# SFT in stages -> AI-feedback preferences -> DPO, with evaluations in $(RUNS)/eval-*.json. About 4 hours on
# 2 CPU cores. Everything starts from `embedded-init`, the deterministic untrained build. The vision tower stays
# frozen (training the tiny random tower erases shape information: bench/probe_features.py).
DATA ?= data/synthetic
MORE ?= data/synthetic-more
VARIED ?= data/synthetic-varied
VARIED2 ?= data/synthetic-varied2
VARIED3 ?= data/synthetic-varied3
LONG ?= data/synthetic-varied-long
SIZES ?= data/synthetic-sizes
RUNS ?= runs/embedded
JOB  := HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(PY) -m
EVAL := --data $(DATA) --frames 4 --max-new-tokens 8
EVALV := --data $(VARIED) --frames 4 --max-new-tokens 8
SFT4 := --frames 4 --batch-size 16
FRAME_SIZES := 112x112,150x112,200x112,112x150,224x224,320x240,426x240,240x320,480x360,640x360
embedded-default: install
	$(JOB) jobs.make_synthetic --output $(DATA) --train 2000 --val 200 --test 200 --seed 0 --follow-ups
	$(JOB) jobs.eval $(EVAL) --model embedded-init --json-out $(RUNS)/eval-init.json
	# SFT 1: 4-frame clips, lr 2e-3 held then decayed
	$(JOB) jobs.sft --data $(DATA) --output $(RUNS) --name sft --model embedded-init $(SFT4) \
		--lr 2e-3 --max-steps 1600 --decay-from 800 --checkpoint-every 200
	$(JOB) jobs.eval $(EVAL) --model $(RUNS)/sft/model --json-out $(RUNS)/eval-sft.json
	# SFT 2: lr 5e-4, where shape and then binding are learned; three runs of 1600 steps (held, decayed from 1000),
	# the last on 6000 fresh clips (seed 1) because the 2000 are memorised by then
	$(JOB) jobs.sft --data $(DATA) --output $(RUNS) --name sft-2a --model $(RUNS)/sft/model $(SFT4) \
		--lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 200
	$(JOB) jobs.eval $(EVAL) --model $(RUNS)/sft-2a/model --json-out $(RUNS)/eval-sft-2a.json
	$(JOB) jobs.sft --data $(DATA) --output $(RUNS) --name sft-2b --model $(RUNS)/sft-2a/model $(SFT4) \
		--lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
	$(JOB) jobs.eval $(EVAL) --model $(RUNS)/sft-2b/model --json-out $(RUNS)/eval-sft-2b.json
	$(JOB) jobs.make_synthetic --output $(MORE) --train 6000 --val 0 --test 0 --seed 1 --follow-ups
	$(JOB) jobs.sft --data $(MORE) --output $(RUNS) --name sft-2c --model $(RUNS)/sft-2b/model $(SFT4) \
		--lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
	$(JOB) jobs.eval $(EVAL) --model $(RUNS)/sft-2c/model --json-out $(RUNS)/eval-sft-2c.json
	# SFT 2d, 2e and 3 on clips from a wider distribution (--varied: any start, shape sizes, speeds, frame aspect
	# ratios), 6000 fresh clips each, so the binding also holds on clips unlike the first ones (such as the bundled one)
	$(JOB) jobs.make_synthetic --output $(VARIED) --train 6000 --val 0 --test 200 --seed 2 --follow-ups --varied
	$(JOB) jobs.make_synthetic --output $(VARIED2) --train 6000 --val 0 --test 0 --seed 3 --follow-ups --varied
	$(JOB) jobs.make_synthetic --output $(VARIED3) --train 6000 --val 0 --test 0 --seed 4 --follow-ups --varied
	$(JOB) jobs.make_synthetic --output $(LONG) --train 3000 --val 0 --test 200 --seed 5 --frames 32 --fps 8 \
		--follow-ups --varied
	$(JOB) jobs.make_synthetic --output $(SIZES) --train 4000 --val 0 --test 200 --seed 6 --frames 32 --fps 8 \
		--follow-ups --varied --frame-sizes $(FRAME_SIZES)
	$(JOB) jobs.sft --data $(VARIED) --output $(RUNS) --name sft-2d --model $(RUNS)/sft-2c/model $(SFT4) \
		--lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
	$(JOB) jobs.eval $(EVALV) --model $(RUNS)/sft-2d/model --json-out $(RUNS)/eval-sft-2d-varied.json
	$(JOB) jobs.sft --data $(VARIED2) --output $(RUNS) --name sft-2e --model $(RUNS)/sft-2d/model $(SFT4) \
		--lr 5e-4 --max-steps 1600 --decay-from 1000 --checkpoint-every 400
	$(JOB) jobs.eval $(EVALV) --model $(RUNS)/sft-2e/model --json-out $(RUNS)/eval-sft-2e-varied.json
	$(JOB) jobs.eval $(EVAL) --model $(RUNS)/sft-2e/model --json-out $(RUNS)/eval-sft-2e.json
	# SFT 3: 4-32 frames per clip, so it also answers at the frame counts serving samples; 3b: the same on 4-second
	# clips (32 frames at 8 fps), where fast shapes wrap round the frame twice as they do in the bundled clip
	$(JOB) jobs.sft --data $(VARIED3) --output $(RUNS) --name sft-frames --model $(RUNS)/sft-2e/model $(SFT4) \
		--frame-counts 4,8,16,32 --lr 5e-4 --max-steps 500 --decay-from 0 --checkpoint-every 100
	$(JOB) jobs.eval $(EVALV) --model $(RUNS)/sft-frames/model --json-out $(RUNS)/eval-sft-frames-varied.json
	$(JOB) jobs.sft --data $(LONG) --output $(RUNS) --name sft-long --model $(RUNS)/sft-frames/model $(SFT4) \
		--frame-counts 4,8,16,32 --lr 5e-4 --max-steps 400 --decay-from 0 --checkpoint-every 100
	$(JOB) jobs.eval $(EVALV) --model $(RUNS)/sft-long/model --json-out $(RUNS)/eval-sft-long-varied.json
	# SFT 3c: the same on clips of every frame size from 112x112 to 640x360 (the earlier clips are all 112-200 pixels
	# wide and look blurred once resized to 336; the bundled clip is 320x240)
	$(JOB) jobs.sft --data $(SIZES) --output $(RUNS) --name sft-sizes --model $(RUNS)/sft-long/model $(SFT4) \
		--frame-counts 4,8,16,32 --lr 5e-4 --max-steps 1200 --decay-from 600 --checkpoint-every 200
	$(JOB) jobs.eval $(EVALV) --model $(RUNS)/sft-sizes/model --json-out $(RUNS)/eval-sft-sizes-varied.json
	$(JOB) jobs.eval --data $(SIZES) --frames 32 --max-new-tokens 8 --model $(RUNS)/sft-sizes/model \
		--json-out $(RUNS)/eval-sft-sizes-32.json
	$(JOB) jobs.make_preferences --data $(SIZES) --model $(RUNS)/sft-sizes/model --output $(RUNS)/prefs --overwrite \
		--frames 4 --max-new-tokens 8 --samples 4 --limit 1000
	$(JOB) jobs.dpo --preferences $(RUNS)/prefs --model $(RUNS)/sft-sizes/model --output $(RUNS) --name dpo \
		--frames 4 --beta 0.1 --lr 2e-5 --epochs 3 --batch-size 8
	for data in $(DATA) $(VARIED) $(LONG) $(SIZES); do for frames in 4 32; do \
		$(JOB) jobs.eval --data $$data --frames $$frames --max-new-tokens 8 --model $(RUNS)/dpo/model \
			--json-out $(RUNS)/eval-dpo-$$(basename $$data)-$$frames.json || exit 1; done; done
	$(JOB) jobs.eval --data $(SIZES) --frames 32 --max-new-tokens 8 --binding --model $(RUNS)/dpo/model \
		--json-out $(RUNS)/binding-dpo-sizes-32.json
	rm -rf video_llava/assets/embedded && cp -r $(RUNS)/dpo/model video_llava/assets/embedded

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
