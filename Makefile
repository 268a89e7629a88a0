# forgepipe: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
DEMO_DIR ?= outputs/demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install forgepipe with pinned (CPU) torch and dev tools

.PHONY: test
test: install ## Run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: demo
demo: install ## Fine-tune a tiny GPT-NeoX on the bundled sample (CPU), logging to ./mlruns
	$(PY) -m forgepipe.models.tiny $(DEMO_DIR)/tiny-gpt-neox
	$(VENV)/bin/forgepipe sft --model $(DEMO_DIR)/tiny-gpt-neox --data examples/data/sample_pairs.jsonl \
	  --data examples/data/sample_docs.jsonl --output-dir $(DEMO_DIR)/sft --dtype fp32 --zero-stage 2 \
	  --torch-adam --per-device-batch-size 8 --lr 1e-3 --epochs 3 --max-seq-len 256 --eval-every 10 --run-name demo-sft

.PHONY: lint
lint: install ## ruff on the code
	$(VENV)/bin/ruff check forgepipe tests
