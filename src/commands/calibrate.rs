//! `rankpilot calibrate`: a short high-rank probe run on a real model measures every site's update
//! spectrum (singular values of `s·B·A`) and sensitivity (AdaLoRA importance) and writes an
//! environment preset for that model: `<out>.toml` (a template preset's resource, reward and
//! dynamics with the model's real sites) plus `<out stem>.calibration.json` beside it. Then
//! `rankpilot train --env <out>.toml` trains a policy for that model.
//!
//! The template's resource is rescaled so that the budget relative to the all-max-rank plan has
//! the same distribution on the new sites (the channel deadline, or the latency budget, times
//! the ratio of the two models' all-max-rank costs): a policy then faces the same scarcity.
//!
//! The dynamics' learning rate η and loss floor L∞ are fitted to the probe's per-step training
//! loss, L(s) = A + B·r^s ([`envs::calibration::fit_loss_curve`]), and mapped onto a simulated
//! round of `--steps-per-round` optimizer steps: η = 1 − r^steps_per_round, L∞ =
//! sensitivity.total·A/(B·r) ([`envs::calibration::fitted_dynamics`]). With `--decay-law power`
//! the fit is L(s) = A + B·(1 + s·c/α)^(−α) and the preset also gets `dynamics.decay_exponent` α,
//! so the simulated rounds close shares that fall as a power law. The entropy effect keeps
//! the template's value (one probe curve cannot identify it). `--keep-dynamics` keeps the
//! template's dynamics whole, as does a probe curve that does not decrease.
//!
//! With `--fit-ranks`, plain real runs at those uniform ranks fit the exponent γ that flattens the
//! probe's spectra (`sites.spectrum_exponent`), so that the simulator values higher ranks as the
//! real loss does ([`envs::calibration::fit_spectrum_exponent`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tch::Kind;

use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;
use crate::commands::common::{TuneInput, load_model_and_data, progress_bar};
use envs::calibration::{DecayLaw, FittedDynamics, LossCurveFit, NoFit, fit_loss_curve, fitted_dynamics};
use rankpilot::controller::sites_calibration;
use runio::tensorboard::SummaryWriter;
use tune::finetune::{FinetuneConfig, Finetuner, RankSpec};

/// Arguments of `rankpilot calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    input: TuneInput,
    /// The preset to write (`.toml`); the calibration JSON goes beside it.
    #[arg(long)]
    out: PathBuf,
    /// Template preset for the resource, reward, dynamics and rank set.
    #[arg(long, default_value = "wireless-rayleigh")]
    env: String,
    /// Rank of every site during the probe (capped at each site's min(d_in, d_out)); ranks of
    /// the set above it get no more energy than the probe measured.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Probe optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Violation penalty multiplier of the written preset (the template's AirLLM value is 10). In a
    /// real run a lost round costs that round's progress and its bits, nothing more; a large
    /// penalty trains policies that shrink adapters to nothing in a deep fade rather than lose a
    /// round. Must exceed the preset's `loss_floor + sensitivity.total` (the oracle relies on it).
    #[arg(long)]
    violation_coef: Option<f64>,
    /// Cap on the cost ratio inside the violation penalty of the written preset (>= 1).
    #[arg(long)]
    violation_cap: Option<f64>,
    /// DR-RL perturbation weight of the written preset (the template's is 0): penalises rank
    /// changes by the spectral energy they move, `‖ΔA‖_F`. In a real run every shrink resets the
    /// site's AdamW moments and every grow starts fresh components, which the simulator's
    /// dynamics do not see; this term makes a policy hold its ranks unless a change pays.
    #[arg(long)]
    perturbation_coef: Option<f64>,
    /// Optimizer steps of a real run per scheduler round, the real run's `--steps / --rounds`
    /// (200 / 20 for `compare`'s and `finetune`'s defaults, which the template's 20 rounds then
    /// span). Maps the probe's fitted per-step decay r onto the simulator's per-round learning
    /// rate: η = 1 − r^steps_per_round.
    #[arg(long, default_value_t = 10)]
    steps_per_round: u32,
    /// Keep the template's dynamics (learning rate, loss floor) instead of the ones fitted to the
    /// probe's loss curve (the fit is still logged and printed).
    #[arg(long)]
    keep_dynamics: bool,
    /// The law fitted to the probe's loss curve: `exponential`, L(s) = A + B·r^s (the simulator's
    /// original dynamics: each round closes the same share of the gap), or `power`,
    /// L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r, written as `dynamics.decay_exponent` = α
    /// (later rounds close less, but not nothing).
    #[arg(long, value_enum, default_value_t = Law::Exponential)]
    decay_law: Law,
    /// First probe step of the fit (1-based): the law's time origin moves there, and the steps
    /// before it are left out. 11 leaves out the probe's 10-step learning-rate warm-up, whose
    /// losses fall for a reason no constant-rate law describes (with it, a power law fits as an
    /// exponential).
    #[arg(long, default_value_t = 1)]
    fit_from: usize,
    /// Uniform ranks of real runs that fit `sites.spectrum_exponent` γ (e.g. `1,2,4,8,16`; the
    /// largest is the reference, and at least two distinct ranks are needed). The probe's spectra
    /// come from one short rank-`--rank` run, which puts nearly all of a site's energy in its
    /// first few singular values; real runs keep gaining from higher ranks. Each rank is run
    /// `--fit-seeds` times for `--fit-steps` steps, and γ is the exponent whose simulated
    /// gains (each site's captured share, weighted by its sensitivity, at one fitted scale) best
    /// match the mean real gains over the reference rank ([`envs::calibration::fit_spectrum_exponent`]).
    /// Without it the preset keeps the probe's spectra (γ = 1).
    #[arg(long, value_delimiter = ',')]
    fit_ranks: Vec<usize>,
    /// Optimizer steps of each `--fit-ranks` run (`compare`'s and `finetune`'s default length).
    #[arg(long, default_value_t = 200)]
    fit_steps: usize,
    /// Seeds per rank of the `--fit-ranks` runs (`--seed`, `--seed` + 1, ...); the gains are
    /// paired by seed (same data order) and averaged.
    #[arg(long, default_value_t = 2)]
    fit_seeds: u64,
    /// Peak learning rate of the `--fit-ranks` runs (default: `--lr`, the probe's). Use the
    /// rate the real runs will use: `compare`'s sweep picks 5e-3 for fixed ranks on the tiny model.
    #[arg(long)]
    fit_lr: Option<f64>,
    /// TensorBoard log directory of the probe.
    #[arg(long, default_value = "runs/calibrate")]
    logdir: PathBuf,
}

