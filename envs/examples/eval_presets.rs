//! Prints the baseline table of every embedded preset.
//! `cargo run --release -p envs --example eval_presets -- [episodes] [seed] [preset...]`
fn main() -> Result<(), envs::EnvError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let episodes = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let seed = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let names: Vec<String> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        envs::presets::NAMES.iter().map(|s| s.to_string()).collect()
    };
    for name in names {
        let preset = envs::presets::load(&name)?;
        let t0 = std::time::Instant::now();
        let table = envs::evaluate_baselines(&preset, &envs::Baseline::ALL, episodes, seed)?;
        println!(
            "{}\n({:.1} s)\n",
            table.to_markdown(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
