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

## The main job on the embedded defaults.
run: build
	$(BIN) doctor --seed 0

## All tests of the workspace, including the checks with the Python `tensorboard` reader.
test: setup
	$(CARGO) test $(PROFILE) --workspace --no-fail-fast

## Benchmarks (figures quoted in the README).
bench: setup
	$(CARGO) bench --workspace

doctor: build
	$(BIN) doctor

fmt:
	$(CARGO) fmt --all
