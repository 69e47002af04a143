//! What one rank everywhere buys in the simulator: the mean final loss of holding uniform rank r
//! at every site for every round, on a preset whose resource is made wide enough that no round
//! fails (so only the dynamics and the spectra speak). Compare with real runs of `fixed:R`.
//!
//! `cargo run --release -p envs --example fixed_rank -- <preset> <episodes> <seed> <rank>...`
use envs::VecEnv;
use envs::presets;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fixed_rank <preset> <episodes> <seed> <rank>...";
    let (Some(name), Some(Ok(episodes)), Some(Ok(seed))) =
        (args.first(), args.get(1).map(|a| a.parse::<usize>()), args.get(2).map(|a| a.parse::<u64>()))
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mut preset = match presets::load(name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // A resource no plan can exceed.
    if let Some(c) = preset.resource.channel.as_mut() {
        c.deadline_s *= 1e6;
    }
    if let Some(c) = preset.resource.compute.as_mut() {
        c.latency_budget_s *= 1e6;
    }
    println!("| rank | final loss (mean ± se over {episodes} episodes) | loss above the floor |\n|---:|---:|---:|");
    for r in &args[3..] {
        let Ok(rank) = r.parse::<u32>() else {
            eprintln!("{usage}");
            std::process::exit(2);
        };
        let mut env = match VecEnv::new(&preset, 1, seed) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
        let plan = vec![rank; env.n_sites()];
        let mut finals = Vec::with_capacity(episodes);
        while finals.len() < episodes {
            if let Err(e) = env.step(&plan) {
                eprintln!("rank {rank}: {e}");
                std::process::exit(2);
            }
            if env.dones()[0] {
                finals.push(env.outcomes()[0].loss);
            }
        }
        let n = finals.len() as f64;
        let mean = finals.iter().sum::<f64>() / n;
        let se = (finals.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0) / n).sqrt();
        println!("| {rank} | {mean:.4} ± {se:.4} | {:.4} |", mean - preset.dynamics.loss_floor);
    }
}
