//! The model-based prior alone (no network) on held-out episodes, next to the baselines:
//! what a policy with a zero residual does before any training.
//!
//! `cargo run --release -p policies --example prior_eval -- [preset] [episodes] [seed] [default-dim|dims]`
//!
//! The last argument chooses the sites' shapes the prior assumes: `dims` (default) gives it each
//! site's min(d_in, d_out) from the round context, a number assumes that for every site.
use policies::prior::{Prior, PriorConfig, PriorPolicy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("wireless-rayleigh", |s| s.as_str());
    let episodes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let seed: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let dims = args.get(3).map_or("dims", |s| s.as_str());
    let preset = envs::presets::load(name)?;
    let mut table = envs::evaluate_baselines(&preset, &envs::Baseline::ALL, episodes, seed)?;
    let spec = envs::EnvSpec::new(&preset)?;
    let mut cfg = PriorConfig { enabled: true, ..Default::default() };
    if let Ok(d) = dims.parse::<u32>() {
        cfg.default_dim = d;
    }
    let t0 = std::time::Instant::now();
    let mut policy = PriorPolicy {
        prior: Prior::new(cfg, spec.rank_set.ranks()),
        use_dims: dims == "dims",
        belief: Default::default(),
    };
    table.push(envs::evaluate(&preset, &mut policy, episodes, seed)?);
    print!("{}", table.to_text());
    for base in ["adalora", "uniform"] {
        if let Some((d, se)) = table.paired_difference("prior", base) {
            println!("prior − {base}: {d:+.3} ± {se:.3} return (paired, {:.1} standard errors)", d / se.max(1e-12));
        }
    }
    println!("prior row: {:.2} s", t0.elapsed().as_secs_f64());
    Ok(())
}
