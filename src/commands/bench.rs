//! `rankpilot bench svd|finetune`: the README's benchmarks, each run side by side with the same
//! work in Python torch (the set-up's venv) in one invocation; figures as ratios.
//!
//! * `svd`: QR-core squeeze of a d=4096, r=64 adapter to r=16 (rankpilot vs the same route in
//!   PyTorch, and vs a full SVD of ΔW); randomized vs exact truncated SVD of 4096×4096 matrices
//!   with a decaying and with a flat spectrum (time and error; PyTorch's `svd_lowrank` alongside).
//! * `ppo` ([`super::bench_ppo`]): rankpilot PPO against Stable-Baselines3 PPO on one preset.
//! * `finetune`: LoRA fine-tuning tokens/s of the tiny model on the CPU against transformers +
//!   peft with the same configuration; resize overhead as a share of training time.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use tch::{Device, Kind, Tensor, nn};

use crate::cli::Common;
use policies::belief::Belief;

/// Rounds of history behind a timed decision of a prior that infers (`bench policy`).
const HISTORY_ROUNDS: usize = 15;
use tune::data::TokenData;
use tune::finetune::{FinetuneConfig, Finetuner, RankPlan, RankSpec};
use tune::lora::AdamW;
use tune::model::llama::{Llama, LlamaConfig};
use tune::svd::{self, RsvdOptions};

/// Which benchmark.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// QR-core squeeze and randomized SVD.
    Svd,
    /// Fine-tuning throughput and resize overhead.
    Finetune,
    /// Rank-policy decision latency for the 224-site 7B preset, PPO alone and with DDIM.
    Policy,
    /// rankpilot PPO against Stable-Baselines3 PPO (through the Gymnasium environment): env
    /// steps/s while training and while stepping alone, and gap closed after equal env steps.
    Ppo,
}

/// Arguments of `rankpilot bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// The benchmark to run.
    which: Which,
    /// Python interpreter with torch (default: the set-up's venv).
    #[arg(long)]
    python: Option<String>,
    /// Directory of the Python halves (default: this checkout's benches/python).
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// Repetitions for the timings (median reported).
    #[arg(long, default_value_t = 9)]
    repeats: usize,
    /// Timed training steps per configuration (finetune).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Intra-op threads for both sides (default: libtorch's default, the number of cores).
    /// On small shared VMs PyTorch's multi-threaded LAPACK can be pathologically slow; compare
    /// at 1 thread too.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Skip the full 4096×4096 SVDs (each takes tens of seconds on a small CPU).
    #[arg(long)]
    skip_full_svd: bool,
    /// Model of `bench finetune`: `tiny` (the embedded default: 4 layers × 256, seq 128) or
    /// `large` (12 layers × 1024, vocabulary 32 000, seq 1024: enough to load a GPU).
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "large"])]
    model_size: String,
    /// `bench finetune` with bfloat16 base weights on both sides (default: float32).
    #[arg(long)]
    bf16: bool,
    /// `bench ppo`: the environment preset both learners train and are evaluated on.
    #[arg(long, default_value = "wireless-rayleigh")]
    pub(crate) env: String,
    /// `bench ppo`: environment steps (rounds) each learner trains for.
    #[arg(long, default_value_t = 32_768)]
    pub(crate) env_steps: u64,
    /// `bench ppo`: evaluation episodes (those of `rankpilot eval --seed <eval-seed>`).
    #[arg(long, default_value_t = 200)]
    pub(crate) episodes: usize,
    /// `bench ppo`: seed of the evaluation episodes (not the training seed, `--seed`).
    #[arg(long, default_value_t = 1000)]
    pub(crate) eval_seed: u64,
    /// `bench ppo`: SB3's parallel environments (DummyVecEnv; n_steps = 2048 / this).
    #[arg(long, default_value_t = 8)]
    pub(crate) sb3_envs: usize,
}

pub(crate) fn python(a: &BenchArgs) -> Result<String> {
    a.python
        .clone()
        .or_else(|| std::env::var("RANKPILOT_PYTHON").ok())
        .or(option_env!("RANKPILOT_PYTHON").map(String::from))
        .context("no Python interpreter: pass --python or run scripts/setup.sh")
}

pub(crate) fn script(a: &BenchArgs, name: &str) -> PathBuf {
    a.scripts.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/python")).join(name)
}

