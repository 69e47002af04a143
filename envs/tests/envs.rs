//! Integration tests: determinism, resource statistics, penalties, bad input, presets, oracle
//! versus baselines.

use envs::presets::{self, EnvPreset};
use envs::resource::{ChannelModel, ResourceModel};
use envs::{Baseline, EnvError, GLOBAL_FEATURES, GlobalFeature, SITE_FEATURES, SiteFeature, VecEnv};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn edit(name: &str, edits: &[(&str, &str)]) -> Result<EnvPreset, EnvError> {
    let mut text = presets::embedded_text(name).unwrap().to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "{from} not in preset {name}");
        text = text.replacen(from, to, 1);
    }
    presets::from_toml(&text, "edited.toml", None)
}

fn err(name: &str, edits: &[(&str, &str)]) -> String {
    let r = edit(name, edits).and_then(|p| envs::EnvSpec::new(&p).map(|_| ()));
    r.expect_err("expected an error").to_string()
}

fn rollout(preset: &EnvPreset, seed: u64, steps: usize) -> (Vec<f32>, Vec<f32>) {
    let mut v = VecEnv::new(preset, 3, seed).unwrap();
    let n = v.n_sites();
    let rs = v.spec().rank_set.clone();
    let mut obs = Vec::new();
    let mut rew = Vec::new();
    for t in 0..steps {
        let plan: Vec<u32> = (0..3 * n).map(|i| rs.rank((i * 7 + t) % 5)).collect();
        v.step(&plan).unwrap();
        obs.extend_from_slice(v.obs_global());
        obs.extend_from_slice(v.obs_sites());
        rew.extend_from_slice(v.rewards());
    }
    (obs, rew)
}

#[test]
fn same_seed_same_trajectory() {
    for name in presets::NAMES {
        let p = presets::load(name).unwrap();
        let a = rollout(&p, 42, 25);
        let b = rollout(&p, 42, 25);
        assert_eq!(a, b, "{name}");
        let c = rollout(&p, 43, 25);
        assert_ne!(a.1, c.1, "{name}: different seeds should differ");
    }
}

