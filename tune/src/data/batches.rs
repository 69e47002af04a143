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
    /// Per training id: whether it is a target of the loss (instruction data: completions only).
    /// Empty when every id is.
    pub train_mask: Vec<bool>,
    /// Per validation id, as `train_mask`.
    pub val_mask: Vec<bool>,
}

/// Which half of the validation stream a run is scored on ([`TokenData::keep_validation_half`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValidationHalf {
    /// The first half: where settings are chosen.
    Select,
    /// The second half: where the reported figures come from.
    Report,
}

/// A batch of windows `[batch, seq_len + 1]` and, for instruction data, which ids are targets.
#[derive(Debug)]
pub struct Batch {
    /// Token ids.
    pub ids: Tensor,
    /// `[batch, seq_len + 1]` booleans: ids that count in the loss (as targets); `None`: all.
    pub mask: Option<Tensor>,
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
        // Instruction data: each prompt (with what the tokenizer adds in front, e.g. BOS), then
        // its completion and the tokenizer's EOS, packed one after another; only completion and
        // EOS ids are targets.
        let (ids, mask) = if !corpus.chats.is_empty() {
            // Conversations: rendered by the tokenizer's chat template (which writes its own BOS
            // and turn markers), tokenized without additions; ids that start inside an
            // assistant's turn are targets.
            let template = tok.chat_template().ok_or_else(|| {
                BadInput(format!(
                    "data `{}`: `messages` records need the model's chat template (`chat_template` in tokenizer_config.json), and this model has none",
                    corpus.source
                ))
            })?;
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for (i, chat) in corpus.chats.iter().enumerate() {
                let (text, spans) = template
                    .render_with_targets(chat)
                    .map_err(|why| BadInput(format!("data `{}`: conversation {}: {why}", corpus.source, i + 1)))?;
                let (t, starts) = tok.encode_with_starts(&text)?;
                mask.extend(starts.iter().map(|&s| spans.iter().any(|&(a, b)| s >= a && s < b)));
                ids.extend(t);
            }
            (ids, mask)
        } else if corpus.examples.is_empty() {
            (tok.encode(&corpus.text())?, Vec::new())
        } else {
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for e in &corpus.examples {
                let p = tok.encode(&e.prompt)?;
                let mut c = tok.encode_plain(&e.completion)?;
                c.extend(tok.eos_id());
                mask.extend(std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())));
                ids.extend(p);
                ids.extend(c);
            }
            (ids, mask)
        };
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
        let (train_mask, val_mask) =
            if mask.is_empty() { (Vec::new(), Vec::new()) } else { (mask[..split].to_vec(), mask[split..].to_vec()) };
        Ok(TokenData { train: ids[..split].to_vec(), val: ids[split..].to_vec(), train_mask, val_mask })
    }

    fn windows(ids: &[i64], mask: &[bool], starts: &[usize], seq_len: usize, device: Device) -> Batch {
        let mut v = Vec::with_capacity(starts.len() * (seq_len + 1));
        let mut m = Vec::with_capacity(if mask.is_empty() { 0 } else { v.capacity() });
        for &s in starts {
            v.extend_from_slice(&ids[s..s + seq_len + 1]);
            if !mask.is_empty() {
                m.extend_from_slice(&mask[s..s + seq_len + 1]);
            }
        }
        let shape = [starts.len() as i64, seq_len as i64 + 1];
        Batch {
            ids: Tensor::from_slice(&v).view(shape).to_device(device),
            mask: (!mask.is_empty()).then(|| Tensor::from_slice(&m).view(shape).to_device(device)),
        }
    }

    /// Keeps one half of the validation stream: the first for choosing settings (a learning rate
    /// from a sweep), the second for the figures reported, so that a choice is never scored on
    /// the windows it was made on. Each half still needs `2·(seq_len + 1)` ids.
    pub fn keep_validation_half(&mut self, half: ValidationHalf, seq_len: usize) -> Result<()> {
        let mid = self.val.len() / 2;
        if mid < 2 * (seq_len + 1) {
            return Err(BadInput(format!(
                "--lr-sweep: each half of the validation text needs {} ids and has {mid}: use more text or a shorter --seq-len",
                2 * (seq_len + 1)
            ))
            .into());
        }
        let range = match half {
            ValidationHalf::Select => 0..mid,
            ValidationHalf::Report => mid..self.val.len(),
        };
        self.val = self.val[range.clone()].to_vec();
        if !self.val_mask.is_empty() {
            self.val_mask = self.val_mask[range].to_vec();
        }
        Ok(())
    }

    /// A random training batch with its target mask (the same draws as [`TokenData::train_batch`]).
    pub fn train_batch_masked(&self, rng: &mut ChaCha8Rng, batch: usize, seq_len: usize, device: Device) -> Batch {
        let hi = self.train.len() - seq_len - 1;
        let starts: Vec<usize> = (0..batch).map(|_| rng.random_range(0..=hi)).collect();
        Self::windows(&self.train, &self.train_mask, &starts, seq_len, device)
    }

    /// A random training batch `[batch, seq_len + 1]` of windows drawn with `rng`.
    pub fn train_batch(&self, rng: &mut ChaCha8Rng, batch: usize, seq_len: usize, device: Device) -> Tensor {
        self.train_batch_masked(rng, batch, seq_len, device).ids
    }

    /// The fixed validation batches: up to `max_batches` batches of `batch` evenly spaced windows.
    pub fn val_batches(&self, max_batches: usize, batch: usize, seq_len: usize, device: Device) -> Vec<Tensor> {
        self.val_batches_masked(max_batches, batch, seq_len, device).into_iter().map(|b| b.ids).collect()
    }

    /// [`TokenData::val_batches`] with their target masks.
    pub fn val_batches_masked(&self, max_batches: usize, batch: usize, seq_len: usize, device: Device) -> Vec<Batch> {
        let n_windows = (self.val.len() - 1) / (seq_len + 1);
        let total = n_windows.min(max_batches * batch).max(1);
        let stride = if total > 1 { (self.val.len() - seq_len - 1) / (total - 1) } else { 0 };
        let starts: Vec<usize> = (0..total).map(|i| i * stride).collect();
        starts.chunks(batch).map(|c| Self::windows(&self.val, &self.val_mask, c, seq_len, device)).collect()
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
        let c = Corpus {
            source: "t".into(),
            docs: vec!["abcdefghijklmnopqrstuvwxyz".repeat(20)],
            files: vec![],
            examples: vec![],
            chats: vec![],
        };
        let d = TokenData::new(&c, &Tokenizer::Bytes, 0.2, 8).unwrap();
        let a = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        let b = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        assert_eq!(a.size(), vec![4, 9]);
        assert!(a.equal(&b));
        let v = d.val_batches(2, 3, 8, Device::Cpu);
        assert!(!v.is_empty() && v[0].size()[1] == 9);
    }
}
