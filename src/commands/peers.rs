//! Hugging Face PEFT's own methods as rows of `rankpilot compare` (`peft:lora`, `peft:adalora`,
//! `peft:eva`), run by `python -m rankpilot.peers` in the set-up's venv.
//!
//! The Rust side draws the run's token windows exactly as a [`tune::finetune::Finetuner`] of the
//! same seed would (training batches from [`data_rng`]`(seed)`, micro-batch by micro-batch; the
//! fixed validation windows; EVA's batches from its own generator) and hands them to Python in
//! a safetensors file with a JSON job, so a peer trains on the same batches in the same order and
//! is scored on the same windows. The result comes back as a [`RunReport`]. With
//! `--peer-init rankpilot` the job also carries the adapter tensors rankpilot's matching row
//! starts from ([`rankpilot_init`]), so both sides train the same tensors on the same batches.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tch::{Device, Tensor};

use rankpilot::controller::RunReport;
use rankpilot::scheduler::{BudgetSpec, SchedulerSpec};
use rankpilot_config::BadInput;
use runio::checkpoint;
use tune::data::{TokenData, data_rng};
use tune::finetune::{FinetuneConfig, Finetuner, RankPlan, RankSpec};
use tune::model::llama::Llama;
use tune::peft::PREFIX;

/// A PEFT method run as a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftMethod {
    /// `peft:lora`: plain LoRA at rank R on the same projections.
    Lora,
    /// `peft:adalora`: PEFT's AdaLoRA, `init_r` ⌈1.5·R⌉ → `target_r` R, `update_and_allocate`
    /// after every step.
    Adalora,
    /// `peft:eva`: LoRA with EVA's data-driven initialisation and rank redistribution (ρ = 2).
    Eva,
}

/// EVA's ρ: a module may get up to ρ·R components (PEFT's default).
pub const EVA_RHO: f64 = 2.0;

impl PeftMethod {
    /// Parses `peft:lora`, `peft:adalora` or `peft:eva`; `None` when `s` is not a `peft:` row.
    pub fn parse(s: &str) -> Option<Result<PeftMethod, String>> {
        let name = s.strip_prefix("peft:")?;
        Some(match name {
            "lora" => Ok(PeftMethod::Lora),
            "adalora" => Ok(PeftMethod::Adalora),
            "eva" => Ok(PeftMethod::Eva),
            _ => Err(format!("unknown PEFT peer `{s}`: allowed: peft:lora, peft:adalora, peft:eva")),
        })
    }

    /// The method's name in the Python job.
    pub fn name(self) -> &'static str {
        match self {
            PeftMethod::Lora => "lora",
            PeftMethod::Adalora => "adalora",
            PeftMethod::Eva => "eva",
        }
    }

    /// The row's label.
    pub fn label(self) -> String {
        format!("peft:{}", self.name())
    }
}

/// Where a peer's initial adapter tensors come from (`compare --peer-init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerInit {
    /// PEFT draws them: its documented initialisation, from its own generator.
    Peft,
    /// The tensors rankpilot's matching row starts training from at the same seed
    /// ([`rankpilot_init`]), so a paired difference between the two rows measures the
    /// implementations alone, not two draws of the initialisation.
    Rankpilot,
}

