# rankpilot — the two commands: `make run` and `make test`.
# Every target runs the idempotent set-up first (a no-op taking well under a second when all is there).
SHELL := bash
CARGO ?= cargo
# Tests share the release profile with the binary: one libtorch build, optimized numeric code.
PROFILE ?= --release
BIN := target/release/rankpilot
# The set-up's venv (scripts/setup.sh), where the Python package is installed.
PY := $(or $(RANKPILOT_CACHE),$(HOME)/.cache/rankpilot)/venv/bin/python

.PHONY: setup build run compare realrun channel latency test lint bench doctor fmt clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build $(PROFILE) --workspace --bins

## The main job on the embedded defaults: train a rank policy on the default distribution of
## environments (a new environment every episode; a short run, a few minutes on 2 cores), then
## evaluate it and the shipped policy (checkpoints/default, the full 300 k-step run) on the held-out
## suite: gap closed per environment and on average with 95 % intervals, each against its prior.
RUN_DIR ?= runs/make-run
RUN_STEPS ?= 40960
RUN_EPISODES ?= 150
run: build
	$(BIN) train --distribution default --policy default --steps $(RUN_STEPS) --seed 0 --force \
		--logdir $(RUN_DIR)/tensorboard --out $(RUN_DIR)/checkpoint
	$(BIN) eval --suite default --episodes $(RUN_EPISODES) --seed 1000 \
		--checkpoint $(RUN_DIR)/checkpoint/best --checkpoint checkpoints/default \
		--markdown $(RUN_DIR)/eval.md --json $(RUN_DIR)/eval.json
	@echo "TensorBoard logs: $(RUN_DIR)/tensorboard  (view: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(RUN_DIR)/tensorboard)"
	@echo "Evaluation table: $(RUN_DIR)/eval.md"

## End to end on a real model, offline: pre-train the tiny base model, calibrate an environment
## preset from a probe run on it, train a policy on that preset, then fine-tune the model under
## every scheduler at an equal budget (3 seeds) and print the comparison table (≈15 min on 2 cores).
## The policy trains on one thread, as the shipped checkpoints/tiny-code did (with 2 threads it
## comes out different, and in the one run measured much weaker).
E2E_DIR ?= runs/end-to-end
E2E_BUDGET ?= rank:8
compare: build
	$(BIN) pretrain --out $(E2E_DIR)/model --logdir $(E2E_DIR)/pretrain --seed 0
	$(BIN) calibrate --model $(E2E_DIR)/model --out $(E2E_DIR)/tiny-code.toml --logdir $(E2E_DIR)/calibrate --seed 0 \
		--perturbation-coef 0.3
	OMP_NUM_THREADS=1 $(BIN) train --env $(E2E_DIR)/tiny-code.toml --policy ppo --steps 100000 --seed 1 --force \
		--logdir $(E2E_DIR)/train --out $(E2E_DIR)/policy
	$(BIN) compare --model $(E2E_DIR)/model --env $(E2E_DIR)/tiny-code.toml --budget $(E2E_BUDGET) --seeds 3 --seed 0 \
		--schedulers fixed,adalora,squeeze,policy:$(E2E_DIR)/policy/best --logdir $(E2E_DIR)/compare
	@echo "TensorBoard logs: $(E2E_DIR)  (view: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(E2E_DIR))"

## Real runs against Hugging Face PEFT's own methods at a plain parameter budget (rank 8 on
## average, no resource): pre-train the tiny base model, then rankpilot's fixed, eva (and fixed@eva,
## EVA's init without the redistribution), adalora, adalora-svd, the distribution's policy and this
## setting's (checkpoints/tiny-budget, trained on envs/presets/tiny-budget.toml), both with EVA's
## init, beside peft:lora, peft:adalora and peft:eva, 8 seeds, every row at its best learning rate
## of a 3-point sweep chosen on the first half of the validation text and reported on the second
## (110 runs, two at a time at one thread each: about 100 min on 2 cores). Then AdaLoRA's
## faithfulness: adalora-svd beside peft:adalora started from the same tensors (--peer-init
## rankpilot), 8 seeds at 1e-2 (18 runs, about 10 min). Last, the two policies deciding once from
## a probe of this model (`calibrate`'s 100-step rank-64 run, 20 s): `+hold` keeps the round-0
## plan, `--probe` lets round 0 read the probe's per-site sensitivities (22 runs, about 13 min).
REAL_DIR ?= runs/realrun
realrun: build
	$(BIN) pretrain --out $(REAL_DIR)/model --logdir $(REAL_DIR)/pretrain --seed 0
	$(BIN) compare --model $(REAL_DIR)/model --env none --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 2e-3,5e-3,1e-2 --logdir $(REAL_DIR)/compare \
		--schedulers fixed,eva,fixed@eva,adalora,adalora-svd,policy:checkpoints/default@eva,policy:checkpoints/tiny-budget@eva,peft:lora,peft:adalora,peft:eva
	$(BIN) compare --model $(REAL_DIR)/model --env none --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 1e-2 --peer-init rankpilot --logdir $(REAL_DIR)/shared-init --schedulers adalora-svd,peft:adalora
	$(BIN) calibrate --model $(REAL_DIR)/model --out $(REAL_DIR)/probe/budget.toml --env budget --seed 0
	$(BIN) compare --model $(REAL_DIR)/model --env none --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 2e-3,5e-3,1e-2 --probe $(REAL_DIR)/probe/budget.calibration.json --logdir $(REAL_DIR)/probe-hold \
		--schedulers policy:checkpoints/tiny-budget+hold@eva,policy:checkpoints/default+hold@eva
	@echo "Tables: $(REAL_DIR)/compare/compare.md, $(REAL_DIR)/shared-init/compare.md, $(REAL_DIR)/probe-hold/compare.md  (TensorBoard: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(REAL_DIR))"

