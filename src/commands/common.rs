//! Helpers every command shares: the progress bar, the resource beside a run, and loading a
//! base model with its tokenizer and data.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use rankpilot_config::BadInput;
use tch::Kind;
use tune::data::{BUILTIN_CODE, Corpus, TokenData, Tokenizer};
use tune::model::llama::Llama;

/// A progress bar over `steps` optimizer steps.
pub fn progress_bar(steps: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// `none` or an environment preset (name or file) for the resource beside a run.
pub fn load_env(name: &str) -> Result<Option<envs::EnvPreset>> {
    if name == "none" {
        return Ok(None);
    }
    let p = envs::presets::load(name).map_err(|e| BadInput(format!("--env: {e}; or `none` for no resource")))?;
    Ok(Some(p))
}

/// Reads a calibration probe (`--probe`): a `rankpilot calibrate` file of per-site
/// measurements. Its errors are bad input naming the file.
pub fn load_probe(path: &std::path::Path) -> Result<envs::calibration::Calibration> {
    envs::calibration::Calibration::load(path).map_err(|e| BadInput(format!("--probe: {e}")).into())
}

/// Loads a base model, its tokenizer and the tokenized corpus (the tokenizer must fit the
/// model's vocabulary).
pub fn load_model_and_data(
    model_dir: &std::path::Path,
    data: &str,
    val_fraction: f64,
    seq_len: usize,
    device: tch::Device,
    kind: Kind,
) -> Result<(Llama, tch::nn::VarStore, Tokenizer, Corpus, TokenData)> {
    let (model, vs) = Llama::load(model_dir, device, kind)?;
    let tok = Tokenizer::for_model_dir(model_dir)?;
    if tok.vocab_size() > model.cfg.vocab_size {
        return Err(BadInput(format!(
            "{}: the tokenizer produces ids up to {} but the model's vocab_size is {}",
            model_dir.display(),
            tok.vocab_size(),
            model.cfg.vocab_size
        ))
        .into());
    }
    let corpus = Corpus::load(data)?;
    let tokens = TokenData::new(&corpus, &tok, val_fraction, seq_len)?;
    Ok((model, vs, tok, corpus, tokens))
}

/// What every fine-tuning command runs on: the base model, the text, the batch shape and the
/// learning rate.
#[derive(Debug, Clone, Args)]
pub struct TuneInput {
    /// Base model directory (config.json + model.safetensors; tokenizer.json used if present).
    #[arg(long)]
    pub model: PathBuf,
    /// Training text: a file, a directory, a .jsonl file, or `builtin:code` / `builtin:prose`.
    #[arg(long, default_value = BUILTIN_CODE)]
    pub data: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Peak learning rate (AdamW, after a linear warm-up from 0).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Learning-rate schedule after the warm-up, with transformers' formulas: constant, linear
    /// (to 0 at the last step) or cosine (half a cosine to 0).
    #[arg(long, default_value = "constant")]
    pub lr_schedule: tune::finetune::LrSchedule,
    /// Gradient accumulation: micro-batches of --batch-size per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Dropout on each LoRA site's input during training (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// How LoRA sites start and grow: `kaiming` (PEFT's random A) or `eva` / `eva:N` (EVA: the
    /// principal directions of each site's input activations over N training batches, default
    /// 4; every grow takes the next ones).
    #[arg(long, default_value = "kaiming")]
    pub init: tune::finetune::SiteInit,
    /// How a scheduler's shrink drops components: `svd` (the QR-core SVD's best rank-k
    /// approximation; the site's optimizer state restarts) or `prune` (drop the components with
    /// the smallest rank-one terms; the others keep their directions and optimizer state).
    #[arg(long, default_value = "svd")]
    pub shrink: tune::lora::Shrink,
}

impl TuneInput {
    /// Checks the training settings that clap cannot.
    /// The settings every fine-tuning command takes from these arguments (steps, batch, sequence
    /// length, schedule, accumulation, dropout, `--init`, learning rate `lr`), over
    /// [`FinetuneConfig`]'s defaults.
    pub fn finetune_config(&self, steps: usize, lr: f64) -> tune::finetune::FinetuneConfig {
        tune::finetune::FinetuneConfig {
            steps,
            batch_size: self.batch_size,
            schedule: self.lr_schedule,
            grad_accum: self.grad_accum,
            lora_dropout: self.lora_dropout,
            init: self.init,
            shrink: self.shrink,
            seq_len: self.seq_len,
            adam: tune::lora::AdamW { lr, ..tune::lora::AdamW::default() },
            ..tune::finetune::FinetuneConfig::default()
        }
    }

    /// `--init` for a run under `scheduler`: one that reads the sites' input bases (`eva`)
    /// starts its sites with EVA unless `--init` says otherwise.
    pub fn init_for(&self, scheduler: Option<&rankpilot::scheduler::SchedulerSpec>) -> tune::finetune::SiteInit {
        match (scheduler, self.init) {
            (Some(spec), tune::finetune::SiteInit::Kaiming) if spec.needs_eva_init() => {
                tune::finetune::SiteInit::Eva { batches: 4 }
            }
            (_, init) => init,
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.grad_accum == 0 {
            return Err(BadInput("--grad-accum 0: allowed: at least 1".into()).into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(BadInput(format!("--lora-dropout {}: allowed: a number in [0, 1)", self.lora_dropout)).into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(BadInput(format!("--lr {}: allowed: a finite number > 0", self.lr)).into());
        }
        Ok(())
    }
}
