//! Property tests (issue 13): every loader of user files in this crate — environment presets
//! (TOML) and calibration files (JSON) — on hostile edits of valid files returns a value or an
//! error, never panics, and what it accepts simulates to finite observations and rewards.

use envs::VecEnv;
use envs::calibration::Calibration;
use envs::presets::{self, NAMES};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rankpilot_config::mutate::mutate;

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(13), ..Config::default() }
}

/// A few rounds of the preset with the smallest ranks: everything it shows must be finite.
fn simulate(p: &envs::EnvPreset) -> Result<(), TestCaseError> {
    let Ok(mut venv) = VecEnv::new(p, 2, 0) else { return Ok(()) };
    let plan = vec![venv.spec().rank_set.rank(0); venv.n_envs() * venv.n_sites()];
    for _ in 0..3 {
        if venv.step(&plan).is_err() {
            return Ok(());
        }
        prop_assert!(venv.rewards().iter().all(|r| r.is_finite()), "non-finite reward");
        prop_assert!(venv.obs_global().iter().chain(venv.obs_sites()).all(|x| x.is_finite()), "non-finite observation");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn env_presets(preset in 0usize..NAMES.len() - 1, kind in 0u8..6, at in 0usize..100_000, pick in 0usize..1000) {
        // llama7b (the last) is 4× larger and slower to simulate; its keys are the same.
        let text = mutate(presets::embedded_text(NAMES[preset]).unwrap(), kind, at, pick);
        if let Ok(p) = presets::from_toml(&text, "hostile.toml", None) {
            simulate(&p)?;
        }
    }

    #[test]
    fn calibration_files(kind in 0u8..6, at in 0usize..100_000, pick in 0usize..1000) {
        let base = include_str!("../presets/calibration-example.json");
        if let Ok(c) = Calibration::from_json(&mutate(base, kind, at, pick), "hostile.json") {
            let mut p = presets::load("wireless-rayleigh").unwrap();
            p.calibration_data = Some(c);
            p.sites.calibration = Some("hostile.json".into());
            simulate(&p)?;
        }
    }
}
