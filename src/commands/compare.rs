//! `rankpilot compare`: the same fine-tuning run under each scheduler, at an equal average
//! adapter-parameter budget, with the same resource realisation (seeded by the run's seed), for
//! several seeds. Prints a table of final validation loss (mean ± std over seeds), cost sent,
//! rounds lost, adapter size and wall time, and writes it as Markdown and JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use tch::Kind;

use rankpilot_config::BadInput;
use runio::checkpoint;
use serde::Deserialize;

use crate::cli::Common;
use crate::commands::common::{TuneInput, load_env, load_model_and_data, load_probe, progress_bar};
use crate::commands::peers::{self, PeerInit, PeftMethod};
use rankpilot::controller::{RunOptions, RunReport};
use rankpilot::scheduler::{BudgetSpec, SchedulerSpec};
use runio::tensorboard::SummaryWriter;
use tune::data::ValidationHalf;
use tune::finetune::{FinetuneConfig, Finetuner, RankSpec, SiteInit};

/// Arguments of `rankpilot compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    input: TuneInput,
    /// Resource beside the runs: `none`, a preset name or a preset file (e.g. from `calibrate`).
    #[arg(long, default_value = "wireless-rayleigh")]
    env: String,
    /// Average adapter-parameter budget every scheduler is held to: parameters or `rank:R`.
    #[arg(long, default_value = "rank:4", value_parser = BudgetSpec::parse)]
    budget: BudgetSpec,
    /// A calibration probe of this model and data (the `.calibration.json` that `rankpilot
    /// calibrate` writes beside its preset): in round 0, before a run has measured anything,
    /// policies read each site's sensitivity from it instead of 1, as the simulator's first
    /// round reveals them. The other schedulers read no observation and ignore it.
    #[arg(long)]
    probe: Option<PathBuf>,
    /// Schedulers to compare (comma-separated): fixed, fixed:R, adalora, adalora-svd, squeeze, eva,
    /// policy:<dir>, policy:<dir>+hold (the policy's round-0 plan held for the run, as EVA holds
    /// its own, trimmed in a round whose conservative estimate it does not fit; with --probe), and the classic ones with +skip (skip a round whose plan does not
    /// fit the conservative estimate). adalora-svd is AdaLoRA as PEFT implements it (SVD-form sites,
    /// orthogonality penalty, masking every step), in rankpilot's loop; it needs --env none and
    /// --budget rank:R. A row ending in @eva (or @eva:N) starts and grows its sites with EVA instead of
    /// --init, e.g. `fixed,fixed@eva`. Hugging Face PEFT's own methods are rows too: peft:lora,
    /// peft:adalora (init_r 1.5·R → target_r R, update_and_allocate every step) and peft:eva
    /// (EVA init and rank redistribution, rho 2), run in the set-up's venv on the same windows;
    /// they need --env none and --budget rank:R, and ignore --init.
    #[arg(
        long,
        default_value = "fixed,adalora,squeeze,policy:checkpoints/wireless-rayleigh",
        value_delimiter = ',',
        value_parser = RowSpec::parse
    )]
    schedulers: Vec<RowSpec>,
    /// Where the PEFT peers' initial adapter tensors come from: `peft` (PEFT draws them, its
    /// documented initialisation) or `rankpilot` (the tensors rankpilot's matching row starts from
    /// at the same seed: peft:lora gets fixed's, peft:adalora gets adalora-svd's), so that the
    /// paired difference between a peer and its row measures the two implementations alone.
    /// peft:eva initialises from data and is refused with `rankpilot`.
    #[arg(long, value_enum, default_value_t = PeerInit::Peft)]
    peer_init: PeerInit,
    /// Number of seeds: --seed, --seed + 1, …
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Seeds run at once, each in its own process (every scheduler of a seed in turn), with the
    /// cores divided among them: libtorch threads per process = cores / jobs (at least 1).
    /// Two libtorch processes that each take every core slow each other about 12× on 2 cores;
    /// divided, they do not. A seed's figures depend on its thread count (float reduction
    /// order), so compare tables at the same --jobs. Default 1: every seed in this process.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Learning rates to sweep, comma-separated (e.g. 1e-3,2e-3,5e-3,1e-2): every row runs once at
    /// each on seed --seed + --seeds (a seed not reported), scored on the first half of the
    /// validation text, and its reported runs use its best rate, scored on the second half.
    /// Without it every row uses --lr and the whole validation text.
    #[arg(long, value_delimiter = ',')]
    lr_sweep: Vec<f64>,
    /// Internal: run one task (JSON) as a worker of a `--jobs` comparison.
    #[arg(long, hide = true)]
    worker_task: Option<String>,
    /// Internal: where a worker writes its run (JSON).
    #[arg(long, hide = true)]
    worker_out: Option<PathBuf>,
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Rounds per run (scheduler decisions).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Validation batches.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// TensorBoard logs: one directory per scheduler and seed; the tables are written here too
    /// (compare.md, compare.json).
    #[arg(long, default_value = "runs/compare")]
    logdir: PathBuf,
}

