//! Training-loop properties: exact resumption, and that a small problem is actually learned.

use policies::model::{BudgetContext, ObsBatch, TrainedPolicy};
use policies::network::{BudgetPrice, SampleFit, SiteOrder};
use policies::trainer::{Trainer, load_preset};
use tch::Device;

/// The default wireless preset shrunk to two layers (14 sites) so tests run in seconds.
fn small_env() -> envs::EnvPreset {
    let text = envs::presets::embedded_text("wireless-rayleigh").unwrap().replace("layers = 8", "layers = 2");
    envs::presets::from_toml(&text, "small-test-env", None).unwrap()
}

/// libtorch's CPU kernels split reductions by the threads they get, and threads are shared by the
/// whole process: two trainings at once in one test binary would not see the same arithmetic.
/// Every test here holds this lock (separate processes, as the CLI runs, are unaffected).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A round's allocation context at its conservative budget, as evaluation passes it.
fn round_budget<'a>(ctx: &'a envs::RoundContext<'a>, dims: &'a [u32]) -> BudgetContext<'a> {
    BudgetContext {
        unit_cost: ctx.unit_cost,
        budgets: std::slice::from_ref(&ctx.conservative_budget),
        dims: Some(dims),
        cost_coef: Some(ctx.cost_coef),
    }
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.model.weights().into_iter().map(|(n, w)| (n, Vec::<f32>::try_from(w.flatten(0, -1)).unwrap())).collect()
}

/// A trainer rebuilt from its checkpoint parts, through JSON text as a checkpoint stores them.
fn through_checkpoint(t: Trainer) -> Trainer {
    let (tensors, config, state) = t.checkpoint_parts();
    let config: serde_json::Value = serde_json::from_str(&config.to_string()).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state.to_string()).unwrap();
    let copies: Vec<(String, tch::Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    drop(t);
    Trainer::restore(&config, &state, &copies, None, Device::Cpu).unwrap()
}

/// A DDIM stage small enough for a test: warmed up after one iteration of the `tiny` preset.
fn small_ddim() -> policies::ddim::DdimConfig {
    policies::ddim::DdimConfig {
        enabled: true,
        warmup: 64,
        updates_per_iteration: 2,
        batch_size: 8,
        replay_capacity: 256,
        hidden: 16,
        sample_steps: 3,
        ..Default::default()
    }
}

#[test]
fn resume_equals_uninterrupted_run() {
    let _serial = serial();
    let env = small_env();
    let mut preset = load_preset("tiny").unwrap();
    preset.ddim = small_ddim(); // exercise the replay buffer and the second optimizer too
    let steps = 4 * preset.ppo.num_envs as u64 * preset.ppo.num_steps as u64;

    let mut straight = Trainer::new(&env, &preset, steps, 7, Device::Cpu).unwrap();
    for _ in 0..4 {
        straight.iterate();
    }

    let mut first = Trainer::new(&env, &preset, steps, 7, Device::Cpu).unwrap();
    first.iterate();
    first.iterate();
    let mut resumed = through_checkpoint(first);
    assert!(resumed.model.ddim_active, "DDIM warmed up before the checkpoint");
    resumed.iterate();
    resumed.iterate();

    assert_eq!(resumed.global_step, straight.global_step);
    let (a, b) = (weights(&resumed), weights(&straight));
    let differing: Vec<&String> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(x, _)| &x.0).collect();
    assert!(differing.is_empty(), "weights differ after resuming: {differing:?}");
    assert_eq!(resumed.model.norm, straight.model.norm);
}

#[test]
fn small_preset_is_learned_clearly_above_uniform() {
    let _serial = serial();
    let env = small_env();
    let mut preset = load_preset("default").unwrap();
    preset.ppo.num_envs = 8;
    preset.ppo.num_steps = 40;
    preset.ppo.learning_rate = 3e-4;
    let mut t = Trainer::new(&env, &preset, 25_000, 3, Device::Cpu).unwrap();
    while !t.finished() {
        t.iterate();
    }
    let mut table = envs::evaluate_baselines(&env, &[envs::Baseline::Uniform, envs::Baseline::Oracle], 64, 99).unwrap();
    let mut policy = TrainedPolicy::greedy(&t.model, "policy");
    table.push(envs::evaluate(&env, &mut policy, 64, 99).unwrap());
    let (d, se) = table.paired_difference("policy", "uniform").unwrap();
    let gap = table.rows[2].oracle_gap_closed.unwrap();
    eprintln!("{}", table.to_text());
    assert!(d > 3.0 * se && gap > 0.1, "policy − uniform = {d:.3} ± {se:.3}, gap closed {gap:.3}");
}

