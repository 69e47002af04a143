//! `rankpilot train`: train a rank policy in a simulated environment.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use envs::{Baseline, EvalTable};
use policies::model::TrainedPolicy;
use policies::trainer::{PolicyPreset, Trainer};

use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;
use runio::tensorboard::SummaryWriter;

/// Arguments of `rankpilot train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Environment preset: an embedded name (wireless-rayleigh, wireless-rician, latency, budget,
    /// llama7b) or a path to a .toml file.
    #[arg(long, default_value = "wireless-rayleigh")]
    pub env: String,
    /// Train on a distribution of environments instead of one preset: an embedded name
    /// (default: every generative parameter varied, channel, compute and budget resources) or a
    /// path to a distribution .toml. Every episode of each group of 4 environments is a new
    /// draw; evaluation during training (and `best/`) uses 4 validation draws from the run's
    /// evaluation seed. Report held-out figures with `rankpilot eval --suite`.
    #[arg(long, conflicts_with = "env")]
    pub distribution: Option<String>,
    /// Policy/training preset: an embedded name (default, ddim, tiny, ppo) or a path to a .toml file.
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Environment steps to train for (rounds × environments) [default: 300000; with --resume:
    /// the resumed run's own total, so a resume continues the run that was started — give
    /// --steps to change it, which also rescales the learning-rate schedule].
    #[arg(long)]
    pub steps: Option<u64>,
    /// TensorBoard log directory [default: runs/train-<env>-s<seed>].
    #[arg(long)]
    pub logdir: Option<PathBuf>,
    /// Checkpoint directory (written periodically and at the end) [default: checkpoints/<env>].
    /// The policy with the best evaluation so far is also kept in <out>/best.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the checkpoint in --out (same seed, presets and planned steps as stored
    /// there; the best evaluation so far is kept).
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Start a fresh run even if --out already holds a checkpoint, replacing it.
    #[arg(long)]
    pub force: bool,
    /// Write a checkpoint every this many PPO iterations.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Evaluate (greedy policy vs uniform and oracle) every this many iterations; 0 = only at
    /// the end.
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Episodes per evaluation (held-out seeds).
    #[arg(long, default_value_t = 32)]
    pub eval_episodes: usize,
    /// Stop after this many iterations even if --steps is not reached (to test resuming).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

/// Evaluation seeds are disjoint from training seeds (training uses derive_seed(seed, 1..)).
pub fn eval_seed(seed: u64) -> u64 {
    seed ^ 0x5eed_0000_e7a1
}

/// Runs the command.
pub fn run(a: &TrainArgs) -> anyhow::Result<()> {
    if !(1..=MAX_EVAL_EPISODES).contains(&a.eval_episodes) {
        return Err(BadInput(format!(
            "--eval-episodes {}: allowed: an integer from 1 to {MAX_EVAL_EPISODES}",
            a.eval_episodes
        ))
        .into());
    }
    if a.steps == Some(0) {
        return Err(BadInput("--steps 0: allowed: an integer >= 1".into()).into());
    }
    let distribution = match &a.distribution {
        Some(d) => {
            Some(envs::distribution::EnvDistribution::load(d).map_err(|e| BadInput(format!("--distribution: {e}")))?)
        }
        None => None,
    };
    // The environments evaluated during training: the preset, or validation draws.
    let eval_presets: Vec<envs::EnvPreset> = match &distribution {
        Some(d) => (0..VALIDATION_DRAWS)
            .map(|i| d.draw(envs::derive_seed(eval_seed(a.common.seed), i)))
            .collect::<Result<_, _>>()
            .map_err(|e| BadInput(format!("--distribution: {e}")))?,
        None => vec![envs::presets::load(&a.env).map_err(|e| BadInput(e.to_string()))?],
    };
    let env_preset = eval_presets[0].clone();
    let run_name = distribution.as_ref().map_or(env_preset.name.clone(), |d| format!("dist-{}", d.name));
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("checkpoints").join(&run_name));
    // One writer per output directory, for the whole run.
    let _lock = checkpoint::DirLock::acquire(&out)?;
    let mut best: Option<BestEval> = None;
    let mut trainer = if a.resume {
        let (meta, tensors) = checkpoint::load(&out, checkpoint::POLICY_KIND)
            .with_context(|| format!("--resume: reading {}", out.display()))?;
        best = BestEval::from_state(&meta.state).map_err(|why| {
            BadInput(format!("{}: key `state.best`: {why}", out.join(checkpoint::META_FILE).display()))
        })?;
        Trainer::restore(&meta.config, &meta.state, &tensors, a.steps, a.common.device)
            .with_context(|| out.display().to_string())?
    } else {
        if !a.force
            && let Ok(meta) = checkpoint::read_meta(&out)
        {
            return Err(BadInput(format!(
                "--out {} already holds a checkpoint ({} at step {}): --resume continues it, --force replaces it",
                out.display(),
                meta.kind,
                meta.step
            ))
            .into());
        }
        let preset: PolicyPreset = policies::trainer::load_preset(&a.policy)?;
        let steps = a.steps.unwrap_or(DEFAULT_STEPS);
        match &distribution {
            None => Trainer::new(&env_preset, &preset, steps, a.common.seed, a.common.device),
            Some(d) => Trainer::with_distribution(d, &env_preset, &preset, steps, a.common.seed, a.common.device),
        }
        .map_err(|e| match e.is_bad_input() {
            true => anyhow::Error::new(BadInput(format!("preset `{run_name}` with policy `{}`: {e}", a.policy))),
            false => anyhow::Error::new(e).context(format!("preset `{run_name}` with policy `{}`", a.policy)),
        })?
    };
    let trained_on =
        |t: &Trainer| t.distribution.as_ref().map_or(t.env_preset.name.clone(), |d| format!("dist-{}", d.name));
    if a.resume && trained_on(&trainer) != run_name {
        return Err(BadInput(format!(
            "--resume: the checkpoint in {} was trained on `{}`, not `{}`",
            out.display(),
            trained_on(&trainer),
            run_name
        ))
        .into());
    }
    let logdir = a.logdir.clone().unwrap_or_else(|| PathBuf::from(format!("runs/train-{run_name}-s{}", trainer.seed)));
    let mut tb = SummaryWriter::new(&logdir)?;
    if a.resume {
        // Readers drop what the interrupted run logged after its last checkpoint.
        tb.add_session_start(trainer.global_step as i64)?;
    }
    let (_, config, _) = trainer.checkpoint_parts();
    tb.add_text(
        "config",
        &format!("```json\n{}\n```", serde_json::to_string_pretty(&config)?),
        trainer.global_step as i64,
    )?;

    let seed = trainer.seed;
    let baselines = eval_presets
        .iter()
        .map(|p| {
            envs::evaluate_baselines(
                p,
                &[Baseline::Uniform, Baseline::Adalora, Baseline::Oracle],
                a.eval_episodes,
                eval_seed(seed),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let total = trainer.total_iterations();
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} train [{elapsed_precise}] {bar:30} {pos}/{len} it  {msg}")
            .expect("template"),
    );
    pb.set_position(trainer.iteration as u64);
    eprintln!(
        "training on `{}` ({}) with `{}`: {} iterations of {}×{} rounds; TensorBoard: {}; checkpoints: {}",
        run_name,
        match &trainer.distribution {
            Some(_) => format!("a new draw every episode, {} environments per draw", policies::trainer::ENVS_PER_DRAW),
            None => format!("{} sites", trainer.n_sites()),
        },
        trainer.preset.name,
        total,
        trainer.preset.ppo.num_envs,
        trainer.preset.ppo.num_steps,
        logdir.display(),
        out.display()
    );
    let start = Instant::now();
    let start_step = trainer.global_step;
    if trainer.finished() {
        println!(
            "nothing to do: the run in {} already finished ({} environment steps){}",
            out.display(),
            trainer.global_step,
            best.map(|b| format!("; best evaluation: gap closed {:.3} at step {}", b.oracle_gap_closed, b.step))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let mut last_gap = f64::NAN;
    let mut iterations_this_run = 0;
    // A fresh run is evaluated before its first update too, so `best` is never worse (on the
    // evaluation seeds) than the initial policy — with a prior, that is the prior's own plan.
    if !a.resume && a.eval_every > 0 {
        let row = evaluate_policy(&trainer, &eval_presets, &baselines, a.eval_episodes, seed)?;
        last_gap = row.oracle_gap_closed.unwrap_or(f64::NAN);
        tb.add_scalar("eval/return", row.mean_return, 0)?;
        tb.add_scalar("eval/oracle_gap_closed", last_gap, 0)?;
        best = Some(BestEval { oracle_gap_closed: last_gap, step: 0 });
        save(&trainer, &out.join("best"), best)?;
        tb.add_scalar("eval/best_oracle_gap_closed", last_gap, 0)?;
        if std::env::var_os("RANKPILOT_PRINT_EVAL").is_some() {
            eprintln!("eval step 0: gap closed {last_gap:.3}");
        }
    }
    while !trainer.finished() {
        let t0 = Instant::now();
        let st = trainer.iterate();
        let step = st.global_step as i64;
        let sps = (trainer.preset.ppo.num_envs * trainer.preset.ppo.num_steps) as f64 / t0.elapsed().as_secs_f64();
        let u = &st.update;
        if u.non_finite {
            pb.println(format!(
                "iteration {}: non-finite loss or gradient; update skipped, last good weights kept",
                st.iteration
            ));
        }
        for (tag, v) in [
            ("losses/policy_loss", u.policy_loss),
            ("losses/value_loss", u.value_loss),
            ("losses/entropy", u.entropy),
            ("losses/approx_kl", u.approx_kl),
            ("losses/clip_fraction", u.clip_fraction),
            ("losses/skip_prob", u.skip_prob),
            ("losses/explained_variance", u.explained_variance),
            ("losses/epochs", u.epochs as f64),
            ("losses/non_finite", if u.non_finite { 1.0 } else { 0.0 }),
            ("charts/learning_rate", u.learning_rate),
            ("charts/steps_per_s", sps),
            ("charts/mean_reward", st.mean_reward),
            ("charts/trimmed_share", st.trimmed_share),
            ("charts/rollout_s", st.rollout_s),
            ("charts/update_s", st.update_s),
            ("charts/prior_scale", trainer.model.net.prior_scale().unwrap_or(f64::NAN)),
        ] {
            tb.add_scalar(tag, v, step)?;
        }
        if st.reward_over_reference.is_finite() {
            tb.add_scalar("charts/reward_over_reference", st.reward_over_reference, step)?;
        }
        if st.vine_skip_better.is_finite() {
            tb.add_scalar("charts/vine_skip_better", st.vine_skip_better, step)?;
            tb.add_scalar("charts/vine_states", st.vine_states as f64, step)?;
        }
        if st.defer_share.is_finite() {
            tb.add_scalar("charts/defer_share", st.defer_share, step)?;
            tb.add_scalar("charts/defer_states", st.defer_states as f64, step)?;
            if st.defer_prior_better.is_finite() {
                tb.add_scalar("charts/defer_prior_better", st.defer_prior_better, step)?;
            }
            if st.defer_loss.is_finite() {
                tb.add_scalar("losses/defer", st.defer_loss, step)?;
            }
        }
        if st.teacher_agreement.is_finite() {
            tb.add_scalar("charts/teacher_agreement", st.teacher_agreement, step)?;
            tb.add_scalar("charts/teacher_weight", st.teacher_weight, step)?;
            tb.add_scalar("losses/teacher_loss", u.teacher_loss, step)?;
        }
        if trainer.preset.ppo.prior_kl_coef > 0.0 {
            tb.add_scalar("losses/prior_kl", u.prior_kl, step)?;
        }
        if st.spend_price.is_finite() {
            tb.add_scalar("charts/spend_price", st.spend_price, step)?;
        }
        if st.ddim_loss.is_finite() {
            tb.add_scalar("losses/ddim_loss", st.ddim_loss, step)?;
        }
        if !st.episodes.is_empty() {
            let n = st.episodes.len() as f64;
            let mean = |f: &dyn Fn(&envs::EpisodeSummary) -> f64| st.episodes.iter().map(f).sum::<f64>() / n;
            tb.add_scalar("charts/episode_return", mean(&|e| e.episode_return), step)?;
            tb.add_scalar("charts/final_loss", mean(&|e| e.final_loss), step)?;
            tb.add_scalar("charts/resource_used", mean(&|e| e.resource_used), step)?;
            tb.add_scalar("charts/violation_rate", mean(&|e| e.violations as f64 / e.rounds.max(1) as f64), step)?;
            tb.add_scalar("charts/skip_rate", mean(&|e| e.skips as f64 / e.rounds.max(1) as f64), step)?;
        }
        let ranks: Vec<f64> = st.last_ranks.iter().map(|&r| r as f64).collect();
        tb.add_histogram("ranks/all_sites", &ranks, step)?;
        if let Some((rounds, r)) = &st.episode_ranks
            && (st.iteration % a.eval_every.max(1) == 0 || trainer.finished())
        {
            // The record is rounds × sites of environment 0's last episode: a labelled rank map
            // (sites by index: on a distribution the site list changes from episode to episode).
            let n_sites = r.len() / rounds.max(&1);
            let map = runio::figures::RankMap {
                title: format!("environment 0, last episode, step {step}"),
                sites: (0..n_sites).map(|l| format!("site {l}")).collect(),
                rounds: r
                    .chunks(n_sites.max(1))
                    .map(|c| runio::figures::RoundRanks {
                        ranks: c.iter().map(|&x| x as f64).collect(),
                        skipped: false,
                        lost: false,
                    })
                    .collect(),
            };
            let img = runio::figures::rank_map(&map)?;
            tb.add_image_rgb("ranks/heatmap_sites_x_rounds", img.width, img.height, &img.rgb, step)?;
        }
        let eval_now = (a.eval_every > 0 && st.iteration % a.eval_every == 0) || trainer.finished();
        if eval_now {
            let row = evaluate_policy(&trainer, &eval_presets, &baselines, a.eval_episodes, seed)?;
            last_gap = row.oracle_gap_closed.unwrap_or(f64::NAN);
            tb.add_scalar("eval/return", row.mean_return, step)?;
            tb.add_scalar("eval/oracle_gap_closed", last_gap, step)?;
            tb.add_scalar("eval/final_loss", row.final_loss, step)?;
            tb.add_scalar("eval/violation_rate", row.violation_rate, step)?;
            tb.add_scalar("eval/skip_rate", row.skip_rate, step)?;
            tb.add_scalar("eval/change_rate", row.change_rate, step)?;
            tb.add_scalar("eval/resource_used", row.resource_used, step)?;
            tb.add_scalar("eval/wall_s", start.elapsed().as_secs_f64(), step)?;
            // Model selection on the evaluation seeds (held out from training; report final
            // figures on yet other seeds with `rankpilot eval --seed`).
            if std::env::var_os("RANKPILOT_PRINT_EVAL").is_some() {
                eprintln!(
                    "eval step {step}: gap closed {last_gap:.3}  prior scale {:.3}",
                    trainer.model.net.prior_scale().unwrap_or(f64::NAN)
                );
            }
            if best.is_none_or(|b| last_gap > b.oracle_gap_closed) {
                best = Some(BestEval { oracle_gap_closed: last_gap, step: trainer.global_step });
                save(&trainer, &out.join("best"), best)?;
                tb.add_scalar("eval/best_oracle_gap_closed", last_gap, step)?;
            }
        }
        if st.iteration % a.checkpoint_every.max(1) == 0 || trainer.finished() {
            save(&trainer, &out, best)?;
        }
        pb.set_position(st.iteration as u64);
        pb.set_message(format!(
            "return {:.2}  gap closed {:.3}  kl {:.4}  {:.0} steps/s",
            st.episodes.iter().map(|e| e.episode_return).sum::<f64>() / st.episodes.len().max(1) as f64,
            last_gap,
            u.approx_kl,
            sps
        ));
        tb.flush()?;
        iterations_this_run += 1;
        if a.stop_after.is_some_and(|n| iterations_this_run >= n) {
            save(&trainer, &out, best)?;
            break;
        }
    }
    pb.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    println!(
        "trained {} environment steps in {:.1} s ({:.0} steps/s); oracle gap closed {:.3} (best {:.3}) on {} evaluation episodes",
        trainer.global_step - start_step,
        wall,
        (trainer.global_step - start_step) as f64 / wall.max(1e-9),
        last_gap,
        best.map_or(f64::NAN, |b| b.oracle_gap_closed),
        a.eval_episodes
    );
    println!(
        "checkpoints: {} (last), {} (best evaluation)   TensorBoard: tensorboard --logdir {}",
        out.display(),
        out.join("best").display(),
        logdir.display()
    );
    Ok(())
}

/// Most episodes one evaluation may run (each holds a full episode's state in memory).
pub const MAX_EVAL_EPISODES: usize = 1_000_000;

/// Environment steps of a fresh run without --steps.
const DEFAULT_STEPS: u64 = 300_000;

/// The best evaluation of a run so far: what `<out>/best` holds. Saved in every checkpoint's
/// state (`state.best`), so a resumed run replaces `best/` only with a better policy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BestEval {
    /// Oracle gap closed on the run's evaluation episodes.
    oracle_gap_closed: f64,
    /// Environment step of that evaluation.
    step: u64,
}

impl BestEval {
    /// `state.best` of a checkpoint (absent in checkpoints written before it existed).
    fn from_state(state: &serde_json::Value) -> Result<Option<BestEval>, String> {
        match state.get("best") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => {
                let b: BestEval = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
                if !b.oracle_gap_closed.is_finite() {
                    return Err("`oracle_gap_closed` must be a finite number".into());
                }
                Ok(Some(b))
            }
        }
    }
}

fn save(trainer: &Trainer, out: &Path, best: Option<BestEval>) -> anyhow::Result<()> {
    let (tensors, config, mut state) = trainer.checkpoint_parts();
    state["best"] = serde_json::to_value(best)?;
    checkpoint::save(out, checkpoint::POLICY_KIND, trainer.global_step, config, state, &tensors)?;
    Ok(())
}

/// Validation draws evaluated during a distribution run.
const VALIDATION_DRAWS: u64 = 4;

/// Greedy evaluation of the trainer's current policy on each evaluation preset next to its
/// precomputed baseline rows: the policy's row, with return, gap closed and the other columns
/// averaged over the presets.
fn evaluate_policy(
    trainer: &Trainer,
    presets: &[envs::EnvPreset],
    baselines: &[EvalTable],
    episodes: usize,
    seed: u64,
) -> anyhow::Result<envs::EvalRow> {
    let mut rows = Vec::new();
    for (p, base) in presets.iter().zip(baselines) {
        let mut policy = TrainedPolicy::greedy(&trainer.model, "policy");
        let mut table = base.clone();
        table.push(envs::evaluate(p, &mut policy, episodes, eval_seed(seed))?);
        rows.push(table.rows.pop().expect("the policy row"));
    }
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&envs::EvalRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let mut row = rows[0].clone();
    row.mean_return = mean(&|r| r.mean_return);
    row.final_loss = mean(&|r| r.final_loss);
    row.violation_rate = mean(&|r| r.violation_rate);
    row.skip_rate = mean(&|r| r.skip_rate);
    row.change_rate = mean(&|r| r.change_rate);
    row.resource_used = mean(&|r| r.resource_used);
    row.oracle_gap_closed = Some(mean(&|r| r.oracle_gap_closed.unwrap_or(f64::NAN)));
    Ok(row)
}