/// γ fitted to real runs at uniform ranks (`--fit-ranks`).
struct SpectrumFit {
    /// The exponent written as `sites.spectrum_exponent`.
    gamma: f64,
    /// Loss units per unit of simulated gain, fitted with γ.
    scale: f64,
    /// Root-mean-square residual of the fitted gains (loss units).
    rms: f64,
    /// The reference (largest) rank.
    top: u32,
    /// Each other rank's mean real gain over the reference (final val loss at the rank minus at
    /// the reference, paired by seed).
    gains: Vec<(u32, f64)>,
}

impl SpectrumFit {
    /// One line for the summary and the preset's header.
    fn describe(&self, seeds: u64, steps: usize) -> String {
        let gains: Vec<String> = self.gains.iter().map(|(r, g)| format!("r{r} {g:+.4}")).collect();
        format!(
            "spectrum_exponent {:.2} fitted to real runs at uniform ranks ({seeds} seed(s) x {steps} steps; final val loss over rank {}: {}): scale {:.4}, rms {:.4}",
            self.gamma,
            self.top,
            gains.join(", "),
            self.scale,
            self.rms
        )
    }
}

/// Each rank's mean loss over the reference rank's, paired by seed: `losses[i][s]` is rank
/// `ranks[i]`'s final loss at seed `s`; the reference is the largest rank.
fn paired_gains(ranks: &[u32], losses: &[Vec<f64>]) -> (u32, Vec<(u32, f64)>) {
    let (t, &top) = ranks.iter().enumerate().max_by_key(|x| x.1).expect("at least one rank");
    let gains = ranks
        .iter()
        .zip(losses)
        .filter(|(r, _)| **r != top)
        .map(|(&r, l)| {
            let d: Vec<f64> = l.iter().zip(&losses[t]).map(|(a, b)| a - b).collect();
            (r, d.iter().sum::<f64>() / d.len().max(1) as f64)
        })
        .collect();
    (top, gains)
}

