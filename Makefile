# The two commands of the README:
#   make demo   set up .venv, start the local stack, run the main job on the embedded default
#   make test   set up .venv, run the test suite
# Other targets: setup, test-fast (no servers, no Ray: under 2 minutes), stack-up, stack-down,
# results-bad-inputs, clean.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CXR    := $(BIN)/cxr

.PHONY: setup demo test test-fast stack-up stack-down results-bad-inputs clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first and alone: it comes from local disk; resolved with the rest, pip could pull another build.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	# Headless Chromium for the review page's browser test (a Debian package; root installs it).
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
		echo "chromium could not be installed: tests/test_scoring.py's browser test will say so"
	touch $@

setup: $(VENV)/.installed

stack-up: setup
	$(BIN)/python -m infra.local.stack up

stack-down:
	$(BIN)/python -m infra.local.stack down

# The main job on the embedded default: manifests of the curated data ($$CXR_DATA,
# ../shared/data, else the shipped sample); champion models (the screen shipped in
# models/cxr-screen, imported the first time); then the nightly scoring of the sample archive
# in the loopback bucket (s3://cxr-demo/archive) into out/scores, and its review page.
demo: stack-up
	. .stack/env.sh && $(CXR) prepare-data --out out/manifests
	. .stack/env.sh && $(CXR) bootstrap
	. .stack/env.sh && $(CXR) score
	. .stack/env.sh && $(CXR) report --scores out/scores --out out/report.html
	@echo "scores (Parquet) in out/scores; review page out/report.html; MLflow UI at http://127.0.0.1:5050; stop the stack with: make stack-down"

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not integration and not slow and not gpu"

results-bad-inputs: setup
	$(BIN)/python -m tests.inputs

clean: stack-down
	rm -rf out .stack
