//! The dynamic-rank LoRA fine-tuning loop.
//!
//! A [`Finetuner`] owns a frozen [`Llama`] whose chosen projections carry LoRA sites, the
//! tokenized data and the optimizer settings. It trains step by step ([`Finetuner::train_step`]),
//! evaluates on fixed validation batches ([`Finetuner::evaluate`]), reports per-site signals for
//! rank schedulers ([`Finetuner::signals`]) and applies a scheduler's [`RankPlan`] at a round
//! boundary ([`Finetuner::resize`]: grow or QR-core shrink per site, output unchanged).
//!
//! Learning rate: linear warm-up over `warmup_steps`, then constant. Gradient clipping: global
//! norm over all LoRA factors. Base weights never receive gradients.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use crate::adalora::{AdaloraConfig, RankAllocator, orthogonality_penalty};
use crate::data::{TokenData, data_rng};
use crate::lora::{AdamW, Lora, LoraInit, ResizeKind, SavedModule, Shrink, check_rank};
use crate::model::llama::Llama;
use crate::model::{Projection, Target};
use crate::peft::{PREFIX, PeftAdapter, PeftSite};
use rankpilot_config::BadInput;

/// Ranks per site: a default plus PEFT-style `key=rank` overrides, parsed from `--ranks`.
///
/// Syntax: comma-separated items, each either a bare rank (the default for every site) or
/// `key=rank`, where `key` matches a module name the way PEFT's `rank_pattern` does (the regex
/// `(.*\.)?(key)$`: `q_proj`, `mlp.down_proj`, `layers.3.self_attn.v_proj`, …). The first
/// matching key wins; sites no key matches get the default, or 0 (no adapter yet) if none is given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankSpec {
    /// Rank of sites no key matches.
    pub default: usize,
    /// `(key, rank)` overrides, first match wins.
    pub patterns: Vec<(String, usize)>,
}

impl RankSpec {
    /// Parses `--ranks` (see the type's documentation).
    pub fn parse(s: &str) -> Result<RankSpec, String> {
        let mut default = None;
        let mut patterns = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                None => {
                    let r =
                        item.parse::<usize>().map_err(|_| format!("`{item}` is not a rank (expected N or key=N)"))?;
                    if default.replace(r).is_some() {
                        return Err("more than one default rank".into());
                    }
                }
                Some((k, v)) => {
                    let k = k.trim();
                    let r = v.trim().parse::<usize>().map_err(|_| format!("`{item}`: `{v}` is not a rank"))?;
                    regex::Regex::new(&format!("^(.*\\.)?({k})$"))
                        .map_err(|e| format!("`{k}` is not a valid pattern: {e}"))?;
                    patterns.push((k.to_string(), r));
                }
            }
        }
        if default.is_none() && patterns.is_empty() {
            return Err("empty rank specification".into());
        }
        Ok(RankSpec { default: default.unwrap_or(0), patterns })
    }

    /// The rank for `module`.
    pub fn rank_for(&self, module: &str) -> usize {
        for (k, r) in &self.patterns {
            if regex::Regex::new(&format!("^(.*\\.)?({k})$")).is_ok_and(|re| re.is_match(module)) {
                return *r;
            }
        }
        self.default
    }
}

/// A rank for every site, in [`Finetuner::site_names`] order: what a scheduler decides at a round
/// boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RankPlan {
    /// One rank per site.
    pub ranks: Vec<usize>,
    /// Skip the round: keep every adapter as it is, train nothing and send nothing (a policy's
    /// answer to a deep fade, instead of squeezing its adapters to fit). `ranks` are then the
    /// current ones.
    pub skip: bool,
}

impl RankPlan {
    /// A plan that plays the round with `ranks`.
    pub fn new(ranks: Vec<usize>) -> Self {
        RankPlan { ranks, skip: false }
    }
}

/// Per-site signals for rank schedulers (one per adapted projection).
#[derive(Debug, Clone, Serialize)]
pub struct SiteSignals {
    /// Module name, e.g. `model.layers.3.self_attn.v_proj`.
    pub name: String,
    /// Layer index.
    pub layer: usize,
    /// Projection name (`q_proj` … `down_proj`).
    pub projection: String,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Current rank.
    pub rank: usize,
    /// AdaLoRA importance: mean over the site's LoRA entries of `Ī·Ū` (EMAs of `|θ·∇θ|` and of
    /// its deviation, β₁ = β₂ = 0.85).
    pub importance: f64,
    /// AdaLoRA per-component scores `mean_j s(A_ij) + mean_j s(B_ji)`, one per rank index.
    pub component_importance: Vec<f64>,
    /// `‖(∇A, ∇B)‖_F` of the last step (before clipping).
    pub grad_norm: f64,
    /// Singular values of `s·B·A` (QR-core route), descending; empty unless requested.
    pub singular_values: Vec<f64>,
    /// EVA's explained-variance ratios of the site's input directions (empty without
    /// `--init eva`).
    pub input_variance: Vec<f64>,
}

/// What a round can change, taken before it so that a round lost to the resource can be undone
/// ([`Finetuner::snapshot`], [`Finetuner::restore`]).
#[derive(Debug)]
pub struct RoundSnapshot {
    sites: Vec<Lora>,
    saved: Vec<SavedModule>,
}

