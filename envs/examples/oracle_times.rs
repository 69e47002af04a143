//! Distribution of oracle solve times over whole episodes under the oracle's own plans.
//! `cargo run --release -p envs --example oracle_times -- [envs] [preset...]`
fn main() -> Result<(), envs::EnvError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n_envs = args.first().and_then(|a| a.parse().ok()).unwrap_or(32);
    let names: Vec<String> =
        if args.len() > 1 { args[1..].to_vec() } else { envs::presets::NAMES.iter().map(|s| s.to_string()).collect() };
    for name in names {
        let p = envs::presets::load(&name)?;
        let mut v = envs::VecEnv::new(&p, n_envs, 3)?;
        let mut times = Vec::new();
        let mut worst_core = (0, 0);
        for _ in 0..p.rounds {
            let mut plan = Vec::new();
            for e in 0..n_envs {
                let t0 = std::time::Instant::now();
                let (pl, st) = v.oracle_plan(e);
                times.push(t0.elapsed().as_secs_f64() * 1e6);
                worst_core = worst_core.max((st.core_items, st.max_states));
                plan.extend(pl);
            }
            v.step(&plan)?;
        }
        times.sort_by(f64::total_cmp);
        let q = |f: f64| times[((times.len() - 1) as f64 * f) as usize];
        println!(
            "{name:<18} sites {:>3}  solves {}  p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>7.1} µs  (largest core {} sites / {} states)",
            v.n_sites(),
            times.len(),
            q(0.5),
            q(0.99),
            q(1.0),
            worst_core.0,
            worst_core.1
        );
    }
    Ok(())
}
