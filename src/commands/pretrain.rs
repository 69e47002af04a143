//! `rankpilot pretrain`: trains a tiny Llama base model from scratch on local text and writes it
//! in the Hugging Face layout (`config.json` + `model.safetensors`, and the byte-level
//! `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer` loads), plus `rankpilot.json`
//! with the corpus's provenance (source, file count, SHA-256) and the final losses.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use tch::{nn, nn::OptimizerConfig};

use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;
use runio::tensorboard::SummaryWriter;
use tune::data::{BUILTIN_PROSE, Corpus, TokenData, Tokenizer, data_rng};
use tune::model::llama::{Llama, LlamaConfig};

/// Arguments of `rankpilot pretrain`.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    common: Common,
    /// Training text: a file, a directory, a .jsonl file, or `builtin:prose` / `builtin:code`.
    #[arg(long, default_value = BUILTIN_PROSE)]
    data: String,
    /// Output model directory (HF layout).
    #[arg(long, default_value = "models/tiny")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up, cosine decay to 10%).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (grouped-query attention when fewer than --heads).
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// SwiGLU inner width.
    #[arg(long, default_value_t = 688)]
    intermediate: usize,
    /// Share of the corpus held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// TensorBoard log directory.
    #[arg(long, default_value = "runs/pretrain")]
    logdir: PathBuf,
}

/// Trains and writes the model.
pub fn run(a: &PretrainArgs) -> Result<()> {
    // Every size in a documented range: a zero divides by zero somewhere, a huge one asks
    // libtorch for more memory than exists.
    for (flag, value, max) in [
        ("--steps", a.steps, 100_000_000),
        ("--batch-size", a.batch_size, 4096),
        ("--seq-len", a.seq_len, 32_768),
        ("--hidden", a.hidden, 16_384),
        ("--layers", a.layers, 256),
        ("--heads", a.heads, 256),
        ("--kv-heads", a.kv_heads, 256),
        ("--intermediate", a.intermediate, 65_536),
        ("--eval-every", a.eval_every, usize::MAX),
    ] {
        if value == 0 || value > max {
            return Err(BadInput(format!("{flag} {value}: allowed: an integer from 1 to {max}")).into());
        }
    }
    if !a.hidden.is_multiple_of(a.heads) || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(BadInput(format!(
            "--hidden {} must be divisible by --heads {}, and --heads by --kv-heads {}",
            a.hidden, a.heads, a.kv_heads
        ))
        .into());
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err(BadInput(format!("--lr {}: allowed: a finite number > 0", a.lr)).into());
    }
    tch::manual_seed(a.common.seed as i64);
    let device = a.common.device;
    let corpus = Corpus::load(&a.data)?;
    let tok = Tokenizer::Bytes;
    let data = TokenData::new(&corpus, &tok, a.val_fraction, a.seq_len)?;
    let cfg = LlamaConfig {
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.kv_heads,
        head_dim: a.hidden / a.heads,
        max_position_embeddings: a.seq_len.max(1024),
        ..LlamaConfig::tiny()
    };
    // The model must be one `finetune` reads back: the same checks as a config.json.
    LlamaConfig::from_json(&cfg.to_hf_json())
        .map_err(|why| BadInput(format!("--hidden/--heads/--kv-heads/--intermediate give no valid model: {why}")))?;
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &cfg);
    let mut opt = nn::AdamW { wd: 0.1, beta2: 0.95, ..Default::default() }.build(&vs, a.lr)?;
    let mut rng = data_rng(a.common.seed);
    let val = data.val_batches(8, a.batch_size, a.seq_len, device);
    let eval =
        |m: &Llama| tch::no_grad(|| val.iter().map(|b| m.loss(b).double_value(&[])).sum::<f64>() / val.len() as f64);
    let mut tb = SummaryWriter::new(&a.logdir)?;
    tb.add_text(
        "config",
        &format!(
            "pretrain: {} parameters, corpus `{}` ({} files, {} train / {} val bytes, sha256 {})",
            cfg.num_params(),
            corpus.source,
            corpus.files.len(),
            data.train.len(),
            data.val.len(),
            corpus.sha256()
        ),
        0,
    )?;
    eprintln!(
        "pretrain: {} parameters on {}, corpus {} ({} files, sha256 {}…)",
        cfg.num_params(),
        crate::device::describe(device),
        corpus.source,
        corpus.files.len(),
        &corpus.sha256()[..16]
    );
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let mut val_loss = eval(&model);
    let mut train_loss = f64::NAN;
    for step in 0..a.steps {
        let lr = if step < a.warmup {
            a.lr * (step + 1) as f64 / a.warmup as f64
        } else {
            let p = (step - a.warmup) as f64 / (a.steps - a.warmup).max(1) as f64;
            a.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.set_lr(lr);
        let batch = data.train_batch(&mut rng, a.batch_size, a.seq_len, device);
        let loss = model.loss(&batch);
        opt.backward_step_clip_norm(&loss, 1.0);
        train_loss = loss.double_value(&[]);
        if !train_loss.is_finite() {
            anyhow::bail!("training loss became {train_loss} at step {step}");
        }
        tb.add_scalar("train/loss", train_loss, step as i64)?;
        tb.add_scalar("train/lr", lr, step as i64)?;
        if (step + 1) % a.eval_every == 0 || step + 1 == a.steps {
            val_loss = eval(&model);
            tb.add_scalar("val/loss", val_loss, step as i64 + 1)?;
            let tps = ((step + 1) * a.batch_size * a.seq_len) as f64 / t0.elapsed().as_secs_f64();
            tb.add_scalar("perf/tokens_per_s", tps, step as i64 + 1)?;
        }
        bar.set_message(format!("loss {train_loss:.3} val {val_loss:.3}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    tb.flush()?;
    model.save(&vs, &a.out)?;
    checkpoint::atomic_write(&a.out.join("tokenizer.json"), Tokenizer::bytes_tokenizer_json()?.as_bytes())?;
    let tok_config = Tokenizer::bytes_tokenizer_config(cfg.max_position_embeddings);
    checkpoint::atomic_write(&a.out.join("tokenizer_config.json"), &serde_json::to_vec_pretty(&tok_config)?)?;
    let info = serde_json::json!({
        "written_by": format!("rankpilot {}", env!("CARGO_PKG_VERSION")),
        "tokenizer": "bytes",
        "corpus": {"source": corpus.source, "files": corpus.files.len(), "sha256": corpus.sha256(),
                   "train_tokens": data.train.len(), "val_tokens": data.val.len()},
        "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr, "seed": a.common.seed,
        "final_train_loss": train_loss, "final_val_loss": val_loss,
        "parameters": cfg.num_params(),
    });
    checkpoint::atomic_write(&a.out.join("rankpilot.json"), &serde_json::to_vec_pretty(&info)?)?;
    println!(
        "pretrained {} parameters for {} steps in {:.1}s: train loss {train_loss:.4}, val loss {val_loss:.4} (nats/byte) -> {}",
        cfg.num_params(),
        a.steps,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