/// Settings of a fine-tuning run.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence (inputs; each window has one more id for the targets).
    pub seq_len: usize,
    /// AdamW settings for the LoRA factors.
    pub adam: AdamW,
    /// Linear learning-rate warm-up steps (from 0, as transformers' schedulers).
    pub warmup_steps: usize,
    /// The learning-rate schedule after the warm-up.
    pub schedule: LrSchedule,
    /// Micro-batches of `batch_size` whose gradients are summed (averaged loss) per optimizer
    /// step: the effective batch is `batch_size × grad_accum`.
    pub grad_accum: usize,
    /// PEFT's `lora_dropout`: dropout on each site's input during training (not in evaluation).
    pub lora_dropout: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Validation batches of `batch_size` fixed windows.
    pub eval_batches: usize,
    /// Modules that carry sites: projections (in every layer), `lm_head`, `embed_tokens`.
    pub targets: Vec<Target>,
    /// Initial ranks.
    pub ranks: RankSpec,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling `α/√r`.
    pub rslora: bool,
    /// Update the AdaLoRA importance every step (costs a few element-wise ops per factor).
    pub track_importance: bool,
    /// Seed for libtorch (LoRA init) and the data order.
    pub seed: u64,
    /// How sites start and grow: random directions, or EVA's data-driven ones.
    pub init: SiteInit,
    /// How a scheduler's shrink drops components: the SVD's best approximation (default) or
    /// pruning the weakest, which keeps the others' directions and optimizer state.
    pub shrink: Shrink,
    /// AdaLoRA as PEFT implements it ([`crate::adalora`]): every site starts in SVD form at
    /// `init_r` components (`ranks` is then not read) and a [`RankAllocator`] masks them after
    /// every step. `None`: plain LoRA sites, resized by the scheduler's plans.
    pub adalora: Option<AdaloraConfig>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            steps: 200,
            batch_size: 8,
            seq_len: 128,
            adam: AdamW { lr: 2e-3, ..AdamW::default() },
            warmup_steps: 10,
            schedule: LrSchedule::Constant,
            grad_accum: 1,
            lora_dropout: 0.0,
            grad_clip: 1.0,
            eval_batches: 8,
            targets: Projection::ALL.map(Target::Layer).to_vec(),
            ranks: RankSpec { default: 8, patterns: vec![] },
            alpha: 16.0,
            rslora: false,
            track_importance: true,
            seed: 0,
            init: SiteInit::Kaiming,
            shrink: Shrink::Svd,
            adalora: None,
        }
    }
}

/// The learning-rate schedules of transformers' `get_scheduler`, with the same formulas (the
/// multiplier at optimizer step `k`, 0-based, after a linear warm-up from 0 over `warmup` steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `constant_with_warmup`: 1 after the warm-up.
    Constant,
    /// `linear`: from 1 down to 0 at the last step.
    Linear,
    /// `cosine`: half a cosine from 1 down to 0 at the last step.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<LrSchedule, String> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "linear" => Ok(LrSchedule::Linear),
            "cosine" => Ok(LrSchedule::Cosine),
            _ => Err(format!("unknown schedule `{s}`: allowed: constant, linear, cosine")),
        }
    }
}

