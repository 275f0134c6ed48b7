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

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache tour build *.egg-info src/*.egg-info