#[test]
fn snapshot_resumes_exactly() {
    let p = presets::load("wireless-rayleigh").unwrap();
    let mut v = VecEnv::new(&p, 2, 9).unwrap();
    let n = v.n_sites();
    let plan = vec![8u32; 2 * n];
    for _ in 0..7 {
        v.step(&plan).unwrap();
    }
    let json = serde_json::to_string(&v.snapshot()).unwrap();
    let mut w = VecEnv::restore(v.spec().clone(), serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(v.obs_sites(), w.obs_sites());
    for _ in 0..30 {
        v.step(&plan).unwrap();
        w.step(&plan).unwrap();
        assert_eq!(v.rewards(), w.rewards());
        assert_eq!(v.obs_global(), w.obs_global());
        assert_eq!(v.obs_sites(), w.obs_sites());
    }
}

#[test]
fn auto_reset_and_schema() {
    let p = presets::load("wireless-rician").unwrap();
    let mut v = VecEnv::new(&p, 2, 1).unwrap();
    let n = v.n_sites();
    assert_eq!(v.obs_global().len(), 2 * GLOBAL_FEATURES);
    assert_eq!(v.obs_sites().len(), 2 * n * SITE_FEATURES);
    assert_eq!(envs::observation::GLOBAL_NAMES.len(), GLOBAL_FEATURES);
    for t in 0..p.rounds {
        assert!((v.observation(0).global[GlobalFeature::Progress] - t as f32 / p.rounds as f32).abs() < 1e-6);
        v.step(&vec![4; 2 * n]).unwrap();
        assert!(v.obs_global().iter().chain(v.obs_sites()).all(|x| x.is_finite()));
        let done = t + 1 == p.rounds;
        assert_eq!(v.dones(), &[done, done]);
        assert_eq!(v.finished().len(), if done { 2 } else { 0 });
    }
    assert_eq!(v.observation(0).global[GlobalFeature::Progress], 0.0, "new episode starts at round 0");
    assert_eq!(v.observation(0).site(0)[SiteFeature::Rank], 0.0, "ranks reset");
    let o = v.observation(1);
    assert_eq!(o.n_sites, n);
    assert_eq!(o.site(3).len(), SITE_FEATURES);
}

#[test]
fn rayleigh_mean_power_is_one() {
    let p = presets::load("wireless-rayleigh").unwrap();
    let ch = ChannelModel { cfg: p.resource.channel.clone().unwrap() };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = 200_000;
    let m: f64 = (0..n).map(|_| ch.sample_fading_power(&mut rng)).sum::<f64>() / n as f64;
    // Exp(1) has standard deviation 1: 5 standard errors.
    assert!((m - 1.0).abs() < 5.0 / (n as f64).sqrt(), "E|h|^2 = {m}");
}

#[test]
fn rician_k_factor_by_moments() {
    let p = presets::load("wireless-rician").unwrap();
    for k in [0.0, 1.0, 6.0, 20.0] {
        let mut cfg = p.resource.channel.clone().unwrap();
        cfg.k_factor = k;
        let ch = ChannelModel { cfg };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 400_000;
        let xs: Vec<f64> = (0..n).map(|_| ch.sample_fading_power(&mut rng)).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        assert!((m - 1.0).abs() < 0.01, "K {k}: mean {m}");
        // Var(P)/E(P)^2 = (1 + 2K)/(K + 1)^2, solved for K.
        let g = var / (m * m);
        let k_hat = ((1.0 - g) + (1.0 - g).max(0.0).sqrt()) / g;
        assert!((k_hat - k).abs() < 0.05 * k + 0.03, "K {k}: estimated {k_hat}");
    }
}

#[test]
fn shadowing_autocorrelation_matches_rho() {
    let p = presets::load("wireless-rayleigh").unwrap();
    for rho in [0.0, 0.5, 0.9] {
        let mut cfg = p.resource.channel.clone().unwrap();
        cfg.shadowing_rho = rho;
        let sigma = cfg.shadowing_std_db;
        let ch = ChannelModel { cfg };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 200_000;
        let mut s = 0.0;
        let mut xs = Vec::with_capacity(n);
        for _ in 0..n {
            s = ch.next_shadowing(s, &mut rng);
            xs.push(s);
        }
        let m = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        let cov = xs.windows(2).map(|w| (w[0] - m) * (w[1] - m)).sum::<f64>() / (n - 1) as f64;
        let r1 = cov / var;
        // Standard error of the lag-1 autocorrelation of an AR(1) is about sqrt((1 - rho^2)/n).
        assert!((r1 - rho).abs() < 5.0 * ((1.0 - rho * rho) / n as f64).sqrt() + 1e-3, "rho {rho}: {r1}");
        assert!((var.sqrt() - sigma).abs() < 0.05 * sigma, "std {}", var.sqrt());
    }
}

#[test]
fn larger_rank_never_raises_a_floor_in_any_preset() {
    for name in presets::NAMES {
        let p = presets::load(name).unwrap();
        let v = VecEnv::new(&p, 2, 5).unwrap();
        let k = v.spec().rank_set.len();
        for e in 0..2 {
            let en = v.state(e).hidden_energy();
            for l in 0..v.n_sites() {
                for j in 1..k {
                    assert!(1.0 - en[l * k + j] <= 1.0 - en[l * k + j - 1], "{name} site {l}");
                }
                assert!(en[l * k] >= 0.0 && en[l * k + k - 1] <= 1.0 + 1e-6);
            }
        }
    }
}

#[test]
fn over_budget_plan_is_a_violation_with_the_documented_penalty() {
    for name in ["wireless-rayleigh", "latency", "budget"] {
        let p = presets::load(name).unwrap();
        let mut v = VecEnv::new(&p, 1, 8).unwrap();
        let n = v.n_sites();
        // A feasible step first, so there is state to keep.
        v.step(&vec![1; n]).unwrap();
        let before_obs = v.obs_sites().to_vec();
        let loss_before = v.state(0).loss();
        let ranks_before = v.state(0).ranks(v.spec());
        let budget = v.state(0).true_budget();
        let plan = vec![64u32; n];
        let cost = v.spec().plan_cost(&plan).unwrap();
        assert!(cost > budget, "{name}: max plan fits; test needs a tighter budget");
        v.step(&plan).unwrap();
        let out = v.outcomes()[0];
        assert!(out.violation);
        let c = cost / budget;
        assert!((out.cost_ratio - c).abs() < 1e-9 * c);
        let want = -(p.reward.violation_coef + p.reward.cost_coef) * c.min(p.reward.violation_cost_cap);
        assert!((out.reward - want).abs() < 1e-9 * want.abs(), "{name}: {} vs {want}", out.reward);
        assert_eq!(v.state(0).loss(), loss_before, "no progress on a violation");
        assert_eq!(v.state(0).ranks(v.spec()), ranks_before, "no resize on a violation");
        assert_eq!(v.observation(0).global[GlobalFeature::LastViolation], 1.0, "last_violation flag");
        let _ = before_obs;
    }
}

#[test]
fn feasible_round_reward_is_minus_loss_minus_cost() {
    let p = presets::load("wireless-rayleigh").unwrap();
    let mut v = VecEnv::new(&p, 1, 3).unwrap();
    let n = v.n_sites();
    let plan = vec![0u32; n];
    v.step(&plan).unwrap();
    let o = v.outcomes()[0];
    assert!(!o.violation);
    // Rank 0 everywhere: nothing learned, loss = floor + total sensitivity, zero cost.
    assert!((o.loss - (p.dynamics.loss_floor + p.sensitivity.total)).abs() < 1e-6);
    assert!((o.reward + o.loss).abs() < 1e-9);
}

#[test]
fn bad_actions_are_errors_not_panics() {
    let p = presets::load("wireless-rayleigh").unwrap();
    let mut v = VecEnv::new(&p, 2, 1).unwrap();
    let n = v.n_sites();
    let e = v.step(&vec![4; n]).unwrap_err().to_string();
    assert!(e.contains(&format!("exactly {}", 2 * n)), "{e}");
    let mut plan = vec![4; 2 * n];
    plan[n + 3] = 5;
    let e = v.step(&plan).unwrap_err().to_string();
    assert!(
        e.contains("environment 1, site 3") && e.contains("rank 5") && e.contains("[0, 1, 2, 4, 8, 16, 32, 64]"),
        "{e}"
    );
    let mut idx = vec![0u8; 2 * n];
    idx[0] = 8;
    assert!(v.step_indices(&idx).is_err());
    assert!(v.spec().plan_cost(&[1, 2]).is_err());
    // Nothing moved.
    assert_eq!(v.observation(0).global[GlobalFeature::Progress], 0.0);
}

#[test]
fn bad_presets_name_key_and_allowed_values() {
    let e = err("wireless-rayleigh", &[("ranks = [0, 1, 2, 4, 8, 16, 32, 64]", "ranks = []")]);
    assert!(e.contains("key `ranks`") && e.contains("non-empty"), "{e}");
    let e = err("wireless-rayleigh", &[("ranks = [0, 1, 2, 4, 8, 16, 32, 64]", "ranks = [0, 8, 1024]")]);
    assert!(e.contains("`ranks`") && e.contains("<= 512"), "{e}");
    let e = err("wireless-rayleigh", &[("shadowing_std_db = 4.0", "shadowing_std_db = -1.0")]);
    assert!(e.contains("resource.channel.shadowing_std_db") && e.contains(">= 0"), "{e}");
    let e = err("wireless-rayleigh", &[("beta_jitter = 0.15", "beta_jitter = -0.1")]);
    assert!(e.contains("spectrum.beta_jitter"), "{e}");
    let e = err("wireless-rayleigh", &[("estimate_noise_db = 0.5", "estimate_noise_db = -2.0")]);
    assert!(e.contains("resource.channel.estimate_noise_db"), "{e}");
    let e = err("wireless-rician", &[("k_factor = 6.0", "k_factor = -1.0")]);
    assert!(e.contains("resource.channel.k_factor") && e.contains(">= 0"), "{e}");
    for bad in ["1.0", "-0.1", "1.5"] {
        let e = err("wireless-rayleigh", &[("shadowing_rho = 0.9", &format!("shadowing_rho = {bad}"))]);
        assert!(e.contains("resource.channel.shadowing_rho") && e.contains("[0, 1)"), "{e}");
    }
    let e = err("latency", &[("throughput_rho = 0.8", "throughput_rho = 1.0")]);
    assert!(e.contains("resource.compute.throughput_rho"), "{e}");
    let e = err("wireless-rayleigh", &[("fading = \"rayleigh\"", "fading = \"nakagami\"")]);
    assert!(e.contains("rayleigh") && e.contains("rician"), "{e}");
    let e = err("wireless-rayleigh", &[("deadline_s = 2.0", "deadline_s = 2.0\ndeadlin = 3.0")]);
    assert!(e.contains("deadlin") && e.contains("deadline_s"), "{e}");
    let e = err("wireless-rayleigh", &[("kind = \"channel\"", "kind = \"compute\"")]);
    assert!(e.contains("resource.compute"), "{e}");
    let e = presets::load("no-such-preset").unwrap_err().to_string();
    assert!(e.contains("wireless-rayleigh") && e.contains("llama7b"), "{e}");
}

#[test]
fn llama7b_has_real_shapes() {
    let p = presets::load("llama7b").unwrap();
    let spec = envs::EnvSpec::new(&p).unwrap();
    assert_eq!(spec.n_sites(), 224);
    let count = |d_in, d_out| spec.sites.iter().filter(|s| s.d_in == d_in && s.d_out == d_out).count();
    assert_eq!(count(4096, 4096), 128);
    assert_eq!(count(4096, 11008), 64);
    assert_eq!(count(11008, 4096), 32);
}

#[test]
fn calibration_file_round_trip_and_errors() {
    let p = edit(
        "wireless-rayleigh",
        &[("layers = 8\nhidden = 512\nintermediate = 1376\nprojections = [\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"]", "calibration = \"builtin:example\"")],
    )
    .unwrap();
    let cal = p.calibration_data.clone().unwrap();
    assert_eq!(envs::calibration::Calibration::from_json(&cal.to_json(), "x").unwrap(), cal);
    let mut v = VecEnv::new(&p, 2, 1).unwrap();
    assert_eq!(v.n_sites(), cal.sites.len());
    let n = v.n_sites();
    for _ in 0..25 {
        v.step(&vec![4; 2 * n]).unwrap();
    }
    let w: f32 = v.state(0).hidden_weights().iter().sum();
    assert!((w - 1.0).abs() < 1e-4);
    // From a file path, relative to the preset.
    let dir = std::env::temp_dir().join(format!("envs-cal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cal.json"), cal.to_json()).unwrap();
    let text = presets::embedded_text("wireless-rayleigh").unwrap().replace(
        "layers = 8\nhidden = 512\nintermediate = 1376\nprojections = [\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"]",
        "calibration = \"cal.json\"",
    );
    std::fs::write(dir.join("p.toml"), text).unwrap();
    let q = presets::load(dir.join("p.toml").to_str().unwrap()).unwrap();
    assert_eq!(q.calibration_data.unwrap(), cal);
    // `sites.spectrum_exponent` flattens the loaded spectra; it needs a calibration.
    let flat_text = presets::embedded_text("wireless-rayleigh").unwrap().replace(
        "layers = 8\nhidden = 512\nintermediate = 1376\nprojections = [\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"]",
        "calibration = \"cal.json\"\nspectrum_exponent = 0.5",
    );
    std::fs::write(dir.join("flat.toml"), &flat_text).unwrap();
    let flat = presets::load(dir.join("flat.toml").to_str().unwrap()).unwrap();
    assert_eq!(flat.calibration_data.unwrap(), cal.clone().with_spectrum_exponent(0.5));
    for (bad, why) in [("0.0", "(0, 4]"), ("5.0", "(0, 4]")] {
        std::fs::write(
            dir.join("bad.toml"),
            flat_text.replace("spectrum_exponent = 0.5", &format!("spectrum_exponent = {bad}")),
        )
        .unwrap();
        let e = presets::load(dir.join("bad.toml").to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("sites.spectrum_exponent") && e.contains(why), "{e}");
    }
    let e = edit("wireless-rayleigh", &[("projections = [", "spectrum_exponent = 0.5\nprojections = [")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("sites.spectrum_exponent") && e.contains("only with `calibration`"), "{e}");
    // Bad files.
    let mut bad = cal.clone();
    bad.sites[1].tail_energy = -1.0;
    let e = envs::calibration::Calibration::from_json(&bad.to_json(), "bad.json").unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("sites[1].tail_energy"), "{e}");
    let mut bad = cal.clone();
    bad.sites[0].spectrum = vec![1.0, 2.0];
    let e = envs::calibration::Calibration::from_json(&bad.to_json(), "bad.json").unwrap_err().to_string();
    assert!(e.contains("descending"), "{e}");
    let mut bad = cal.clone();
    bad.sites[0].spectrum = vec![1.0, -0.5];
    assert!(envs::calibration::Calibration::from_json(&bad.to_json(), "bad.json").is_err());
    let e = envs::calibration::Calibration::from_json("{\"format_version\": 1, \"sites\": [], \"extra\": 1}", "x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("extra"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn budget_schedule_is_cubic() {
    let p = presets::load("budget").unwrap();
    let ResourceModel::Budget(b) = ResourceModel::new(&p.resource) else { panic!() };
    assert_eq!(b.avg_rank(0, 20), 12.0);
    assert_eq!(b.avg_rank(1, 20), 12.0);
    assert_eq!(b.avg_rank(2, 20), 12.0);
    assert!((b.avg_rank(9, 20) - (8.0 + 4.0 * (1.0 - 7.0 / 14.0f64).powi(3))).abs() < 1e-12);
    assert_eq!(b.avg_rank(16, 20), 8.0);
    assert_eq!(b.avg_rank(19, 20), 8.0);
}

