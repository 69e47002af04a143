//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Python interpreter of the set-up's venv (has torch, tensorboard, transformers, peft).
pub fn python() -> String {
    std::env::var("RANKPILOT_PYTHON")
        .ok()
        .or(option_env!("RANKPILOT_PYTHON").map(String::from))
        .expect("RANKPILOT_PYTHON is not set: run the tests through `make test` (scripts/setup.sh configures it)")
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the rankpilot binary built for this test run.
pub fn rankpilot(args: &[&str]) -> Output {
    rankpilot_in(args, &root())
}

/// Runs the rankpilot binary in `dir`.
pub fn rankpilot_in(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankpilot"))
        .args(args)
        .current_dir(dir)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("spawn rankpilot")
}

/// stdout + stderr as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}