## The channel setting (AirLLM) in real runs: pre-train the tiny base model, then rankpilot's fixed,
## AdaLoRA, squeeze, EVA (standing for peft:eva, which runs without a resource) and the two shipped
## channel policies (session 28's, and session 46's trained for loss alone) on the shipped
## calibrated preset, 8 seeds, each row at its best learning rate of a 3-point sweep (66 runs, two
## at a time at one thread each: about 43 min on 2 cores).
CH_DIR ?= runs/channel
channel: build
	$(BIN) pretrain --out $(E2E_DIR)/model --logdir $(E2E_DIR)/pretrain --seed 0
	$(BIN) compare --model $(E2E_DIR)/model --env envs/presets/tiny-code.toml --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 2e-3,5e-3,1e-2 --logdir $(CH_DIR)/compare \
		--schedulers fixed,adalora,squeeze,eva,policy:checkpoints/tiny-code,policy:checkpoints/tiny-code-loss
	@echo "Tables: $(CH_DIR)/compare/compare.md  (TensorBoard: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(CH_DIR)/compare)"

## The latency setting (DR-RL) in real runs: pre-train the tiny base model, then rankpilot's fixed,
## AdaLoRA and EVA beside the two shipped latency policies (trained for loss alone without a skip
## head, and the session-30 one with compute costs and skips) on the calibrated preset with the
## table's objective, 8 seeds, each row at its best learning rate of a 3-point sweep (55 runs, two at
## a time at one thread each: about 42 min on 2 cores). Then a probe of the same model and the
## budget setting's two policies holding their round-0 plans beside AdaLoRA (33 runs, about 20 min).
LAT_DIR ?= runs/latency
latency: build
	$(BIN) pretrain --out $(E2E_DIR)/model --logdir $(E2E_DIR)/pretrain --seed 0
	$(BIN) compare --model $(E2E_DIR)/model --env envs/presets/tiny-latency-loss.toml --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 2e-3,5e-3,1e-2 --logdir $(LAT_DIR)/compare \
		--schedulers fixed,adalora,eva,policy:checkpoints/tiny-latency-loss,policy:checkpoints/tiny-latency
	$(BIN) calibrate --model $(E2E_DIR)/model --out $(LAT_DIR)/probe/budget.toml --env budget --seed 0
	$(BIN) compare --model $(E2E_DIR)/model --env envs/presets/tiny-latency-loss.toml --budget rank:8 --seeds 8 --seed 0 --jobs 2 \
		--lr-sweep 2e-3,5e-3,1e-2 --probe $(LAT_DIR)/probe/budget.calibration.json --logdir $(LAT_DIR)/probe-hold \
		--schedulers adalora,policy:checkpoints/tiny-budget+hold@eva,policy:checkpoints/default+hold@eva
	@echo "Tables: $(LAT_DIR)/compare/compare.md, $(LAT_DIR)/probe-hold/compare.md  (TensorBoard: ~/.cache/rankpilot/venv/bin/tensorboard --logdir $(LAT_DIR))"

## All tests of the workspace, including the checks with the Python `tensorboard` reader, then
## the Python package's suite (Gymnasium env checker, SB3, Policy.act vs `rankpilot act`,
## Trainer + PEFT with the callback, a 2-process torchrun).
test: setup
	$(CARGO) test $(PROFILE) --workspace --no-fail-fast
	$(PY) -m pytest -q -p no:cacheprovider python/tests

## Lints: clippy on every crate and target, warnings as errors (CI runs it after the tests).
lint: setup
	$(CARGO) clippy $(PROFILE) --workspace --all-targets -- -D warnings

## Benchmarks (figures quoted in the READMEs): environment stepping and the oracle, policy decision
## latency, SVD and fine-tuning side by side with Python torch (1 thread: see docs/finetune.md),
## PPO against Stable-Baselines3 through the Gymnasium environment.
bench: build
	$(CARGO) bench -p envs
	$(BIN) bench policy
	$(BIN) bench svd --threads 1 --skip-full-svd
	$(BIN) bench finetune --threads 1
	$(BIN) bench ppo --threads 1

doctor: build
	$(BIN) doctor

fmt:
	$(CARGO) fmt --all