#[test]
fn oracle_beats_every_baseline_on_every_preset() {
    for name in presets::NAMES {
        let p = presets::load(name).unwrap();
        let episodes = if name == "llama7b" { 6 } else { 16 };
        let t = envs::evaluate_baselines(&p, &Baseline::ALL, episodes, 123).unwrap();
        let oracle = t.rows.iter().find(|r| r.name == "oracle").unwrap();
        assert_eq!(oracle.violation_rate, 0.0);
        for r in &t.rows {
            assert!(
                oracle.mean_return >= r.mean_return,
                "{name}: oracle {} < {} {}",
                oracle.mean_return,
                r.name,
                r.mean_return
            );
        }
        let md = t.to_markdown();
        assert!(md.contains("oracle gap closed"));
        let back: envs::EvalTable = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(back.rows.len(), t.rows.len());
        for (a, b) in back.rows.iter().zip(&t.rows) {
            assert_eq!(a.name, b.name);
            assert!((a.mean_return - b.mean_return).abs() < 1e-12);
        }
    }
}

#[test]
fn oracle_is_exact_and_small_core_on_llama7b() {
    let p = presets::load("llama7b").unwrap();
    let mut v = VecEnv::new(&p, 1, 4).unwrap();
    let n = v.n_sites();
    for _ in 0..5 {
        let (plan, stats) = v.oracle_plan(0);
        assert!(stats.exact);
        assert!(v.spec().plan_cost(&plan).unwrap() <= v.state(0).true_budget());
        v.step(&plan).unwrap();
        assert_eq!(plan.len(), n);
    }
}

