//! Times each built-in policy's evaluation on one preset.
//! `cargo run --release -p envs --example time_rows -- [preset] [episodes]`
fn main() -> Result<(), envs::EnvError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("llama7b");
    let episodes = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let preset = envs::presets::load(name)?;
    for b in envs::Baseline::ALL {
        let t0 = std::time::Instant::now();
        let t = envs::evaluate_baselines(&preset, &[b], episodes, 0)?;
        println!("{:<8} {:>8.2} s  return {:.3}", b.name(), t0.elapsed().as_secs_f64(), t.rows[0].mean_return);
    }
    Ok(())
}