#[test]
fn a_checkpoint_refuses_another_rank_set() {
    let _serial = serial();
    let env = small_env();
    let preset = load_preset("tiny").unwrap();
    let t = Trainer::new(&env, &preset, 64, 1, Device::Cpu).unwrap();
    let (tensors, config, state) = t.checkpoint_parts();
    let (model, cfg) = policies::trainer::policy_from_checkpoint(&config, &state, &tensors, Device::Cpu).unwrap();
    assert_eq!(model.ranks, env.ranks);
    let other = policies::model::Schema::current(&[0, 4, 8]);
    let e = cfg.schema.check_compatible(&other).unwrap_err();
    assert!(e.to_string().contains("[0, 4, 8]"), "{e}");
}

#[test]
fn an_untrained_policy_with_a_prior_plans_as_the_prior() {
    // The residual heads start at zero, so the greedy policy skips exactly when the prior's skip
    // margin is positive, and otherwise plays the prior's knapsack plan: equal, or (float ties
    // between log-softmax utilities and the prior's values) of equal prior value.
    let _serial = serial();
    let env = small_env();
    let preset = load_preset("default").unwrap();
    assert!(preset.prior.enabled);
    let t = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap();
    let mut model_policy = TrainedPolicy::greedy(&t.model, "policy");
    let prior = policies::prior::Prior::new(preset.prior.clone(), &env.ranks);
    let mut venv = envs::VecEnv::new(&env, 1, 17).unwrap();
    let (mut rounds, mut equal, mut skips) = (0, 0, 0);
    let mut belief = policies::belief::Belief::new();
    for _ in 0..60 {
        let obs = venv.observation(0);
        let ctx = venv.context(0);
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let budget = round_budget(&ctx, &dims);
        // The prior's values, skip margin and the budget it plans at (with `risk`, chosen for the
        // inferred error of the estimate, which its belief measures from what was sent).
        let k = env.ranks.len();
        let want_all = policies::prior::Want { values: true, skip: true, estimates: false, loss_quantile: 0.0 };
        let out = prior.evaluate(ObsBatch::one(&obs), budget, std::slice::from_mut(&mut belief), want_all);
        let (v, margin, plan_budget) = (out.values, out.skip_margin[0], out.plan_budget[0]);
        let want = prior.plan_from_values(&v, BudgetContext { budgets: &[plan_budget], ..budget });
        let reference = policies::prior::estimated_budget(&obs.global, ctx.unit_cost, &env.ranks);
        let sent = |belief: &mut policies::belief::Belief, cost: f64| match reference {
            Some(b) => belief.sent(b, cost),
            None => belief.sent(0.0, 0.0),
        };
        let Some(got) = envs::RankPolicy::decide(&mut model_policy, &obs, &ctx) else {
            assert!(margin > -1e-4, "round {rounds}: skipped with a skip margin of {margin}");
            skips += 1;
            rounds += 1;
            sent(&mut belief, 0.0);
            let keep = venv.rank_indices(0).to_vec();
            venv.step_indices_skipping(&keep, &[true]).unwrap();
            continue;
        };
        assert!(margin < 1e-4, "round {rounds}: played with a skip margin of {margin}");
        let got: Vec<usize> = got.iter().map(|&r| ctx.rank_set.index_of(r).unwrap()).collect();
        let value = |p: &[usize]| p.iter().enumerate().map(|(l, &j)| v[l * k + j] as f64).sum::<f64>();
        let (vg, vw) = (value(&got), value(&want));
        assert!(
            vg >= vw - 1e-4 * vw.abs().max(1.0),
            "round {rounds}: model plan {got:?} ({vg}) vs prior {want:?} ({vw})"
        );
        assert!(ctx.plan_cost(&got.iter().map(|&j| env.ranks[j]).collect::<Vec<_>>()) <= plan_budget * (1.0 + 1e-9));
        equal += (got == want) as usize;
        rounds += 1;
        sent(&mut belief, ctx.plan_cost(&want.iter().map(|&j| env.ranks[j]).collect::<Vec<_>>()));
        venv.step_indices(&want.iter().map(|&j| j as u8).collect::<Vec<_>>()).unwrap();
    }
    assert!(equal * 10 >= (rounds - skips) * 9, "only {equal} of {} plans identical", rounds - skips);
    assert!(skips > 0 && skips < rounds, "{skips} of {rounds} rounds skipped: both branches are checked");
}