#[test]
fn baseline_names_parse() {
    for b in Baseline::ALL {
        assert_eq!(b.name().parse::<Baseline>().unwrap(), b);
    }
    let e = "ppo".parse::<Baseline>().unwrap_err().to_string();
    assert!(e.contains("uniform, adalora, random, oracle"), "{e}");
}

#[test]
fn context_exposes_costs_and_budgets() {
    for name in ["wireless-rayleigh", "latency", "budget"] {
        let p = presets::load(name).unwrap();
        let v = VecEnv::new(&p, 1, 2).unwrap();
        let ctx = v.context(0);
        assert!(ctx.privileged.is_none());
        let plan = vec![8u32; v.n_sites()];
        assert_eq!(ctx.plan_cost(&plan), v.spec().plan_cost(&plan).unwrap());
        assert!(ctx.conservative_budget <= ctx.estimated_budget);
        // The observation's budget ratio is the estimated budget over the all-max-rank plan.
        let ratio = v.observation(0).global[GlobalFeature::BudgetRatioEst] as f64;
        assert!((ratio - (ctx.estimated_budget / v.spec().max_plan_cost).min(4.0)).abs() < 1e-5, "{name}");
        let pc = v.privileged_context(0);
        assert_eq!(pc.privileged.unwrap().true_budget(), v.state(0).true_budget());
        let o = envs::Observation::zeros(v.n_sites());
        assert_eq!(o.sites.len(), v.n_sites() * SITE_FEATURES);
    }
}

