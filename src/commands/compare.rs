//! `rankpilot compare`: the same fine-tuning run under each scheduler, at an equal average
//! adapter-parameter budget, with the same resource realisation (seeded by the run's seed), for
//! several seeds. Prints a table of final validation loss (mean ± std over seeds), cost sent,
//! rounds lost, adapter size and wall time, and writes it as Markdown and JSON.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tch::Kind;

use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;
use crate::commands::common::{TuneInput, load_env, load_model_and_data, progress_bar};
use rankpilot::controller::{RunOptions, RunReport};
use rankpilot::scheduler::{BudgetSpec, SchedulerSpec};
use runio::tensorboard::SummaryWriter;
use tune::finetune::{FinetuneConfig, Finetuner, RankSpec, SiteInit};
use tune::lora::AdamW;

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
    /// Schedulers to compare (comma-separated): fixed, fixed:R, adalora, squeeze, policy:<dir>, and
    /// the classic ones with +skip (skip a round whose plan does not fit the conservative estimate).
    /// A row ending in @eva (or @eva:N) starts and grows its sites with EVA instead of --init,
    /// e.g. `fixed,fixed@eva`.
    #[arg(
        long,
        default_value = "fixed,adalora,squeeze,policy:checkpoints/wireless-rayleigh",
        value_delimiter = ',',
        value_parser = RowSpec::parse
    )]
    schedulers: Vec<RowSpec>,
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
    /// Internal: run as one worker of a `--jobs` comparison and write its runs (JSON) here.
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

/// A row of the table: a scheduler, and the site initialisation when it is not `--init`'s.
#[derive(Debug, Clone)]
pub struct RowSpec {
    /// The scheduler.
    pub scheduler: SchedulerSpec,
    /// `@eva[:N]`: this row's [`SiteInit`].
    pub init: Option<SiteInit>,
}

impl RowSpec {
    fn parse(s: &str) -> Result<RowSpec, String> {
        let (sched, init) = match s.rsplit_once('@') {
            Some((sched, init)) if init.starts_with("eva") || init == "kaiming" => {
                (sched, Some(init.parse::<SiteInit>().map_err(|e| format!("`{s}`: {e}"))?))
            }
            _ => (s, None),
        };
        Ok(RowSpec { scheduler: SchedulerSpec::parse(sched)?, init })
    }

    /// The row's label: the scheduler's, with `@<init>` when it has its own.
    pub fn label(&self) -> String {
        match self.init {
            None => self.scheduler.label(),
            Some(SiteInit::Kaiming) => format!("{}@kaiming", self.scheduler.label()),
            Some(SiteInit::Eva { batches }) => format!("{}@eva:{batches}", self.scheduler.label()),
        }
    }
}

/// One scheduler's row.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Scheduler label.
    pub scheduler: String,
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

