//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Device, nn};
use tune::model::llama::{Llama, LlamaConfig};

/// The Python interpreter of the set-up's venv (has torch, tensorboard, transformers, peft).
pub fn python() -> String {
    std::env::var("RANKPILOT_PYTHON")
        .ok()
        .or(option_env!("RANKPILOT_PYTHON").map(String::from))
        .expect("RANKPILOT_PYTHON is not set: run the tests through `make test` (scripts/setup.sh configures it)")
}

/// Runs `tests/python/peft_interop.py` with `args` in the set-up's venv and parses the JSON of
/// its last line of output.
pub fn peft_interop(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(root().join("tests/python/peft_interop.py"))
        .args(args)
        .output()
        .expect("run python");
    assert!(out.status.success(), "python failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
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

/// Writes a random 2-layer byte-level Llama to `dir`: `hidden` wide, an MLP `intermediate` wide,
/// 4 query heads of which `kv_heads` key/value heads; weights from libtorch seeded with `seed`.
pub fn small_model(dir: &Path, seed: i64, hidden: usize, intermediate: usize, kv_heads: usize) {
    tch::manual_seed(seed);
    let cfg = LlamaConfig {
        vocab_size: 256,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        head_dim: hidden / 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        arch: Default::default(),
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Llama::new(&vs.root(), &cfg);
    m.save(&vs, dir).unwrap();
}

/// Writes `code.py`, `functions` small Python functions, into `dir`; returns its path.
pub fn text_file(dir: &Path, functions: usize) -> String {
    let p = dir.join("code.py");
    let mut s = String::new();
    for i in 0..functions {
        s.push_str(&format!("def f{i}(x, y):\n    return x * {i} + y  # add\n\n"));
    }
    std::fs::write(&p, s).unwrap();
    p.to_str().unwrap().to_string()
}
