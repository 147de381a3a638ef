# `make test` and `make demo` each build .venv on first use.
# torch is pinned first: torch==2.13.0 is the CPU wheel on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check grpokit tests benchmarks

test: lint
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/grpokit verify && $(BIN)/grpokit train

clean:
	rm -rf $(VENV) runs