/// Runs the command.
pub fn run(a: &CompareArgs) -> Result<()> {
    a.input.check()?;
    if a.seeds == 0 || a.steps == 0 || a.schedulers.is_empty() {
        return Err(BadInput("--seeds, --steps: allowed: integers >= 1; --schedulers: at least one".into()).into());
    }
    if a.jobs == 0 {
        return Err(BadInput("--jobs: allowed: an integer >= 1".into()).into());
    }
    let env = load_env(&a.env)?;
    let device = a.common.device;
    let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); a.schedulers.len()];
    let mut unit = String::from("none");
    let in_processes = a.jobs > 1 && a.seeds > 1 && a.worker_out.is_none();
    if in_processes {
        runs = run_seeds_in_processes(a)?;
        unit = runs[0].first().map_or(unit, |r| r.cost_unit.clone());
    }
    for k in (0..a.seeds).filter(|_| !in_processes) {
        let seed = a.common.seed + k;
        for (i, spec) in a.schedulers.iter().enumerate() {
            let (model, vs, _tok, _corpus, data) =
                load_model_and_data(&a.input.model, &a.input.data, 0.1, a.input.seq_len, device, Kind::Float)?;
            let cfg = FinetuneConfig {
                steps: a.steps,
                batch_size: a.input.batch_size,
                schedule: a.input.lr_schedule,
                grad_accum: a.input.grad_accum,
                lora_dropout: a.input.lora_dropout,
                init: spec.init.unwrap_or(if spec.scheduler.needs_eva_init() && a.input.init == SiteInit::Kaiming {
                    SiteInit::Eva { batches: 4 }
                } else {
                    a.input.init
                }),
                seq_len: a.input.seq_len,
                adam: AdamW { lr: a.input.lr, ..AdamW::default() },
                eval_batches: a.eval_batches,
                ranks: RankSpec { default: 0, patterns: vec![] },
                seed,
                ..FinetuneConfig::default()
            };
            let mut ft = Finetuner::new(model, vs, data, cfg)?;
            let (mut sched, mut res) = rankpilot::controller::prepare(
                &ft,
                &spec.scheduler,
                env.as_ref(),
                Some(a.budget),
                a.rounds,
                seed,
                device,
            )?;
            let dir = a.logdir.join(spec.label().replace([':', '/', '@'], "-")).join(format!("seed{seed}"));
            let mut tb = SummaryWriter::new(&dir)?;
            tb.add_text(
                "config",
                &format!(
                    "scheduler `{}`, env `{}`, budget {:?}, seed {seed}, {} steps in {} rounds",
                    spec.label(),
                    a.env,
                    a.budget,
                    a.steps,
                    a.rounds
                ),
                0,
            )?;
            let bar = progress_bar(a.steps);
            if a.worker_out.is_some() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            // Four evaluations per run (and the final one).
            let opts = RunOptions::even(a.rounds, a.steps, (a.steps / a.rounds.max(1)).max(1) * a.rounds.div_ceil(4))?;
            let mut report = rankpilot::controller::run(
                &mut ft,
                sched.as_mut(),
                &mut res,
                &opts,
                &mut tb,
                &bar,
                &Default::default(),
            )?;
            bar.finish_and_clear();
            report.scheduler = spec.label();
            eprintln!(
                "seed {seed} {:<28} val loss {:.4}  sent {:.3e} {}  lost {}/{}  skipped {}  mean params {:.0}  {:.1}s",
                report.scheduler,
                report.val_loss_final,
                report.cost_sent,
                report.cost_unit,
                report.rounds_lost,
                a.rounds,
                report.rounds_skipped,
                report.mean_params,
                report.wall_seconds
            );
            unit = report.cost_unit.clone();
            runs[i].push(report);
        }
    }
    if let Some(out) = &a.worker_out {
        checkpoint::atomic_write(out, &serde_json::to_vec(&runs)?)?;
        return Ok(());
    }
    let first: Vec<f64> = runs[0].iter().map(|r| r.val_loss_final).collect();
    let first_cost = runs[0].iter().map(|r| r.cost_sent).sum::<f64>();
    let rows: Vec<CompareRow> = runs
        .iter()
        .map(|rs| {
            let v: Vec<f64> = rs.iter().map(|r| r.val_loss_final).collect();
            let (m, s) = mean_std(&v);
            let avg = |f: &dyn Fn(&RunReport) -> f64| rs.iter().map(f).sum::<f64>() / rs.len() as f64;
            CompareRow {
                scheduler: rs[0].scheduler.clone(),
                val_loss: v,
                val_loss_mean: m,
                val_loss_std: s,
                cost_sent_mean: avg(&|r| r.cost_sent),
                rounds_lost_mean: avg(&|r| r.rounds_lost as f64),
                rounds_skipped_mean: avg(&|r| r.rounds_skipped as f64),
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
            " {unit} sent / run | {unit} vs {first} | rounds lost / run | rounds skipped / run |",
            first = rows[0].scheduler
        )
    } else {
        String::new()
    };
    let mut md = format!(
        "`rankpilot compare --model {} --data {} --env {} --budget {} --seeds {} --steps {} --rounds {} --seed {}`\n\n| scheduler | final val loss (mean ± std) | Δ vs best, {best_name} (paired, mean ± se [95% t interval]) |{resource_head} mean adapter params | final adapter params | wall s / run |\n|---|---:|---:|{}---:|---:|---:|\n",
        a.input.model.display(),
        a.input.data,
        a.env,
        budget,
        a.seeds,
        a.steps,
        a.rounds,
        a.common.seed,
        if simulated { "---:|---:|---:|---:|" } else { "" },
        best_name = rows[best].scheduler,
    );
    for r in &rows {
        let diff = match r.vs_best {
            Some(d) => format!("{:+.4} ± {:.4} [{:+.4}, {:+.4}]", d.mean, d.se, d.lo, d.hi),
            None => "best".into(),
        };
        let resource = if simulated {
            format!(
                " {:.3e} | {:.2}× | {:.1} / {} | {:.1} |",
                r.cost_sent_mean, r.cost_ratio_vs_first, r.rounds_lost_mean, a.rounds, r.rounds_skipped_mean
            )
        } else {
            String::new()
        };
        md += &format!(
            "| {} | {:.4} ± {:.4} | {diff} |{resource} {:.0} | {:.0} | {:.1} |\n",
            r.scheduler, r.val_loss_mean, r.val_loss_std, r.mean_params, r.final_params, r.wall_seconds_mean
        );
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
    let json = serde_json::json!({
        "model": a.input.model, "data": a.input.data, "env": a.env, "budget": budget,
        "seeds": a.seeds, "seed": a.common.seed, "steps": a.steps, "rounds": a.rounds,
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

/// Runs every seed in its own worker process (this binary, `compare … --seed S --seeds 1
/// --worker-out F`), at most `--jobs` at a time with the cores divided among them, and gathers
/// their runs per scheduler in seed order: the same table as one process would give at that
/// thread count.
fn run_seeds_in_processes(a: &CompareArgs) -> Result<Vec<Vec<RunReport>>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = a.jobs.min(a.seeds as usize);
    let threads = (cores / jobs).max(1);
    eprintln!("running {} seeds in {jobs} processes at a time, {threads} thread(s) each", a.seeds);
    let exe = std::env::current_exe()?;
    let work = tempfile::tempdir()?;
    let bar = progress_bar(a.seeds as usize);
    let mut pending: Vec<u64> = (0..a.seeds).rev().collect();
    let mut running: Vec<(u64, std::process::Child)> = Vec::new();
    let mut failed = None;
    while failed.is_none() && (!pending.is_empty() || !running.is_empty()) {
        while running.len() < jobs
            && let Some(k) = pending.pop()
        {
            let seed = a.common.seed + k;
            // The parent's own arguments, then the worker's: later flags override earlier ones.
            let child = std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .args(["--seed", &seed.to_string(), "--seeds", "1", "--jobs", "1", "--worker-out"])
                .arg(work.path().join(format!("seed{k}.json")))
                .env("OMP_NUM_THREADS", threads.to_string())
                .env("MKL_NUM_THREADS", threads.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()?;
            running.push((k, child));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait()? {
                Some(status) => {
                    let (k, _) = running.swap_remove(i);
                    if !status.success() {
                        failed = Some((k, status));
                    }
                    bar.inc(1);
                }
                None => i += 1,
            }
        }
    }
    bar.finish_and_clear();
    if let Some((k, status)) = failed {
        for (_, mut c) in running {
            let _ = c.kill();
            let _ = c.wait();
        }
        anyhow::bail!("the worker for seed {} failed ({status}); its error is printed above", a.common.seed + k);
    }
    let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); a.schedulers.len()];
    for k in 0..a.seeds {
        let path = work.path().join(format!("seed{k}.json"));
        let seed_runs: Vec<Vec<RunReport>> = serde_json::from_slice(&std::fs::read(&path)?)?;
        for (row, mut r) in runs.iter_mut().zip(seed_runs) {
            row.append(&mut r);
        }
    }
    Ok(runs)
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
