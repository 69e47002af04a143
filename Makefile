# rankpilot — the two commands: `make run` and `make test`.
# Every target runs the idempotent set-up first (a no-op taking well under a second when all is there).
SHELL := bash
CARGO ?= cargo
# Tests share the release profile with the binary: one libtorch build, optimized numeric code.
PROFILE ?= --release
BIN := target/release/rankpilot

.PHONY: setup build run test bench doctor fmt clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build $(PROFILE) --workspace --bins

## The main job on the embedded defaults: train a rank policy on the default environment
## (a few minutes on 2 cores), then evaluate it on 200 held-out episodes next to the baselines,
## the oracle and the shipped policy.
RUN_DIR ?= runs/make-run
RUN_STEPS ?= 150000
run: build
	$(BIN) train --env wireless-rayleigh --policy default --steps $(RUN_STEPS) --seed 0 \
		--logdir $(RUN_DIR)/tensorboard --out $(RUN_DIR)/checkpoint
	$(BIN) eval --env wireless-rayleigh --episodes 200 --seed 1000 \
		--checkpoint $(RUN_DIR)/checkpoint/best --checkpoint checkpoints/wireless-rayleigh \
		--markdown $(RUN_DIR)/eval.md --json $(RUN_DIR)/eval.json
	@echo "TensorBoard logs: $(RUN_DIR)/tensorboard  (view: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(RUN_DIR)/tensorboard)"
	@echo "Evaluation table: $(RUN_DIR)/eval.md"

## All tests of the workspace, including the checks with the Python `tensorboard` reader.
test: setup
	$(CARGO) test $(PROFILE) --workspace --no-fail-fast

## Benchmarks (figures quoted in the READMEs): environment stepping and the oracle, policy decision
## latency, SVD and fine-tuning side by side with Python torch (1 thread: see docs/finetune.md).
bench: build
	$(CARGO) bench -p envs
	$(BIN) bench policy
	$(BIN) bench svd --threads 1 --skip-full-svd
	$(BIN) bench finetune --threads 1

doctor: build
	$(BIN) doctor

fmt:
	$(CARGO) fmt --all
