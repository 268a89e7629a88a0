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

.PHONY: test test-all
test: install ## The fast tests (not the multi-process, end-to-end and Slurm ones): a few minutes
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)
test-all: install ## The whole suite, slow and Slurm tests included (what CI runs; ~25 min on 2 cores)
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

.PHONY: demo
demo: install ## Fine-tune a tiny GPT-NeoX on the bundled sample (CPU), logging to ./mlruns
	$(PY) -m forgepipe.models.tiny $(DEMO_DIR)/tiny-gpt-neox
	$(VENV)/bin/forgepipe sft --model $(DEMO_DIR)/tiny-gpt-neox --data examples/data/sample_pairs.jsonl \
	  --data examples/data/sample_docs.jsonl --output-dir $(DEMO_DIR)/sft --dtype fp32 --zero-stage 2 \
	  --torch-adam --per-device-batch-size 8 --lr 1e-3 --epochs 3 --max-seq-len 256 --eval-every 10 --run-name demo-sft

SIF ?= forge.sif
GPU ?= amd
DOCKERFILE := containers/Dockerfile.$(if $(filter nvidia,$(GPU)),cuda,rocm)
DOCKER_TAG ?= forgepipe:$(if $(filter nvidia,$(GPU)),cuda,rocm)
SHELL_SCRIPTS := $(wildcard bench/*.sh scripts/frontier/*.sh scripts/frontier/*.sbatch scripts/ci/*.sh scripts/local/*.sh containers/*.sh) containers/march-cc .ci/run

.PHONY: lint
lint: install ## ruff, shellcheck on every script, hadolint on the Dockerfile
	$(VENV)/bin/ruff check forgepipe tests bench
	$(VENV)/bin/shellcheck -x $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint containers/Dockerfile.rocm containers/Dockerfile.cuda

# Base images: pinned by digest in containers/versions.env (`make pin`); an empty digest builds from the
# tag, resolved to its digest now where a registry client is found, recorded in $(LOCK) (the image
# carries it), the image's labels and its runs' MLflow tags. STRICT_PINS=1 refuses that. ROCM_ARCH:
# the GPU architecture(s) of a ROCm image's DeepSpeed ops (make docker: this host's, else gfx90a).
STRICT_PINS ?= 0
ROCM_ARCH ?=
LOCK ?= containers/versions.lock

.PHONY: sif docker pin docker-run frontier-sft frontier-reward frontier-ppo frontier-dpo frontier-pipeline slurm-up slurm-down
sif: ## Build the Apptainer image $(SIF) (Apptainer >= 1.2, registry access; STRICT_PINS=1 refuses an unpinned base)
	args="$$(STRICT_PINS=$(STRICT_PINS) ROCM_ARCH='$(ROCM_ARCH)' containers/build-args.sh --recipe containers/Apptainer.def --lock $(LOCK))" \
	  && apptainer build $$args $(SIF) containers/Apptainer.def
docker: ## Build the Docker image $(DOCKER_TAG) (GPU=amd: ROCm, ops for this host's GPUs or ROCM_ARCH; GPU=nvidia: CUDA)
	arch='$(ROCM_ARCH)'; if [[ "$(GPU)" != nvidia && -z "$$arch" ]]; then arch="$$(containers/host-rocm-arch.sh)"; fi; \
	  args="$$(STRICT_PINS=$(STRICT_PINS) ROCM_ARCH="$$arch" containers/build-args.sh --recipe $(DOCKERFILE) --lock $(LOCK))" \
	  && docker build $$args -f $(DOCKERFILE) -t $(DOCKER_TAG) .
pin: ## Look up the base images' digests (skopeo, crane, regctl, docker buildx or curl) and write them into containers/versions.env
	containers/pin.sh
docker-run: ## Run a stage in Docker on this machine's GPUs (STAGE=sft ARGS="--model ..." GPU=amd|nvidia; DRY_RUN=1 prints)
	scripts/local/run.sh --gpu $(GPU) --image $(DOCKER_TAG) $(if $(DRY_RUN),--dry-run) $(STAGE) $(ARGS)
frontier-sft: ## Submit SFT on Frontier (ACCOUNT, IMAGE, MODEL, DATA, OUTPUT_DIR from env; ARGS=...; DRY_RUN=1 previews)
	scripts/frontier/submit.sh sft $(if $(DRY_RUN),--dry-run) $(ARGS)
frontier-reward: ## Submit the reward-model stage on Frontier (as frontier-sft)
	scripts/frontier/submit.sh reward $(if $(DRY_RUN),--dry-run) $(ARGS)
frontier-ppo: ## Submit PPO on Frontier (ACTOR or MODEL, REWARD_MODEL, ...)
	scripts/frontier/submit.sh ppo $(if $(DRY_RUN),--dry-run) $(ARGS)
frontier-dpo: ## Submit DPO on Frontier (MODEL, DATA with pairs, ...; ARGS="--ref ... --beta ...")
	scripts/frontier/submit.sh dpo $(if $(DRY_RUN),--dry-run) $(ARGS)
frontier-pipeline: ## Submit the whole pipeline on Frontier (MODEL, REWARD_MODEL, ...)
	scripts/frontier/submit.sh pipeline $(if $(DRY_RUN),--dry-run) $(ARGS)
slurm-up: ## Start the localhost Slurm test cluster (root)
	scripts/ci/slurm-up.sh
slurm-down: ## Stop the localhost Slurm test cluster
	scripts/ci/slurm-down.sh

# Comparison with DeepSpeed-Chat and TRL: their own venv and a pretrained model under $(BENCH_ENV), set up by the
# script (idempotent); the table goes into bench/RESULTS.md. BENCH_ARGS=--quick is the CI smoke (SFT, 3 steps).
BENCH_ENV ?= /work/bench-env
BENCH_ARGS ?=
.PHONY: bench
bench: install ## forgepipe vs DeepSpeed-Chat vs TRL, SFT + reward, alternating; table into bench/RESULTS.md (BENCH_ARGS=--quick)
	BENCH_ENV=$(BENCH_ENV) bench/setup_contenders.sh
	BENCH_ENV=$(BENCH_ENV) $(PY) bench/compare.py --write $(BENCH_ARGS)

# GPU check: the machine's own python3 (a GPU box may have torch but no venv); wheels for what it lacks
# come from .whl/ (make gpu-wheels, on a machine with a package index).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check gpu-wheels
gpu-check: ## Check a GPU machine: SFT/reward/PPO at ZeRO-2/3 on the FORGE-s shape, one table (CPU: tiny smoke)
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)
gpu-wheels: ## Fetch wheels (.whl/) of the packages a CUDA/ROCm box without an index lacks, for gpu-check
	bench/gpu_wheels.sh .whl

# The training step against the hardware (matmul peak, attention kernels, a plain-PyTorch ceiling, forgepipe
# lever by lever): one device call; GPU_PERF_ARGS="--deadline 540 --out $$OUT" on a lent machine.
GPU_PERF_ARGS ?=
.PHONY: gpu-perf
gpu-perf: ## forgepipe's step vs a plain-PyTorch ceiling and the matmul peak on a GPU (bench/gpu_perf.py; CPU: tiny smoke)
	$(GPU_PY) bench/gpu_perf.py $(GPU_PERF_ARGS)

# The comparison on a GPU machine: `make gpu-bench-bundle` here (needs the bench env), carry .whl/ and
# .gpu-bench/, then `make gpu-bench` there. The default contenders test the H200 profile's reading
# (forgepipe at DeepSpeed-Chat's fixed shapes, and with lengths rounded to 64, beside both); OUT and
# GPU_BENCH_ARGS override.
OUT ?= bench/gpu-bench
GPU_BENCH_ARGS ?= --deadline 520 --dtype bf16 --max-len 256 --batch 4 --steps 30 --warmup 5 --rounds 2 \
	--stages sft,reward,ppo --contenders forgepipe-pad-to-max,dschat,forgepipe-multiple-64,forgepipe
.PHONY: gpu-bench gpu-bench-bundle
gpu-bench-bundle: install ## Pack what bench/gpu_compare.py needs on a GPU machine into .gpu-bench/ (DeepSpeed-Chat, SmolLM2 config, HH)
	BENCH_ENV=$(BENCH_ENV) $(PY) bench/gpu_compare.py bundle
gpu-bench: ## forgepipe vs DeepSpeed-Chat on a GPU machine (bench/gpu_compare.py run; table and logs in $(OUT))
	$(GPU_PY) bench/gpu_compare.py run --out $(OUT) $(GPU_BENCH_ARGS)
