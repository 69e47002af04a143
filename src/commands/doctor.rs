//! `rankpilot doctor`: what is installed and where computation will run.

use clap::Args;

use crate::cli::Common;
use crate::device;

/// Arguments of `rankpilot doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    common: Common,
}

/// Prints versions, the libtorch location and CUDA devices, then runs a matmul on the device.
pub fn run(a: &DoctorArgs) -> anyhow::Result<()> {
    tch::manual_seed(a.common.seed as i64);
    let libtorch = std::env::var("LIBTORCH").ok().or(option_env!("LIBTORCH").map(String::from));
    println!("rankpilot      {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch       {}", libtorch.unwrap_or_else(|| "(resolved through rpath)".into()));
    println!("cuda available {}", tch::Cuda::is_available());
    println!("cuda devices   {}", if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 });
    println!("cudnn          {}", tch::Cuda::cudnn_is_available());
    println!("device         {}", device::describe(a.common.device));
    // A tiny computation on the chosen device proves the libraries load and run there.
    let x = tch::Tensor::randn([64, 64], (tch::Kind::Float, a.common.device));
    let s = x.matmul(&x.tr()).trace().double_value(&[]);
    anyhow::ensure!(s.is_finite(), "a 64×64 matmul on {:?} gave a non-finite trace", a.common.device);
    println!("check          64×64 matmul on {} ok", device::describe(a.common.device));
    Ok(())
}
