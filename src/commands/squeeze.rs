//! `rankpilot squeeze`: compresses an existing PEFT LoRA adapter (any model) site by site with the
//! QR-core SVD (LoRA-Squeeze's memory-efficient route; `ΔW` is never formed), rewriting
//! `rank_pattern` / `alpha_pattern`. Each site keeps its alpha; the factors absorb the change of
//! scaling, so the squeezed adapter is the best rank-k approximation of each original `ΔW`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgGroup, Args};

use rankpilot_config::BadInput;

use crate::cli::Common;
use tune::lora::Lora;
use tune::peft::PeftAdapter;
use tune::svd::energy_rank;

/// Arguments of `rankpilot squeeze`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["rank", "energy"])))]
pub struct SqueezeArgs {
    #[command(flatten)]
    common: Common,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Target rank for every site (sites already at or below it are kept).
    #[arg(long)]
    rank: Option<usize>,
    /// Keep per site the smallest rank whose singular values hold this share of ‖ΔW‖²_F.
    #[arg(long)]
    energy: Option<f64>,
    /// Output adapter directory.
    #[arg(long)]
    out: PathBuf,
}

/// Squeezes and writes the adapter.
pub fn run(a: &SqueezeArgs) -> Result<()> {
    if let Some(e) = a.energy
        && !(e > 0.0 && e <= 1.0)
    {
        return Err(BadInput(format!("--energy {e} must be in (0, 1]")).into());
    }
    if a.rank == Some(0) {
        return Err(BadInput("--rank must be at least 1 (PEFT cannot store rank-0 modules)".into()).into());
    }
    tch::manual_seed(a.common.seed as i64);
    let mut ad = PeftAdapter::load(&a.adapter)?;
    let device = a.common.device;
    let (mut before, mut after) = (0usize, 0usize);
    println!("{:<60} {:>6} {:>6} {:>9}", "module", "r", "r'", "energy");
    for site in ad.sites.iter_mut() {
        let kind = site.a.kind();
        let mut l =
            Lora::from_factors(&site.module, site.a.to_device(device), site.b.to_device(device), site.alpha, ad.rslora);
        let r = l.rank();
        let sv = l.singular_values();
        let k = match (a.rank, a.energy) {
            (Some(k), _) => k.min(r),
            // Energy never grows a site: a rank-0 site stays empty.
            (None, Some(e)) => energy_rank(&sv, e).clamp(r.min(1), r),
            _ => r,
        };
        let total: f64 = sv.iter().map(|x| x * x).sum();
        let kept: f64 = sv.iter().take(k).map(|x| x * x).sum();
        l.resize(k, tune::lora::Shrink::Svd)?;
        before += r * (l.d_in + l.d_out);
        after += k * (l.d_in + l.d_out);
        println!(
            "{:<60} {:>6} {:>6} {:>8.2}%",
            site.module,
            r,
            k,
            if total > 0.0 { 100.0 * kept / total } else { 100.0 }
        );
        site.a = l.a.detach().to_kind(kind).to_device(tch::Device::Cpu);
        site.b = l.b.detach().to_kind(kind).to_device(tch::Device::Cpu);
    }
    ad.save(&a.out)?;
    println!(
        "squeezed {} sites: {} -> {} LoRA parameters ({:.1}%) -> {}",
        ad.sites.len(),
        before,
        after,
        100.0 * after as f64 / before.max(1) as f64,
        a.out.display()
    );
    Ok(())
}
