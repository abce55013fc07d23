# Two commands for a fresh clone: `make demo` (install + run the demo pipeline end to end) and
# `make test` (install + run the test suite). Everything lives in a project-local .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: install demo test test-slow test-all serve clean gpu-wheels gpu-check prefect-home

TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

# uv (Astral's pip-compatible installer) fills the venv in ~42 s with a warm cache where pip takes ~140 s: torch's
# wheels unpack to ~5 GiB. --compile-bytecode writes the .pyc files as pip does (without them, and with
# PYTHONDONTWRITEBYTECODE set, every process compiled torch and Prefect again: imports 16 s instead of 6 s). pip is
# the fallback wherever uv cannot be installed or fails (uv reads no pip.conf: an index only pip.conf names is
# reached by pip).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -m pip install -q uv && \
	    $(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python $(TORCH_PINS) -e ".[dev]"; then :; else \
	  echo "make install: uv failed; installing with pip"; \
	  $(BIN)/python -m pip install -q --upgrade pip && \
	  $(BIN)/python -m pip install -q $(TORCH_PINS) && \
	  $(BIN)/python -m pip install -q -e ".[dev]" || exit 1; \
	fi
	touch $(STAMP)

install: $(STAMP)

# The Prefect home holds the database (every run's parameters and logs) and serve.sh's API auth string:
# private to this user whatever creates it first (the CLI and serve.sh make it so too).
prefect-home:
	@umask 077 && mkdir -p "$(PREFECT_HOME)" && chmod go-rwx "$(PREFECT_HOME)"

demo: install prefect-home
	$(BIN)/alignet demo --root alignet-data

test: install prefect-home
	$(BIN)/python -m pytest -q

test-slow: install prefect-home
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

# A local Prefect server (UI at http://127.0.0.1:4200), the process pool, every deployment and a worker.
serve: install prefect-home
	BIN=$(CURDIR)/$(BIN) scripts/serve.sh

clean:
	rm -rf alignet-data .prefect

# The GPU check (scripts/gpu_check.py; README: "Checking the GPU path on a GPU machine").
# Here, with a package registry: the Python 3.12 wheels the GPU machine's image lacks, into .gpu-wheels/.
gpu-wheels: install
	$(BIN)/python scripts/gpu_check.py --build-wheels

# On the GPU machine (its own python3, no .venv, no network; .gpu-wheels/ carried along): ≤ 8 minutes.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)
