//! Batches: a tokenized corpus cut into a training stream, sampled in seeded random windows,
//! and a held-out validation stream, read in fixed windows.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankpilot_config::BadInput;
use tch::{Device, Tensor};

use crate::data::{Corpus, Tokenizer};

/// A tokenized corpus cut into a training stream and a held-out validation stream.
#[derive(Debug)]
pub struct TokenData {
    /// Training ids.
    pub train: Vec<i64>,
    /// Validation ids (the last `val_fraction` of the corpus).
    pub val: Vec<i64>,
}

impl TokenData {
    /// Tokenizes `corpus` and holds out the last `val_fraction` of its ids for validation.
    /// Needs at least `2·(seq_len + 1)` ids in each part.
    pub fn new(corpus: &Corpus, tok: &Tokenizer, val_fraction: f64, seq_len: usize) -> Result<TokenData> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(BadInput(format!(
                "--val-fraction {val_fraction}: allowed: a number in (0, 1) (both the training and the validation part need text)"
            ))
            .into());
        }
        let ids = tok.encode(&corpus.text())?;
        let train_len = ids.len() - ((ids.len() as f64) * val_fraction).round() as usize;
        let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
        let need = 2 * (seq_len + 1);
        if ids.len() < 2 * need || n_val < need || train_len < need {
            return Err(BadInput(format!(
                "data `{}`: {} tokens is too little for sequences of {seq_len} (need at least {} with {:.0}% held out for validation)",
                corpus.source,
                ids.len(),
                ((2 * need) as f64).max(need as f64 / val_fraction.max(1e-9)).ceil(),
                val_fraction * 100.0
            ))
            .into());
        }
        let split = ids.len() - n_val;
        Ok(TokenData { train: ids[..split].to_vec(), val: ids[split..].to_vec() })
    }

    /// A random training batch `[batch, seq_len + 1]` of windows drawn with `rng`.
    pub fn train_batch(&self, rng: &mut ChaCha8Rng, batch: usize, seq_len: usize, device: Device) -> Tensor {
        let hi = self.train.len() - seq_len - 1;
        let mut v = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let s = rng.random_range(0..=hi);
            v.extend_from_slice(&self.train[s..s + seq_len + 1]);
        }
        Tensor::from_slice(&v).view([batch as i64, seq_len as i64 + 1]).to_device(device)
    }

    /// The fixed validation batches: up to `max_batches` batches of `batch` evenly spaced windows.
    pub fn val_batches(&self, max_batches: usize, batch: usize, seq_len: usize, device: Device) -> Vec<Tensor> {
        let n_windows = (self.val.len() - 1) / (seq_len + 1);
        let total = n_windows.min(max_batches * batch).max(1);
        let stride = if total > 1 { (self.val.len() - seq_len - 1) / (total - 1) } else { 0 };
        let starts: Vec<usize> = (0..total).map(|i| i * stride).collect();
        starts
            .chunks(batch)
            .map(|c| {
                let mut v = Vec::with_capacity(c.len() * (seq_len + 1));
                for &s in c {
                    v.extend_from_slice(&self.val[s..s + seq_len + 1]);
                }
                Tensor::from_slice(&v).view([c.len() as i64, seq_len as i64 + 1]).to_device(device)
            })
            .collect()
    }
}

/// The seeded generator for data order (independent of libtorch's generator).
pub fn data_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic() {
        let c = Corpus { source: "t".into(), docs: vec!["abcdefghijklmnopqrstuvwxyz".repeat(20)], files: vec![] };
        let d = TokenData::new(&c, &Tokenizer::Bytes, 0.2, 8).unwrap();
        let a = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        let b = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        assert_eq!(a.size(), vec![4, 9]);
        assert!(a.equal(&b));
        let v = d.val_batches(2, 3, 8, Device::Cpu);
        assert!(!v.is_empty() && v[0].size()[1] == 9);
    }
}