/// A row of the table: a scheduler of rankpilot's loop, or a PEFT method run in Python.
#[derive(Debug, Clone)]
pub enum RowSpec {
    /// A scheduler, with its own site initialisation (`@eva[:N]`, `@kaiming`) when not `--init`'s.
    Loop {
        /// The scheduler.
        scheduler: SchedulerSpec,
        /// This row's [`SiteInit`].
        init: Option<SiteInit>,
    },
    /// `peft:lora`, `peft:adalora`, `peft:eva`: Hugging Face PEFT on the same windows.
    Peft(PeftMethod),
}

impl RowSpec {
    fn parse(s: &str) -> Result<RowSpec, String> {
        if let Some(m) = PeftMethod::parse(s) {
            return m.map(RowSpec::Peft);
        }
        let (sched, init) = match s.rsplit_once('@') {
            Some((sched, init)) if init.starts_with("eva") || init == "kaiming" => {
                (sched, Some(init.parse::<SiteInit>().map_err(|e| format!("`{s}`: {e}"))?))
            }
            _ => (s, None),
        };
        Ok(RowSpec::Loop { scheduler: SchedulerSpec::parse(sched)?, init })
    }

    /// The row's label: the scheduler's, with `@<init>` when it has its own.
    pub fn label(&self) -> String {
        match self {
            RowSpec::Peft(m) => m.label(),
            RowSpec::Loop { scheduler, init: None } => scheduler.label(),
            RowSpec::Loop { scheduler, init: Some(SiteInit::Kaiming) } => format!("{}@kaiming", scheduler.label()),
            RowSpec::Loop { scheduler, init: Some(SiteInit::Eva { batches }) } => {
                format!("{}@eva:{batches}", scheduler.label())
            }
        }
    }
}

/// One scheduler's row.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Scheduler label.
    pub scheduler: String,
    /// The learning rate of its runs (its best of the sweep, with `--lr-sweep`).
    pub lr: f64,
    /// Final validation loss per seed.
    pub val_loss: Vec<f64>,
    /// Mean final validation loss.
    pub val_loss_mean: f64,
    /// Sample standard deviation over seeds.
    pub val_loss_std: f64,
    /// Mean cost sent per run (resource unit).
    pub cost_sent_mean: f64,
    /// Mean rounds lost per run.
    pub rounds_lost_mean: f64,
    /// Mean rounds the scheduler skipped per run.
    pub rounds_skipped_mean: f64,
    /// Share of site decisions, from the second round on, whose rank differs from the previous
    /// round's (`RunReport::rank_change_rate`), mean over seeds: what `eval`'s rank change rate
    /// is in the simulator.
    pub rank_change_rate: f64,
    /// Mean adapter parameters over rounds and seeds.
    pub mean_params: f64,
    /// Mean final adapter parameters.
    pub final_params: f64,
    /// Mean wall time per run (s).
    pub wall_seconds_mean: f64,
    /// Final validation loss minus the first scheduler's, per seed (paired: same seed, same data
    /// order, same channel).
    pub val_loss_diff_vs_first: Vec<f64>,
    /// Cost sent relative to the first scheduler's.
    pub cost_ratio_vs_first: f64,
    /// Paired difference of final validation loss to the row with the lowest mean (`None` for
    /// that row itself): mean over seeds, its standard error and the 95 % t interval.
    pub vs_best: Option<PairedDifference>,
}

