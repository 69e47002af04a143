//! Using a model without training it: the loss and perplexity of a token stream, and text
//! generation (greedy, or temperature / top-p sampling from a seeded generator).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::model::llama::Llama;

/// The next-token loss of a whole token stream.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StreamLoss {
    /// Mean cross-entropy per predicted token, in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens predicted (every token of the stream but the first).
    pub tokens: usize,
    /// Windows the stream was cut into.
    pub windows: usize,
}

/// The windows [`stream_loss`] cuts `len` ids into: `(start, length)` with length `seq_len + 1`,
/// starting every `seq_len` ids, so that consecutive windows share one id and every id but the
/// first is predicted exactly once. The last window may be shorter (at least 2 ids).
pub fn stream_windows(len: usize, seq_len: usize) -> Vec<(usize, usize)> {
    (0..len.saturating_sub(1)).step_by(seq_len.max(1)).map(|s| (s, (seq_len + 1).min(len - s))).collect()
}

/// Mean next-token cross-entropy of `ids` over the windows of [`stream_windows`] (each window
/// sees only its own context), `batch` windows at a time. Sums are accumulated in `f64`.
pub fn stream_loss(
    model: &Llama,
    ids: &[i64],
    seq_len: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> StreamLoss {
    let device = model.embed_tokens.device();
    let windows = stream_windows(ids.len(), seq_len);
    let (mut nll, mut tokens) = (0.0f64, 0usize);
    // Windows of equal length go through together; only the last one can be shorter.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].1;
        let mut j = i;
        while j < windows.len() && j - i < batch.max(1) && windows[j].1 == len {
            j += 1;
        }
        let rows: Vec<i64> = windows[i..j].iter().flat_map(|&(s, l)| ids[s..s + l].iter().copied()).collect();
        let t = Tensor::from_slice(&rows).view([(j - i) as i64, len as i64]).to_device(device);
        let inputs = t.narrow(1, 0, len as i64 - 1);
        let targets = t.narrow(1, 1, len as i64 - 1).reshape([-1]);
        let logits = tch::no_grad(|| model.forward(&inputs));
        let v = logits.size()[2];
        let sum = logits.view([-1, v]).to_kind(Kind::Float).log_softmax(-1, Kind::Float).gather(
            1,
            &targets.unsqueeze(1),
            false,
        );
        nll -= sum.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        tokens += (j - i) * (len - 1);
        progress(j - i);
        i = j;
    }
    let loss = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
    StreamLoss { loss, perplexity: loss.exp(), tokens, windows: windows.len() }
}

/// How [`generate`] picks each token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches `top_p`
    /// (1 = the whole vocabulary).
    pub top_p: f64,
    /// Ids that end the generation (kept in the output).
    pub stop: Vec<i64>,
}

/// Continues `prompt` token by token. Each step runs the whole sequence again (no key/value
/// cache): exact for every family, including sliding windows, and fast enough for the small
/// models rankpilot trains; the context is cut to the model's `max_position_embeddings`.
pub fn generate(
    model: &Llama,
    prompt: &[i64],
    sampling: &Sampling,
    rng: &mut ChaCha8Rng,
    mut on_token: impl FnMut(i64),
) -> Vec<i64> {
    let device = model.embed_tokens.device();
    let mut ids = prompt.to_vec();
    let context = model.cfg.max_position_embeddings;
    for _ in 0..sampling.max_new_tokens {
        let from = ids.len().saturating_sub(context);
        let input = Tensor::from_slice(&ids[from..]).view([1, -1]).to_device(device);
        let logits = tch::no_grad(|| model.forward(&input));
        let last = logits.select(1, -1).select(0, 0).to_kind(Kind::Double).to_device(tch::Device::Cpu);
        let logits: Vec<f64> = Vec::<f64>::try_from(&last).unwrap_or_default();
        let next = pick(&logits, sampling, rng) as i64;
        ids.push(next);
        on_token(next);
        if sampling.stop.contains(&next) {
            break;
        }
    }
    ids[prompt.len()..].to_vec()
}

/// One token from `logits`: the argmax at temperature 0, else a draw from the tempered softmax
/// restricted to its top-`p` nucleus. Ties go to the lower id.
pub fn pick(logits: &[f64], s: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    let argmax = || {
        logits.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
    };
    if s.temperature <= 0.0 || logits.is_empty() {
        return argmax();
    }
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut order: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &x)| (i, ((x - m) / s.temperature).exp())).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = order.iter().map(|x| x.1).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for &(_, w) in &order {
        kept += w;
        n += 1;
        if kept >= s.top_p * total {
            break;
        }
    }
    let mut u = rng.random::<f64>() * kept;
    for &(i, w) in &order[..n] {
        u -= w;
        if u <= 0.0 {
            return i;
        }
    }
    order[n - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn windows_predict_every_id_but_the_first_once() {
        for (len, seq) in [(10, 3), (11, 5), (2, 8), (1, 4), (0, 4), (9, 4)] {
            let w = stream_windows(len, seq);
            let predicted: usize = w.iter().map(|&(_, l)| l - 1).sum();
            assert_eq!(predicted, len.saturating_sub(1), "{len} {seq}: {w:?}");
            assert!(w.iter().all(|&(s, l)| l >= 2 && s + l <= len));
        }
    }

    #[test]
    fn sampling_is_greedy_at_zero_temperature_and_stays_in_the_nucleus() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = Sampling { max_new_tokens: 1, temperature: 0.0, top_p: 1.0, stop: vec![] };
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        let nucleus = Sampling { temperature: 1.0, top_p: 0.5, ..greedy.clone() };
        assert!((0..200).all(|_| pick(&logits, &nucleus, &mut rng) == 1), "p(1) ≈ 0.51 ≥ 0.5: the nucleus is {{1}}");
        let wide = Sampling { temperature: 1.0, top_p: 0.9, ..greedy };
        let draws: Vec<usize> = (0..400).map(|_| pick(&logits, &wide, &mut rng)).collect();
        assert!(draws.contains(&1) && draws.contains(&2) && !draws.contains(&3), "{draws:?}");
    }
}