/// The adapter tensors rankpilot's row matching `method` holds when its first optimizer step
/// starts, named as PEFT's `get_peft_model_state_dict` names them, and the run's data back:
/// `peft:lora` gets `fixed:R`'s (sites grown from rank 0 to R by the first round's plan, as
/// the controller does it), `peft:adalora` gets `adalora-svd`'s (A, B ~ N(0, 0.02²) from each
/// site's generator, Λ = 0). `peft:eva` initialises from data and has no such draw.
pub fn rankpilot_init(
    method: PeftMethod,
    model: Llama,
    vs: tch::nn::VarStore,
    data: TokenData,
    cfg: &FinetuneConfig,
    rank: usize,
) -> Result<(TokenData, Vec<(String, Tensor)>)> {
    let budget = BudgetSpec::Rank(rank as f64);
    let cfg = match method {
        PeftMethod::Lora => FinetuneConfig { ranks: RankSpec { default: 0, patterns: vec![] }, ..cfg.clone() },
        PeftMethod::Adalora => {
            FinetuneConfig { adalora: SchedulerSpec::AdaloraSvd.adalora_config(Some(budget), cfg.steps)?, ..cfg.clone() }
        }
        PeftMethod::Eva => bail!(BadInput(
            "--peer-init rankpilot: peft:eva initialises its adapter from data, rankpilot draws none for it; allowed rows: peft:lora, peft:adalora".into()
        )),
    };
    let mut ft = Finetuner::new(model, vs, data, cfg)?;
    if method == PeftMethod::Lora {
        let n = ft.model.sites().len();
        ft.resize(&RankPlan::new(vec![rank; n]))?;
    }
    let mut tensors = Vec::new();
    for s in ft.model.sites() {
        let key = format!("{PREFIX}{}", s.name);
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
        match &s.lambda {
            // PEFT's SVDLinear keeps lora_A, lora_B and lora_E in ParameterDicts: no `.weight`.
            Some(lambda) => tensors.extend([
                (format!("{key}.lora_A"), cpu(&s.a)),
                (format!("{key}.lora_B"), cpu(&s.b)),
                (format!("{key}.lora_E"), cpu(lambda)),
            ]),
            None => tensors
                .extend([(format!("{key}.lora_A.weight"), cpu(&s.a)), (format!("{key}.lora_B.weight"), cpu(&s.b))]),
        }
    }
    Ok((ft.into_data(), tensors))
}

/// The Python interpreter of the set-up's venv (`RANKPILOT_PYTHON`, as the benchmarks use).
fn python() -> Result<String> {
    std::env::var("RANKPILOT_PYTHON")
        .ok()
        .or(option_env!("RANKPILOT_PYTHON").map(String::from))
        .context("no Python interpreter for the PEFT peers: run scripts/setup.sh (it sets RANKPILOT_PYTHON)")
}

/// What a peer run needs besides the windows.
pub struct PeerRun<'a> {
    /// The method.
    pub method: PeftMethod,
    /// Base model directory (Hugging Face layout).
    pub model: &'a Path,
    /// The run's settings, as a Rust row of the same seed would get them.
    pub cfg: &'a FinetuneConfig,
    /// The rank R every module gets (LoRA, EVA's mean) or targets (AdaLoRA).
    pub rank: usize,
    /// Optimizer steps after which the validation loss is measured (besides step 0).
    pub eval_steps: Vec<usize>,
    /// Batches EVA's initialisation reads.
    pub eva_batches: usize,
    /// Scratch directory for the job, the windows and the result.
    pub work: &'a Path,
    /// The adapter's initial tensors ([`rankpilot_init`]); `None`: PEFT draws its own.
    pub init: Option<Vec<(String, Tensor)>>,
}

/// Stacks batches of windows into one `[n, batch, seq_len + 1]` tensor; instruction data (with
/// target masks) is refused: the peers train on plain text.
fn stack(batches: Vec<tune::data::Batch>) -> Result<Tensor> {
    if batches.iter().any(|b| b.mask.is_some()) {
        bail!(BadInput(
            "--schedulers peft:*: the PEFT peers train on plain text; this --data has instruction targets".into()
        ));
    }
    Ok(Tensor::stack(&batches.into_iter().map(|b| b.ids).collect::<Vec<_>>(), 0))
}