/// A paired difference over seeds: mean, standard error and 95 % t interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PairedDifference {
    /// Mean of the per-seed differences.
    pub mean: f64,
    /// Their standard error (sample standard deviation / √seeds).
    pub se: f64,
    /// Lower end of the 95 % interval (mean − t₀.₉₇₅,ₙ₋₁ · se).
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

impl PairedDifference {
    fn of(diffs: &[f64]) -> PairedDifference {
        let (m, sd) = mean_std(diffs);
        let se = sd / (diffs.len() as f64).sqrt();
        let t = t_975(diffs.len().saturating_sub(1));
        PairedDifference { mean: m, se, lo: m - t * se, hi: m + t * se }
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (1.96 beyond 30; NaN at 0).
fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = if x.len() > 1 { x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, v.sqrt())
}

/// One fine-tuning run of a comparison: a row at a seed and learning rate, scored on the whole
/// validation text or on one half of it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Task {
    /// Index into `--schedulers`.
    row: usize,
    seed: u64,
    lr: f64,
    /// `None`: the whole validation text (no sweep).
    half: Option<ValidationHalf>,
}

/// Runs the command.
pub fn run(a: &CompareArgs) -> Result<()> {
    a.input.check()?;
    if a.seeds == 0 || a.steps == 0 || a.schedulers.is_empty() {
        return Err(BadInput("--seeds, --steps: allowed: integers >= 1; --schedulers: at least one".into()).into());
    }
    if a.jobs == 0 {
        return Err(BadInput("--jobs: allowed: an integer >= 1".into()).into());
    }
    if let Some(lr) = a.lr_sweep.iter().find(|lr| !(lr.is_finite() && **lr > 0.0)) {
        return Err(BadInput(format!("--lr-sweep {lr}: allowed: positive learning rates")).into());
    }
    let env = load_env(&a.env)?;
    if a.schedulers.iter().any(|r| matches!(r, RowSpec::Peft(_))) {
        if env.is_some() {
            return Err(BadInput(format!(
                "--env {}: the PEFT peers (peft:*) run without a resource, which is rankpilot's simulation: use --env none",
                a.env
            ))
            .into());
        }
        if !matches!(a.budget, BudgetSpec::Rank(r) if r >= 1.0 && r.fract() == 0.0) {
            return Err(BadInput(
                "--budget: with peft:* rows, allowed: rank:R with a whole R >= 1 (the peers' LoRA rank; PEFT's AdaLoRA targets R per module)"
                    .into(),
            )
            .into());
        }
    }
    if a.peer_init == PeerInit::Rankpilot && a.schedulers.iter().any(|r| matches!(r, RowSpec::Peft(PeftMethod::Eva))) {
        return Err(BadInput(
            "--peer-init rankpilot: peft:eva initialises its adapter from data, rankpilot draws none for it; allowed rows: peft:lora, peft:adalora".into(),
        )
        .into());
    }
    for row in &a.schedulers {
        if let RowSpec::Loop { scheduler: spec @ SchedulerSpec::AdaloraSvd, .. } = row {
            if env.is_some() {
                return Err(BadInput(format!(
                    "--env {}: adalora-svd runs without a resource (it masks after every step and cannot roll back a lost round): use --env none",
                    a.env
                ))
                .into());
            }
            spec.adalora_config(Some(a.budget), a.steps)?;
        }
    }
    if let (Some(task), Some(out)) = (&a.worker_task, &a.worker_out) {
        let task: Task = serde_json::from_str(task).map_err(|e| BadInput(format!("--worker-task: {e}")))?;
        let report = run_task(a, env.as_ref(), &task)?;
        checkpoint::atomic_write(out, &serde_json::to_vec(&report)?)?;
        return Ok(());
    }
    // The learning-rate sweep: every row once at every rate, on a seed that is not reported,
    // scored on the first half of the validation text; the reported runs use each row's best
    // rate and are scored on the second half.
    let n_rows = a.schedulers.len();
    let mut lrs = vec![a.input.lr; n_rows];
    let mut sweep: Vec<Vec<f64>> = Vec::new();
    let sweep_seed = a.common.seed + a.seeds;
    let half = (!a.lr_sweep.is_empty()).then_some(ValidationHalf::Report);
    if !a.lr_sweep.is_empty() {
        let tasks: Vec<Task> = (0..n_rows)
            .flat_map(|row| {
                a.lr_sweep.iter().map(move |&lr| Task { row, seed: sweep_seed, lr, half: Some(ValidationHalf::Select) })
            })
            .collect();
        eprintln!(
            "learning-rate sweep: {} runs on seed {sweep_seed}, scored on the first half of the validation text",
            tasks.len()
        );
        let reports = execute(a, env.as_ref(), &tasks)?;
        sweep = reports.chunks(a.lr_sweep.len()).map(|rs| rs.iter().map(|r| r.val_loss_final).collect()).collect();
        for (row, losses) in sweep.iter().enumerate() {
            let best = (0..losses.len()).min_by(|&i, &j| losses[i].total_cmp(&losses[j])).unwrap_or(0);
            lrs[row] = a.lr_sweep[best];
        }
    }
    let tasks: Vec<Task> = (0..a.seeds)
        .flat_map(|k| {
            let lrs = &lrs;
            (0..n_rows).map(move |row| Task { row, seed: a.common.seed + k, lr: lrs[row], half })
        })
        .collect();
    let reports = execute(a, env.as_ref(), &tasks)?;
    let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); n_rows];
    for (t, r) in tasks.iter().zip(reports) {
        runs[t.row].push(r);
    }
    let unit = runs[0].first().map_or_else(|| "none".to_string(), |r| r.cost_unit.clone());
    let first: Vec<f64> = runs[0].iter().map(|r| r.val_loss_final).collect();
    let first_cost = runs[0].iter().map(|r| r.cost_sent).sum::<f64>();
    let rows: Vec<CompareRow> = runs
        .iter()
        .zip(&lrs)
        .map(|(rs, &lr)| {
            let v: Vec<f64> = rs.iter().map(|r| r.val_loss_final).collect();
            let (m, s) = mean_std(&v);
            let avg = |f: &dyn Fn(&RunReport) -> f64| rs.iter().map(f).sum::<f64>() / rs.len() as f64;
            CompareRow {
                scheduler: rs[0].scheduler.clone(),
                lr,
                val_loss: v,
                val_loss_mean: m,
                val_loss_std: s,
                cost_sent_mean: avg(&|r| r.cost_sent),
                rounds_lost_mean: avg(&|r| r.rounds_lost as f64),
                rounds_skipped_mean: avg(&|r| r.rounds_skipped as f64),
                rank_change_rate: avg(&|r| r.rank_change_rate()),
                mean_params: avg(&|r| r.mean_params),
                final_params: avg(&|r| r.final_params as f64),
                wall_seconds_mean: avg(&|r| r.wall_seconds),
                val_loss_diff_vs_first: rs.iter().zip(&first).map(|(r, f)| r.val_loss_final - f).collect(),
                cost_ratio_vs_first: rs.iter().map(|r| r.cost_sent).sum::<f64>() / first_cost.max(f64::MIN_POSITIVE),
                vs_best: None,
            }
        })
        .collect();
    let mut rows = rows;
    let best = (0..rows.len()).min_by(|&i, &j| rows[i].val_loss_mean.total_cmp(&rows[j].val_loss_mean)).unwrap_or(0);
    let best_loss = rows[best].val_loss.clone();
    for (i, r) in rows.iter_mut().enumerate() {
        if i != best {
            let d: Vec<f64> = r.val_loss.iter().zip(&best_loss).map(|(x, b)| x - b).collect();
            r.vs_best = Some(PairedDifference::of(&d));
        }
    }
    // Resource columns only where a resource was simulated (`--env none` sends nothing).
    let simulated = env.is_some();
    let budget = match a.budget {
        BudgetSpec::Params(p) => format!("{p}"),
        BudgetSpec::Rank(r) => format!("rank:{r}"),
    };
    let resource_head = if simulated {
        format!(
            " {unit} sent / run | {unit} vs {first} | rounds lost / run | rounds skipped / run | rank change rate |",
            first = rows[0].scheduler
        )
    } else {
        String::new()
    };
    let sweep_arg = if a.lr_sweep.is_empty() {
        String::new()
    } else {
        format!(" --lr-sweep {}", a.lr_sweep.iter().map(|lr| format!("{lr:e}")).collect::<Vec<_>>().join(","))
    };
    let sweep_arg = match a.peer_init {
        PeerInit::Peft => sweep_arg,
        PeerInit::Rankpilot => format!("{sweep_arg} --peer-init rankpilot"),
    };
    let sweep_arg = match &a.probe {
        Some(p) => format!("{sweep_arg} --probe {}", p.display()),
        None => sweep_arg,
    };
    let sweep_arg = match a.input.shrink {
        tune::lora::Shrink::Svd => sweep_arg,
        tune::lora::Shrink::Prune => format!("{sweep_arg} --shrink prune"),
    };
    let mut md = format!(
        "`rankpilot compare --model {} --data {} --env {} --budget {} --seeds {} --steps {} --rounds {} --seed {}{sweep_arg}`\n\n| scheduler | lr | final val loss (mean ± std) | Δ vs best, {best_name} (paired, mean ± se [95% t interval]) |{resource_head} mean adapter params | final adapter params | wall s / run |\n|---|---:|---:|---:|{}---:|---:|---:|\n",
        a.input.model.display(),
        a.input.data,
        a.env,
        budget,
        a.seeds,
        a.steps,
        a.rounds,
        a.common.seed,
        if simulated { "---:|---:|---:|---:|---:|" } else { "" },
        best_name = rows[best].scheduler,
    );
    for r in &rows {
        let diff = match r.vs_best {
            // One seed has no spread: say so rather than print NaN.
            Some(d) if d.lo.is_nan() => format!("{:+.4} (one seed: no interval)", d.mean),
            Some(d) => format!("{:+.4} ± {:.4} [{:+.4}, {:+.4}]", d.mean, d.se, d.lo, d.hi),
            None => "best".into(),
        };
        let resource = if simulated {
            format!(
                " {:.3e} | {:.2}× | {:.1} / {} | {:.1} | {:.4} |",
                r.cost_sent_mean,
                r.cost_ratio_vs_first,
                r.rounds_lost_mean,
                a.rounds,
                r.rounds_skipped_mean,
                r.rank_change_rate
            )
        } else {
            String::new()
        };
        md += &format!(
            "| {} | {:.0e} | {:.4} ± {:.4} | {diff} |{resource} {:.0} | {:.0} | {:.1} |\n",
            r.scheduler, r.lr, r.val_loss_mean, r.val_loss_std, r.mean_params, r.final_params, r.wall_seconds_mean
        );
    }
    if half.is_some() {
        md += "\nScored on the second half of the validation text; each row's learning rate is its best of the sweep below.\n";
    }
    md += &format!(
        "\nPer seed (final val loss; seeds {}..{}, paired: same data order and channel):\n\n| scheduler |{}\n|---|{}\n",
        a.common.seed,
        a.common.seed + a.seeds - 1,
        (0..a.seeds).map(|s| format!(" seed {} |", a.common.seed + s)).collect::<String>(),
        "---:|".repeat(a.seeds as usize)
    );
    for r in &rows {
        md += &format!("| {} |{}\n", r.scheduler, r.val_loss.iter().map(|v| format!(" {v:.4} |")).collect::<String>());
    }
    if !sweep.is_empty() {
        md += &format!(
            "\nLearning-rate sweep (seed {sweep_seed}, final val loss on the first half of the validation text; * = chosen):\n\n| scheduler |{}\n|---|{}\n",
            a.lr_sweep.iter().map(|lr| format!(" {lr:.0e} |")).collect::<String>(),
            "---:|".repeat(a.lr_sweep.len())
        );
        for ((r, losses), &chosen) in rows.iter().zip(&sweep).zip(&lrs) {
            md += &format!(
                "| {} |{}\n",
                r.scheduler,
                losses
                    .iter()
                    .zip(&a.lr_sweep)
                    .map(|(v, &lr)| format!(" {v:.4}{} |", if lr == chosen { "*" } else { "" }))
                    .collect::<String>()
            );
        }
    }
    let json = serde_json::json!({
        "model": a.input.model, "data": a.input.data, "env": a.env, "budget": budget,
        "seeds": a.seeds, "seed": a.common.seed, "steps": a.steps, "rounds": a.rounds,
        "lr_sweep": a.lr_sweep, "sweep_seed": sweep_seed, "sweep_val_loss": sweep,
        "peer_init": format!("{:?}", a.peer_init).to_lowercase(), "shrink": a.input.shrink,
        "rows": rows, "runs": runs,
    });
    std::fs::create_dir_all(&a.logdir)?;
    let figures = write_figures(a, &runs, &unit, simulated)?;
    md += &format!("\nFigures: {}\n", figures.join(", "));
    checkpoint::atomic_write(&a.logdir.join("compare.md"), md.as_bytes())?;
    checkpoint::atomic_write(&a.logdir.join("compare.json"), &serde_json::to_vec_pretty(&json)?)?;
    println!("{md}");
    println!(
        "tables: {} and {}; TensorBoard: tensorboard --logdir {}",
        a.logdir.join("compare.md").display(),
        a.logdir.join("compare.json").display(),
        a.logdir.display()
    );
    Ok(())
}