#[test]
fn site_rewards_sum_to_the_round_reward() {
    // Random plans over every preset: some rounds fit the budget, some violate it; the per-site
    // split used for credit assignment must add up to the reward either way.
    for name in presets::NAMES {
        let preset = presets::load(name).unwrap();
        let mut venv = VecEnv::new(&preset, 4, 11).unwrap();
        let (n, k) = (venv.n_sites(), preset.ranks.len());
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut violations = 0;
        for _ in 0..30 {
            let idx: Vec<u8> = (0..4 * n).map(|_| rand::Rng::random_range(&mut rng, 0..k) as u8).collect();
            venv.step_indices(&idx).unwrap();
            for e in 0..4 {
                let total: f64 = venv.site_rewards()[e * n..(e + 1) * n].iter().map(|&r| r as f64).sum();
                let r = venv.rewards()[e] as f64;
                assert!((total - r).abs() < 1e-3 * r.abs().max(1.0), "{name}: {total} vs {r}");
                violations += venv.outcomes()[e].violation as usize;
            }
        }
        assert!(violations > 0, "{name}: random plans should sometimes violate");
    }
}

/// The gap closed after t trained rounds at one fixed plan, relative to the first round's:
/// (L₀ − L_t)/(L₀ − L₁) = (1 − G(t))/(1 − G(1)), whatever the hidden weights and energies (every
/// site starts at nothing captured, so each site's gap follows the same G).
fn closed_share(g: impl Fn(f64) -> f64, t: f64) -> f64 {
    (1.0 - g(t)) / (1.0 - g(1.0))
}