/// The final validation loss of a plain run at uniform rank `rank`.
fn uniform_rank_loss(a: &CalibrateArgs, rank: usize, seed: u64, bar: &indicatif::ProgressBar) -> Result<f64> {
    let (model, vs, _tok, _corpus, data) =
        load_model_and_data(&a.input.model, &a.input.data, 0.1, a.input.seq_len, a.common.device, Kind::Float)?;
    let cfg = FinetuneConfig {
        ranks: RankSpec { default: rank, patterns: vec![] },
        seed,
        ..a.input.finetune_config(a.fit_steps, a.fit_lr.unwrap_or(a.input.lr))
    };
    let mut ft = Finetuner::new(model, vs, data, cfg)?;
    for _ in 0..a.fit_steps {
        ft.train_step()?;
        bar.inc(1);
    }
    Ok(ft.evaluate())
}

/// `--decay-law`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Law {
    /// L(s) = A + B·r^s.
    Exponential,
    /// L(s) = A + B·(1 + s·c/α)^(−α).
    Power,
}

/// What became of the written preset's dynamics.
enum Dynamics {
    /// Fitted and written.
    Fitted(LossCurveFit, FittedDynamics),
    /// Fitted, but `--keep-dynamics` kept the template's.
    Kept(LossCurveFit, FittedDynamics),
    /// No fit: the template's kept.
    NoFit(NoFit),
}

impl Dynamics {
    /// One line for the summary and the preset's header: the fit, the values written and the
    /// template's.
    fn describe(&self, template: &envs::presets::DynamicsConfig) -> String {
        let fit = |f: &LossCurveFit, d: &FittedDynamics| {
            let clamp =
                |clamped: bool, raw: f64| if clamped { format!(" (clamped from {raw:.4})") } else { String::new() };
            let (law, alpha, eta, exponent, floor) = match f.exponent {
                None => ("L(s) = A + B·r^s", String::new(), format!("1 − r^{}", d.steps_per_round), String::new(), "r"),
                Some(a) => (
                    "L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r",
                    format!(", α {a:.4}"),
                    "the first round's".to_string(),
                    format!(", decay_exponent {a:.4}"),
                    "x(1)",
                ),
            };
            format!(
                "loss fit {law}: A {:.4}, B {:.4}, r {:.5}{alpha}, rms {:.4} over {} steps; at {} steps per round learning_rate {:.4}{} ({eta}){exponent}, loss_floor {:.4}{} (total·A/(B·{floor}))",
                f.floor,
                f.amplitude,
                f.ratio,
                f.rms,
                f.steps,
                d.steps_per_round,
                d.learning_rate,
                clamp(d.learning_rate_clamped(), d.raw_learning_rate),
                d.loss_floor,
                clamp(d.loss_floor_clamped(), d.raw_loss_floor),
            )
        };
        let tpl = format!("learning_rate {}, loss_floor {}", template.learning_rate, template.loss_floor);
        match self {
            Dynamics::Fitted(f, d) => format!(
                "dynamics fitted: {}; template's {tpl}; entropy_effect {} from the template (not identifiable from one probe curve)",
                fit(f, d),
                template.entropy_effect
            ),
            Dynamics::Kept(f, d) => format!("dynamics: the template's kept (--keep-dynamics: {tpl}); {}", fit(f, d)),
            Dynamics::NoFit(e) => format!("dynamics: the template's kept ({tpl}): no loss fit, {e}"),
        }
    }
}