/// A small distribution (2–3 layers, 4–8 rounds, every resource kind) written to a file.
fn small_distribution() -> envs::distribution::EnvDistribution {
    let dir = std::env::temp_dir().join(format!("rankpilot-small-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.toml");
    std::fs::write(
        &path,
        r#"name = "small"
base = "wireless-rayleigh"
[[pick]]
presets = ["wireless-rayleigh", "latency", "budget"]
tables = ["resource", "baselines", "reward"]
[[vary]]
key = "rounds"
min = 4
max = 8
[[vary]]
key = "sites.layers"
min = 2
max = 3
[[vary]]
key = "dynamics.learning_rate"
min = 0.1
max = 0.6
"#,
    )
    .unwrap();
    let d = envs::distribution::EnvDistribution::load(path.to_str().unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    d
}

#[test]
fn distribution_run_resumes_exactly_and_acts_on_every_preset() {
    let mut preset = load_preset("tiny").unwrap();
    preset.ppo.num_envs = 8; // two groups of 4, each drawing its own environments
    preset.ppo.net.skip = true;
    preset.prior.enabled = true;
    check_distribution_run(&preset);
}

#[test]
fn a_network_reading_the_estimates_without_a_prior_resumes_exactly_and_acts_on_every_preset() {
    // No prior values, the online inference's estimates as inputs, read per rank.
    let mut preset = load_preset("tiny").unwrap();
    preset.ppo.num_envs = 8;
    preset.ppo.net.skip = true;
    preset.ppo.net.estimates = true;
    preset.ppo.net.rank_head = true;
    preset.prior.enabled = false;
    check_distribution_run(&preset);
}

#[test]
fn a_policy_that_keeps_held_ranks_and_fits_at_the_mean_price_resumes_exactly_and_acts_on_every_preset() {
    // The sampling options of the `ppo` preset's exploration study: keep mixture, mean price,
    // largest-first allocation (the mixture needs each site's current rank in the minibatch).
    let mut preset = load_preset("tiny").unwrap();
    preset.ppo.num_envs = 8;
    preset.ppo.net.skip = true;
    preset.ppo.net.keep = 0.9;
    preset.ppo.net.fit = SampleFit { price: BudgetPrice::Mean, order: SiteOrder::LargestFirst };
    preset.prior.enabled = false;
    check_distribution_run(&preset);
}

#[test]
fn a_teacher_trained_policy_with_a_refiner_of_the_oracles_plans_resumes_exactly_on_a_distribution() {
    // The privileged teacher's cross-entropy, and a DDIM refiner whose replay holds the
    // oracle's plans of environments with different site counts (2–3 layers): the replay
    // round-trips through the checkpoint, and the refined policy acts on every preset.
    let mut preset = load_preset("tiny").unwrap();
    preset.ppo.num_envs = 8;
    preset.ppo.net.skip = true;
    preset.ppo.teacher_coef = 1.0;
    preset.prior.enabled = true;
    preset.ddim = policies::ddim::DdimConfig { target: policies::ddim::DdimTarget::Oracle, ..small_ddim() };
    check_distribution_run(&preset);
}

#[test]
fn a_run_measured_against_reference_twins_resumes_exactly_and_acts_on_every_preset() {
    // `ppo.reference_rollout`: every group carries twins played by the prior alone; they are
    // redrawn with their group and round-trip through the checkpoint.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.reference_rollout = true;
    check_distribution_run(&preset);
}

#[test]
fn a_refiner_beside_a_network_reading_the_estimates_resumes_exactly_and_acts_on_every_preset() {
    // The `default` preset's network reads the estimates; the refiner reads the observation's
    // own features (the leading columns of the network's rows), in its replay and when it acts.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.net.estimates = true;
    preset.ddim = small_ddim();
    check_distribution_run(&preset);
}

#[test]
fn a_run_with_rewards_per_gap_resumes_exactly_and_acts_on_every_preset() {
    // `ppo.reward_per_gap`: each draw's reward weight is recomputed from the draw on resume; a
    // different weight would change the updates, so the resumed weights would differ.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.reward_per_gap = true;
    check_distribution_run(&preset);
}

#[test]
fn a_run_with_vine_skip_advantages_resumes_exactly_and_acts_on_every_preset() {
    // `ppo.skip_vine`: the branch rounds are drawn from the run's generator and the branches
    // play copies, so a resumed run must branch where the straight one did, on the same draws.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.skip_vine = 1.0;
    check_distribution_run(&preset);
}

#[test]
fn a_run_with_a_defer_head_resumes_exactly_trains_the_head_and_acts_on_every_preset() {
    // `net.defer`: a third branch plays the prior's decision, and the head trains on the
    // branches with its own optimizer, whose moments a checkpoint must carry.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.skip_vine = 2.0;
    preset.ppo.net.defer = true;
    check_distribution_run(&preset);
    let _serial = serial();
    let dist = small_distribution();
    let mut t = Trainer::with_distribution(&dist, &dist.draw(1).unwrap(), &preset, 1 << 20, 9, Device::Cpu).unwrap();
    let before = weights(&t);
    let learned = (0..4).map(|_| t.iterate()).filter(|st| st.defer_loss.is_finite()).count();
    assert!(learned > 0, "the head met branched states where the two decisions returned differently");
    let moved = before.iter().zip(&weights(&t)).filter(|(a, b)| a.0.starts_with("defer.") && a.1 != b.1).count();
    assert!(moved > 0, "the defer head's weights were trained");
}

#[test]
fn a_run_whose_plans_are_the_priors_resumes_exactly_and_acts_on_every_preset() {
    // `net.prior_ranks` (the `default` preset's): the rank residual's weights receive no gradient
    // and stay at their zero start; the skip head and the critic train.
    let mut preset = tiny_with_skip_and_prior();
    preset.ppo.skip_vine = 1.0;
    preset.ppo.net.prior_ranks = true;
    check_distribution_run(&preset);
    let _serial = serial();
    let dist = small_distribution();
    let mut t = Trainer::with_distribution(&dist, &dist.draw(1).unwrap(), &preset, 1 << 20, 9, Device::Cpu).unwrap();
    let before = weights(&t);
    for _ in 0..2 {
        t.iterate();
    }
    let after = weights(&t);
    let changed = |prefix: &str| before.iter().zip(&after).any(|(a, b)| a.0.starts_with(prefix) && a.1 != b.1);
    assert!(!changed("net.logits."), "the rank residual stays at zero");
    assert!(changed("net.skip.") && changed("net.value2."), "the skip head and the critic train");
}

/// The `tiny` preset with 8 environments, the skip head and the prior: the base of the options'
/// resume tests.
fn tiny_with_skip_and_prior() -> policies::trainer::PolicyPreset {
    let mut preset = load_preset("tiny").unwrap();
    preset.ppo.num_envs = 8;
    preset.ppo.net.skip = true;
    preset.prior.enabled = true;
    preset
}

/// A run of `preset` on the small distribution: resumed mid-way it gives the same weights as
/// straight through, and the trained policy acts on every built-in preset.
fn check_distribution_run(preset: &policies::trainer::PolicyPreset) {
    let _serial = serial();
    let dist = small_distribution();
    let validation = dist.draw(1).unwrap();
    let steps = 4 * preset.ppo.num_envs as u64 * preset.ppo.num_steps as u64;
    let new = || Trainer::with_distribution(&dist, &validation, preset, steps, 9, Device::Cpu).unwrap();

    let mut straight = new();
    let mut site_counts = std::collections::HashSet::new();
    for _ in 0..4 {
        let st = straight.iterate();
        assert!(!st.update.non_finite);
        site_counts.insert(st.last_ranks.len());
    }
    let mut first = new();
    first.iterate();
    first.iterate();
    let mut resumed = through_checkpoint(first);
    resumed.iterate();
    resumed.iterate();
    let (a, b) = (weights(&resumed), weights(&straight));
    let differing: Vec<&String> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(x, _)| &x.0).collect();
    assert!(differing.is_empty(), "weights differ after resuming a distribution run: {differing:?}");
    assert!(site_counts.len() > 1, "groups of different site counts were in flight: {site_counts:?}");

    // The trained policy acts on every built-in preset (any site count, any resource kind), and
    // never skips where the resource forbids it.
    for name in envs::presets::NAMES {
        let env = envs::presets::load(name).unwrap();
        let mut policy = TrainedPolicy::greedy(&straight.model, "p");
        let row = envs::evaluate(&env, &mut policy, 2, 5).unwrap();
        assert!(row.mean_return.is_finite(), "{name}");
        if env.resource.kind == envs::presets::ResourceKind::Budget {
            assert_eq!(row.skip_rate, 0.0, "no skipping on {name}");
        }
    }
}

#[test]
fn the_network_reads_the_estimates_of_one_round_model_and_each_belief_sees_a_round_once() {
    let env = small_env();
    // The `ppo` preset (no prior) reading the estimates.
    let mut preset = load_preset("ppo").unwrap();
    preset.ppo.net.estimates = true;
    assert!(!preset.prior.enabled);
    let model = policies::model::PolicyModel::with_prior(
        Device::Cpu,
        &env.ranks,
        preset.ppo.net,
        preset.ddim.clone(),
        &preset.prior,
    );
    let estimator =
        policies::prior::Prior::new(policies::prior::PriorConfig { infer: true, ..preset.prior.clone() }, &env.ranks);
    let mut venv = envs::VecEnv::new(&env, 1, 3).unwrap();
    let (k, n) = (env.ranks.len(), venv.n_sites());
    let (g_dim, s_dim) = model.input_dims();
    assert_eq!((g_dim, s_dim), (envs::GLOBAL_FEATURES + 4, envs::SITE_FEATURES + 3 + k));
    let (mut belief, mut reference) = (vec![policies::belief::Belief::new()], vec![policies::belief::Belief::new()]);
    for round in 0..4 {
        let obs = venv.observation(0);
        let ctx = venv.context(0);
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let budget = round_budget(&ctx, &dims);
        let d = model.act(ObsBatch::one(&obs), budget, &mut belief, policies::model::ActMode::Greedy);
        assert_eq!(belief[0].observations(), round + 1, "one observation per round");
        let want = policies::prior::Want { values: false, skip: false, estimates: true, loss_quantile: 0.0 };
        let est = estimator.evaluate(ObsBatch::one(&obs), budget, &mut reference, want);
        assert_eq!(&d.global[envs::GLOBAL_FEATURES..], &est.est_global[..]);
        for l in 0..n {
            let row = &d.sites[l * s_dim..(l + 1) * s_dim];
            assert_eq!(&row[envs::SITE_FEATURES..], &est.est_sites[l * (3 + k)..(l + 1) * (3 + k)]);
            assert!(row.iter().all(|x| x.is_finite()));
        }
        // The energy row is a share of the spectrum, rising with the rank.
        let energy = &est.est_sites[3..3 + k];
        assert!(energy.windows(2).all(|w| w[0] <= w[1] + 1e-6) && energy[k - 1] <= 1.0 + 1e-6, "{energy:?}");
        venv.step_indices(&d.executed).unwrap();
    }
}

#[test]
fn plans_at_the_inferred_loss_quantile_lose_fewer_rounds_on_a_noisy_channel_than_at_the_fixed_margin() {
    // A channel whose SNR estimate is three times noisier than the preset's 1.5 dB safety margin
    // assumes: a plan that fills the conservative budget is lost about one round in six. An
    // untrained network without a prior whose utilities grow with the rank (`net.monotone`, so
    // its greedy plan fills whatever budget it is given) loses far fewer with its plans fitted to
    // the budget whose inferred probability of a lost round is 2 % (`net.loss_quantile`).
    let _serial = serial();
    let text = envs::presets::embedded_text("wireless-rayleigh")
        .unwrap()
        .replace("layers = 8", "layers = 2")
        .replace("estimate_noise_db = 0.5", "estimate_noise_db = 1.5");
    let env = envs::presets::from_toml(&text, "noisy-estimate-test-env", None).unwrap();
    let mut preset = load_preset("ppo").unwrap();
    preset.ppo.net.monotone = true;
    let mut rates = Vec::new();
    for q in [0.0, 0.02] {
        preset.ppo.net.loss_quantile = q;
        let t = Trainer::new(&env, &preset, 1_000, 3, Device::Cpu).unwrap();
        let mut policy = TrainedPolicy::greedy(&t.model, "policy");
        let row = envs::evaluate(&env, &mut policy, 32, 7).unwrap();
        rates.push((row.violation_rate, row.skip_rate));
    }
    eprintln!("(violation rate, skip rate) at the margin and at the quantile: {rates:?}");
    let ((margin, _), (quantile, _)) = (rates[0], rates[1]);
    assert!(margin > 0.06, "filling the conservative budget loses {margin:.3} of the rounds: {rates:?}");
    assert!(quantile < margin / 3.0, "{rates:?}");
}
