//! Small, deterministic fixtures for tests and examples of this crate and the crates above it
//! (a real model and run, only tiny).

use tch::{Device, Tensor, nn};

use crate::data::{Corpus, TokenData, Tokenizer};
use crate::finetune::{FinetuneConfig, Finetuner, RankSpec};
use crate::lora::AdamW;
use crate::model::llama::{Llama, LlamaConfig};

/// A fine-tuning run of `steps` steps on a 2-layer, 32-wide random Llama (deterministic weights)
/// over a repeated line of Python, with sites at `ranks` (a `--ranks` spec): seconds on a CPU.
pub fn tiny_run(steps: usize, ranks: &str) -> Finetuner {
    tiny_run_with(steps, ranks, |_| {})
}

/// [`tiny_run`] with its settings changed by `edit` first.
pub fn tiny_run_with(steps: usize, ranks: &str, edit: impl FnOnce(&mut FinetuneConfig)) -> Finetuner {
    tch::manual_seed(0);
    let cfg = LlamaConfig {
        vocab_size: 256,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        arch: Default::default(),
    };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg);
    // Deterministic base weights, independent of libtorch's global generator (tests run in
    // parallel threads and share it).
    let vars: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    tch::no_grad(|| {
        for (i, (_, v)) in vars.iter().enumerate() {
            let sz = v.size();
            let (r, c) = (sz[0] as usize, sz.get(1).copied().unwrap_or(1) as usize);
            let g = crate::svd::gaussian(r, c, 100 + i as u64, tch::Kind::Float, Device::Cpu);
            v.shallow_clone().copy_(&(g.view(sz.as_slice()) * 0.02 + if sz.len() == 1 { 1.0 } else { 0.0 }));
        }
    });
    vs.freeze();
    let corpus = Corpus {
        source: "test".into(),
        docs: vec!["def add(a, b):\n    return a + b\n\n".repeat(40)],
        files: vec![],
        examples: vec![],
        chats: vec![],
    };
    let data = TokenData::new(&corpus, &Tokenizer::Bytes, 0.2, 32).unwrap();
    let mut fc = FinetuneConfig {
        steps,
        batch_size: 4,
        seq_len: 32,
        eval_batches: 2,
        ranks: RankSpec::parse(ranks).unwrap(),
        adam: AdamW { lr: 1e-2, ..AdamW::default() },
        ..FinetuneConfig::default()
    };
    edit(&mut fc);
    Finetuner::new(model, vs, data, fc).unwrap()
}