pub(crate) fn run_python(a: &BenchArgs, args: &[String]) -> Result<serde_json::Value> {
    let py = python(a)?;
    let out = Command::new(&py).args(args).output().with_context(|| format!("running {py}"))?;
    if !out.status.success() {
        bail!("python half failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("python output: {stdout}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall time of `f` on `device`, waiting for CUDA's queued kernels before each clock read
/// (CUDA launches are asynchronous).
fn time_on<F: FnMut()>(device: Device, repeats: usize, mut f: F) -> f64 {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    f();
    sync();
    median(
        (0..repeats.max(1))
            .map(|_| {
                let t0 = Instant::now();
                f();
                sync();
                t0.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Runs the chosen benchmark and prints its table.
pub fn run(a: &BenchArgs) -> Result<()> {
    tch::manual_seed(a.common.seed as i64);
    if let Some(n) = a.threads {
        if n == 0 {
            return Err(rankpilot_config::BadInput("--threads must be at least 1".into()).into());
        }
        tch::set_num_threads(n as i32);
    }
    match a.which {
        Which::Svd => bench_svd(a),
        Which::Finetune => bench_finetune(a),
        Which::Policy => bench_policy(a),
        Which::Ppo => super::bench_ppo::run(a),
    }
}

/// Decision latency: one observation of the 224-site `llama7b` preset in, one feasible plan out
/// (normalization, network, allocation; with DDIM also `sample_steps` denoiser passes). The
/// default preset's prior infers from the episode's history, so its decisions are timed at
/// round [`HISTORY_ROUNDS`] of an episode, with that much history behind them.
fn bench_policy(a: &BenchArgs) -> Result<()> {
    use policies::ddim::DdimConfig;
    use policies::model::{ActMode, BudgetContext, ObsBatch, PolicyModel};
    use policies::network::NetConfig;

    let preset = envs::presets::load("llama7b")?;
    let venv = envs::VecEnv::new(&preset, 1, a.common.seed)?;
    let ctx = venv.context(0);
    let n_sites = venv.n_sites();
    let ranks = preset.ranks.clone();
    println!(
        "decision latency, {} sites, {} ranks, {} thread(s), median of {} decisions",
        n_sites,
        ranks.len(),
        tch::get_num_threads(),
        a.repeats.max(1) * 20
    );
    println!("{:<28} {:>12} {:>12}", "policy", "median ms", "p90 ms");
    let mut rows = Vec::new();
    // The shipped `default` preset as it acts, with its model-based prior and skip head (whose
    // margin takes one more knapsack solve); `ppo` with the estimates and the per-rank head
    // (`net.estimates`, `net.rank_head`). Both infer from the episode's history, so they are
    // timed with that history behind them.
    let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
    use policies::ddim::DdimActivation::{Mish, Silu};
    for (label, ddim_steps, activation, preset_name) in [
        ("PPO alone", None, Mish, None),
        ("PPO + prior + skip (default)", None, Mish, Some("default")),
        ("PPO + DDIM, 10 steps", Some(10), Mish, None),
        ("PPO + DDIM, 50 steps", Some(50), Mish, None),
        ("PPO + DDIM (SiLU), 10 steps", Some(10), Silu, None),
        ("default + DDIM (SiLU), 10 st.", Some(10), Silu, Some("default")),
        ("PPO + estimates + skip", None, Mish, Some("ppo")),
        ("PPO + estimates + rank head", None, Mish, Some("ppo+rank_head")),
    ] {
        let ddim = DdimConfig {
            enabled: ddim_steps.is_some(),
            sample_steps: ddim_steps.unwrap_or(10),
            activation,
            ..DdimConfig::default()
        };
        let mut model = match preset_name {
            Some(name) => {
                let mut p = policies::trainer::load_preset(name.trim_end_matches("+rank_head"))?;
                if !p.prior.enabled {
                    // The `ppo` preset reading the inference's estimates (the student of the
                    // privileged teacher), optionally through the per-rank head.
                    p.ppo.net.estimates = true;
                    p.ppo.net.rank_head = name.ends_with("+rank_head");
                }
                PolicyModel::with_prior(a.common.device, &ranks, p.ppo.net, ddim, &p.prior)
            }
            None => PolicyModel::new(a.common.device, &ranks, NetConfig::default(), ddim),
        };
        let with_history = model.prior.is_some() || model.estimates;
        model.ddim_active = ddim_steps.is_some();
        let mut belief = vec![Belief::new(); with_history as usize];
        let mut bench_env = venv.clone();
        for _ in 0..HISTORY_ROUNDS.min(preset.rounds as usize - 1) * with_history as usize {
            let c = bench_env.context(0);
            let d = model.act(
                ObsBatch { global: bench_env.obs_global(), sites: bench_env.obs_sites(), n_envs: 1, n_sites },
                BudgetContext {
                    unit_cost: c.unit_cost,
                    budgets: &[c.conservative_budget],
                    dims: Some(&dims),
                    cost_coef: Some(c.cost_coef),
                },
                &mut belief,
                ActMode::Greedy,
            );
            bench_env.step_indices_skipping(&d.executed, &d.skip)?;
        }
        let c = bench_env.context(0);
        let budget = BudgetContext {
            unit_cost: c.unit_cost,
            budgets: &[c.conservative_budget],
            dims: Some(&dims),
            cost_coef: Some(c.cost_coef),
        };
        let mut times = Vec::new();
        for i in 0..a.repeats.max(1) * 20 + 5 {
            let mut history = belief.clone();
            let t = Instant::now();
            let d = model.act(
                ObsBatch { global: bench_env.obs_global(), sites: bench_env.obs_sites(), n_envs: 1, n_sites },
                budget,
                &mut history,
                ActMode::Greedy,
            );
            let ms = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(d);
            if i >= 5 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let (med, p90) = (times[times.len() / 2], times[times.len() * 9 / 10]);
        println!("{label:<28} {med:>12.3} {p90:>12.3}");
        rows.push((label, med));
        if ddim_steps == Some(10) && preset_name.is_none() {
            // The denoiser's sampling alone, the plain loop beside the batched one, on this
            // decision's inputs (random weights: the cost does not depend on them).
            for (label, med, p90) in time_ddim_samplers(&model, &bench_env, a)? {
                println!("{label:<28} {med:>12.3} {p90:>12.3}");
            }
        }
    }
    println!(
        "prior / PPO alone: {:.2}×; DDIM (10 steps) / PPO alone: {:.1}×",
        rows[1].1 / rows[0].1,
        rows[2].1 / rows[0].1
    );
    Ok(())
}

/// Median and p90 (ms) of the denoiser's 10-step sampling alone, [`Denoiser::sample_reference`]
/// and the batched [`Denoiser::sample`], at the bench environment's site count.
///
/// [`Denoiser::sample_reference`]: policies::ddim::Denoiser::sample_reference
/// [`Denoiser::sample`]: policies::ddim::Denoiser::sample
fn time_ddim_samplers(
    model: &policies::model::PolicyModel,
    venv: &envs::VecEnv,
    a: &BenchArgs,
) -> Result<Vec<(&'static str, f64, f64)>> {
    use rand::SeedableRng;
    let Some(den) = model.denoiser.as_ref() else { return Ok(Vec::new()) };
    let (g, l) = (envs::GLOBAL_FEATURES as i64, venv.n_sites() as i64);
    let dev = model.device();
    let global = Tensor::from_slice(venv.obs_global()).view([1, g]).to_device(dev);
    let sites = Tensor::from_slice(venv.obs_sites()).view([1, l, envs::SITE_FEATURES as i64]).to_device(dev);
    let mask = Tensor::ones([1, l], (Kind::Float, dev));
    let coarse = Tensor::zeros([1, l], (Kind::Float, dev));
    let obs = policies::ddim::ObsTensors { global: &global, sites: &sites, mask: &mask };
    let cfg = policies::ddim::DdimConfig { sample_steps: 10, ..Default::default() };
    let mut out = Vec::new();
    for (label, fast) in [("  DDIM sampling, plain loop", false), ("  DDIM sampling, batched", true)] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.common.seed);
        let mut times = Vec::new();
        for i in 0..a.repeats.max(1) * 20 + 5 {
            let t = Instant::now();
            let x = if fast {
                den.sample(&cfg, &model.alpha_bar, &coarse, obs, &mut rng)
            } else {
                den.sample_reference(&cfg, &model.alpha_bar, &coarse, obs, &mut rng)
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let _ = std::hint::black_box(x);
            if i >= 5 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        out.push((label, times[times.len() / 2], times[times.len() * 9 / 10]));
    }
    Ok(out)
}

fn fro(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

fn bench_svd(a: &BenchArgs) -> Result<()> {
    let (d, r, k_sq) = (4096usize, 64usize, 16usize);
    let dev = a.common.device;
    let threads = tch::get_num_threads();
    // A "trained" adapter: B with a decaying column scale so ΔW has a real spectrum.
    let scale = Tensor::from_slice(&(0..r).map(|j| (-(j as f64) / 16.0).exp() as f32).collect::<Vec<_>>());
    let b = svd::gaussian(d, r, 1, Kind::Float, dev) * scale.unsqueeze(0) * 0.01;
    let at = svd::gaussian(r, d, 2, Kind::Float, dev) / (d as f64).sqrt();
    let (k, p, q) = (64usize, 10usize, 2usize);
    let n = d;
    let decaying: Vec<f64> = (1..=n).map(|j| (j as f64).powf(-1.0)).collect();
    let flat: Vec<f64> = (0..n).map(|j| 1.0 - 0.5 * j as f64 / n as f64).collect();
    eprintln!("bench svd: building 4096×4096 test matrices…");
    let m_dec = svd::matrix_with_spectrum(n, n, &decaying, 3, Kind::Float).to_device(dev);
    let m_flat = svd::matrix_with_spectrum(n, n, &flat, 4, Kind::Float).to_device(dev);

    let tmp = tempfile_dir()?;
    let inputs = tmp.join("inputs.safetensors");
    runio::checkpoint::write_safetensors(
        &inputs,
        &[
            ("B".into(), b.to_device(Device::Cpu)),
            ("A".into(), at.to_device(Device::Cpu)),
            ("decaying".into(), m_dec.to_device(Device::Cpu)),
            ("flat".into(), m_flat.to_device(Device::Cpu)),
        ],
        None,
    )?;

    // 1. QR-core squeeze.
    let t_qr = time_on(dev, a.repeats, || {
        let _ = tch::no_grad(|| svd::squeeze_factors(&b, &at, k_sq, 1.0));
    });
    let (b2, a2, full) = svd::squeeze_factors(&b, &at, k_sq, 1.0);
    let dw = b.matmul(&at);
    let (t_full, same) = if a.skip_full_svd {
        (f64::NAN, f64::NAN)
    } else {
        eprintln!("bench svd: full SVD of ΔW (4096×4096)…");
        let t0 = Instant::now();
        let ex = svd::svd(&dw);
        let t = t0.elapsed().as_secs_f64();
        let best = ex.truncate(k_sq).reconstruct();
        (t, fro(&(b2.matmul(&a2) - &best)) / fro(&best))
    };
    let sv = Vec::<f64>::try_from(full.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default();

    // 2. Randomized vs exact truncated SVD.
    let optimal = |s: &[f64]| s[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut rows = Vec::new();
    for (name, m, spec) in [("decaying σ_j = 1/j", &m_dec, &decaying), ("flat σ_j = 1 − j/2n", &m_flat, &flat)] {
        let best = optimal(spec);
        for qq in [0usize, q] {
            let opt = RsvdOptions { oversample: p, power_iters: qq, seed: 5 };
            let t = time_on(dev, (a.repeats / 4).max(1), || {
                let _ = svd::randomized_svd(m, k, opt);
            });
            let res = svd::randomized_svd(m, k, opt);
            let err = fro(&(res.reconstruct() - m));
            let s_est = res.values();
            let s_err = s_est.iter().zip(spec.iter()).map(|(e, t)| (e - t).abs() / t).fold(0.0, f64::max);
            rows.push((name, qq, t, err / best, s_err));
        }
    }
    let t_exact = if a.skip_full_svd {
        f64::NAN
    } else {
        eprintln!("bench svd: exact SVD of a 4096×4096 matrix…");
        let t0 = Instant::now();
        let _ = svd::svd(&m_dec);
        t0.elapsed().as_secs_f64()
    };

    eprintln!("bench svd: Python torch half…");
    let py = run_python(
        a,
        &[
            script(a, "bench_svd.py").display().to_string(),
            inputs.display().to_string(),
            k.to_string(),
            p.to_string(),
            q.to_string(),
            a.repeats.to_string(),
            threads.to_string(),
            device_name(dev),
        ],
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    let f = |k: &str| py[k].as_f64().unwrap_or(f64::NAN);
    let on = if dev == Device::Cpu { format!("CPU, {threads} threads") } else { device_name(dev) };
    println!("## QR-core squeeze, d = {d}, r = {r} → {k_sq} ({on}, median of {})", a.repeats);
    println!("| route | time | ratio to PyTorch QR-core |");
    println!("|---|---|---|");
    println!("| rankpilot QR-core (tch) | {:.2} ms | {:.2}× |", t_qr * 1e3, t_qr / f("qr_core_s"));
    println!("| PyTorch {} QR-core | {:.2} ms | 1.00× |", py["torch"].as_str().unwrap_or("?"), f("qr_core_s") * 1e3);
    // A route not run (`--skip-full-svd`) reads "skipped", not NaN.
    let skipped = "skipped (--skip-full-svd)";
    if a.skip_full_svd {
        println!("| full SVD of ΔW (4096×4096, tch/LAPACK) | {skipped} | — |");
    } else {
        println!("| full SVD of ΔW (4096×4096, tch/LAPACK) | {:.2} s | {:.0}× |", t_full, t_full / f("qr_core_s"));
    }
    let same = if a.skip_full_svd { skipped.to_string() } else { format!("{same:.2e}") };
    println!(
        "\nsame result: ‖B'A' − best rank-{k_sq} of ΔW‖_F / ‖best‖_F = {same}; σ₁ = {:.4e}, σ₁₆ = {:.4e}, σ₆₄ = {:.4e}\n",
        sv[0], sv[15], sv[63]
    );
    println!("## Randomized (k = {k}, oversampling p = {p}) vs exact truncated SVD, 4096×4096");
    println!(
        "| spectrum | power iters | rankpilot rSVD | PyTorch svd_lowrank (q = {q}) | exact SVD | error / optimal | max rel. error of σ_1..k | PyTorch error / optimal |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, qq, t, e, se) in &rows {
        let key = if name.starts_with("decaying") { "decaying" } else { "flat" };
        let (pt, pe) = if *qq == q {
            (
                format!("{:.0} ms ({:.2}×)", f(&format!("rsvd_{key}_s")) * 1e3, t / f(&format!("rsvd_{key}_s"))),
                format!(
                    "{:.4}",
                    f(&format!("rsvd_{key}_err")) / optimal(if key == "decaying" { &decaying } else { &flat })
                ),
            )
        } else {
            ("—".into(), "—".into())
        };
        let exact =
            if a.skip_full_svd { skipped.to_string() } else { format!("{:.1} s ({:.0}× rSVD)", t_exact, t_exact / t) };
        println!("| {name} | {qq} | {:.0} ms | {pt} | {exact} | {e:.4} | {:.2e} | {pe} |", t * 1e3, se);
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("rankpilot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `cpu` or `cuda:N`, as torch spells it.
fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

fn bench_finetune(a: &BenchArgs) -> Result<()> {
    let threads = tch::get_num_threads();
    let device = a.common.device;
    let large = a.model_size == "large";
    let (batch, seq, rank, alpha, lr) = (8usize, if large { 1024usize } else { 128 }, 8usize, 16.0, 2e-3);
    let mc = if large {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 1024,
            intermediate_size: 2752,
            num_hidden_layers: 12,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            head_dim: 64,
            max_position_embeddings: 2048,
            ..LlamaConfig::tiny()
        }
    } else {
        LlamaConfig::tiny()
    };
    let kind = if a.bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let vocab = mc.vocab_size as i64;
    let make = |track: bool| -> Result<Finetuner> {
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(device);
        let model = Llama::new(&vs.root(), &mc);
        vs.freeze();
        if a.bf16 {
            vs.set_kind(kind);
        }
        let ids: Vec<i64> = (0..400_000i64).map(|i| (i * 7919 + i / 13) % vocab).collect();
        let ids = &ids[..if large { 400_000 } else { 200_000 }];
        let split = ids.len() * 9 / 10;
        let data = TokenData {
            train: ids[..split].to_vec(),
            val: ids[split..].to_vec(),
            train_mask: vec![],
            val_mask: vec![],
        };
        let cfg = FinetuneConfig {
            batch_size: batch,
            seq_len: seq,
            ranks: RankSpec { default: rank, patterns: vec![] },
            alpha,
            adam: AdamW { lr, ..AdamW::default() },
            eval_batches: 1,
            track_importance: track,
            ..FinetuneConfig::default()
        };
        Finetuner::new(model, vs, data, cfg)
    };
    let measure = |ft: &mut Finetuner, steps: usize| -> Result<f64> {
        for _ in 0..3 {
            ft.train_step()?;
        }
        let t0 = Instant::now();
        for _ in 0..steps {
            ft.train_step()?;
        }
        Ok((steps * batch * seq) as f64 / t0.elapsed().as_secs_f64())
    };
    eprintln!("bench finetune: rankpilot…");
    let mut ft = make(true)?;
    let tps_imp = measure(&mut ft, a.steps)?;
    let mut ft2 = make(false)?;
    let tps_plain = measure(&mut ft2, a.steps)?;
    // Resize overhead: alternate all sites 8 → 16 (grow) and 16 → 8 (QR-core shrink).
    let n = ft.site_names().len();
    let mut resize_s = Vec::new();
    let mut train_s = 0.0;
    let round = 10usize;
    for i in 0..4 {
        let plan = RankPlan::new(vec![if i % 2 == 0 { 16 } else { 8 }; n]);
        resize_s.push(ft.resize(&plan)?.seconds);
        let t0 = Instant::now();
        for _ in 0..round {
            ft.train_step()?;
        }
        train_s += t0.elapsed().as_secs_f64();
    }
    let resize_total: f64 = resize_s.iter().sum();
    let step_s = train_s / (4 * round) as f64;
    let per_resize = resize_total / resize_s.len() as f64;

    eprintln!("bench finetune: transformers + peft…");
    let cfg = serde_json::json!({
        "vocab": mc.vocab_size, "hidden": mc.hidden_size, "intermediate": mc.intermediate_size,
        "layers": mc.num_hidden_layers, "heads": mc.num_attention_heads, "kv_heads": mc.num_key_value_heads,
        "rank": rank, "alpha": alpha, "lr": lr, "batch": batch, "seq": seq, "steps": a.steps, "warmup": 3,
        "threads": threads, "device": device_name(device), "bf16": a.bf16, "head_dim": mc.head_dim,
    });
    let py = run_python(a, &[script(a, "bench_finetune.py").display().to_string(), cfg.to_string()])?;
    let py_tps = py["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "## LoRA fine-tuning throughput, {} model ({} params: {} layers, width {}, seq {seq}, batch {batch}, rank {rank} on all 7 projections; {}, {}, {} timed steps)",
        a.model_size,
        mc.num_params(),
        mc.num_hidden_layers,
        mc.hidden_size,
        if device == Device::Cpu { format!("CPU, {threads} threads") } else { device_name(device) },
        if a.bf16 { "bf16 base weights" } else { "f32" },
        a.steps
    );
    println!("| implementation | tokens/s | ratio to transformers+peft |");
    println!("|---|---|---|");
    println!("| rankpilot (AdaLoRA importance tracked every step) | {tps_imp:.0} | {:.2}× |", tps_imp / py_tps);
    println!("| rankpilot (no importance tracking) | {tps_plain:.0} | {:.2}× |", tps_plain / py_tps);
    println!("| transformers 5.24 + peft, torch AdamW | {py_tps:.0} | 1.00× |");
    println!("\n## Resize overhead (all {n} sites, alternating 8 → 16 grow and 16 → 8 QR-core shrink)");
    println!("| quantity | value |");
    println!("|---|---|");
    println!("| mean resize (all sites) | {:.2} ms |", per_resize * 1e3);
    println!("| mean training step | {:.1} ms |", step_s * 1e3);
    println!(
        "| share of training time, a resize every {round} steps (measured) | {:.3}% |",
        100.0 * resize_total / (train_s + resize_total)
    );
    println!(
        "| share of training time, a resize every 100 steps (extrapolated) | {:.3}% |",
        100.0 * per_resize / (100.0 * step_s + per_resize)
    );
    Ok(())
}