#[test]
fn power_law_dynamics_follow_their_law_a_skip_holds_it_and_a_grown_site_is_younger() {
    // A channel wide enough that no plan fails, and no entropy effect, so every trained round
    // closes exactly the law's share.
    let alpha = 0.5;
    let p = edit(
        "wireless-rayleigh",
        &[
            ("deadline_s = 2.0", "deadline_s = 2000.0"),
            ("entropy_effect = 0.5", "entropy_effect = 0.0\ndecay_exponent = 0.5"),
        ],
    )
    .unwrap();
    assert_eq!(p.dynamics.decay_exponent, Some(alpha));
    let c = -(1.0 - p.dynamics.learning_rate).ln();
    let law = |k: f64| (1.0 + k * c / alpha).powf(-alpha);
    let exponential = |k: f64| (1.0 - p.dynamics.learning_rate).powf(k);
    // The per-round rates multiply out to the law, and the age of its gap is the rounds trained.
    let mut g = 1.0;
    for k in 0..20 {
        g *= 1.0 - p.dynamics.round_rate(k as f64);
        assert!((g - law(k as f64 + 1.0)).abs() < 1e-12, "round {k}");
        assert!((p.dynamics.age_of_gap(g) - (k + 1) as f64).abs() < 1e-6 * (k + 1) as f64, "round {k}");
    }
    let mut v = VecEnv::new(&p, 1, 5).unwrap();
    let n = v.n_sites();
    let l0 = v.state(0).loss();
    let play = |v: &mut VecEnv, plan: &[u8], skip: bool| {
        v.step_indices_skipping(plan, &[skip]).unwrap();
        assert!(!v.outcomes()[0].violation);
    };
    let rank1 = vec![1u8; n];
    play(&mut v, &rank1, false);
    let l1 = v.state(0).loss();
    // Round 1 is skipped: the loss and every site's age stay where they were.
    let age = |v: &VecEnv| v.state(0).site_age(v.spec(), 0);
    let a1 = age(&v);
    assert!((a1 - 1.0).abs() < 1e-4, "{a1}");
    play(&mut v, &rank1, true);
    assert_eq!((v.state(0).loss(), v.state(0).round()), (l1, 2));
    assert_eq!(age(&v), a1);
    for t in 2..=8u32 {
        play(&mut v, &rank1, false);
        assert!((age(&v) - t as f64).abs() < 1e-3 * t as f64, "t {t}: age {}", age(&v));
        let share = (l0 - v.state(0).loss()) / (l0 - l1);
        assert!(
            (share - closed_share(law, t as f64)).abs() < 1e-4,
            "t {t}: {share} vs {}",
            closed_share(law, t as f64)
        );
        // Far from the exponential of the same first round: late rounds still close a share.
        if t >= 4 {
            assert!(closed_share(exponential, t as f64) - share > 0.05, "t {t}");
        }
    }
    // Growing every site to the largest rank makes it younger: its new capacity starts fresh.
    let old = age(&v);
    let top = vec![(v.spec().rank_set.len() - 1) as u8; n];
    play(&mut v, &top, false);
    assert!(age(&v) < old, "age {} after growing, {old} before", age(&v));
    // Without the exponent the same preset is the exponential, whose rate has no age.
    let mut e = p.clone();
    e.dynamics.decay_exponent = None;
    assert_eq!(e.dynamics.round_rate(7.0), e.dynamics.learning_rate);
    assert_eq!(e.dynamics.age_of_gap(0.3), 0.0);
    // A bad exponent is refused with its key.
    let msg = err("wireless-rayleigh", &[("entropy_effect = 0.5", "entropy_effect = 0.5\ndecay_exponent = -1.0")]);
    assert!(msg.contains("decay_exponent") && msg.contains("> 0"), "{msg}");
}