/// Runs the tasks, in this process or (`--jobs N`) in worker processes, and returns their reports
/// in task order.
fn execute(a: &CompareArgs, env: Option<&envs::EnvPreset>, tasks: &[Task]) -> Result<Vec<RunReport>> {
    if a.jobs > 1 && tasks.len() > 1 {
        return run_tasks_in_processes(a, tasks);
    }
    tasks.iter().map(|t| run_task(a, env, t)).collect()
}

/// One run: a Rust scheduler through the controller, or a PEFT peer in Python, with its logs.
fn run_task(a: &CompareArgs, env: Option<&envs::EnvPreset>, task: &Task) -> Result<RunReport> {
    let device = a.common.device;
    let spec = &a.schedulers[task.row];
    let seed = task.seed;
    let (model, vs, _tok, _corpus, mut data) =
        load_model_and_data(&a.input.model, &a.input.data, 0.1, a.input.seq_len, device, Kind::Float)?;
    if let Some(h) = task.half {
        data.keep_validation_half(h, a.input.seq_len)?;
    }
    let init = match spec {
        RowSpec::Loop { scheduler, init } => init.unwrap_or(a.input.init_for(Some(scheduler))),
        RowSpec::Peft(_) => SiteInit::Kaiming,
    };
    let adalora = match spec {
        RowSpec::Loop { scheduler, .. } => scheduler.adalora_config(Some(a.budget), a.steps)?,
        RowSpec::Peft(_) => None,
    };
    let cfg = FinetuneConfig {
        init,
        adalora,
        eval_batches: a.eval_batches,
        ranks: RankSpec { default: 0, patterns: vec![] },
        seed,
        ..a.input.finetune_config(a.steps, task.lr)
    };
    let label = spec.label();
    let run_dir = label.replace([':', '/', '@'], "-");
    let dir = match task.half {
        Some(ValidationHalf::Select) => a.logdir.join("sweep").join(&run_dir).join(format!("lr{:e}", task.lr)),
        _ => a.logdir.join(&run_dir).join(format!("seed{seed}")),
    };
    let mut tb = SummaryWriter::new(&dir)?;
    tb.add_text(
        "config",
        &format!(
            "row `{label}`, env `{}`, budget {:?}, seed {seed}, lr {:e}, {} steps in {} rounds, validation {}",
            a.env,
            a.budget,
            task.lr,
            a.steps,
            a.rounds,
            match task.half {
                None => "the whole text",
                Some(ValidationHalf::Select) => "first half (sweep)",
                Some(ValidationHalf::Report) => "second half (reported)",
            }
        ),
        0,
    )?;
    // Four evaluations per run (and the final one).
    let opts = RunOptions::even(a.rounds, a.steps, (a.steps / a.rounds.max(1)).max(1) * a.rounds.div_ceil(4))?;
    let mut report = match spec {
        RowSpec::Loop { scheduler, .. } => {
            let mut ft = Finetuner::new(model, vs, data, cfg)?;
            let (mut sched, mut res) =
                rankpilot::controller::prepare(&ft, scheduler, env, Some(a.budget), a.rounds, seed, device)?;
            if let Some(path) = &a.probe {
                res.set_probe(&load_probe(path)?, path, &ft.signals(false))?;
            }
            let bar = progress_bar(a.steps);
            if a.worker_out.is_some() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let report = rankpilot::controller::run(
                &mut ft,
                sched.as_mut(),
                &mut res,
                &opts,
                &mut tb,
                &bar,
                &Default::default(),
            )?;
            bar.finish_and_clear();
            report
        }
        RowSpec::Peft(method) => {
            let BudgetSpec::Rank(rank) = a.budget else { unreachable!("checked in run") };
            let rank = rank as usize;
            let (data, init) = match a.peer_init {
                PeerInit::Peft => {
                    drop((model, vs));
                    (data, None)
                }
                PeerInit::Rankpilot => {
                    let (data, tensors) = peers::rankpilot_init(*method, model, vs, data, &cfg, rank)?;
                    (data, Some(tensors))
                }
            };
            let work = peers::work_dir(&a.logdir)?;
            let peer = peers::PeerRun {
                method: *method,
                model: &a.input.model,
                cfg: &cfg,
                rank,
                eval_steps: opts.eval_steps(a.steps),
                eva_batches: 4,
                work: &work,
                init,
            };
            let tag = format!("{run_dir}-lr{:e}", task.lr);
            let (report, train_loss) = peers::run_peer(&peer, &data, &tag)?;
            for (k, l) in train_loss.iter().enumerate() {
                tb.add_scalar("train/loss", *l, k as i64 + 1)?;
            }
            for &(step, v) in &report.val_curve {
                tb.add_scalar("val/loss", v, step as i64)?;
            }
            tb.add_scalar("ranks/adapter_params", report.final_params as f64, a.steps as i64)?;
            report
        }
    };
    tb.flush()?;
    report.scheduler = label;
    // No resource (`--env none`): nothing is sent, lost or skipped.
    let resource = match report.cost_unit.as_str() {
        "none" => String::new(),
        unit => format!(
            "  sent {:.3e} {unit}  lost {}/{}  skipped {}",
            report.cost_sent, report.rounds_lost, a.rounds, report.rounds_skipped
        ),
    };
    eprintln!(
        "seed {seed} lr {:.0e} {:<28} val loss {:.4}{resource}  mean params {:.0}  {:.1}s",
        task.lr, report.scheduler, report.val_loss_final, report.mean_params, report.wall_seconds
    );
    Ok(report)
}

