//! Property tests (issue 13): every loader of user files in this crate — a PEFT adapter
//! (`adapter_config.json` + `adapter_model.safetensors`), a model's `config.json` and a
//! `tokenizer.json` — on hostile edits of valid files returns a value or an error, never panics,
//! and what it accepts is usable: finite adapter weights, a model config that builds, a
//! tokenizer whose ids fit its vocabulary.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rankpilot_config::mutate::mutate;
use tch::{Device, Kind, Tensor};
use tune::data::Tokenizer;
use tune::model::llama::LlamaConfig;
use tune::peft::{CONFIG_FILE, PeftAdapter, WEIGHTS_FILE};

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(13), ..Config::default() }
}

const Q: &str = "base_model.model.model.layers.0.self_attn.q_proj";

fn adapter_config() -> String {
    serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
        "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8.0},
        "target_modules": ["q_proj"], "base_model_name_or_path": "m"
    })
    .to_string()
}

fn adapter_weights() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(WEIGHTS_FILE);
    let ts = vec![
        (format!("{Q}.lora_A.weight"), Tensor::randn([4, 16], (Kind::Float, Device::Cpu))),
        (format!("{Q}.lora_B.weight"), Tensor::randn([12, 4], (Kind::Float, Device::Cpu))),
    ];
    let md = HashMap::from([("format".to_string(), "pt".to_string())]);
    runio::checkpoint::write_safetensors(&p, &ts, Some(md)).unwrap();
    std::fs::read(p).unwrap()
}

fn tokenizer_json() -> String {
    // A valid file the `tokenizers` library reads (rankpilot's own byte-level tokenizer).
    Tokenizer::bytes_tokenizer_json().unwrap()
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn peft_adapters(kind in 0u8..8, at in 0usize..100_000, pick in 0usize..1000, byte in any::<u8>()) {
        let d = tempfile::tempdir().unwrap();
        let (mut cfg, mut w) = (adapter_config(), adapter_weights());
        // Kinds 0–5 edit the config text; 6 overwrites a byte of the weights, 7 truncates them.
        match kind {
            0..=5 => cfg = mutate(&cfg, kind, at, pick),
            6 => {
                let i = at % w.len();
                w[i] = byte;
            }
            _ => w.truncate(at % w.len()),
        }
        std::fs::write(d.path().join(CONFIG_FILE), cfg).unwrap();
        std::fs::write(d.path().join(WEIGHTS_FILE), w).unwrap();
        if let Ok(ad) = PeftAdapter::load(d.path()) {
            for s in &ad.sites {
                prop_assert!(s.alpha.is_finite() && s.alpha > 0.0);
                for t in [&s.a, &s.b] {
                    prop_assert!(t.numel() == 0 || t.isfinite().all().int64_value(&[]) == 1);
                }
            }
        }
    }

    #[test]
    fn model_configs(kind in 0u8..6, at in 0usize..100_000, pick in 0usize..1000) {
        let base = serde_json::to_string_pretty(&LlamaConfig::tiny().to_hf_json()).unwrap();
        let text = mutate(&base, kind, at, pick);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Ok(c) = LlamaConfig::from_json(&v)
        {
            prop_assert!(c.rms_norm_eps.is_finite() && c.rope_theta.is_finite() && c.head_dim % 2 == 0);
            prop_assert!(c.num_attention_heads % c.num_key_value_heads == 0);
            prop_assert!(c.num_params() < usize::MAX / 4);
        }
    }

    #[test]
    fn tokenizer_files(kind in 0u8..6, at in 0usize..100_000, pick in 0usize..1000) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer.json"), mutate(&tokenizer_json(), kind, at, pick)).unwrap();
        if let Ok(tok) = Tokenizer::for_model_dir(d.path()) {
            let ids = tok.encode("hello, world — naïve 123\n").unwrap_or_default();
            prop_assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < tok.vocab_size()), "{ids:?}");
        }
    }
}