/// Runs one peer: writes its windows and job into `run.work`, runs Python, reads the report.
pub fn run_peer(run: &PeerRun<'_>, data: &TokenData, label: &str) -> Result<(RunReport, Vec<f64>)> {
    let cfg = run.cfg;
    let accum = cfg.grad_accum.max(1);
    // The same draws as Finetuner::train_step, in order.
    let mut rng = data_rng(cfg.seed);
    let train: Vec<_> = (0..cfg.steps * accum)
        .map(|_| data.train_batch_masked(&mut rng, cfg.batch_size, cfg.seq_len, Device::Cpu))
        .collect();
    // Finetuner::collect_site_inputs' generator.
    let mut eva_rng = data_rng(cfg.seed ^ 0x0e7a_0e7a);
    let eva: Vec<_> = (0..run.eva_batches)
        .map(|_| data.train_batch_masked(&mut eva_rng, cfg.batch_size, cfg.seq_len, Device::Cpu))
        .collect();
    let val = data.val_batches_masked(cfg.eval_batches, cfg.batch_size, cfg.seq_len, Device::Cpu);
    let val_rows: Vec<Tensor> = stack_rows(val)?;
    let windows = run.work.join(format!("{label}-seed{}-windows.safetensors", cfg.seed).replace([':', '/'], "-"));
    checkpoint::write_safetensors(
        &windows,
        &[
            ("train".to_string(), stack(train)?),
            ("val".to_string(), Tensor::cat(&val_rows, 0)),
            ("eva".to_string(), stack(eva)?),
        ],
        None,
    )?;
    let init = match &run.init {
        Some(tensors) => {
            let path = windows.with_extension("init.safetensors");
            let named: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
            checkpoint::write_safetensors(&path, &named, None)?;
            Some(path)
        }
        None => None,
    };
    let out = windows.with_extension("result.json");
    let targets: Vec<&str> = cfg
        .targets
        .iter()
        .map(|t| match t {
            tune::model::Target::Layer(p) => Ok(p.name()),
            other => Err(BadInput(format!(
                "--schedulers peft:*: the peers adapt the layers' projections only, not `{}`",
                other.name()
            ))),
        })
        .collect::<Result<_, _>>()?;
    let job = serde_json::json!({
        "method": run.method.name(),
        "label": label,
        "model": run.model,
        "windows": windows,
        "init": init,
        "out": out,
        "rank": run.rank,
        "alpha": cfg.alpha,
        "lora_dropout": cfg.lora_dropout,
        "targets": targets,
        "steps": cfg.steps,
        "grad_accum": accum,
        "warmup_steps": cfg.warmup_steps,
        "schedule": cfg.schedule,
        "lr": cfg.adam.lr,
        "beta1": cfg.adam.beta1,
        "beta2": cfg.adam.beta2,
        "eps": cfg.adam.eps,
        "weight_decay": cfg.adam.weight_decay,
        "grad_clip": cfg.grad_clip,
        "val_batch": cfg.batch_size,
        "eval_steps": run.eval_steps,
        "eva_rho": EVA_RHO,
        "seed": cfg.seed,
        "threads": tch::get_num_threads().max(1),
    });
    let job_path = windows.with_extension("job.json");
    checkpoint::atomic_write(&job_path, &serde_json::to_vec_pretty(&job)?)?;
    let py = python()?;
    let status = std::process::Command::new(&py)
        .args(["-m", "rankpilot.peers"])
        .arg(&job_path)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {py} -m rankpilot.peers"))?;
    if !status.success() {
        bail!("the PEFT peer `{label}` (seed {}) failed ({status}); its Python error is printed above", cfg.seed);
    }
    let _ = std::fs::remove_file(&windows);
    if let Some(p) = &init {
        let _ = std::fs::remove_file(p);
    }
    let text = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text)?;
    let train_loss: Vec<f64> = serde_json::from_value(v["train_loss"].clone()).unwrap_or_default();
    let report: RunReport =
        serde_json::from_value(v).with_context(|| format!("{}: not a run report", out.display()))?;
    Ok((report, train_loss))
}

/// The validation windows as rows `[windows, seq_len + 1]`, one tensor per batch.
fn stack_rows(batches: Vec<tune::data::Batch>) -> Result<Vec<Tensor>> {
    if batches.iter().any(|b| b.mask.is_some()) {
        bail!(BadInput(
            "--schedulers peft:*: the PEFT peers train on plain text; this --data has instruction targets".into()
        ));
    }
    Ok(batches.into_iter().map(|b| b.ids).collect())
}

/// A scratch directory for peer jobs under `logdir` (kept with the logs: the job and result
/// files show exactly what ran).
pub fn work_dir(logdir: &Path) -> Result<PathBuf> {
    let d = logdir.join("peers");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