/// Runs every task in its own worker process (this binary, `compare … --worker-task T
/// --worker-out F`), at most `--jobs` at a time with the cores divided among them: the same
/// reports as one process would give at that thread count.
fn run_tasks_in_processes(a: &CompareArgs, tasks: &[Task]) -> Result<Vec<RunReport>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = a.jobs.min(tasks.len());
    let threads = (cores / jobs).max(1);
    eprintln!("running {} runs in {jobs} processes at a time, {threads} thread(s) each", tasks.len());
    let exe = std::env::current_exe()?;
    let work = tempfile::tempdir()?;
    let bar = progress_bar(tasks.len());
    let mut pending: Vec<usize> = (0..tasks.len()).rev().collect();
    let mut running: Vec<(usize, std::process::Child)> = Vec::new();
    let mut failed = None;
    while failed.is_none() && (!pending.is_empty() || !running.is_empty()) {
        while running.len() < jobs
            && let Some(i) = pending.pop()
        {
            // The parent's own arguments, then the worker's: later flags override earlier ones.
            let child = std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .args(["--jobs", "1", "--worker-task", &serde_json::to_string(&tasks[i])?, "--worker-out"])
                .arg(work.path().join(format!("task{i}.json")))
                .env("OMP_NUM_THREADS", threads.to_string())
                .env("MKL_NUM_THREADS", threads.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .with_context(|| {
                    // A binary rebuilt under a running comparison leaves /proc/self/exe deleted.
                    format!("starting a worker from {} (was the binary replaced during the run?)", exe.display())
                })?;
            running.push((i, child));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut k = 0;
        while k < running.len() {
            match running[k].1.try_wait()? {
                Some(status) => {
                    let (i, _) = running.swap_remove(k);
                    if !status.success() {
                        failed = Some((i, status));
                    }
                    bar.inc(1);
                }
                None => k += 1,
            }
        }
    }
    bar.finish_and_clear();
    if let Some((i, status)) = failed {
        for (_, mut c) in running {
            let _ = c.kill();
            let _ = c.wait();
        }
        let t = &tasks[i];
        anyhow::bail!(
            "the worker for `{}` at seed {} (lr {:e}) failed ({status}); its error is printed above",
            a.schedulers[t.row].label(),
            t.seed,
            t.lr
        );
    }
    (0..tasks.len())
        .map(|i| {
            let path = work.path().join(format!("task{i}.json"));
            Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
        })
        .collect()
}

/// The comparison's figures, as PNG files in `--logdir` (next to the tables) and as images in its
/// `figures` TensorBoard run: validation loss against step per scheduler (mean over seeds, band
/// from the lowest to the highest seed), each scheduler's rank map of the first seed (from that
/// run's `ranks.png`), and with a resource the cost sent against the budget (first seed).
fn write_figures(a: &CompareArgs, runs: &[Vec<RunReport>], unit: &str, simulated: bool) -> Result<Vec<String>> {
    use runio::figures;
    let mut written = Vec::new();
    let mut tb = SummaryWriter::new(a.logdir.join("figures"))?;
    let mut save = |name: &str, img: &runio::tensorboard::RgbImage, tb: &mut SummaryWriter| -> Result<()> {
        tb.add_image_rgb(name.trim_end_matches(".png"), img.width, img.height, &img.rgb, 0)?;
        checkpoint::atomic_write(
            &a.logdir.join(name),
            &runio::tensorboard::encode_png(img.width, img.height, &img.rgb)?,
        )?;
        written.push(name.to_string());
        Ok(())
    };
    let series: Vec<figures::LossSeries> = runs
        .iter()
        .map(|rs| figures::LossSeries {
            label: rs[0].scheduler.clone(),
            steps: rs[0].val_curve.iter().map(|&(s, _)| s as f64).collect(),
            seeds: rs.iter().map(|r| r.val_curve.iter().map(|&(_, v)| v).collect()).collect(),
        })
        .collect();
    let title = format!("validation loss, {} seeds (band: lowest to highest seed), env {}", a.seeds, a.env);
    save("val_loss.png", &figures::loss_curves(&title, &series)?, &mut tb)?;
    if simulated {
        let spent: Vec<(String, Vec<f64>)> =
            runs.iter().map(|rs| (rs[0].scheduler.clone(), rs[0].rounds.iter().map(|r| r.cost).collect())).collect();
        let budget: Vec<f64> = runs[0][0].rounds.iter().map(|r| r.budget).collect();
        let title = format!("{unit} sent against the budget, seed {}", a.common.seed);
        save("spend.png", &figures::spend(&title, unit, &spent, &budget)?, &mut tb)?;
    }
    for rs in runs {
        let label = rs[0].scheduler.replace([':', '/', '@'], "-");
        let from = a.logdir.join(&label).join(format!("seed{}", a.common.seed)).join("ranks.png");
        if let Ok(bytes) = std::fs::read(&from) {
            let name = format!("ranks-{label}.png");
            checkpoint::atomic_write(&a.logdir.join(&name), &bytes)?;
            written.push(name);
        }
    }
    tb.flush()?;
    Ok(written)
}
