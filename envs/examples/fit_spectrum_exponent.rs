//! Fits `sites.spectrum_exponent` to real runs at uniform ranks:
//! `cargo run --release -p envs --example fit_spectrum_exponent -- <calibration.json> <top rank> r1:gain1 r2:gain2 ...`
//! where a gain is the final val loss at uniform rank r minus that at the top rank (e.g. from
//! `rankpilot compare --env none --schedulers fixed:1,fixed:2,...`). Prints γ, the fitted scale,
//! the rms residual, and the real and simulated gains side by side, with γ = 1 for reference.
use envs::calibration::{Calibration, fit_spectrum_exponent, simulated_gains};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fit_spectrum_exponent <calibration.json> <top rank> r:gain ...";
    let (Some(path), Some(top)) = (args.first(), args.get(1).and_then(|t| t.parse::<u32>().ok())) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let cal = Calibration::load(std::path::Path::new(path)).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let gains: Vec<(u32, f64)> = args[2..]
        .iter()
        .map(|a| match a.split_once(':').map(|(r, g)| (r.parse::<u32>(), g.parse::<f64>())) {
            Some((Ok(r), Ok(g))) => (r, g),
            _ => {
                eprintln!("{a}: {usage}");
                std::process::exit(2);
            }
        })
        .collect();
    let Some((gamma, scale, rms)) = fit_spectrum_exponent(&cal, &gains, top) else {
        eprintln!("nothing to fit: {usage}");
        std::process::exit(2);
    };
    println!("spectrum_exponent {gamma:.2}: scale {scale:.4} (loss units), rms residual {rms:.4}");
    let ranks: Vec<u32> = gains.iter().map(|&(r, _)| r).collect();
    for g in [1.0, gamma] {
        let sim = simulated_gains(&cal, g, &ranks, top);
        // Each γ at its own best scale, so the shapes compare.
        let ss: f64 = sim.iter().map(|x| x * x).sum();
        let c = sim.iter().zip(&gains).map(|(x, (_, y))| x * y).sum::<f64>() / ss.max(f64::MIN_POSITIVE);
        print!("gamma {g:.2} (scale {c:.3}):");
        for (&(r, real), s) in gains.iter().zip(&sim) {
            print!("  r{r} real {real:+.3} sim {:+.3}", c * s);
        }
        println!();
    }
}
