"""Shared paths for the package's tests (run by `make test` after the Rust tests, which build
the `rankpilot` binary some tests compare with)."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "rankpilot"

# Two libtorch processes on two cores slow each other ~12x: keep this one to a single thread
# unless told otherwise.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("RANKPILOT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
    return ROOT


@pytest.fixture(scope="session")
def rankpilot_bin() -> pathlib.Path:
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "rankpilot"], cwd=ROOT, check=True)
    return BIN
