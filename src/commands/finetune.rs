//! `rankpilot finetune`: dynamic-rank LoRA fine-tuning of a Hugging Face-layout Llama model.
//!
//! One loop for every run ([`rankpilot::controller::run`]): a `--scheduler`, or the ranks given by
//! `--ranks`/`--adapter` and `--resize-at`. Logs train/val loss, tokens/s, learning rate, ranks
//! (total, histogram, sites × rounds heatmap) and AdaLoRA importance to TensorBoard; writes the
//! adapter as a PEFT directory to `<logdir>/adapter` (and to `--export-peft` when given) and a
//! `summary.json` next to it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tch::Kind;

use rankpilot_config::BadInput;
use runio::checkpoint;

use rankpilot::controller::{self, RunOptions, RunResource};
use rankpilot::scheduler::{BudgetSpec, RankScheduler, ResizeAt, SchedulerSpec};
use runio::tensorboard::SummaryWriter;
use tune::finetune::{FinetuneConfig, Finetuner, RankPlan, RankSpec};
use tune::lora::AdamW;
use tune::model::Target;
use tune::peft::PeftAdapter;

use crate::cli::Common;
use crate::commands::common::{TuneInput, load_env, load_model_and_data, load_probe, progress_bar};

/// Arguments of `rankpilot finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    input: TuneInput,
    /// Initial ranks: `R` for every site, or PEFT-style `key=R` items plus an optional default,
    /// e.g. `q_proj=16,mlp.down_proj=4,8` (first matching key wins).
    #[arg(long, default_value = "8", value_parser = RankSpec::parse)]
    ranks: RankSpec,
    /// Modules that carry LoRA sites (comma-separated): any of the seven projections (in every
    /// layer), `lm_head` and `embed_tokens` (PEFT's Embedding LoRA). With --adapter, every module
    /// of the adapter must be among them.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", value_delimiter = ',')]
    targets: Vec<Target>,
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
    /// uniform rank within --budget), `fixed:R`, `adalora`, `adalora-svd` (AdaLoRA as PEFT
    /// implements it: SVD-form sites masked every step; --budget rank:R, no --env), `squeeze`,
    /// `eva` (EVA's redistribution by explained variance, with --init eva) or
    /// `policy:<checkpoint dir>` (`policy:<dir>+hold` keeps its round-0 plan for the whole run,
    /// trimmed in proportion in a round whose conservative estimate it does not fit);
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
    /// A calibration probe of this model and data (the `.calibration.json` that `rankpilot
    /// calibrate` writes beside its preset): in round 0, before the run has measured anything, a
    /// policy reads each site's sensitivity from it instead of 1, as the simulator's first round
    /// reveals them. Needs --scheduler; other schedulers ignore it.
    #[arg(long, requires = "scheduler")]
    probe: Option<PathBuf>,
    /// Write a resumable checkpoint to <logdir>/resume at the start of every N-th round (0 = never):
    /// the sites with their optimizer and importance state, modules_to_save, the data position,
    /// the scheduler's and the resource's state, the rounds so far. Each replaces the last.
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Stop once the checkpoint at this round is written (as an interruption there would; exit 0).
    #[arg(long, requires = "save_every")]
    stop_at_round: Option<usize>,
    /// Continue an interrupted run from its checkpoint directory (<logdir>/resume). Every setting
    /// must be the same as the interrupted run's; the result equals the uninterrupted run's.
    #[arg(long)]
    resume: Option<PathBuf>,
}

fn parse_resize(s: &str) -> Result<(usize, RankSpec), String> {
    let (step, spec) = s.split_once(':').ok_or_else(|| format!("`{s}`: expected STEP:RANKS"))?;
    let step = step.trim().parse::<usize>().map_err(|_| format!("`{step}` is not a step"))?;
    Ok((step, RankSpec::parse(spec)?))
}