#[test]
fn a_final_loss_reward_pays_each_rounds_progress_and_sums_to_the_loss_it_ends_at() {
    // No cost terms and a channel no plan can exceed: the return is the initial minus the final
    // loss, each round's reward its progress, split over the sites; a skip pays nothing.
    let p = edit(
        "wireless-rayleigh",
        &[("deadline_s = 2.0", "deadline_s = 2000.0"), ("cost_coef = 0.1", "cost_coef = 0.0\nloss_term = \"final\"")],
    )
    .unwrap();
    assert_eq!(p.reward.loss_term, envs::presets::LossTerm::Final);
    let mut v = VecEnv::new(&p, 1, 3).unwrap();
    let n = v.n_sites();
    let k = v.spec().rank_set.len() as u8;
    let l0 = v.state(0).loss();
    let mut ret = 0.0f64;
    for t in 0..p.rounds {
        let before = v.state(0).loss();
        // Grow, hold, shrink (which loses captured energy: a negative progress), skip.
        let plan: Vec<u8> = vec![[2, k - 1, k - 1, 1][t as usize % 4]; n];
        let skip = t % 5 == 4;
        v.step_indices_skipping(&plan, &[skip]).unwrap();
        let o = v.outcomes()[0];
        let r = v.rewards()[0] as f64;
        assert!(!o.violation);
        let site_sum: f64 = v.site_rewards().iter().map(|&x| x as f64).sum();
        assert!((site_sum - r).abs() < 1e-4 * (1.0 + r.abs()), "round {t}: sites {site_sum} vs {r}");
        if skip {
            assert_eq!(r, 0.0, "round {t}");
        } else if !v.dones()[0] {
            assert!((r - (before - v.state(0).loss())).abs() < 1e-5, "round {t}");
        }
        ret += r;
    }
    let s = v.finished()[0];
    assert!((ret - (l0 - s.final_loss)).abs() < 1e-4, "return {ret} vs {} − {}", l0, s.final_loss);
    // An unknown loss term is refused with its key.
    let msg = err("wireless-rayleigh", &[("cost_coef = 0.1", "cost_coef = 0.1\nloss_term = \"area\"")]);
    assert!(msg.contains("loss_term") || msg.contains("every-round"), "{msg}");
}

