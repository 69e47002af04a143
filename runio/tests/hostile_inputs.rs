//! Property tests (issue 13): a checkpoint directory (`checkpoint.json` + safetensors weights)
//! with hostile edits is read back as a checkpoint or refused with an error, never a panic; what
//! is accepted has the weights its metadata promises.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rankpilot_config::mutate::mutate;
use runio::checkpoint::{self, META_FILE};
use tch::{Device, Kind, Tensor};

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(13), ..Config::default() }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn checkpoints(kind in 0u8..8, at in 0usize..100_000, pick in 0usize..1000, byte in any::<u8>()) {
        let d = tempfile::tempdir().unwrap();
        let tensors = vec![("w".to_string(), Tensor::randn([3, 5], (Kind::Float, Device::Cpu)))];
        let meta = checkpoint::save(
            d.path(), "policy", 7, serde_json::json!({"lr": 0.1}), serde_json::json!({"n": [1, 2]}), &tensors,
        )
        .unwrap();
        let weights = d.path().join(&meta.weights);
        // Kinds 0–5 edit checkpoint.json; 6 overwrites a byte of the weights, 7 truncates them.
        match kind {
            0..=5 => {
                let text = std::fs::read_to_string(d.path().join(META_FILE)).unwrap();
                std::fs::write(d.path().join(META_FILE), mutate(&text, kind, at, pick)).unwrap();
            }
            6 => {
                let mut w = std::fs::read(&weights).unwrap();
                let i = at % w.len();
                w[i] = byte;
                std::fs::write(&weights, w).unwrap();
            }
            _ => {
                let w = std::fs::read(&weights).unwrap();
                std::fs::write(&weights, &w[..at % w.len()]).unwrap();
            }
        }
        if let Ok((m, ts)) = checkpoint::load(d.path(), "policy") {
            prop_assert_eq!(m.kind, "policy");
            prop_assert_eq!(ts.len(), 1);
        }
    }
}
