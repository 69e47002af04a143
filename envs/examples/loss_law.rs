//! Which law extrapolates a real loss curve: fits the first `fit` losses of each curve with
//! [`envs::calibration::fit_loss_curve`] under the exponential and the power law, and prints each
//! fit and its error on the losses after them (the steps a probe does not see).
//!
//! `cargo run --release -p envs --example loss_law -- <fit> <file>...`
//!
//! Each file holds one loss per line, step 1 first (e.g. a run's `train/loss` exported from
//! TensorBoard). The held-out error is the RMS over the remaining steps and the mean over the
//! last tenth of the curve (the batches' noise averages out there, the law's bias does not).
use envs::calibration::{DecayLaw, fit_loss_curve};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: loss_law <fit steps> <file>...";
    let Some(fit_steps) = args.first().and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    println!(
        "| curve | law | A | B | r | α | rms (fit) | rms (held out) | mean error, last tenth |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for path in &args[1..] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        let losses: Result<Vec<f64>, _> = text.split_whitespace().map(str::parse::<f64>).collect();
        let Ok(losses) = losses else {
            eprintln!("{path}: allowed: one number per line");
            std::process::exit(2);
        };
        if losses.len() <= fit_steps {
            eprintln!("{path}: {} losses, allowed: more than the {fit_steps} fitted", losses.len());
            std::process::exit(2);
        }
        for law in [DecayLaw::Exponential, DecayLaw::Power] {
            match fit_loss_curve(&losses[..fit_steps], law) {
                Ok(f) => {
                    let held: Vec<f64> = (fit_steps..losses.len()).map(|i| losses[i] - f.at((i + 1) as f64)).collect();
                    let rms = (held.iter().map(|e| e * e).sum::<f64>() / held.len() as f64).sqrt();
                    let tail = (losses.len() / 10).max(1);
                    let last = &held[held.len().saturating_sub(tail)..];
                    let mean_last = last.iter().sum::<f64>() / last.len() as f64;
                    println!(
                        "| {path} | {law:?} | {:.4} | {:.4} | {:.5} | {} | {:.4} | {rms:.4} | {mean_last:+.4} |",
                        f.floor,
                        f.amplitude,
                        f.ratio,
                        f.exponent.map(|a| format!("{a:.3}")).unwrap_or_else(|| "∞".into()),
                        f.rms
                    );
                }
                Err(e) => println!("| {path} | {law:?} | no fit: {e} | | | | | | |"),
            }
        }
    }
}
