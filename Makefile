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
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m bench.decode

# The pipeline that produced the shipped embedded default (about 4 hours on 2 CPU cores; docs/embedded-default.md).
embedded-default: install
	PY=$(PY) bash scripts/embedded_default.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
