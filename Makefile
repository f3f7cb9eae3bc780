# opd — on-policy distillation. `make help` lists the targets.
# Two commands from a fresh clone: `make demo` (installs, then runs the default distillation) and `make test`.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev,report
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS        ?=
EXP         ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all methods train debug table toy-models lint clean-logs bench

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)  ## create .venv and install opd with its dependencies (once; again when pyproject.toml changes)

demo: $(STAMP)  ## the default run: GKD (λ=1) distils the toy teacher into the toy student on CPU, offline
	$(BIN)/opd-train $(ARGS)

test: $(STAMP)  ## the test suite (fast tests; slow/gpu/vllm/deepspeed are marked and skipped)
	$(BIN)/python -m pytest -q $(ARGS)

test-all: $(STAMP)  ## every CPU test, slow ones included
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

methods: $(STAMP)  ## list the registered methods, samplers and datasets
	@$(BIN)/opd-train --methods

train: $(STAMP)  ## a run from an experiment config: make train EXP=<name> [ARGS="key=value ..."]
	$(BIN)/opd-train $(if $(EXP),experiment=$(EXP)) $(ARGS)

table: $(STAMP)  ## the miniature table: every method x 3 seeds on the toy task, then opd-report (CPU, < 60 min)
	$(BIN)/opd-train -m experiment=toy_table $(ARGS)
	$(BIN)/opd-report $$(ls -d logs/toy_table/multiruns/* | tail -n 1)

debug: $(STAMP)  ## a 3-step plumbing check (seconds)
	$(BIN)/opd-train debug=tiny $(ARGS)

bench: $(STAMP)  ## benchmarks (CPU, ~7 min): chunked vs full-logits loss, rollout throughput; see benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_rollout.py

toy-models: $(STAMP)  ## re-make the shipped toy teacher and student checkpoints (opd/assets/toy)
	$(BIN)/python scripts/make_toy_models.py $(ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/python -m ruff check opd tests scripts

clean-logs:  ## delete run directories under logs/
	rm -rf logs/ multirun/