/// Runs the command.
pub fn run(a: &CalibrateArgs) -> Result<()> {
    a.input.check()?;
    if a.out.extension().and_then(|e| e.to_str()) != Some("toml") {
        return Err(BadInput(format!("--out {}: allowed: a path ending in .toml", a.out.display())).into());
    }
    if a.steps == 0 || a.rank == 0 {
        return Err(BadInput("--steps and --rank: allowed: integers >= 1".into()).into());
    }
    if a.fit_from == 0 || a.fit_from > a.steps {
        return Err(
            BadInput(format!("--fit-from {}: allowed: a step from 1 to --steps ({})", a.fit_from, a.steps)).into()
        );
    }
    if a.steps_per_round == 0 {
        return Err(BadInput("--steps-per-round 0: allowed: an integer >= 1".into()).into());
    }
    let mut fit_ranks = a.fit_ranks.clone();
    fit_ranks.sort_unstable();
    fit_ranks.dedup();
    if !a.fit_ranks.is_empty() && (fit_ranks.len() < 2 || fit_ranks[0] == 0) {
        return Err(BadInput(format!(
            "--fit-ranks {}: allowed: at least two distinct ranks >= 1, comma-separated (e.g. 1,2,4,8,16)",
            a.fit_ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
        ))
        .into());
    }
    if a.fit_steps == 0 || a.fit_seeds == 0 {
        return Err(BadInput("--fit-steps and --fit-seeds: allowed: integers >= 1".into()).into());
    }
    if let Some(lr) = a.fit_lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
        return Err(BadInput(format!("--fit-lr {lr}: allowed: a finite number > 0")).into());
    }
    let template = envs::presets::load(&a.env).map_err(|e| BadInput(format!("--env: {e}")))?;
    let stem = a.out.file_stem().and_then(|s| s.to_str()).unwrap_or("calibrated").to_string();
    let dir = a.out.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let device = a.common.device;
    let (model, vs, _tok, corpus, data) =
        load_model_and_data(&a.input.model, &a.input.data, 0.1, a.input.seq_len, device, Kind::Float)?;
    let min_dim = tune::model::Projection::ALL
        .into_iter()
        .map(|p| {
            let (i, o) = model.cfg.projection_shape(p);
            i.min(o)
        })
        .min()
        .unwrap_or(1);
    if let Some(&r) = fit_ranks.last().filter(|&&r| r > min_dim) {
        return Err(BadInput(format!(
            "--fit-ranks {r}: allowed: ranks up to {min_dim}, the narrowest projection's min(d_in, d_out) in {}",
            a.input.model.display()
        ))
        .into());
    }
    let cfg = FinetuneConfig {
        ranks: RankSpec { default: a.rank.min(min_dim), patterns: vec![] },
        seed: a.common.seed,
        ..a.input.finetune_config(a.steps, a.input.lr)
    };
    let mut ft = Finetuner::new(model, vs, data, cfg)?;
    let mut tb = SummaryWriter::new(&a.logdir)?;
    let t0 = Instant::now();
    let bar = progress_bar(a.steps);
    let mut losses = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let st = ft.train_step()?;
        losses.push(st.loss);
        tb.add_scalar("train/loss", st.loss, step as i64 + 1)?;
        bar.set_message(format!("probe rank {} loss {:.3}", a.rank.min(min_dim), st.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let val = ft.evaluate();
    tb.add_scalar("val/loss", val, a.steps as i64)?;
    let signals = ft.signals(true);
    let max_imp = signals.iter().map(|s| s.importance).fold(0.0, f64::max);
    let mut cal = sites_calibration(&a.input.model.display().to_string(), &signals);
    for (c, s) in cal.sites.iter_mut().zip(&signals) {
        c.spectrum = s.singular_values.clone();
        // A site without measurable importance still needs a positive weight.
        c.sensitivity = s.importance.max(1e-6 * max_imp).max(f64::MIN_POSITIVE);
    }
    tb.add_histogram("calibration/sensitivity", &cal.sites.iter().map(|s| s.sensitivity).collect::<Vec<_>>(), 0)?;
    tb.flush()?;
    cal.check().map_err(|e| anyhow::anyhow!("the measured calibration is invalid: {e}"))?;
    drop(ft);

    // γ from real runs at uniform ranks, paired by seed (`--fit-ranks`).
    let spectrum_fit = if fit_ranks.is_empty() {
        None
    } else {
        let bar = progress_bar(fit_ranks.len() * a.fit_seeds as usize * a.fit_steps);
        let mut losses = Vec::with_capacity(fit_ranks.len());
        for &rank in &fit_ranks {
            let mut per_seed = Vec::with_capacity(a.fit_seeds as usize);
            for k in 0..a.fit_seeds {
                let seed = a.common.seed + k;
                bar.set_message(format!("uniform rank {rank}, seed {seed}"));
                let loss = uniform_rank_loss(a, rank, seed, &bar)?;
                tb.add_scalar(&format!("calibration/uniform_rank_val_loss/seed_{seed}"), loss, rank as i64)?;
                per_seed.push(loss);
            }
            losses.push(per_seed);
        }
        bar.finish_and_clear();
        let ranks: Vec<u32> = fit_ranks.iter().map(|&r| r as u32).collect();
        let (top, gains) = paired_gains(&ranks, &losses);
        let (gamma, scale, rms) = envs::calibration::fit_spectrum_exponent(&cal, &gains, top)
            .ok_or_else(|| anyhow::anyhow!("no spectrum exponent could be fitted to {gains:?}"))?;
        tb.add_scalar("calibration/spectrum_exponent", gamma, 0)?;
        tb.flush()?;
        Some(SpectrumFit { gamma, scale, rms, top, gains })
    };
    let fit_line = spectrum_fit.as_ref().map(|f| f.describe(a.fit_seeds, a.fit_steps));

    // The preset: the template with the model's sites, ranks it can hold, and the resource
    // rescaled to the same scarcity.
    let mut preset = template.clone();
    preset.name = stem.clone();
    preset.description = format!(
        "{} ({} sites) calibrated on {} by a rank-{} probe of {} steps; resource from `{}`",
        a.input.model.display(),
        cal.sites.len(),
        corpus.source,
        a.rank.min(min_dim),
        a.steps,
        template.name
    );
    preset.ranks.retain(|&r| r as usize <= min_dim);
    let cal_name = format!("{stem}.calibration.json");
    preset.sites = envs::presets::SitesConfig {
        layers: None,
        hidden: None,
        intermediate: None,
        projections: preset.sites.projections.clone(),
        calibration: Some(cal_name.clone()),
        spectrum_exponent: spectrum_fit.as_ref().map_or(1.0, |f| f.gamma),
    };
    preset.calibration_data = Some(cal.clone());
    let t_spec = envs::EnvSpec::new(&template)?;
    let n_spec = envs::EnvSpec::new(&preset)?;
    let scale = n_spec.max_plan_cost / t_spec.max_plan_cost;
    if let Some(c) = preset.resource.channel.as_mut() {
        c.deadline_s *= scale;
    }
    if let Some(c) = preset.resource.compute.as_mut() {
        c.latency_budget_s *= scale;
    }
    // A parameter budget is an average rank per site, the same on any sites: nothing to rescale.
    let resource_line = if preset.resource.channel.is_some() || preset.resource.compute.is_some() {
        format!("resource of `{}` rescaled by {scale:.4} (ratio of all-max-rank costs)", template.name)
    } else {
        format!("resource of `{}` kept (an average rank per site needs no rescaling)", template.name)
    };
    if let Some(v) = a.violation_coef {
        preset.reward.violation_coef = v;
    }
    if let Some(v) = a.violation_cap {
        preset.reward.violation_cost_cap = v;
    }
    if let Some(v) = a.perturbation_coef {
        preset.reward.perturbation_coef = v;
    }
    // The dynamics from the probe's loss curve (after the reward, whose violation coefficient
    // bounds the loss floor).
    let law = match a.decay_law {
        Law::Exponential => DecayLaw::Exponential,
        Law::Power => DecayLaw::Power,
    };
    let dynamics = match fit_loss_curve(&losses[a.fit_from - 1..], law) {
        Ok(fit) => {
            for s in a.fit_from..=a.steps {
                tb.add_scalar("calibration/fitted_loss", fit.at((s + 1 - a.fit_from) as f64), s as i64)?;
            }
            let d = fitted_dynamics(&fit, a.steps_per_round, preset.sensitivity.total, preset.reward.violation_coef);
            tb.add_scalar("calibration/learning_rate", d.learning_rate, 0)?;
            tb.add_scalar("calibration/loss_floor", d.loss_floor, 0)?;
            tb.flush()?;
            if a.keep_dynamics {
                Dynamics::Kept(fit, d)
            } else {
                d.apply(&mut preset.dynamics);
                Dynamics::Fitted(fit, d)
            }
        }
        Err(e) => Dynamics::NoFit(e),
    };
    let dynamics_line = dynamics.describe(&template.dynamics);
    preset.description.push_str(&match dynamics {
        Dynamics::Fitted(..) => "; dynamics fitted to the probe's loss curve".to_string(),
        _ => format!("; dynamics from `{}`", template.name),
    });
    if spectrum_fit.is_some() {
        preset.description.push_str("; spectra flattened by an exponent fitted to uniform-rank runs");
    }
    let body = toml::to_string(&preset).context("serializing the preset")?;
    let text = format!(
        "# Written by `rankpilot calibrate --model {} --data {} --env {} --rank {} --steps {} --steps-per-round {} --seed {}{}`.\n# Sites and spectra: {cal_name}. {}{}.\n# {dynamics_line}.\n{}{body}",
        a.input.model.display(),
        a.input.data,
        a.env,
        a.rank,
        a.steps,
        a.steps_per_round,
        a.common.seed,
        a.violation_coef.map(|v| format!(" --violation-coef {v}")).unwrap_or_default()
            + &a.violation_cap.map(|v| format!(" --violation-cap {v}")).unwrap_or_default()
            + &a.perturbation_coef.map(|v| format!(" --perturbation-coef {v}")).unwrap_or_default()
            + if a.keep_dynamics { " --keep-dynamics" } else { "" }
            + if a.decay_law == Law::Power { " --decay-law power" } else { "" }
            + &if a.fit_from != 1 { format!(" --fit-from {}", a.fit_from) } else { String::new() }
            + &if fit_ranks.is_empty() {
                String::new()
            } else {
                format!(
                    " --fit-ranks {} --fit-steps {} --fit-seeds {}{}",
                    fit_ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
                    a.fit_steps,
                    a.fit_seeds,
                    a.fit_lr.map(|lr| format!(" --fit-lr {lr}")).unwrap_or_default()
                )
            },
        resource_line[..1].to_uppercase(),
        &resource_line[1..],
        fit_line.as_ref().map(|l| format!("# {l}.\n")).unwrap_or_default()
    );
    // Check the preset loads as written before anything is replaced.
    let cal_path = dir.join(&cal_name);
    checkpoint::atomic_write(&cal_path, cal.to_json().as_bytes())?;
    let check = envs::presets::from_toml(&text, &a.out.display().to_string(), Some(dir.clone()))
        .and_then(|p| envs::EnvSpec::new(&p).map(|_| ()));
    if let Err(e) = check {
        let _ = std::fs::remove_file(&cal_path);
        return Err(BadInput(format!("the preset for {} does not validate: {e}", a.out.display())).into());
    }
    checkpoint::atomic_write(&a.out, text.as_bytes())?;
    println!(
        "calibrated {} sites in {:.1}s (probe rank {}, {} steps, val loss {val:.4}); wrote {} and {}; ranks {:?}; {resource_line}; {dynamics_line}",
        cal.sites.len(),
        t0.elapsed().as_secs_f64(),
        a.rank.min(min_dim),
        a.steps,
        a.out.display(),
        cal_path.display(),
        preset.ranks
    );
    if let Some(l) = &fit_line {
        println!("{l}");
    }
    println!("next: rankpilot train --env {} --policy ppo --out checkpoints/{stem}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gains_are_paired_by_seed_against_the_largest_rank() {
        // Ranks in any order; the reference is the largest (16), each gain the mean over seeds
        // of (loss at r − loss at 16) for the same seed.
        let ranks = [4, 16, 1];
        let losses = vec![vec![2.10, 2.30], vec![2.00, 2.20], vec![2.40, 2.50]];
        let (top, gains) = paired_gains(&ranks, &losses);
        assert_eq!(top, 16);
        assert_eq!(gains.len(), 2);
        assert_eq!(gains[0].0, 4);
        assert!((gains[0].1 - 0.10).abs() < 1e-12, "{gains:?}");
        assert_eq!(gains[1].0, 1);
        assert!((gains[1].1 - 0.35).abs() < 1e-12, "{gains:?}");
        let fit = SpectrumFit { gamma: 0.52, scale: 0.4043, rms: 0.0052, top, gains };
        let line = fit.describe(2, 200);
        assert_eq!(
            line,
            "spectrum_exponent 0.52 fitted to real runs at uniform ranks (2 seed(s) x 200 steps; final val loss over rank 16: r4 +0.1000, r1 +0.3500): scale 0.4043, rms 0.0052"
        );
    }

    #[test]
    fn the_dynamics_line_names_the_law_and_its_values() {
        let template = envs::presets::load("latency").unwrap().dynamics;
        // The exponential's line is the one the shipped presets' headers carry.
        let fit =
            LossCurveFit { floor: 2.0803, amplitude: 1.2328, ratio: 0.96762, exponent: None, rms: 0.1905, steps: 100 };
        let d = fitted_dynamics(&fit, 10, 1.0, 10.0);
        let line = Dynamics::Kept(fit, d).describe(&template);
        assert!(
            line.ends_with(&format!(
                "loss fit L(s) = A + B·r^s: A 2.0803, B 1.2328, r 0.96762, rms 0.1905 over 100 steps; at 10 steps per round learning_rate {:.4} (1 − r^10), loss_floor {:.4} (total·A/(B·r))",
                d.learning_rate, d.loss_floor
            )),
            "{line}"
        );
        let fit = LossCurveFit { exponent: Some(0.1616), ..fit };
        let d = fitted_dynamics(&fit, 10, 1.0, 10.0);
        let line = Dynamics::Fitted(fit, d).describe(&template);
        assert!(
            line.contains("L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r: A 2.0803") && line.contains(", α 0.1616, rms"),
            "{line}"
        );
        assert!(
            line.contains("(the first round's), decay_exponent 0.1616, loss_floor")
                && line.contains("(total·A/(B·x(1)))"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
