//! Property tests (issue 13): every loader of user files in this crate — policy presets (TOML)
//! and a policy checkpoint's `config` and `state` (JSON) — on hostile edits of valid files returns
//! a value or an error, never panics, and a checkpoint it accepts acts with in-range ranks.

use policies::model::{ActMode, BudgetContext, ObsBatch};
use policies::trainer::{PolicyPreset, Trainer, load_preset, policy_from_checkpoint};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rankpilot_config::mutate::mutate;
use tch::Device;

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(13), ..Config::default() }
}

fn small_env() -> envs::EnvPreset {
    let text = envs::presets::embedded_text("wireless-rayleigh").unwrap().replace("layers = 8", "layers = 2");
    envs::presets::from_toml(&text, "small-test-env", None).unwrap()
}

const PRESETS: [&str; 4] = [
    include_str!("../presets/default.toml"),
    include_str!("../presets/ppo.toml"),
    include_str!("../presets/ddim.toml"),
    include_str!("../presets/tiny.toml"),
];

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn policy_presets(preset in 0usize..PRESETS.len(), kind in 0u8..6, at in 0usize..100_000, pick in 0usize..1000) {
        let text = mutate(PRESETS[preset], kind, at, pick);
        let _ = rankpilot_config::from_str::<PolicyPreset>(&text, "hostile.toml");
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn checkpoint_config_and_state(part in 0usize..2, kind in 0u8..6, at in 0usize..1_000_000, pick in 0usize..1000) {
        let env = small_env();
        let t = Trainer::new(&env, &load_preset("tiny").unwrap(), 64, 1, Device::Cpu).unwrap();
        let (tensors, config, state) = t.checkpoint_parts();
        let (mut c, mut s) = (config.to_string(), state.to_string());
        if part == 0 { c = mutate(&c, kind, at, pick) } else { s = mutate(&s, kind, at, pick) }
        let (Ok(c), Ok(s)) = (serde_json::from_str(&c), serde_json::from_str(&s)) else { return Ok(()) };
        let _ = Trainer::restore(&c, &s, &tensors, None, Device::Cpu);
        if let Ok((model, _)) = policy_from_checkpoint(&c, &s, &tensors, Device::Cpu) {
            let venv = envs::VecEnv::new(&env, 1, 3).unwrap();
            let ctx = venv.context(0);
            let d = model.act(
                ObsBatch { global: venv.obs_global(), sites: venv.obs_sites(), n_envs: 1, n_sites: venv.n_sites() },
                BudgetContext { unit_cost: ctx.unit_cost, budgets: &[ctx.conservative_budget], dims: None, cost_coef: None },
                &mut [],
                ActMode::Greedy,
            );
            prop_assert!(d.executed.iter().all(|&j| (j as usize) < model.ranks.len()));
        }
    }
}