/// Every preset file shipped in `envs/presets/` (the calibrated ones with their calibration
/// files) loads, builds its environment and runs an episode: a shipped policy's preset that no
/// longer parses would otherwise surface only in a user's `train` or `eval`.
#[test]
fn every_shipped_preset_file_loads_and_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let p = presets::load_path(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        VecEnv::new(&p, 1, 3).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let (_, rewards) = rollout(&p, 3, p.rounds as usize);
        assert!(rewards.iter().all(|r| r.is_finite()), "{}", f.display());
    }
}

/// `observation.unmeasured_first_round`: the first round shows every site's sensitivity and
/// gradient norm at 1, their mean, as a real run from B = 0 does; later rounds show them measured.
/// Without the key the simulator reveals them from the first round.
#[test]
fn an_unmeasured_first_round_hides_the_sensitivities_until_a_round_is_trained() {
    let site_values = |p: &EnvPreset| {
        let mut v = VecEnv::new(p, 1, 4).unwrap();
        let n = v.n_sites();
        let read = |v: &VecEnv| {
            v.obs_sites()
                .chunks_exact(SITE_FEATURES)
                .map(|row| (row[SiteFeature::Sensitivity], row[SiteFeature::GradNorm]))
                .collect::<Vec<_>>()
        };
        let first = read(&v);
        v.step(&vec![v.spec().rank_set.rank(3); n]).unwrap();
        (first, read(&v))
    };
    let hidden = edit("budget", &[("tail_noise = 0.2", "tail_noise = 0.2\nunmeasured_first_round = true")]).unwrap();
    let (first, second) = site_values(&hidden);
    assert!(first.iter().all(|&v| v == (1.0, 1.0)), "{first:?}");
    assert!(second.iter().any(|&(s, g)| s != 1.0 && g != 1.0), "{second:?}");
    let (first, later) = site_values(&presets::load("budget").unwrap());
    assert!(first.iter().any(|&(s, _)| s != 1.0), "revealed by default: {first:?}");
    assert_eq!(later, second, "the key changes the first round's view only");
}

#[test]
fn the_observation_model_can_flatten_gradient_norms_and_scale_tail_shares_as_real_runs_read_them() {
    let after_one_round = |p: &EnvPreset| {
        let mut v = VecEnv::new(p, 1, 4).unwrap();
        let n = v.n_sites();
        v.step(&vec![v.spec().rank_set.rank(3); n]).unwrap();
        let col = |f: SiteFeature| v.obs_sites().chunks_exact(SITE_FEATURES).map(|row| row[f]).collect::<Vec<f32>>();
        (col(SiteFeature::Sensitivity), col(SiteFeature::GradNorm), col(SiteFeature::TailShare))
    };
    let log_sd = |x: &[f32]| {
        let ln: Vec<f64> = x.iter().map(|&v| (v as f64).ln()).collect();
        let m = ln.iter().sum::<f64>() / ln.len() as f64;
        (ln.iter().map(|v| (v - m).powi(2)).sum::<f64>() / ln.len() as f64).sqrt()
    };
    let (s0, g0, t0) = after_one_round(&presets::load("budget").unwrap());
    let read =
        edit("budget", &[("tail_noise = 0.2", "tail_noise = 0.2\ngrad_exponent = 0.4\ntail_scale = 0.5")]).unwrap();
    let (s1, g1, t1) = after_one_round(&read);
    assert_eq!(s1, s0, "the sensitivities and the generator's stream are unchanged");
    assert!(log_sd(&g1) < 0.7 * log_sd(&g0), "flatter gradient norms: {} vs {}", log_sd(&g1), log_sd(&g0));
    for (a, b) in t1.iter().zip(&t0) {
        assert!((a - 0.5 * b).abs() <= 1e-6 * b.abs().max(1e-6), "tail share halved: {a} vs {b}");
    }
    let e = err("budget", &[("tail_noise = 0.2", "tail_noise = 0.2\ngrad_exponent = 3")]);
    assert!(e.contains("grad_exponent") && e.contains("a number >= 0 and <= 2"), "{e}");
    let e = err("budget", &[("tail_noise = 0.2", "tail_noise = 0.2\ntail_scale = 0")]);
    assert!(e.contains("tail_scale") && e.contains("a number > 0 and <= 10"), "{e}");
}