/// Runs the fine-tuning: arguments → one [`controller::run`] → PEFT export and `summary.json`.
/// Without `--scheduler`, the ranks come from `--ranks` (or `--adapter`) and `--resize-at`
/// ([`ResizeAt`]), with rounds at the resize and evaluation steps and no resource.
pub fn run(a: &FinetuneArgs) -> Result<()> {
    a.input.check()?;
    if a.steps == 0 || a.input.batch_size == 0 || a.input.seq_len == 0 || a.eval_every == 0 {
        return Err(BadInput("--steps, --batch-size, --seq-len and --eval-every must be positive".into()).into());
    }
    if a.scheduler.is_some() && (a.adapter.is_some() || !a.resize_at.is_empty()) {
        return Err(BadInput("--scheduler decides every resize: leave out --resize-at and --adapter".into()).into());
    }
    if a.scheduler.is_none() && (a.env != "none" || a.budget.is_some()) {
        return Err(BadInput("--env and --budget need --scheduler".into()).into());
    }
    if a.scheduler == Some(SchedulerSpec::AdaloraSvd) && (a.save_every > 0 || a.resume.is_some()) {
        return Err(BadInput(
            "--save-every / --resume with --scheduler adalora-svd: its allocator's importance averages are not checkpointed; allowed: a run without them".into(),
        )
        .into());
    }
    let device = a.common.device;
    let kind = if a.bf16 { Kind::BFloat16 } else { Kind::Float };
    let (model, vs, tok, corpus, data) =
        load_model_and_data(&a.input.model, &a.input.data, a.val_fraction, a.input.seq_len, device, kind)?;
    let base = a.input.finetune_config(a.steps, a.input.lr);
    let cfg = FinetuneConfig {
        init: a.input.init_for(a.scheduler.as_ref()),
        adam: AdamW { weight_decay: a.weight_decay, ..base.adam },
        warmup_steps: a.warmup,
        grad_clip: a.grad_clip,
        eval_batches: a.eval_batches,
        targets: a.targets.clone(),
        // A scheduler's sites start empty: round 0's plan sets them.
        ranks: if a.scheduler.is_some() { RankSpec { default: 0, patterns: vec![] } } else { a.ranks.clone() },
        alpha: a.alpha,
        rslora: a.rslora,
        track_importance: !a.no_importance,
        seed: a.common.seed,
        adalora: match &a.scheduler {
            Some(spec) => spec.adalora_config(a.budget, a.steps)?,
            None => None,
        },
        ..base
    };
    let env = load_env(&a.env)?;
    let mut ft = Finetuner::new(model, vs, data, cfg.clone())?;
    if let Some(dir) = &a.adapter {
        ft.load_peft(&PeftAdapter::load(dir)?)?;
    }
    let (mut sched, mut res, opts) = match &a.scheduler {
        Some(spec) => {
            let (sched, mut res) =
                controller::prepare(&ft, spec, env.as_ref(), a.budget, a.rounds, a.common.seed, device)?;
            if let Some(path) = &a.probe {
                res.set_probe(&load_probe(path)?, path, &ft.signals(false))?;
            }
            (sched, res, RunOptions::even(a.rounds, a.steps, a.eval_every)?)
        }
        None => {
            let names = ft.site_names();
            let mut plans = Vec::with_capacity(a.resize_at.len());
            // Check every listed plan before training starts.
            for (step, spec) in &a.resize_at {
                let plan = RankPlan::new(names.iter().map(|n| spec.rank_for(n)).collect());
                for (s, &r) in ft.model.sites().iter().zip(&plan.ranks) {
                    tune::lora::check_rank(&s.name, r, s.d_in, s.d_out)?;
                }
                plans.push((*step, plan));
            }
            plans.sort_by_key(|(step, _)| *step);
            let evals = (1..).map(|k| k * a.eval_every).take_while(|&s| s < a.steps);
            let opts = RunOptions::at_steps(plans.iter().map(|(s, _)| *s).chain(evals), a.steps, a.eval_every);
            // No resource: the rank set only scales the observation, which `ResizeAt` does not
            // read; the ranks the run takes, up to what the smallest site allows.
            let smallest = ft.model.sites().iter().map(|s| s.d_in.min(s.d_out)).min().unwrap_or(0);
            let mut ranks: Vec<u32> = [0, 1]
                .into_iter()
                .chain(ft.ranks())
                .chain(plans.iter().flat_map(|(_, p)| p.ranks.iter().copied()))
                .filter(|&r| r <= smallest)
                .map(|r| r as u32)
                .collect();
            ranks.sort_unstable();
            ranks.dedup();
            let res = RunResource::new(None, &ft.signals(false), Some(&ranks), opts.rounds(), 0.0, a.common.seed)?;
            (Box::new(ResizeAt { plans }) as Box<dyn RankScheduler>, res, opts)
        }
    };
    let names = ft.site_names();
    let mut tb = SummaryWriter::new(&a.logdir)?;
    let config_text = format!(
        "| key | value |\n|---|---|\n| model | {} |\n| data | {} ({} files, sha256 {}) |\n| tokenizer | {} |\n| sites | {} |\n| scheduler | {} |\n| env | {} |\n| config | `{}` |",
        a.input.model.display(),
        corpus.source,
        corpus.files.len(),
        corpus.sha256(),
        tok.describe(),
        names.len(),
        sched.name(),
        a.env,
        serde_json::to_string(&cfg)?
    );
    tb.add_text("config", &config_text, 0)?;
    eprintln!(
        "finetune: {} sites ({} trainable parameters) on {}, data {} ({} files, sha256 {}…), tokenizer {}, scheduler {}",
        names.len(),
        ft.trainable_params(),
        crate::device::describe(device),
        corpus.source,
        corpus.files.len(),
        &corpus.sha256()[..16],
        tok.describe(),
        sched.name()
    );
    // What makes a run this run: checked key by key before resuming.
    let mut settings = serde_json::to_value(&cfg)?;
    if let Some(o) = settings.as_object_mut() {
        o.insert("model".into(), serde_json::json!(a.input.model));
        o.insert("data_sha256".into(), serde_json::json!(corpus.sha256()));
        o.insert("adapter".into(), serde_json::json!(a.adapter));
        o.insert("scheduler".into(), serde_json::json!(sched.name()));
        o.insert("env".into(), serde_json::json!(a.env));
        o.insert("budget".into(), serde_json::json!(a.budget.map(|b| format!("{b:?}"))));
        o.insert("round_starts".into(), serde_json::json!(opts.round_starts));
        o.insert("resize_at".into(), serde_json::json!(format!("{:?}", a.resize_at)));
        o.insert("bf16".into(), serde_json::json!(a.bf16));
    }
    let ckpt = controller::Checkpointing {
        dir: (a.save_every > 0).then(|| a.logdir.join("resume")),
        every_rounds: a.save_every,
        stop_at_round: a.stop_at_round,
        resume: a.resume.clone(),
        settings,
    };
    let bar = progress_bar(a.steps);
    let report = match controller::run(&mut ft, sched.as_mut(), &mut res, &opts, &mut tb, &bar, &ckpt) {
        Err(e) if e.downcast_ref::<controller::Interrupted>().is_some() => {
            bar.finish_and_clear();
            println!("{e}");
            return Ok(());
        }
        r => r?,
    };
    bar.finish_and_clear();

    let base = a.input.model.display().to_string();
    let adapter_dir = a.logdir.join("adapter");
    if ft.adapter_params() > 0 {
        ft.export_peft(&adapter_dir, &base)?;
        if let Some(dir) = &a.export_peft {
            ft.export_peft(dir, &base)?;
        }
    } else {
        eprintln!("every site ended at rank 0 (no round delivered an adapter): no PEFT adapter written");
    }
    let train_s = ft.train_time.as_secs_f64();
    let resize_s = ft.resize_time.as_secs_f64();
    let summary = serde_json::json!({
        "steps": a.steps,
        "val_loss_initial": report.val_loss_initial,
        "val_loss_final": report.val_loss_final,
        "tokens": report.tokens,
        "tokens_per_s": report.tokens as f64 / train_s,
        "train_seconds": train_s,
        "resize_seconds": resize_s,
        "resize_share": resize_s / (train_s + resize_s),
        "ranks": names.iter().cloned().zip(ft.ranks()).collect::<std::collections::BTreeMap<_, _>>(),
        "adapter_params": ft.adapter_params(),
        "report": report,
        "data": {"source": corpus.source, "files": corpus.files.len(), "sha256": corpus.sha256()},
        "env": a.env,
        "config": cfg,
    });
    checkpoint::atomic_write(&a.logdir.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    let resource = match report.cost_unit.as_str() {
        "none" => String::new(),
        unit => {
            format!(", sent {:.3e} {unit}, {} of {} rounds lost", report.cost_sent, report.rounds_lost, opts.rounds())
        }
    };
    println!(
        "{}: {} steps in {} rounds, {:.1}s: val loss {:.4} -> {:.4}, {:.0} tokens/s, resize {:.3}% of training, mean adapter {:.0} parameters (final {}){resource}; adapter -> {}{}",
        report.scheduler,
        a.steps,
        opts.rounds(),
        report.wall_seconds,
        report.val_loss_initial,
        report.val_loss_final,
        report.tokens as f64 / train_s,
        100.0 * resize_s / train_s,
        report.mean_params,
        report.final_params,
        adapter_dir.display(),
        a.export_peft.as_ref().map(|d| format!(", {}", d.display())).unwrap_or_default()
    );
    Ok(())
}
