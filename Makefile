# moekit: every target bootstraps .venv on first use. Offline: nothing here reaches the Hugging Face hub.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-full bench lint clean corpus-docs browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import moekit, transformers, hypothesis, pytest"
	touch $@

# Best effort: Debian's python3.11-doc gives the training corpus its English prose (without it moekit falls back to
# Python's own pydoc_data topics). Needs root and the Debian mirror; never fails the build.
corpus-docs:
	@test -d /usr/share/doc/python3.11/html/_sources || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 || \
		echo "note: python3.11-doc not installed; the corpus uses pydoc_data for prose"; }

# headless Chromium for the test that renders inspect's HTML report (skipped when absent); best effort
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(timeout 300 apt-get update -qq && timeout 400 apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		echo "note: chromium not installed; the report rendering test will be skipped"; }

demo: $(VENV)/.installed corpus-docs
	$(VENV)/bin/moekit tour

test: $(VENV)/.installed
	$(PY) -m pytest

test-full: $(VENV)/.installed
	MOEKIT_FULL=1 $(PY) -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/moekit bench layer --json

# Peers for `moekit bench decode` (never part of `make test`): llama-cpp-python built from its PyPI source
# distribution with the system compiler (about 10 minutes; CMAKE_BUILD_PARALLEL_LEVEL sets the jobs), unpacked under
# build/peers/, where bench decode also finds llama.cpp's convert_hf_to_gguf.py. Ends with a one-token-per-dtype smoke
# run of llama.cpp on moekit-tiny.
LLAMA_CPP_PYTHON ?= 0.3.36
PEERS := build/peers
.PHONY: bench-peers
bench-peers: $(VENV)/.installed
	mkdir -p $(PEERS)
	test -f $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py || { \
		$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(PEERS) && \
		tar -xzf $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(PEERS); }
	$(PY) -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_PYTHON)')" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} \
		$(PY) -m pip install $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
	$(VENV)/bin/moekit bench decode --quick --threads 1 --json > $(PEERS)/bench-decode-quick.json
	$(PY) -c "import json; r = json.load(open('$(PEERS)/bench-decode-quick.json')); \
		print('llama.cpp', [(x['dtype'], x['llama_cpp_tokens_per_s']) for x in r])"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache tour build *.egg-info src/*.egg-info

# MoEfication of the real all-MiniLM-L6-v2 on WordNet's glosses (best effort for the Debian package; never part of
# `make test`)
.PHONY: bench-make
bench-make: $(VENV)/.installed
	@test -d /usr/share/wordnet || { [ "$$(id -u)" = 0 ] && (timeout 300 apt-get install -y -qq wordnet-base) \
		>/dev/null 2>&1 || echo "note: wordnet-base not installed"; }
	$(PY) -m pip install -q -e '.[make]' 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/moekit bench make --json
