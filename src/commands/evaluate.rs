//! `rankpilot evaluate`: the loss and perplexity of a model (with an optional PEFT adapter) on
//! text, and `rankpilot generate`: text from a prompt, greedy or sampled.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Kind;

use rankpilot_config::BadInput;
use runio::checkpoint;
use tune::data::{BUILTIN_CODE, Corpus, Tokenizer};
use tune::inference::{Sampling, generate, stream_loss, stream_windows};
use tune::model::llama::Llama;
use tune::peft::PeftAdapter;

use crate::cli::Common;
use crate::commands::common::progress_bar;

/// The model a command runs: a Hugging Face directory and an optional adapter.
#[derive(Debug, Clone, Args)]
pub struct ModelInput {
    /// Base model directory (config.json + safetensors; its tokenizer.json if present, else bytes).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter to apply (with its modules_to_save).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Run the model in bfloat16 (default: float32).
    #[arg(long)]
    pub bf16: bool,
}

impl ModelInput {
    /// Loads the model, attaches the adapter, and reads the tokenizer (which must fit the
    /// vocabulary).
    pub fn load(&self, device: tch::Device) -> Result<(Llama, tch::nn::VarStore, Tokenizer)> {
        let kind = if self.bf16 { Kind::BFloat16 } else { Kind::Float };
        let (mut model, vs) = Llama::load(&self.model, device, kind)?;
        if let Some(dir) = &self.adapter {
            model.attach_adapter(&PeftAdapter::load(dir)?)?;
        }
        let tok = Tokenizer::for_model_dir(&self.model)?;
        if tok.vocab_size() > model.cfg.vocab_size {
            return Err(BadInput(format!(
                "{}: the tokenizer produces ids up to {} but config.json's `vocab_size` is {}",
                self.model.display(),
                tok.vocab_size(),
                model.cfg.vocab_size
            ))
            .into());
        }
        Ok((model, vs, tok))
    }
}

/// Arguments of `rankpilot evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    input: ModelInput,
    /// Text to evaluate: a file, a directory, a .jsonl file, or `builtin:code` / `builtin:prose`.
    /// It is tokenized as the training commands read it (each document followed by a blank line).
    #[arg(long, default_value = BUILTIN_CODE)]
    data: String,
    /// Context per window: the stream is cut into windows of `seq-len + 1` tokens starting every
    /// `seq-len` tokens, so that every token but the first is predicted once.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Evaluate only the first N tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prints (and optionally writes) the loss and perplexity.
pub fn run(a: &EvaluateArgs) -> Result<()> {
    if a.seq_len == 0 || a.batch_size == 0 {
        return Err(BadInput("--seq-len and --batch-size: allowed: at least 1".into()).into());
    }
    tch::manual_seed(a.common.seed as i64);
    let (model, _vs, tok) = a.input.load(a.common.device)?;
    let corpus = Corpus::load(&a.data)?;
    let mut ids = tok.encode(&corpus.text())?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens);
    }
    if ids.len() < 2 {
        return Err(BadInput(format!("--data `{}`: {} token(s): allowed: at least 2", a.data, ids.len())).into());
    }
    let bar = progress_bar(stream_windows(ids.len(), a.seq_len).len());
    bar.set_message("windows");
    let r = stream_loss(&model, &ids, a.seq_len, a.batch_size, |n| bar.inc(n as u64));
    bar.finish_and_clear();
    println!(
        "loss {:.6} nats/token, perplexity {:.4} over {} tokens in {} windows ({}; tokenizer {})",
        r.loss,
        r.perplexity,
        r.tokens,
        r.windows,
        corpus.source,
        tok.describe()
    );
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "model": a.input.model, "adapter": a.input.adapter, "data": corpus.source,
            "data_sha256": corpus.sha256(), "seq_len": a.seq_len, "loss": r.loss,
            "perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows,
        });
        checkpoint::atomic_write(p, &serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}

/// Arguments of `rankpilot generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    input: ModelInput,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens holding this probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
}

/// The end-of-sequence ids of a model directory: `eos_token_id` (a number or a list) of
/// `generation_config.json`, else of `config.json`.
fn eos_ids(dir: &std::path::Path) -> Vec<i64> {
    for f in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => return n.as_i64().into_iter().collect(),
            serde_json::Value::Array(a) => return a.iter().filter_map(|x| x.as_i64()).collect(),
            _ => {}
        }
    }
    Vec::new()
}

/// Streams the continuation of the prompt to stdout.
pub fn run_generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(BadInput(format!("--temperature {}: allowed: a finite number >= 0", a.temperature)).into());
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(BadInput(format!("--top-p {}: allowed: a number in (0, 1]", a.top_p)).into());
    }
    tch::manual_seed(a.common.seed as i64);
    let (model, _vs, tok) = a.input.load(a.common.device)?;
    let prompt = tok.encode(&a.prompt)?;
    if prompt.is_empty() {
        return Err(BadInput("--prompt: the prompt has no tokens".into()).into());
    }
    let sampling = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop: eos_ids(&a.input.model),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.common.seed);
    // Decode the whole continuation each time and print what is new, so that multi-byte
    // characters split across tokens come out whole.
    use std::io::Write;
    let mut out: Vec<i64> = Vec::new();
    let mut shown = String::new();
    let mut stdout = std::io::stdout();
    let mut failed = None;
    generate(&model, &prompt, &sampling, &mut rng, |t| {
        out.push(t);
        match tok.decode(&out) {
            Ok(text) if text.starts_with(&shown) && !text.ends_with('\u{FFFD}') => {
                let _ = write!(stdout, "{}", &text[shown.len()..]);
                let _ = stdout.flush();
                shown = text;
            }
            Ok(_) => {}
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let full = tok.decode(&out)?;
    if full.len() > shown.len() && full.starts_with(&shown) {
        print!("{}", &full[shown.len()..]);
    }
    println!();
    eprintln!("{} new tokens", out.len());
    Ok(())
}
