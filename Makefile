# Set-up is part of every target: a fresh machine needs only python3.11 and make.
# run and test install from requirements/lock.txt, the exact set the suite passed on (make lock regenerates it).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP_PIN := pip==26.3
EXTRAS  := test offline bench quant eval serve
LOCK    := requirements/lock.txt
MODELS  := requirements/models.txt
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile $(LOCK) $(MODELS) | cksum | cut -d' ' -f1)
LLAMA   := $(STAMP)-llama-cpp
# llama-cpp-python comes as source only: built with just what its binding needs (no tools, examples, server
# binaries or multimodal parts), on every core; pip keeps the wheel in its cache, so it is built once a machine.
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
               -DLLAMA_BUILD_SERVER=OFF

comma := ,
empty :=
space := $(empty) $(empty)
SPEC  := .[$(subst $(space),$(comma),$(EXTRAS))]

.PHONY: run test test-kernels lock test-latest clean

$(STAMP): pyproject.toml Makefile $(LOCK) $(MODELS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_PIN)
	grep -v '^llama-cpp-python==' $(LOCK) > $(VENV)/lock-without-llama-cpp.txt  # make run needs no C++ build
	$(PY) -m pip install -q -r $(VENV)/lock-without-llama-cpp.txt  # torch 2.13.0: this machine's CPU build; GPUs: install your CUDA torch 2.13.0 first
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps -r $(MODELS)  # the two offline models
	rm -f $(VENV)/.installed-*
	touch $@

# the tests check GGUF exports with llama.cpp itself (its dependencies are in the lock, installed above)
$(LLAMA): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip install -q --no-deps $$(grep '^llama-cpp-python==' $(LOCK))
	touch $@

# The main job: fine-tune MiniLM (offline, from its wheel) on the VADER lexicon (offline, from its wheel).
run: $(STAMP)
	$(VENV)/bin/qkvtune train configs/default.yaml

test: $(LLAMA)
	$(PY) -m pytest

# The suite under PyTorch's other CPU kernels: its portable ones, and AVX2's (what an AVX2-only CPU such as an AMD
# EPYC without AVX-512 runs). Floats computed along two paths differ in their last bits from one kernel set to the
# next, so a test that compares them tighter than its stated tolerance fails on one of these. Not in CI (twice the
# suite's time); run it after changing a test that compares floats.
test-kernels: $(LLAMA)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest

# The lock: what pip resolves today inside pyproject.toml's ranges (pip-tools, pip's own resolver, so the lock is
# the set `make test-latest` tests on the day it is made), torch held at requirements/lock.in's CPU build (found
# through pip's find-links on this machine; a lock that pulled CUDA packages is refused).
LOCKER := .venv-lock/bin/pip-compile
$(LOCKER):
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP_PIN) pip-tools==7.7.0

lock: $(LOCKER)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCKER) -q --upgrade --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	    $(addprefix --extra=,$(EXTRAS)) -o $(LOCK) pyproject.toml requirements/lock.in
	sed -i -e 's/^torch==\([^+]*\)+cpu$$/torch==\1/' $(LOCK)
	@! grep -qE '^(nvidia-|triton==)' $(LOCK) || { echo "lock: torch resolved to a CUDA build; point pip's find-links at the CPU wheel"; exit 2; }

# The suite against the newest releases inside pyproject.toml's ranges (a separate venv; torch held as in the lock).
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(PIP_PIN)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    .venv-latest/bin/python -m pip install -q -c requirements/lock.in -e '$(SPEC)'
	.venv-latest/bin/python -m pip install -q --no-deps -r $(MODELS)
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|accelerate|datasets|bitsandbytes|lm.eval|safetensors)=='
	.venv-latest/bin/python -m pytest

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs
