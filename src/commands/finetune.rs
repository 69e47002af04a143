//! `rankpilot finetune`: dynamic-rank LoRA fine-tuning of a Hugging Face-layout Llama model.
//!
//! Logs train/val loss, tokens/s, learning rate, ranks (total, histogram, sites × rounds heatmap)
//! and AdaLoRA importance to TensorBoard; writes the adapter as a PEFT directory to
//! `<logdir>/adapter` (and to `--export-peft` when given) and a `summary.json` next to it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use tch::Kind;

use crate::checkpoint;
use crate::cli::{BadInput, Common};
use crate::controller::RunOptions;
use crate::data::{BUILTIN_CODE, Corpus, TokenData, Tokenizer};
use crate::finetune::{FinetuneConfig, Finetuner, RankPlan, RankSpec};
use crate::lora::AdamW;
use crate::model::llama::Llama;
use crate::peft::PeftAdapter;
use crate::scheduler::{BudgetSpec, SchedulerSpec};
use crate::tensorboard::{SummaryWriter, heatmap};

/// Arguments of `rankpilot finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    common: Common,
    /// Base model directory (config.json + model.safetensors; tokenizer.json used if present).
    #[arg(long)]
    model: PathBuf,
    /// Training text: a file, a directory, a .jsonl file, or `builtin:code` / `builtin:prose`.
    #[arg(long, default_value = BUILTIN_CODE)]
    data: String,
    /// Initial ranks: `R` for every site, or PEFT-style `key=R` items plus an optional default,
    /// e.g. `q_proj=16,mlp.down_proj=4,8` (first matching key wins).
    #[arg(long, default_value = "8", value_parser = RankSpec::parse)]
    ranks: RankSpec,
    /// Projections that carry LoRA sites (comma-separated).
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", value_delimiter = ',')]
    targets: Vec<String>,
    /// Resize at a round boundary: `STEP:RANKS` (same syntax as --ranks), repeatable,
    /// e.g. `--resize-at 100:4 --resize-at 150:q_proj=8,2`.
    #[arg(long = "resize-at", value_parser = parse_resize)]
    resize_at: Vec<(usize, RankSpec)>,
    /// lora_alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// rsLoRA scaling alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    rslora: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Learning rate (AdamW, linear warm-up then constant).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Evaluate every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Validation batches.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Share of the corpus held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// TensorBoard log directory; the adapter is written to <logdir>/adapter.
    #[arg(long, default_value = "runs/finetune")]
    logdir: PathBuf,
    /// Also write the PEFT adapter here.
    #[arg(long)]
    export_peft: Option<PathBuf>,
    /// Start from this PEFT adapter instead of fresh sites.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Base weights and activations in bfloat16 (LoRA factors stay float32).
    #[arg(long)]
    bf16: bool,
    /// Skip the AdaLoRA importance updates (slightly faster; signals report 0).
    #[arg(long)]
    no_importance: bool,
    /// Rank scheduler deciding every site's rank at each round boundary: `fixed` (the largest
    /// uniform rank within --budget), `fixed:R`, `adalora`, `squeeze` or `policy:<checkpoint dir>`;
    /// a classic one with `+skip` (e.g. `fixed+skip`) skips every round whose plan does not fit the
    /// resource's conservative estimate, as a policy may (nothing trained or sent, adapters kept).
    /// Sites start empty and round 0's plan sets them (--ranks, --resize-at and --adapter are for
    /// runs without a scheduler).
    #[arg(long, value_parser = SchedulerSpec::parse)]
    scheduler: Option<SchedulerSpec>,
    /// Resource simulated beside a scheduled run: `none`, an environment preset name
    /// (wireless-rayleigh, wireless-rician, latency, budget, llama7b) or a preset file (e.g. one
    /// written by `rankpilot calibrate`). A round whose adapter does not fit the round's budget is
    /// lost (rolled back).
    #[arg(long, default_value = "none")]
    env: String,
    /// Rounds of a scheduled run (scheduler decisions; the steps are split evenly).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Average adapter-parameter budget of a scheduled run: a number of parameters or `rank:R`
    /// (the parameters of a uniform rank R). Default: R for `fixed:R`, else rank:8.
    #[arg(long, value_parser = BudgetSpec::parse)]
    budget: Option<BudgetSpec>,
}

fn parse_resize(s: &str) -> Result<(usize, RankSpec), String> {
    let (step, spec) = s.split_once(':').ok_or_else(|| format!("`{s}`: expected STEP:RANKS"))?;
    let step = step.trim().parse::<usize>().map_err(|_| format!("`{step}` is not a step"))?;
    Ok((step, RankSpec::parse(spec)?))
}

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

/// Runs the fine-tuning.
pub fn run(a: &FinetuneArgs) -> Result<()> {
    if a.steps == 0 || a.batch_size == 0 || a.seq_len == 0 || a.eval_every == 0 {
        return Err(BadInput("--steps, --batch-size, --seq-len and --eval-every must be positive".into()).into());
    }
    let device = a.common.device;
    let kind = if a.bf16 { Kind::BFloat16 } else { Kind::Float };
    let (model, vs, tok, corpus, data) =
        load_model_and_data(&a.model, &a.data, a.val_fraction, a.seq_len, device, kind)?;
    let cfg = FinetuneConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        adam: AdamW { lr: a.lr, weight_decay: a.weight_decay, ..AdamW::default() },
        warmup_steps: a.warmup,
        grad_clip: a.grad_clip,
        eval_batches: a.eval_batches,
        targets: a.targets.iter().map(|t| t.trim().to_string()).collect(),
        ranks: a.ranks.clone(),
        alpha: a.alpha,
        rslora: a.rslora,
        track_importance: !a.no_importance,
        seed: a.common.seed,
    };
    if a.scheduler.is_some() && (a.adapter.is_some() || !a.resize_at.is_empty()) {
        return Err(BadInput("--scheduler decides every resize: leave out --resize-at and --adapter".into()).into());
    }
    if a.scheduler.is_none() && (a.env != "none" || a.budget.is_some()) {
        return Err(BadInput("--env and --budget need --scheduler".into()).into());
    }
    let cfg = match a.scheduler {
        Some(_) => FinetuneConfig { ranks: RankSpec { default: 0, patterns: vec![] }, ..cfg },
        None => cfg,
    };
    let env = load_env(&a.env)?;
    let mut ft = Finetuner::new(model, vs, data, cfg.clone())?;
    let scheduled = match &a.scheduler {
        Some(spec) => {
            Some(crate::controller::prepare(&ft, spec, env.as_ref(), a.budget, a.rounds, a.common.seed, device)?)
        }
        None => None,
    };
    if let Some(dir) = &a.adapter {
        ft.load_peft(&PeftAdapter::load(dir)?)?;
    }
    let names = ft.site_names();
    // Check every scheduled plan before training starts.
    let mut schedule: Vec<(usize, RankPlan)> = Vec::new();
    for (step, spec) in &a.resize_at {
        let plan = RankPlan::new(names.iter().map(|n| spec.rank_for(n)).collect());
        for (s, &r) in ft.model.sites().iter().zip(&plan.ranks) {
            crate::lora::check_rank(&s.name, r, s.d_in, s.d_out)?;
        }
        schedule.push((*step, plan));
    }
    schedule.sort_by_key(|(s, _)| *s);

    let mut tb = SummaryWriter::new(&a.logdir)?;
    let config_text = format!(
        "| key | value |\n|---|---|\n| model | {} |\n| data | {} ({} files, sha256 {}) |\n| tokenizer | {} |\n| sites | {} |\n| config | `{}` |",
        a.model.display(),
        corpus.source,
        corpus.files.len(),
        corpus.sha256(),
        tok.describe(),
        names.len(),
        serde_json::to_string(&cfg)?
    );
    tb.add_text("config", &config_text, 0)?;
    eprintln!(
        "finetune: {} sites ({} trainable parameters) on {}, data {} ({} files, sha256 {}…), tokenizer {}",
        names.len(),
        ft.adapter_params(),
        crate::device::describe(device),
        corpus.source,
        corpus.files.len(),
        &corpus.sha256()[..16],
        tok.describe()
    );
    if let Some((mut sched, mut res)) = scheduled {
        let bar = progress_bar(a.steps);
        let steps_per_round = (a.steps / a.rounds.max(1)).max(1);
        let opts = RunOptions { rounds: a.rounds, eval_every_rounds: a.eval_every.div_ceil(steps_per_round) };
        let report = crate::controller::run(&mut ft, sched.as_mut(), &mut res, &opts, &mut tb, &bar)?;
        bar.finish_and_clear();
        let base = a.model.display().to_string();
        let adapter_dir = a.logdir.join("adapter");
        if ft.adapter_params() > 0 {
            ft.export_peft(&adapter_dir, &base)?;
            if let Some(dir) = &a.export_peft {
                ft.export_peft(dir, &base)?;
            }
        } else {
            eprintln!("every site ended at rank 0 (no round delivered an adapter): no PEFT adapter written");
        }
        let summary = serde_json::json!({
            "report": report,
            "data": {"source": corpus.source, "files": corpus.files.len(), "sha256": corpus.sha256()},
            "env": a.env,
            "config": cfg,
        });
        checkpoint::atomic_write(&a.logdir.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
        println!(
            "{}: {} steps in {} rounds, {:.1}s: val loss {:.4} -> {:.4}, mean adapter {:.0} parameters (final {}), sent {:.3e} {}, {} of {} rounds lost; adapter -> {}",
            report.scheduler,
            a.steps,
            a.rounds,
            report.wall_seconds,
            report.val_loss_initial,
            report.val_loss_final,
            report.mean_params,
            report.final_params,
            report.cost_sent,
            report.cost_unit,
            report.rounds_lost,
            a.rounds,
            adapter_dir.display()
        );
        return Ok(());
    }
    let mut heat: Vec<Vec<f64>> = Vec::new();
    let log_ranks = |tb: &mut SummaryWriter, ft: &Finetuner, step: i64, heat: &mut Vec<Vec<f64>>| -> Result<()> {
        let ranks: Vec<f64> = ft.ranks().iter().map(|&r| r as f64).collect();
        tb.add_scalar("ranks/total", ranks.iter().sum(), step)?;
        tb.add_scalar("ranks/adapter_params", ft.adapter_params() as f64, step)?;
        tb.add_histogram("ranks/sites", &ranks, step)?;
        heat.push(ranks);
        Ok(())
    };
    log_ranks(&mut tb, &ft, 0, &mut heat)?;
    let val0 = ft.evaluate();
    tb.add_scalar("val/loss", val0, 0)?;
    let bar = progress_bar(a.steps);
    let t0 = Instant::now();
    let mut next = 0;
    let mut val = val0;
    let mut tokens = 0usize;
    let mut last_loss = f64::NAN;
    for step in 0..a.steps {
        while next < schedule.len() && schedule[next].0 <= step {
            let rep = ft.resize(&schedule[next].1)?;
            tb.add_scalar("perf/resize_ms", rep.seconds * 1e3, step as i64)?;
            log_ranks(&mut tb, &ft, step as i64, &mut heat)?;
            next += 1;
        }
        let st = ft.train_step()?;
        tokens += st.tokens;
        last_loss = st.loss;
        let s = step as i64 + 1;
        tb.add_scalar("train/loss", st.loss, s)?;
        tb.add_scalar("train/grad_norm", st.grad_norm, s)?;
        tb.add_scalar("train/lr", st.lr, s)?;
        tb.add_scalar("perf/tokens_per_s", st.tokens as f64 / st.seconds, s)?;
        if (step + 1) % a.eval_every == 0 || step + 1 == a.steps {
            val = ft.evaluate();
            tb.add_scalar("val/loss", val, s)?;
            let sig = ft.signals(false);
            let imp: Vec<f64> = sig.iter().map(|x| x.importance).collect();
            tb.add_histogram("signals/importance", &imp, s)?;
            tb.add_scalar("signals/importance_mean", imp.iter().sum::<f64>() / imp.len().max(1) as f64, s)?;
        }
        bar.set_message(format!("loss {:.3} val {val:.3} ranks Σ{}", st.loss, ft.ranks().iter().sum::<usize>()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Sites × rounds rank heatmap.
    let rows = names.len();
    let cols = heat.len();
    let mut values = vec![0.0; rows * cols];
    for (c, col) in heat.iter().enumerate() {
        for (r, v) in col.iter().enumerate() {
            values[r * cols + c] = *v;
        }
    }
    let hi = values.iter().cloned().fold(1.0, f64::max);
    let img = heatmap(&values, rows, cols, 0.0, hi, 8);
    tb.add_image_rgb("ranks/heatmap", img.width, img.height, &img.rgb, a.steps as i64)?;
    tb.flush()?;

    let base = a.model.display().to_string();
    let adapter_dir = a.logdir.join("adapter");
    ft.export_peft(&adapter_dir, &base)?;
    if let Some(dir) = &a.export_peft {
        ft.export_peft(dir, &base)?;
    }
    let train_s = ft.train_time.as_secs_f64();
    let summary = serde_json::json!({
        "steps": a.steps,
        "val_loss_initial": val0,
        "val_loss_final": val,
        "train_loss_last": last_loss,
        "tokens": tokens,
        "tokens_per_s": tokens as f64 / train_s,
        "train_seconds": train_s,
        "resize_seconds": ft.resize_time.as_secs_f64(),
        "resize_share": ft.resize_time.as_secs_f64() / (train_s + ft.resize_time.as_secs_f64()),
        "ranks": names.iter().cloned().zip(ft.ranks()).collect::<std::collections::BTreeMap<_, _>>(),
        "adapter_params": ft.adapter_params(),
        "data": {"source": corpus.source, "files": corpus.files.len(), "sha256": corpus.sha256()},
        "config": cfg,
    });
    checkpoint::atomic_write(&a.logdir.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    println!(
        "fine-tuned {} steps in {:.1}s: val loss {val0:.4} -> {val:.4}, {:.0} tokens/s, resize {:.3}% of training; adapter -> {}{}",
        a.steps,
        t0.elapsed().as_secs_f64(),
        tokens as f64 / train_s,
        100.0 * ft.resize_time.as_secs_f64() / train_s,
        adapter_dir.display(),
        a.export_peft.as_ref().map(|d| format!(", {}", d.display())).unwrap_or_default()
    );
    Ok(())
}