impl LrSchedule {
    /// The multiplier of the base learning rate at step `k` of `total`.
    pub fn factor(self, k: usize, warmup: usize, total: usize) -> f64 {
        if k < warmup {
            return k as f64 / warmup.max(1) as f64;
        }
        let progress = (k - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => (1.0 - progress).max(0.0),
            LrSchedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// How a site's `A` starts, and where a grow takes its new directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteInit {
    /// PEFT's default: Kaiming-uniform rows (random directions).
    Kaiming,
    /// EVA (Paischer et al. 2024, "explained variance adaptation"): the right singular vectors
    /// of the site's input activations over `batches` training batches (randomized SVD), in
    /// order of explained variance. `A` starts at the leading ones, and every grow takes the
    /// next ones. Embedding sites (one-hot inputs) keep Kaiming rows, as in PEFT.
    Eva {
        /// Training batches whose activations are collected.
        batches: usize,
    },
}

/// Principal directions kept per site for EVA (the largest rank a preset's rank set reaches).
pub const EVA_COMPONENTS: usize = 64;

impl std::str::FromStr for SiteInit {
    type Err = String;

    fn from_str(s: &str) -> Result<SiteInit, String> {
        let allowed = "allowed: kaiming, eva, or eva:N (N >= 1 training batches of activations)";
        match s.trim() {
            "kaiming" => Ok(SiteInit::Kaiming),
            "eva" => Ok(SiteInit::Eva { batches: 4 }),
            other => match other.strip_prefix("eva:").map(str::parse::<usize>) {
                Some(Ok(batches)) if batches >= 1 => Ok(SiteInit::Eva { batches }),
                _ => Err(format!("unknown init `{other}`: {allowed}")),
            },
        }
    }
}

/// What one training step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Training loss of the batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (inputs).
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// What a resize did.
#[derive(Debug, Clone, Serialize)]
pub struct ResizeReport {
    /// Per site: grow, shrink or unchanged.
    pub kinds: Vec<ResizeKind>,
    /// Wall time of the resize.
    pub seconds: f64,
    /// Trainable LoRA parameters before.
    pub params_before: usize,
    /// Trainable LoRA parameters after.
    pub params_after: usize,
}

/// A fine-tuning run in progress.
pub struct Finetuner {
    /// The model with its LoRA sites.
    pub model: Llama,
    /// Keeps the frozen base weights alive.
    pub vs: nn::VarStore,
    /// Settings.
    pub cfg: FinetuneConfig,
    data: TokenData,
    val: Vec<crate::data::Batch>,
    rng: ChaCha8Rng,
    device: Device,
    /// Base tensors trained beside the sites (the adapter's `modules_to_save`).
    pub saved: Vec<SavedModule>,
    /// The adapter's `modules_to_save` list, written back on export.
    pub modules_to_save: Option<serde_json::Value>,
    /// Frozen base weights an imported adapter carried (`<module>.base_layer.weight`, as PEFT
    /// saves them for `embed_tokens` / `lm_head` targets), written back verbatim on export.
    pub base_layers: Vec<(String, Tensor)>,
    /// Optimizer steps taken.
    pub step: usize,
    /// Time spent in `train_step`.
    pub train_time: Duration,
    /// Time spent in `resize`.
    pub resize_time: Duration,
    /// AdaLoRA's allocator when `cfg.adalora` is set.
    pub allocator: Option<RankAllocator>,
}

impl Finetuner {
    /// Attaches LoRA sites to `model` (projections in `cfg.targets`, ranks from `cfg.ranks`) and
    /// prepares the fixed validation batches. Seeds libtorch with `cfg.seed` first.
    pub fn new(mut model: Llama, vs: nn::VarStore, data: TokenData, cfg: FinetuneConfig) -> Result<Finetuner> {
        if cfg.seq_len + 1 > data.train.len() || cfg.seq_len + 1 > data.val.len() {
            bail!(BadInput(format!("sequence length {} is longer than the data", cfg.seq_len)));
        }
        tch::manual_seed(cfg.seed as i64);
        let device = vs.device();
        let init = LoraInit { alpha: cfg.alpha, rslora: cfg.rslora, seed: cfg.seed };
        for (name, target) in model.site_modules(&cfg.targets) {
            let shape = model.target_shape(target);
            let r = cfg.adalora.map_or_else(|| cfg.ranks.rank_for(&name), |a| a.init_r);
            check_rank(&name, r, shape.0, shape.1)?;
            let site = match (target, cfg.adalora) {
                (Target::EmbedTokens, Some(_)) => bail!(BadInput(
                    "adalora-svd: PEFT's AdaLoRA adapts linear layers; allowed targets: projections and lm_head, not embed_tokens".into()
                )),
                (_, Some(_)) => Lora::new_svd(&name, shape, r, init, device)?,
                (Target::EmbedTokens, None) => Lora::new_embedding(&name, shape, r, init, device)?,
                (_, None) => Lora::new(&name, shape, r, init, device)?,
            };
            *model.site_slot(&name).expect("a module of this model").1 = Some(site);
        }
        let val = data.val_batches_masked(cfg.eval_batches, cfg.batch_size, cfg.seq_len, device);
        let init_kind = cfg.init;
        let allocator = match cfg.adalora {
            Some(a) => Some(RankAllocator::new(a, &model.sites())?),
            None => None,
        };
        let mut ft = Finetuner {
            model,
            vs,
            data,
            val,
            rng: data_rng(cfg.seed),
            device,
            cfg,
            saved: Vec::new(),
            modules_to_save: None,
            base_layers: Vec::new(),
            step: 0,
            train_time: Duration::ZERO,
            resize_time: Duration::ZERO,
            allocator,
        };
        if ft.allocator.is_some() && !matches!(init_kind, SiteInit::Kaiming) {
            bail!(BadInput("adalora-svd: its sites start as PEFT's AdaLoRA does; allowed: --init kaiming".into()));
        }
        if let SiteInit::Eva { batches } = init_kind {
            ft.eva_init(batches)?;
        }
        Ok(ft)
    }

    /// EVA's initialisation: collects every linear site's inputs over `batches` training batches
    /// (drawn from their own generator, so the training data order is unchanged), and gives each
    /// site the right singular vectors of its inputs ([`Lora::init_from_basis`]), up to
    /// [`EVA_COMPONENTS`] by a randomized SVD with two power iterations.
    pub fn eva_init(&mut self, batches: usize) -> Result<()> {
        let inputs = self.collect_site_inputs(batches);
        let seed = self.cfg.seed;
        for (site, x) in self.model.sites_mut().into_iter().zip(inputs) {
            let Some(x) = x else { continue };
            let k = EVA_COMPONENTS.min(site.d_in).min(x.size()[0] as usize);
            let opt = crate::svd::RsvdOptions { oversample: 10, power_iters: 2, seed: seed ^ site.seed };
            let svd = tch::no_grad(|| crate::svd::randomized_svd(&x, k, opt));
            let total = x.square().sum(Kind::Double).double_value(&[]).max(f64::MIN_POSITIVE);
            site.init_from_basis(svd.v.tr().contiguous())?;
            site.input_variance = svd.values().iter().map(|s| s * s / total).collect();
        }
        Ok(())
    }

    /// Every linear site's input rows `[tokens, in]` over `batches` training batches drawn by
    /// EVA's own generator (`None` for embedding sites), in [`Finetuner::site_names`] order.
    pub fn collect_site_inputs(&mut self, batches: usize) -> Vec<Option<Tensor>> {
        for site in self.model.sites_mut() {
            if !site.embedding {
                *site.captured_inputs.borrow_mut() = Some(Vec::new());
            }
        }
        let mut rng = data_rng(self.cfg.seed ^ 0x0e7a_0e7a);
        tch::no_grad(|| {
            for _ in 0..batches {
                let batch = self.data.train_batch_masked(&mut rng, self.cfg.batch_size, self.cfg.seq_len, self.device);
                let t = batch.ids.size()[1];
                let _ = self.model.forward(&batch.ids.narrow(1, 0, t - 1));
            }
        });
        self.model
            .sites()
            .iter()
            .map(|s| s.captured_inputs.borrow_mut().take().map(|rows| Tensor::cat(&rows, 0)))
            .collect()
    }

    /// Replaces the sites' factors with those of a PEFT adapter (for continuing a run); sites the
    /// adapter lacks become rank 0; adapter modules that are not sites are an error.
    pub fn load_peft(&mut self, adapter: &PeftAdapter) -> Result<()> {
        let mut by_name: std::collections::HashMap<&str, &PeftSite> =
            adapter.sites.iter().map(|s| (s.module.as_str(), s)).collect();
        for site in self.model.sites_mut() {
            match by_name.remove(site.name.as_str()) {
                Some(p) => {
                    if p.a.size()[1] as usize != site.d_in || p.b.size()[0] as usize != site.d_out {
                        bail!(BadInput(format!(
                            "{}: `{}` has lora_A {:?} / lora_B {:?}, the model's projection is {}→{}",
                            adapter.dir.display(),
                            site.name,
                            p.a.size(),
                            p.b.size(),
                            site.d_in,
                            site.d_out
                        )));
                    }
                    if p.embedding != site.embedding {
                        bail!(BadInput(format!(
                            "{}: `{}` has {} factors, the model's site is {}",
                            adapter.dir.display(),
                            site.name,
                            if p.embedding { "embedding (`lora_embedding_*`)" } else { "linear (`lora_A/B.weight`)" },
                            if site.embedding { "an embedding" } else { "linear" }
                        )));
                    }
                    let embedding = site.embedding;
                    *site = Lora::from_factors(
                        &site.name,
                        p.a.to_device(self.device),
                        p.b.to_device(self.device),
                        p.alpha,
                        adapter.rslora,
                    );
                    site.embedding = embedding;
                }
                None => {
                    site.resize(0, Shrink::Svd)?;
                }
            }
        }
        if let Some(extra) = by_name.keys().next() {
            bail!(BadInput(format!(
                "{}: module `{extra}` is not an adapted projection of this model (check --targets)",
                adapter.dir.display()
            )));
        }
        // `modules_to_save`: trained copies, as PEFT trains its `ModulesToSaveWrapper` copies.
        // Saved base weights of adapted layers replace the frozen base and are written back.
        self.saved.clear();
        self.base_layers.clear();
        for (name, t) in &adapter.other {
            let value = self.model.saved_module_value(adapter, name, t)?;
            if crate::peft::is_base_layer(name) {
                *self.model.param_mut(&crate::peft::base_name(name)).expect("checked") = value;
                self.base_layers.push((name.clone(), t.shallow_clone()));
                continue;
            }
            let saved = SavedModule::new(&crate::peft::base_name(name), &value);
            *self.model.param_mut(&saved.name).expect("checked") = saved.value.shallow_clone();
            self.saved.push(saved);
        }
        self.modules_to_save = adapter.config.get("modules_to_save").filter(|v| !v.is_null()).cloned();
        Ok(())
    }

    /// The run's token data, giving up the run (e.g. after its initial adapter was read off).
    pub fn into_data(self) -> TokenData {
        self.data
    }

    /// Module names of the sites, in plan order.
    pub fn site_names(&self) -> Vec<String> {
        self.model.sites().iter().map(|s| s.name.clone()).collect()
    }

    /// Current ranks, in plan order.
    pub fn ranks(&self) -> Vec<usize> {
        self.model.sites().iter().map(|s| s.rank()).collect()
    }

    /// Components that act, in plan order: the ranks, or under AdaLoRA's allocator the
    /// unmasked ones ([`Lora::active_rank`]).
    pub fn active_ranks(&self) -> Vec<usize> {
        self.model.sites().iter().map(|s| s.active_rank()).collect()
    }

    /// LoRA parameters that act: `Σ r·(d_in + d_out)` over the active ranks (PEFT's count of
    /// AdaLoRA's kept triplets, without `Λ`).
    pub fn adapter_params(&self) -> usize {
        self.model.sites().iter().map(|s| s.active_rank() * (s.d_in + s.d_out)).sum()
    }

    /// Trainable LoRA parameters, acting or not: `Σ r·(d_in + d_out)`, plus `Λ` in SVD form.
    pub fn trainable_params(&self) -> usize {
        self.model
            .sites()
            .iter()
            .map(|s| s.rank() * (s.d_in + s.d_out) + s.lambda.as_ref().map_or(0, |_| s.rank()))
            .sum()
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.cfg.adam.lr * self.cfg.schedule.factor(step, self.cfg.warmup_steps, self.cfg.steps)
    }

    /// Sets every site's dropout and training flag (dropout acts only in training passes).
    fn set_training(&mut self, training: bool) {
        let p = self.cfg.lora_dropout;
        for s in self.model.sites_mut() {
            s.dropout = if training { p } else { 0.0 };
        }
    }

    /// One optimizer step on a fresh random batch (with every site at rank 0 only the loss is
    /// measured).
    pub fn train_step(&mut self) -> Result<StepStats> {
        let t0 = Instant::now();
        let accum = self.cfg.grad_accum.max(1);
        let mut loss_v = 0.0;
        self.set_training(true);
        for _ in 0..accum {
            let batch = self.data.train_batch_masked(&mut self.rng, self.cfg.batch_size, self.cfg.seq_len, self.device);
            let loss = self.model.masked_loss(&batch.ids, batch.mask.as_ref());
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                self.set_training(false);
                bail!("training loss became {v} at step {}", self.step);
            }
            loss_v += v / accum as f64;
            // AdaLoRA's penalty joins every micro-batch's loss, as PEFT's forward adds it.
            let loss = match &self.allocator {
                Some(al) => match orthogonality_penalty(&self.model.sites(), al.cfg.orth_reg_weight) {
                    Some(p) => loss + p,
                    None => loss,
                },
                None => loss,
            };
            // With every site at rank 0 nothing is trainable: the step only measures the loss.
            if loss.requires_grad() {
                if accum > 1 { (loss / accum as f64).backward() } else { loss.backward() }
            }
        }
        self.set_training(false);
        let track = self.cfg.track_importance;
        let mut sq = 0.0;
        for s in self.model.sites_mut() {
            sq += s.observe_gradients(track);
        }
        sq += self.saved.iter().map(SavedModule::grad_sq_norm).sum::<f64>();
        let grad_norm = sq.sqrt();
        let scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = self.lr_at(self.step);
        let opt = AdamW { lr, ..self.cfg.adam };
        match &mut self.allocator {
            // AdaLoRA reads the parameters after the step and the gradients before they clear.
            Some(al) => {
                let mut sites = self.model.sites_mut();
                for s in sites.iter_mut() {
                    s.adamw_update(&opt, scale);
                }
                al.update_and_allocate(&mut sites, self.step, scale);
                for s in sites.iter_mut() {
                    s.zero_grad();
                }
            }
            None => {
                for s in self.model.sites_mut() {
                    s.adamw_step(&opt, scale);
                }
            }
        }
        for s in &mut self.saved {
            s.adamw_step(&opt, scale);
        }
        self.step += 1;
        let dt = t0.elapsed();
        self.train_time += dt;
        Ok(StepStats {
            loss: loss_v,
            grad_norm,
            tokens: self.cfg.batch_size * self.cfg.seq_len * accum,
            seconds: dt.as_secs_f64(),
            lr,
        })
    }

    /// Mean loss over the fixed validation batches.
    pub fn evaluate(&self) -> f64 {
        tch::no_grad(|| {
            let mut total = 0.0;
            let mut n = 0.0;
            for b in &self.val {
                // Weighted by the targets the batch holds (its windows, for plain text).
                let w = match &b.mask {
                    None => b.ids.size()[0] as f64,
                    Some(m) => m.narrow(1, 1, m.size()[1] - 1).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
                };
                total += self.model.masked_loss(&b.ids, b.mask.as_ref()).double_value(&[]) * w;
                n += w;
            }
            total / n
        })
    }

    /// Signals of every site (singular values only when `with_spectrum`, which costs one small
    /// QR-core SVD per site).
    pub fn signals(&self, with_spectrum: bool) -> Vec<SiteSignals> {
        crate::svd::single_threaded(self.device, || self.signals_inner(with_spectrum))
    }

    fn signals_inner(&self, with_spectrum: bool) -> Vec<SiteSignals> {
        self.model
            .sites()
            .iter()
            .map(|s| SiteSignals {
                name: s.name.clone(),
                layer: Target::layer_of(&s.name, self.model.cfg.num_hidden_layers),
                projection: s.name.rsplit('.').next().unwrap_or("").to_string(),
                d_in: s.d_in,
                d_out: s.d_out,
                rank: s.rank(),
                importance: s.importance(),
                component_importance: s.component_importance(),
                grad_norm: s.last_grad_norm,
                singular_values: if with_spectrum { s.singular_values() } else { Vec::new() },
                input_variance: s.input_variance.clone(),
            })
            .collect()
    }

    /// Applies `plan` (one rank per site): grows or QR-core-shrinks each site, leaving the model's
    /// output unchanged up to float error (exactly so for shrinks to at least the true rank).
    /// The plan is checked completely before any site changes.
    pub fn resize(&mut self, plan: &RankPlan) -> Result<ResizeReport> {
        let t0 = Instant::now();
        let params_before = self.adapter_params();
        let n = self.model.sites().len();
        if plan.ranks.len() != n {
            bail!(BadInput(format!("rank plan has {} ranks, the model has {n} sites", plan.ranks.len())));
        }
        for (s, &r) in self.model.sites().iter().zip(&plan.ranks) {
            check_rank(&s.name, r, s.d_in, s.d_out)?;
        }
        let device = self.device;
        let sites = self.model.sites_mut();
        let kinds = crate::svd::single_threaded(device, || -> Result<Vec<ResizeKind>> {
            let mut kinds = Vec::with_capacity(n);
            for (s, &r) in sites.into_iter().zip(&plan.ranks) {
                kinds.push(s.resize(r, self.cfg.shrink)?);
            }
            Ok(kinds)
        })?;
        let dt = t0.elapsed();
        self.resize_time += dt;
        Ok(ResizeReport { kinds, seconds: dt.as_secs_f64(), params_before, params_after: self.adapter_params() })
    }

    /// Independent copies of everything a round trains: every site (factors, optimizer and
    /// importance state) and every `modules_to_save` copy (value and AdamW moments).
    pub fn snapshot(&self) -> RoundSnapshot {
        RoundSnapshot {
            sites: self.model.sites().iter().map(|s| s.deep_copy()).collect(),
            saved: self.saved.iter().map(SavedModule::deep_copy).collect(),
        }
    }

    /// Puts back what [`Finetuner::snapshot`] took: the run continues as if nothing happened
    /// since the snapshot (except the data already drawn). The saved modules are copied back
    /// into the tensors the model reads.
    pub fn restore(&mut self, snapshot: RoundSnapshot) {
        for (site, s) in self.model.sites_mut().into_iter().zip(snapshot.sites) {
            *site = s;
        }
        for (module, s) in self.saved.iter_mut().zip(snapshot.saved) {
            module.restore_from(s);
        }
    }

    /// Normalised unigram entropy of the training tokens, `H / ln(vocab_size)`, in [0, 1] (the
    /// environments' `token_entropy` feature, measured once on the real data).
    pub fn token_entropy(&self) -> f64 {
        let v = self.model.cfg.vocab_size.max(2);
        let mut counts = vec![0u64; v];
        for &t in &self.data.train {
            counts[(t as usize).min(v - 1)] += 1;
        }
        let n = self.data.train.len().max(1) as f64;
        let h: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum();
        h / (v as f64).ln()
    }

    /// Seeds libtorch's generator for round `round` of the run: the only random draws it makes
    /// are `lora_dropout` masks, so they depend on (seed, round, step in round) alone and a resumed
    /// run draws the same ones.
    pub fn seed_round(&self, round: usize) {
        tch::manual_seed((self.cfg.seed ^ 0x7ea1_d70f).wrapping_add(round as u64 * 0x9e37_79b9) as i64);
    }

    /// Everything a resumed run needs to continue exactly: step, data position, every site's
    /// factors with its AdamW moments and importance averages, the `modules_to_save` copies.
    pub fn save_state(&self) -> (serde_json::Value, Vec<(String, Tensor)>) {
        let mut tensors = Vec::new();
        let sites: Vec<serde_json::Value> = self
            .model
            .sites()
            .iter()
            .enumerate()
            .map(|(i, s)| s.save_state(&format!("site.{i}"), &mut tensors))
            .collect();
        let saved: Vec<serde_json::Value> =
            self.saved.iter().enumerate().map(|(i, s)| s.save_state(&format!("saved.{i}"), &mut tensors)).collect();
        let v = serde_json::json!({
            "step": self.step, "rng": self.rng, "sites": sites, "saved": saved,
            "modules_to_save": self.modules_to_save,
        });
        (v, tensors)
    }

    /// Restores what [`Finetuner::save_state`] wrote; the sites must be those of this run.
    pub fn load_state(
        &mut self,
        v: &serde_json::Value,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let bad = |why: &str| -> anyhow::Error { BadInput(format!("resume state: {why}")).into() };
        let sites = v["sites"].as_array().ok_or_else(|| bad("no `sites`"))?;
        let device = self.device;
        let names = self.site_names();
        if sites.len() != names.len() {
            return Err(bad(&format!("{} sites, this run has {}", sites.len(), names.len())));
        }
        let mut restored = Vec::with_capacity(sites.len());
        for (i, (sv, name)) in sites.iter().zip(&names).enumerate() {
            let l = Lora::load_state(sv, &format!("site.{i}"), tensors, device)
                .ok_or_else(|| bad(&format!("site {i} (`{name}`) is incomplete")))?;
            if &l.name != name {
                return Err(bad(&format!("site {i} is `{}`, this run's is `{name}`", l.name)));
            }
            restored.push(l);
        }
        for (site, l) in self.model.sites_mut().into_iter().zip(restored) {
            *site = l;
        }
        self.saved.clear();
        let kind = self.model.embed_tokens.kind();
        for (i, sv) in v["saved"].as_array().ok_or_else(|| bad("no `saved`"))?.iter().enumerate() {
            let m = SavedModule::load_state(sv, &format!("saved.{i}"), tensors, device, kind)
                .ok_or_else(|| bad(&format!("saved module {i} is incomplete")))?;
            *self.model.param_mut(&m.name).ok_or_else(|| bad(&format!("`{}` is no parameter", m.name)))? =
                m.value.shallow_clone();
            self.saved.push(m);
        }
        self.modules_to_save = v.get("modules_to_save").filter(|x| !x.is_null()).cloned();
        self.step = v["step"].as_u64().ok_or_else(|| bad("no `step`"))? as usize;
        self.rng = serde_json::from_value(v["rng"].clone()).map_err(|e| bad(&format!("`rng`: {e}")))?;
        Ok(())
    }

    /// The adapter as a PEFT adapter (sites of rank 0 are left out; a site in AdaLoRA's SVD form
    /// is written as the plain LoRA of its kept components, [`Lora::plain_factors`]).
    pub fn to_peft(&self, base_model: &str) -> PeftAdapter {
        let mut config = PeftAdapter::new_config(base_model, self.cfg.rslora);
        config.insert("lora_alpha".into(), serde_json::json!(self.cfg.alpha));
        config.insert("lora_dropout".into(), serde_json::json!(self.cfg.lora_dropout));
        if let Some(m) = &self.modules_to_save {
            config.insert("modules_to_save".into(), m.clone());
        }
        PeftAdapter {
            dir: Path::new(".").to_path_buf(),
            config,
            rslora: self.cfg.rslora,
            sites: self
                .model
                .sites()
                .iter()
                .filter(|s| s.active_rank() > 0)
                .map(|s| {
                    let (a, b, alpha) = s.plain_factors();
                    PeftSite {
                        module: s.name.clone(),
                        tensor_prefix: format!("{PREFIX}{}", s.name),
                        a: a.to_device(Device::Cpu),
                        b: b.to_device(Device::Cpu),
                        alpha,
                        embedding: s.embedding,
                    }
                })
                .collect(),
            other: self
                .saved
                .iter()
                .map(|s| (format!("{PREFIX}{}", s.name), s.value.detach().to_device(Device::Cpu).contiguous()))
                .chain(self.base_layers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
                .collect(),
        }
    }

    /// Writes the adapter as a PEFT directory (atomically, file by file).
    pub fn export_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.to_peft(base_model).save(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_run, tiny_run_with};

    #[test]
    fn rank_spec_parses_and_matches_like_peft() {
        let s = RankSpec::parse("q_proj=16, layers.1.mlp.down_proj=2, 4").unwrap();
        assert_eq!(s.rank_for("model.layers.0.self_attn.q_proj"), 16);
        assert_eq!(s.rank_for("model.layers.1.mlp.down_proj"), 2);
        assert_eq!(s.rank_for("model.layers.11.mlp.down_proj"), 4);
        assert_eq!(RankSpec::parse("v_proj=8").unwrap().rank_for("model.layers.0.self_attn.q_proj"), 0);
        assert!(RankSpec::parse("x").is_err());
        assert!(RankSpec::parse("4,8").is_err());
        assert!(RankSpec::parse("").is_err());
    }

    fn factors(ft: &Finetuner) -> Vec<Tensor> {
        ft.model.sites().iter().flat_map(|s| [s.a.detach().copy(), s.b.detach().copy()]).collect()
    }

    #[test]
    fn gradient_accumulation_equals_one_batch_of_the_same_windows() {
        // 2 micro-batches of 2 draw the same 4 windows, in the same order, as one batch of 4.
        let mut whole = crate::testing::tiny_run_with(4, "4", |c| c.grad_clip = 0.0);
        let mut split = crate::testing::tiny_run_with(4, "4", |c| {
            c.grad_clip = 0.0;
            c.batch_size = 2;
            c.grad_accum = 2;
        });
        for _ in 0..4 {
            let (a, b) = (whole.train_step().unwrap(), split.train_step().unwrap());
            assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
            assert_eq!(a.tokens, b.tokens);
        }
        for (x, y) in factors(&whole).iter().zip(factors(&split)) {
            let d = (x - &y).abs().max().double_value(&[]);
            assert!(d < 1e-5, "factors differ by {d}");
        }
        // And accumulation is not a no-op: one micro-batch of 2 is another run.
        let mut half = crate::testing::tiny_run_with(4, "4", |c| {
            c.grad_clip = 0.0;
            c.batch_size = 2;
        });
        for _ in 0..4 {
            half.train_step().unwrap();
        }
        let d = (&factors(&half)[1] - &factors(&split)[1]).abs().max().double_value(&[]);
        assert!(d > 1e-4, "{d}");
    }

    #[test]
    fn lora_dropout_acts_in_training_only() {
        let mut plain = crate::testing::tiny_run(3, "4");
        let mut dropped = crate::testing::tiny_run_with(3, "4", |c| c.lora_dropout = 0.3);
        // The same model in evaluation: dropout is off.
        assert_eq!(plain.evaluate(), dropped.evaluate());
        for _ in 0..3 {
            plain.train_step().unwrap();
            dropped.train_step().unwrap();
        }
        assert_ne!(plain.evaluate(), dropped.evaluate());
        assert!(dropped.model.sites().iter().all(|s| s.dropout == 0.0), "reset after the step");
        assert_eq!(dropped.to_peft("m").config["lora_dropout"], serde_json::json!(0.3));
    }

    #[test]
    fn short_finetune_lowers_validation_loss_and_resizes_keep_outputs() {
        let mut ft = tiny_run(30, "4");
        let v0 = ft.evaluate();
        for _ in 0..30 {
            ft.train_step().unwrap();
        }
        let v1 = ft.evaluate();
        assert!(v1 < v0 - 0.05, "validation loss {v0} -> {v1}");
        // Grow every site, then shrink back to the old rank: the loss does not move.
        let n = ft.site_names().len();
        assert_eq!(n, 14);
        let r = ft.resize(&RankPlan::new(vec![8; n])).unwrap();
        assert!(r.kinds.iter().all(|k| *k == ResizeKind::Grow));
        assert!((ft.evaluate() - v1).abs() < 1e-5 * v1);
        ft.resize(&RankPlan::new(vec![4; n])).unwrap();
        assert!((ft.evaluate() - v1).abs() < 1e-5 * v1);
        // Training continues after resizes.
        ft.train_step().unwrap();
        let sig = ft.signals(true);
        assert_eq!(sig.len(), n);
        assert_eq!(sig[0].singular_values.len(), 4);
        assert!(sig.iter().all(|s| s.grad_norm > 0.0));
        assert!(ft.resize(&RankPlan::new(vec![4; 3])).is_err());
        let mut bad = vec![4; n];
        bad[0] = 33;
        let e = ft.resize(&RankPlan::new(bad)).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert_eq!(ft.ranks(), vec![4; n], "a rejected plan changes nothing");
    }

    #[test]
    fn a_step_with_every_site_at_rank_0_measures_the_loss_and_a_rollback_restores_the_sites() {
        let mut ft = tiny_run(0, "0");
        let st = ft.train_step().unwrap();
        assert!(st.loss.is_finite() && st.grad_norm == 0.0);
        let n = ft.site_names().len();
        let saved = ft.snapshot();
        let v0 = ft.evaluate();
        ft.resize(&RankPlan::new(vec![2; n])).unwrap();
        for _ in 0..3 {
            ft.train_step().unwrap();
        }
        assert!(ft.evaluate() != v0);
        ft.restore(saved);
        assert_eq!(ft.ranks(), vec![0; n]);
        assert_eq!(ft.evaluate(), v0);
    }

    /// LoRA on `embed_tokens` and `lm_head` beside the projections: sites in forward order, the
    /// resizes keep the output, the PEFT round trip is exact, and a rollback restores the sites
    /// and the `modules_to_save` copies.
    #[test]
    fn embedding_and_head_sites_resize_round_trip_and_roll_back_with_the_saved_modules() {
        let targets = || ["embed_tokens", "q_proj", "lm_head"].map(|t| t.parse::<Target>().unwrap()).to_vec();
        let mut ft = tiny_run_with(4, "4", |c| c.targets = targets());
        let names = ft.site_names();
        assert_eq!(names.first().map(String::as_str), Some("model.embed_tokens"));
        assert_eq!(names.last().map(String::as_str), Some("lm_head"));
        assert_eq!(names.len(), 4);
        assert!(ft.model.embed_lora.as_ref().unwrap().embedding);
        assert_eq!((ft.model.sites()[0].d_in, ft.model.sites()[0].d_out), (256, 32));
        let sig = ft.signals(false);
        assert_eq!((sig[0].layer, sig[0].projection.as_str()), (0, "embed_tokens"));
        assert_eq!((sig[3].layer, sig[3].projection.as_str()), (1, "lm_head"));
        // A trained norm as `modules_to_save`, as `load_peft` sets one up.
        let saved = SavedModule::new("model.norm.weight", &ft.model.norm);
        ft.model.norm = saved.value.shallow_clone();
        ft.saved.push(saved);
        let v0 = ft.evaluate();
        for _ in 0..4 {
            ft.train_step().unwrap();
        }
        let v1 = ft.evaluate();
        assert!(v1 < v0, "training lowers the loss: {v0} -> {v1}");
        assert!(ft.model.sites().iter().all(|s| s.b.abs().max().double_value(&[]) > 0.0), "every site trains");
        let norm_trained = ft.model.norm.copy();
        assert!(norm_trained.ne_tensor(&Tensor::ones_like(&norm_trained)).any().int64_value(&[]) == 1);
        // Grow, then shrink to the true rank: the output is kept.
        ft.resize(&RankPlan::new(vec![6; 4])).unwrap();
        assert!((ft.evaluate() - v1).abs() < 1e-5 * v1);
        ft.resize(&RankPlan::new(vec![4; 4])).unwrap();
        assert!((ft.evaluate() - v1).abs() < 1e-5 * v1);
        // PEFT round trip.
        let dir = tempfile::tempdir().unwrap();
        ft.export_peft(dir.path(), "base").unwrap();
        let ad = PeftAdapter::load(dir.path()).unwrap();
        assert_eq!(ad.sites.iter().filter(|s| s.embedding).count(), 1);
        let mut c = tiny_run_with(0, "1", |c| c.targets = targets());
        c.load_peft(&ad).unwrap();
        assert!(c.model.embed_lora.as_ref().unwrap().embedding);
        assert!((c.evaluate() - ft.evaluate()).abs() < 1e-6);
        // A lost round is undone, saved modules included.
        let (v_snap, norm_trained) = (ft.evaluate(), ft.model.norm.copy());
        let snap = ft.snapshot();
        for _ in 0..3 {
            ft.train_step().unwrap();
        }
        assert!(ft.model.norm.ne_tensor(&norm_trained).any().int64_value(&[]) == 1);
        ft.restore(snap);
        assert!(ft.model.norm.equal(&norm_trained), "the saved module is rolled back in place");
        assert_eq!(ft.evaluate(), v_snap);
    }

    /// EVA: `A` starts at the leading right singular vectors of each site's inputs (checked
    /// against an exact SVD of the same activations), the output is unchanged, a grow continues
    /// down the basis, and the setting parses.
    #[test]
    fn eva_starts_at_the_principal_directions_of_the_inputs_and_grows_along_them() {
        let base = tiny_run(0, "4");
        let v_base = base.evaluate();
        let mut ft = tiny_run_with(0, "4", |c| c.init = SiteInit::Eva { batches: 2 });
        assert_eq!(ft.evaluate(), v_base, "B = 0: the model is unchanged");
        let inputs = ft.collect_site_inputs(2);
        for (site, x) in ft.model.sites().iter().zip(&inputs) {
            let x = x.as_ref().unwrap();
            assert_eq!(x.size(), [2 * 4 * 32, site.d_in as i64]);
            let exact = crate::svd::svd(x);
            let v4 = exact.v.narrow(1, 0, 4); // [in, 4]
            // |A V| = I up to signs: the same leading directions.
            let overlap = site.a.detach().matmul(&v4).abs();
            let diag_err = (overlap.diagonal(0, 0, 1) - 1.0).abs().max().double_value(&[]);
            assert!(diag_err < 1e-3, "{}: A rows are not the top singular vectors: {overlap:?}", site.name);
            // Captured energy is the best possible at rank 4, far above random directions.
            let energy = |a: &Tensor| x.matmul(&a.tr()).square().sum(Kind::Float).double_value(&[]);
            let best: f64 = exact.values()[..4].iter().map(|s| s * s).sum();
            assert!((energy(&site.a.detach()) - best).abs() < 1e-3 * best, "{}", site.name);
            let random = base.model.sites().iter().find(|s| s.name == site.name).unwrap().a.detach();
            let random = &random / random.norm_scalaropt_dim(2, [1], true);
            assert!(energy(&random) < 0.9 * best, "{}: random rows capture as much", site.name);
        }
        ft.resize(&RankPlan::new(vec![6; ft.site_names().len()])).unwrap();
        for site in ft.model.sites() {
            let basis = site.input_basis.as_ref().unwrap();
            let next = site.a.detach().narrow(0, 4, 2).matmul(&basis.narrow(0, 4, 2).tr()).abs();
            assert!((next.diagonal(0, 0, 1) - 1.0).abs().max().double_value(&[]) < 1e-4, "{}: {next:?}", site.name);
        }
        assert!((ft.evaluate() - v_base).abs() < 1e-6 * v_base);
        assert_eq!("eva:3".parse::<SiteInit>(), Ok(SiteInit::Eva { batches: 3 }));
        assert_eq!("eva".parse::<SiteInit>(), Ok(SiteInit::Eva { batches: 4 }));
        assert!("eva:0".parse::<SiteInit>().unwrap_err().contains("allowed: kaiming, eva"));
    }

    #[test]
    fn bf16_base_weights_train() {
        let ft = tiny_run(0, "2");
        let dir = tempfile::tempdir().unwrap();
        ft.model.save(&ft.vs, dir.path()).unwrap();
        let (model, vs) = Llama::load(dir.path(), Device::Cpu, tch::Kind::BFloat16).unwrap();
        assert_eq!(model.layers[0].q_proj.weight.kind(), tch::Kind::BFloat16);
        let data = TokenData {
            train: (0..400).map(|i| (i % 50) as i64).collect(),
            val: (0..200).map(|i| (i % 50) as i64).collect(),
            train_mask: vec![],
            val_mask: vec![],
        };
        let cfg = FinetuneConfig {
            batch_size: 2,
            seq_len: 16,
            eval_batches: 1,
            ranks: RankSpec::parse("2").unwrap(),
            ..FinetuneConfig::default()
        };
        let mut ft = Finetuner::new(model, vs, data, cfg).unwrap();
        let st = ft.train_step().unwrap();
        assert!(st.loss.is_finite() && st.grad_norm > 0.0);
        let n = ft.site_names().len();
        ft.resize(&RankPlan::new(vec![3; n])).unwrap();
        assert!(ft.evaluate().is_finite());
        assert_eq!(ft.model.sites()[0].a.kind(), tch::Kind::Float);
    }

    #[test]
    fn same_seed_same_result_and_peft_round_trip() {
        let run = || {
            let mut ft = tiny_run(5, "q_proj=4,v_proj=2");
            for _ in 0..5 {
                ft.train_step().unwrap();
            }
            ft
        };
        let a = run();
        let b = run();
        assert_eq!(a.evaluate(), b.evaluate());
        let dir = tempfile::tempdir().unwrap();
        a.export_peft(dir.path(), "base").unwrap();
        let ad = PeftAdapter::load(dir.path()).unwrap();
        assert_eq!(ad.sites.len(), 4);
        let mut c = tiny_run(0, "1");
        c.load_peft(&ad).unwrap();
        assert_eq!(c.ranks(), a.ranks());
        assert!((c.evaluate() - a.evaluate()).abs() < 1e-6);
    }
}
