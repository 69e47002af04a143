//! LoRA sites whose rank changes during training.
//!
//! A site adapts one frozen projection `y = W x` to `y = W x + s · B (A x)` with PEFT's
//! conventions: `A ∈ R^{r×in}` (Kaiming-uniform, `a = √5`, i.e. `U(±1/√in)`), `B ∈ R^{out×r}`
//! (zeros), `s = α / r`, or `α / √r` with rsLoRA. A site of rank 0 contributes nothing.
//!
//! **Resizing** keeps the layer's output unchanged at the moment of the resize:
//!
//! * *grow* `r → r'`: both factors are multiplied by `c = √(s_r / s_r')`, so that
//!   `s_r' · (cB)(cA) = s_r · B A`; `A` gains `r' − r` rows drawn like PEFT's initialisation and
//!   made orthogonal to the existing rows (new directions), `B` gains zero columns. Exact.
//! * *shrink* `r → k` by the QR-core SVD ([`crate::svd::qr_core_svd`], never forming `ΔW`):
//!   `s_r · B A = U Σ Vᵀ`, and the new factors split the kept singular values evenly,
//!   `B' = U_k (Σ_k s_r / s_k)^{1/2}`, `A' = (Σ_k s_r / s_k)^{1/2} V_kᵀ`, so that
//!   `s_k · B' A' = U_k Σ_k V_kᵀ`: the best rank-`k` approximation, exact when `k` is at least
//!   the adapter's true rank. Components whose singular value is zero (e.g. a fresh adapter
//!   with `B = 0`) would be dead (no gradient reaches them); they are re-drawn like new
//!   directions of a grow (fresh `A` row, zero `B` column), which keeps the output unchanged.
//! * *prune* `r → k` ([`Shrink::Prune`], the alternative to the SVD shrink): the `k` components
//!   whose rank-one terms `b_i a_iᵀ` are largest (`‖b_i‖·‖a_i‖`) are kept as they are, rescaled by
//!   `c = √(s_r / s_k)` like a grow, the others dropped. Not the best rank-`k` approximation, but
//!   no component changes direction: an EVA-initialised `A` keeps its data-driven rows, and the
//!   kept entries keep their optimizer state.
//!
//! **Optimizer state** (this module's own AdamW, [`AdamW`]):
//!
//! * grow: kept entries keep their moments, rescaled like the parameters (`m·c`, `v·c²`); new
//!   entries start with `m = 0` and `v` = the mean of the kept `v` of that tensor (so their first
//!   updates have the tensor's typical size instead of the `(1−β₁)/√(1−β₂) ≈ 3×` jump of a zero
//!   second moment); the step count is kept.
//! * shrink: the factors change basis (rotations by `U_c`, `V_c`), so element-wise moments no
//!   longer describe any parameter; both moments are **reset** to zero and the site's step count
//!   to 0, so bias correction restarts for that site alone.
//! * prune: the kept entries keep their moments, rescaled like a grow's (`m·c`, `v·c²`), and
//!   the step count is kept.
//!
//! The AdaLoRA importance averages follow the same rule (padded with zeros on grow, reset on
//! shrink, the kept entries' kept on prune).
//!
//! **AdaLoRA's SVD form** ([`Lora::new_svd`], PEFT's `SVDLinear`): `y = W x + s · B (Λ ⊙ A) x`
//! with a trained diagonal `Λ` (`lora_E`, `[r, 1]`, starting at zero), `A`, `B` drawn from
//! `N(0, 0.02²)` and `s = α / (r + 10⁻⁵)`. Such a site never resizes: [`crate::adalora`] prunes
//! its components by zeroing entries of `Λ`, as PEFT does.

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::svd;

/// AdamW hyper-parameters (decoupled weight decay, bias-corrected moments).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Moments of one tensor.
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
}

impl Moments {
    fn zeros_like(t: &Tensor) -> Moments {
        Moments { m: t.zeros_like(), v: t.zeros_like() }
    }
}

/// AdamW on one tensor in place: moments updated with the gradient `g · grad_scale`, decoupled
/// weight decay, bias-corrected step (`t` is the 1-based step count of this tensor).
fn adamw_update(p: &mut Tensor, g: &Tensor, m: &mut Moments, opt: &AdamW, t: u64, grad_scale: f64) {
    let t = t as i32;
    let bc1 = 1.0 - opt.beta1.powi(t);
    let bc2 = 1.0 - opt.beta2.powi(t);
    let g = if grad_scale != 1.0 { g * grad_scale } else { g.shallow_clone() };
    let _ = m.m.lerp_(&g, 1.0 - opt.beta1);
    let _ = m.v.g_mul_scalar_(opt.beta2);
    let _ = m.v.addcmul_(&(&g * (1.0 - opt.beta2)), &g);
    if opt.weight_decay != 0.0 {
        let _ = p.g_mul_scalar_(1.0 - opt.lr * opt.weight_decay);
    }
    let denom = (&m.v / bc2).sqrt() + opt.eps;
    let _ = p.g_sub_(&((&m.m * (opt.lr / bc1)) / denom));
}

/// A whole base tensor trained beside the LoRA sites: PEFT's `modules_to_save` (a trained
/// `lm_head`, embedding or norm). The model reads the same storage (`value` is shared with the
/// model's field), so the in-place steps act on the forward pass directly.
#[derive(Debug)]
pub struct SavedModule {
    /// The parameter's Hugging Face name, e.g. `lm_head.weight`.
    pub name: String,
    /// The trained copy (requires grad).
    pub value: Tensor,
    adam: Option<Moments>,
    adam_steps: u64,
}

impl SavedModule {
    /// A trainable copy of `base` under `name`.
    pub fn new(name: &str, base: &Tensor) -> SavedModule {
        SavedModule { name: name.to_string(), value: param(base.detach().copy()), adam: None, adam_steps: 0 }
    }

    /// `‖∇‖²` of the last backward pass (0 without a gradient).
    pub fn grad_sq_norm(&self) -> f64 {
        let g = self.value.grad();
        if g.defined() { g.to_kind(tch::Kind::Double).square().sum(tch::Kind::Double).double_value(&[]) } else { 0.0 }
    }

    /// Its training state, as [`Lora::save_state`].
    pub fn save_state(&self, prefix: &str, tensors: &mut Vec<(String, Tensor)>) -> serde_json::Value {
        tensors.push((format!("{prefix}.value"), self.value.detach().to_device(Device::Cpu)));
        if let Some(m) = &self.adam {
            tensors.push((format!("{prefix}.adam_m"), m.m.to_device(Device::Cpu)));
            tensors.push((format!("{prefix}.adam_v"), m.v.to_device(Device::Cpu)));
        }
        serde_json::json!({"name": self.name, "adam_steps": self.adam_steps, "adam": self.adam.is_some()})
    }

    /// The module [`SavedModule::save_state`] wrote, on `device` in `kind`.
    pub fn load_state(
        v: &serde_json::Value,
        prefix: &str,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Option<SavedModule> {
        let get = |k: &str| tensors.get(&format!("{prefix}.{k}")).map(|t| t.to_device(device).to_kind(kind));
        let mut m = SavedModule::new(v["name"].as_str()?, &get("value")?);
        if v["adam"].as_bool()? {
            m.adam = Some(Moments { m: get("adam_m")?, v: get("adam_v")? });
        }
        m.adam_steps = v["adam_steps"].as_u64()?;
        Some(m)
    }

    /// An independent copy (value and moments), to undo a lost round.
    pub fn deep_copy(&self) -> SavedModule {
        SavedModule {
            name: self.name.clone(),
            value: self.value.detach().copy(),
            adam: self.adam.as_ref().map(|m| Moments { m: m.m.copy(), v: m.v.copy() }),
            adam_steps: self.adam_steps,
        }
    }

    /// Takes the value and optimizer state of `copy` (from [`SavedModule::deep_copy`]), writing
    /// the value in place: the model's field shares this tensor's storage.
    pub fn restore_from(&mut self, copy: SavedModule) {
        tch::no_grad(|| {
            self.value.copy_(&copy.value);
        });
        self.adam = copy.adam;
        self.adam_steps = copy.adam_steps;
    }

    /// One AdamW step (gradient scaled by `grad_scale`), then clears the gradient.
    pub fn adamw_step(&mut self, opt: &AdamW, grad_scale: f64) {
        tch::no_grad(|| {
            let g = self.value.grad();
            if !g.defined() {
                return;
            }
            let m = self.adam.get_or_insert_with(|| Moments::zeros_like(&self.value));
            self.adam_steps += 1;
            adamw_update(&mut self.value, &g, m, opt, self.adam_steps, grad_scale);
        });
        self.value.zero_grad();
    }
}

/// AdaLoRA sensitivity averages of one tensor: `Ī` (EMA of `|θ·∇θ|`) and `Ū` (EMA of `|I − Ī|`).
#[derive(Debug)]
pub(crate) struct Importance {
    i_bar: Tensor,
    u_bar: Tensor,
}

impl Importance {
    pub(crate) fn zeros_like(t: &Tensor) -> Importance {
        Importance { i_bar: t.zeros_like(), u_bar: t.zeros_like() }
    }
    /// `s = Ī · Ū`, element-wise.
    pub(crate) fn score(&self) -> Tensor {
        &self.i_bar * &self.u_bar
    }
    /// One observation of parameter `p` with gradient `g`: `I = |p·g|`, `Ī ← β₁Ī + (1−β₁)I`,
    /// `Ū ← β₂Ū + (1−β₂)|I − Ī|`.
    pub(crate) fn observe(&mut self, p: &Tensor, g: &Tensor) {
        let (b1, b2) = IMPORTANCE_BETA;
        let i = (p * g).abs();
        self.i_bar = &self.i_bar * b1 + &i * (1.0 - b1);
        self.u_bar = &self.u_bar * b2 + (&i - &self.i_bar).abs() * (1.0 - b2);
    }
}

/// AdaLoRA's initial spread of `A` and `B` in SVD form (PEFT: `nn.init.normal_(…, std=0.02)`).
pub const SVD_INIT_STD: f64 = 0.02;

/// AdaLoRA's EMA factors (β₁ = β₂ = 0.85, PEFT's defaults).
pub const IMPORTANCE_BETA: (f64, f64) = (0.85, 0.85);

/// One adapted projection.
#[derive(Debug)]
pub struct Lora {
    /// Module path in the Hugging Face model, e.g. `model.layers.3.self_attn.v_proj`.
    pub name: String,
    /// Input features of the projection.
    pub d_in: usize,
    /// Output features of the projection.
    pub d_out: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling (`α/√r`) instead of `α/r`.
    pub rslora: bool,
    /// `A`, `[r, in]`, `f32`, requires grad.
    pub a: Tensor,
    /// `B`, `[out, r]`, `f32`, requires grad.
    pub b: Tensor,
    adam: Option<(Moments, Moments)>,
    adam_steps: u64,
    importance: Option<(Importance, Importance)>,
    /// Gradient norm `‖(∇A, ∇B)‖_F` at the last [`Lora::observe_gradients`].
    pub last_grad_norm: f64,
    /// Dropout probability on the site's input in the current pass (PEFT's `lora_dropout`; the
    /// fine-tuning loop sets it for training passes only).
    pub dropout: f64,
    /// Seed of this site's own generator for new directions (initialisation, grow, re-drawn
    /// dead components): results do not depend on libtorch's global generator.
    pub seed: u64,
    /// A token-embedding site (PEFT's `lora.Embedding`): the input is the one-hot token, so
    /// `d_in` is the vocabulary, the forward pass is [`Lora::forward_ids`], there is no dropout,
    /// and new rows of `A` are drawn with unit variance (see [`Lora::new_embedding`]).
    pub embedding: bool,
    /// Principal directions of the site's inputs, `[k, in]` unit rows in order of explained
    /// variance (EVA, [`Lora::init_from_basis`]): where a grow takes its new directions.
    pub input_basis: Option<Tensor>,
    /// The share of the inputs' energy `σ_i² / ‖X‖²_F` along each row of `input_basis` (EVA's
    /// explained-variance ratios, descending; empty without a basis).
    pub input_variance: Vec<f64>,
    /// While `Some`, [`Lora::forward`] appends its input rows here (EVA's activation pass).
    pub captured_inputs: std::cell::RefCell<Option<Vec<Tensor>>>,
    /// AdaLoRA's `Λ` (PEFT's `lora_E`, `[r, 1]`, requires grad) for a site in SVD form
    /// ([`Lora::new_svd`]); `None` for a plain LoRA site.
    pub lambda: Option<Tensor>,
    lambda_adam: Option<Moments>,
    draws: u64,
}

/// How a resize drops components.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shrink {
    /// The best rank-`k` approximation by the QR-core SVD (LoRA-Squeeze); the factors change
    /// basis and the site's optimizer state restarts (default).
    #[default]
    Svd,
    /// Drop the components with the smallest rank-one terms; the kept ones keep their directions
    /// and their optimizer state.
    Prune,
}

impl std::str::FromStr for Shrink {
    type Err = String;

    fn from_str(s: &str) -> Result<Shrink, String> {
        match s.trim() {
            "svd" => Ok(Shrink::Svd),
            "prune" => Ok(Shrink::Prune),
            other => Err(format!("unknown shrink `{other}`: allowed: svd, prune")),
        }
    }
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ResizeKind {
    /// Same rank: nothing changed.
    Unchanged,
    /// Rank increased.
    Grow,
    /// Rank decreased (QR-core SVD).
    Shrink,
}

/// The scaling `s` for rank `r` (0 for rank 0).
pub fn scaling(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rank == 0 {
        0.0
    } else if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

fn param(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// What every new site of a run shares: PEFT's `lora_alpha`, the rsLoRA switch and the seed
/// (mixed with the site's name, so each site draws its own `A`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraInit {
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling `α/√r` instead of `α/r`.
    pub rslora: bool,
    /// Seed of the sites' generators.
    pub seed: u64,
}

impl Lora {
    /// A new site of rank `rank` with PEFT's initialisation (`B = 0`) on `device`; `A` is drawn
    /// from the site's own generator, seeded by `seed` and the site's name.
    /// Fails when `rank > min(d_in, d_out)`.
    pub fn new(name: &str, shape: (usize, usize), rank: usize, init: LoraInit, device: Device) -> Result<Lora> {
        Lora::create(name, shape, rank, init, device, false)
    }

    /// A new token-embedding site, `(vocab, hidden)`: `ΔE = s · (B A)ᵀ`. PEFT initialises it with
    /// `A = 0` and `B ~ N(0, 1)`; here the random factor is `A` (unit variance, `B = 0`), the
    /// mirror image, so that growing keeps the one rule of every site (new rows of `A`, zero
    /// columns of `B`) and the update starts at zero either way.
    pub fn new_embedding(
        name: &str,
        shape: (usize, usize),
        rank: usize,
        init: LoraInit,
        device: Device,
    ) -> Result<Lora> {
        Lora::create(name, shape, rank, init, device, true)
    }

    fn create(
        name: &str,
        (d_in, d_out): (usize, usize),
        rank: usize,
        init: LoraInit,
        device: Device,
        embedding: bool,
    ) -> Result<Lora> {
        let LoraInit { alpha, rslora, seed } = init;
        check_rank(name, rank, d_in, d_out)?;
        let mut l = Lora::from_factors(
            name,
            Tensor::zeros([0, d_in as i64], (Kind::Float, device)),
            Tensor::zeros([d_out as i64, 0], (Kind::Float, device)),
            alpha,
            rslora,
        );
        l.seed = seed ^ name_hash(name);
        l.embedding = embedding;
        let a = l.kaiming_rows(rank);
        let b = Tensor::zeros([d_out as i64, rank as i64], (Kind::Float, device));
        l.a = param(a);
        l.b = param(b);
        Ok(l)
    }

    /// A site from given factors (`a: [r, in]`, `b: [out, r]`), e.g. a loaded adapter.
    pub fn from_factors(name: &str, a: Tensor, b: Tensor, alpha: f64, rslora: bool) -> Lora {
        let d_in = a.size()[1] as usize;
        let d_out = b.size()[0] as usize;
        Lora {
            name: name.to_string(),
            d_in,
            d_out,
            alpha,
            rslora,
            a: param(a.to_kind(Kind::Float)),
            b: param(b.to_kind(Kind::Float)),
            adam: None,
            adam_steps: 0,
            importance: None,
            last_grad_norm: 0.0,
            dropout: 0.0,
            seed: name_hash(name),
            embedding: false,
            input_basis: None,
            input_variance: Vec::new(),
            captured_inputs: std::cell::RefCell::new(None),
            lambda: None,
            lambda_adam: None,
            draws: 0,
        }
    }

    /// A new site in AdaLoRA's SVD form (PEFT's `SVDLinear`): `A` (`[rank, in]`) and `B`
    /// (`[out, rank]`) drawn from `N(0, 0.02²)` by the site's own generator, `Λ = 0`, so the
    /// update starts at zero. `alpha` is PEFT's `lora_alpha`; the scaling is `α / (rank + 10⁻⁵)`.
    pub fn new_svd(
        name: &str,
        (d_in, d_out): (usize, usize),
        rank: usize,
        init: LoraInit,
        device: Device,
    ) -> Result<Lora> {
        check_rank(name, rank, d_in, d_out)?;
        let mut l = Lora::from_factors(
            name,
            Tensor::zeros([rank as i64, d_in as i64], (Kind::Float, device)),
            Tensor::zeros([d_out as i64, rank as i64], (Kind::Float, device)),
            init.alpha,
            false,
        );
        l.seed = init.seed ^ name_hash(name);
        l.a = param(l.normal(&[rank, d_in], SVD_INIT_STD));
        l.b = param(l.normal(&[d_out, rank], SVD_INIT_STD));
        l.lambda = Some(param(Tensor::zeros([rank as i64, 1], (Kind::Float, device))));
        Ok(l)
    }

    /// Current rank (for a site in SVD form: its components, masked or not).
    pub fn rank(&self) -> usize {
        self.a.size()[0] as usize
    }

    /// Components that act: the rank, or for a site in SVD form the entries of `Λ` that are
    /// not zero (what PEFT's AdaLoRA counts as kept).
    pub fn active_rank(&self) -> usize {
        match &self.lambda {
            Some(l) => l.ne(0.0).sum(Kind::Int64).int64_value(&[]) as usize,
            None => self.rank(),
        }
    }

    /// Current scaling `s` (`α / (r + 10⁻⁵)` in SVD form, PEFT's `scaling / (ranknum + 1e-5)`).
    pub fn scaling(&self) -> f64 {
        match self.lambda {
            Some(_) => self.alpha / (self.rank() as f64 + 1e-5),
            None => scaling(self.alpha, self.rank(), self.rslora),
        }
    }

    /// The factor that multiplies the input: `A`, or `Λ ⊙ A` in SVD form.
    fn a_eff(&self) -> Tensor {
        match &self.lambda {
            Some(l) => &self.a * l,
            None => self.a.shallow_clone(),
        }
    }

    /// `s · B (A x)` in `x`'s dtype, or `None` at rank 0.
    pub fn forward(&self, x: &Tensor) -> Option<Tensor> {
        if let Some(rows) = self.captured_inputs.borrow_mut().as_mut() {
            rows.push(x.detach().reshape([-1, self.d_in as i64]).to_kind(Kind::Float));
        }
        if self.rank() == 0 {
            return None;
        }
        let k = x.kind();
        let h = if self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let h = h.linear(&self.a_eff().to_kind(k), None::<Tensor>);
        Some(h.linear(&self.b.to_kind(k), None::<Tensor>) * self.scaling())
    }

    /// The embedding site's update of the rows `ids` (`[..]` token ids → `[.., hidden]`):
    /// `s · B A[:, id]`, PEFT's `embedding(ids, Aᵀ) Bᵀ · s`, in `kind`; `None` at rank 0.
    pub fn forward_ids(&self, ids: &Tensor, kind: Kind) -> Option<Tensor> {
        if self.rank() == 0 {
            return None;
        }
        let h = Tensor::embedding(&self.a_eff().to_kind(kind).tr(), ids, -1, false, false);
        Some(h.linear(&self.b.to_kind(kind), None::<Tensor>) * self.scaling())
    }

    /// The full update `ΔW = s · B A`, `[out, in]` (for tests and merging; training never forms it).
    pub fn delta_weight(&self) -> Tensor {
        if self.rank() == 0 {
            return Tensor::zeros([self.d_out as i64, self.d_in as i64], (Kind::Float, self.a.device()));
        }
        self.b.detach().matmul(&self.a_eff().detach()) * self.scaling()
    }

    /// The site as plain LoRA factors `(A, B, α)` with the same update `s · B A`: itself, or in
    /// SVD form its kept components, `A = (Λ ⊙ A)[kept]`, `B = B[:, kept]` and `α` rescaled so
    /// that `α / r_kept` equals `α / (r + 10⁻⁵)` (an exact PEFT `LoraConfig` adapter).
    pub fn plain_factors(&self) -> (Tensor, Tensor, f64) {
        match &self.lambda {
            None => (self.a.detach(), self.b.detach(), self.alpha),
            Some(l) => {
                let kept = l.detach().view([-1]).ne(0.0).nonzero().view([-1]);
                let a = self.a_eff().detach().index_select(0, &kept);
                let b = self.b.detach().index_select(1, &kept);
                let alpha = self.scaling() * kept.size()[0] as f64;
                (a, b, alpha)
            }
        }
    }

    /// Singular values of `ΔW = s · B A` by the QR-core route, descending (`rank` values).
    pub fn singular_values(&self) -> Vec<f64> {
        if self.rank() == 0 {
            return Vec::new();
        }
        let s = self.scaling();
        tch::no_grad(|| svd::qr_core_svd(&self.b.detach(), &self.a_eff().detach()).values())
            .into_iter()
            .map(|x| x * s)
            .collect()
    }

    /// Resizes to `new_rank` (a grow, or a shrink by `shrink`), keeping the output unchanged (up
    /// to float error, exactly so for an SVD shrink to at least the true rank). See the module
    /// documentation for what happens to the optimizer state.
    pub fn resize(&mut self, new_rank: usize, shrink: Shrink) -> Result<ResizeKind> {
        check_rank(&self.name, new_rank, self.d_in, self.d_out)?;
        let r = self.rank();
        if self.lambda.is_some() && new_rank != r {
            bail!(rankpilot_config::BadInput(format!(
                "{}: a site in AdaLoRA's SVD form keeps its {r} components (its allocator masks them); allowed: rank {r}",
                self.name
            )));
        }
        Ok(if new_rank == r {
            ResizeKind::Unchanged
        } else if new_rank > r {
            tch::no_grad(|| self.grow(new_rank));
            ResizeKind::Grow
        } else {
            match shrink {
                Shrink::Svd => tch::no_grad(|| self.shrink(new_rank)),
                Shrink::Prune => tch::no_grad(|| self.prune(new_rank)),
            }
            ResizeKind::Shrink
        })
    }

    /// Keeps the `k` components with the largest `‖b_i‖·‖a_i‖` (in their order), rescaled by
    /// `c = √(s_r / s_k)`, with their moments and importance averages.
    fn prune(&mut self, k: usize) {
        if k == 0 {
            return self.shrink(0);
        }
        let c = (self.scaling() / scaling(self.alpha, k, self.rslora)).sqrt();
        let term = self.b.detach().norm_scalaropt_dim(2.0, [0i64].as_slice(), false)
            * self.a.detach().norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        let mut order: Vec<(usize, f64)> = Vec::<f64>::try_from(term.to_kind(Kind::Double).to_device(Device::Cpu))
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .collect();
        // Largest terms first; ties keep the earlier component.
        order.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        let mut keep: Vec<i64> = order.iter().take(k).map(|&(i, _)| i as i64).collect();
        keep.sort_unstable();
        let idx = Tensor::from_slice(&keep).to_device(self.a.device());
        let rows = |t: &Tensor| t.index_select(0, &idx);
        let cols = |t: &Tensor| t.index_select(1, &idx);
        if let Some((ma, mb)) = self.adam.take() {
            self.adam = Some((
                Moments { m: rows(&ma.m) * c, v: rows(&ma.v) * (c * c) },
                Moments { m: cols(&mb.m) * c, v: cols(&mb.v) * (c * c) },
            ));
        }
        if let Some((ia, ib)) = self.importance.take() {
            self.importance = Some((
                Importance { i_bar: rows(&ia.i_bar), u_bar: rows(&ia.u_bar) },
                Importance { i_bar: cols(&ib.i_bar), u_bar: cols(&ib.u_bar) },
            ));
        }
        self.a = param(rows(&self.a.detach()) * c);
        self.b = param(cols(&self.b.detach()) * c);
    }

    fn grow(&mut self, new_rank: usize) {
        let r = self.rank();
        let extra = new_rank - r;
        let c = if r == 0 { 1.0 } else { (self.scaling() / scaling(self.alpha, new_rank, self.rslora)).sqrt() };
        let dev = self.a.device();
        let a_old = self.a.detach() * c;
        let new_rows = self.new_directions(&a_old, extra);
        let a = Tensor::cat(&[a_old, new_rows], 0);
        let b = Tensor::cat(
            &[self.b.detach() * c, Tensor::zeros([self.d_out as i64, extra as i64], (Kind::Float, dev))],
            1,
        );
        if let Some((ma, mb)) = self.adam.take() {
            let pad_rows = |t: &Tensor, fill: f64| {
                Tensor::cat(
                    &[t.shallow_clone(), Tensor::full([extra as i64, self.d_in as i64], fill, (Kind::Float, dev))],
                    0,
                )
            };
            let pad_cols = |t: &Tensor, fill: f64| {
                Tensor::cat(
                    &[t.shallow_clone(), Tensor::full([self.d_out as i64, extra as i64], fill, (Kind::Float, dev))],
                    1,
                )
            };
            let mean = |t: &Tensor| {
                if t.numel() == 0 { 0.0 } else { t.mean(Kind::Float).double_value(&[]) }
            };
            let (va, vb) = (&ma.v * (c * c), &mb.v * (c * c));
            self.adam = Some((
                Moments { m: pad_rows(&(&ma.m * c), 0.0), v: pad_rows(&va, mean(&va)) },
                Moments { m: pad_cols(&(&mb.m * c), 0.0), v: pad_cols(&vb, mean(&vb)) },
            ));
        }
        if let Some((ia, ib)) = self.importance.take() {
            let zr = |t: &Tensor| {
                Tensor::cat(
                    &[t.shallow_clone(), Tensor::zeros([extra as i64, self.d_in as i64], (Kind::Float, dev))],
                    0,
                )
            };
            let zc = |t: &Tensor| {
                Tensor::cat(
                    &[t.shallow_clone(), Tensor::zeros([self.d_out as i64, extra as i64], (Kind::Float, dev))],
                    1,
                )
            };
            self.importance = Some((
                Importance { i_bar: zr(&ia.i_bar), u_bar: zr(&ia.u_bar) },
                Importance { i_bar: zc(&ib.i_bar), u_bar: zc(&ib.u_bar) },
            ));
        }
        self.a = param(a);
        self.b = param(b);
    }

    fn shrink(&mut self, k: usize) {
        let dev = self.a.device();
        let s_old = self.scaling();
        if k == 0 {
            self.a = param(Tensor::zeros([0, self.d_in as i64], (Kind::Float, dev)));
            self.b = param(Tensor::zeros([self.d_out as i64, 0], (Kind::Float, dev)));
        } else {
            let s_new = scaling(self.alpha, k, self.rslora);
            let (b, a, full) = svd::squeeze_factors(&self.b.detach(), &self.a.detach(), k, s_old / s_new);
            let sv = Vec::<f64>::try_from(full.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default();
            let tol = sv.first().copied().unwrap_or(0.0) * 1e-6;
            let live = sv.iter().take(k).filter(|&&x| x > tol && x > 0.0).count();
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            let (a, b) = if live < k {
                // Dead components: fresh directions in A, zero columns in B.
                let a_live = a.narrow(0, 0, live as i64);
                let fresh = self.new_directions(&a_live, k - live);
                let b_live = b.narrow(1, 0, live as i64);
                (
                    Tensor::cat(&[a_live, fresh], 0),
                    Tensor::cat(
                        &[b_live, Tensor::zeros([self.d_out as i64, (k - live) as i64], (Kind::Float, dev))],
                        1,
                    ),
                )
            } else {
                (a, b)
            };
            self.a = param(a.contiguous());
            self.b = param(b.contiguous());
        }
        self.adam = None;
        self.adam_steps = 0;
        self.importance = None;
    }

    /// Records the current gradients: the gradient norm and the AdaLoRA importance averages
    /// (`I = |θ·∇θ|`, `Ī ← β₁Ī + (1−β₁)I`, `Ū ← β₂Ū + (1−β₂)|I − Ī|`). Call after `backward`.
    /// Returns `‖∇A‖² + ‖∇B‖²`.
    pub fn observe_gradients(&mut self, update_importance: bool) -> f64 {
        if self.rank() == 0 {
            self.last_grad_norm = 0.0;
            return 0.0;
        }
        tch::no_grad(|| {
            let ga = self.a.grad();
            let gb = self.b.grad();
            if !ga.defined() || !gb.defined() {
                return 0.0;
            }
            let mut sq = (ga.square().sum(Kind::Float) + gb.square().sum(Kind::Float)).double_value(&[]);
            if let Some(l) = &self.lambda {
                let gl = l.grad();
                if gl.defined() {
                    sq += gl.square().sum(Kind::Float).double_value(&[]);
                }
            }
            self.last_grad_norm = sq.sqrt();
            // In SVD form the allocator measures after the optimizer step, as PEFT does.
            if update_importance && self.lambda.is_none() {
                let imp = self
                    .importance
                    .get_or_insert_with(|| (Importance::zeros_like(&self.a), Importance::zeros_like(&self.b)));
                imp.0.observe(&self.a.detach(), &ga);
                imp.1.observe(&self.b.detach(), &gb);
            }
            sq
        })
    }

    /// AdaLoRA importance of the site: the mean of `Ī·Ū` over all entries of `A` and `B`
    /// (0 before any gradient was observed).
    pub fn importance(&self) -> f64 {
        match &self.importance {
            Some((ia, ib)) if self.rank() > 0 => {
                let n = (ia.i_bar.numel() + ib.i_bar.numel()) as f64;
                (ia.score().sum(Kind::Float) + ib.score().sum(Kind::Float)).double_value(&[]) / n
            }
            _ => 0.0,
        }
    }

    /// AdaLoRA's per-component score without the `λ` term: for each rank index `i`,
    /// `mean_j s(A_ij) + mean_j s(B_ji)`.
    pub fn component_importance(&self) -> Vec<f64> {
        match &self.importance {
            Some((ia, ib)) if self.rank() > 0 => {
                let t = ia.score().mean_dim(1, false, Kind::Float) + ib.score().mean_dim(0, false, Kind::Float);
                Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default()
            }
            _ => vec![0.0; self.rank()],
        }
    }

    /// One AdamW step on `A` and `B` (and `Λ` in SVD form; gradients scaled by `grad_scale`,
    /// e.g. for clipping), then clears the gradients. A site without gradients is left alone.
    pub fn adamw_step(&mut self, opt: &AdamW, grad_scale: f64) {
        self.adamw_update(opt, grad_scale);
        self.zero_grad();
    }

    /// [`Lora::adamw_step`] without clearing the gradients (AdaLoRA's allocator reads them after
    /// the step).
    pub fn adamw_update(&mut self, opt: &AdamW, grad_scale: f64) {
        if self.rank() == 0 {
            return;
        }
        tch::no_grad(|| {
            let ga = self.a.grad();
            let gb = self.b.grad();
            if !ga.defined() || !gb.defined() {
                return;
            }
            let st = self.adam.get_or_insert_with(|| (Moments::zeros_like(&self.a), Moments::zeros_like(&self.b)));
            self.adam_steps += 1;
            for (p, g, m) in [(&mut self.a, ga, &mut st.0), (&mut self.b, gb, &mut st.1)] {
                adamw_update(p, &g, m, opt, self.adam_steps, grad_scale);
            }
            if let Some(l) = &mut self.lambda {
                let gl = l.grad();
                if gl.defined() {
                    let m = self.lambda_adam.get_or_insert_with(|| Moments::zeros_like(l));
                    adamw_update(l, &gl, m, opt, self.adam_steps, grad_scale);
                }
            }
        });
    }

    /// Clears the gradients of the site's factors.
    pub fn zero_grad(&mut self) {
        self.a.zero_grad();
        self.b.zero_grad();
        if let Some(l) = &mut self.lambda {
            l.zero_grad();
        }
    }

    /// The site's whole training state for a resumable checkpoint: its counters as JSON, and its
    /// tensors (factors, AdamW moments, importance averages) added to `tensors` under `prefix`.
    pub fn save_state(&self, prefix: &str, tensors: &mut Vec<(String, Tensor)>) -> serde_json::Value {
        let mut put = |k: &str, t: &Tensor| tensors.push((format!("{prefix}.{k}"), t.detach().to_device(Device::Cpu)));
        put("a", &self.a);
        put("b", &self.b);
        if let Some(basis) = &self.input_basis {
            put("input_basis", basis);
        }
        if let Some((ma, mb)) = &self.adam {
            for (k, m) in [("a", ma), ("b", mb)] {
                put(&format!("adam_{k}_m"), &m.m);
                put(&format!("adam_{k}_v"), &m.v);
            }
        }
        if let Some((ia, ib)) = &self.importance {
            for (k, i) in [("a", ia), ("b", ib)] {
                put(&format!("imp_{k}_i"), &i.i_bar);
                put(&format!("imp_{k}_u"), &i.u_bar);
            }
        }
        if let Some(l) = &self.lambda {
            put("lambda", l);
        }
        if let Some(m) = &self.lambda_adam {
            put("adam_lambda_m", &m.m);
            put("adam_lambda_v", &m.v);
        }
        serde_json::json!({
            "name": self.name, "alpha": self.alpha, "rslora": self.rslora, "adam_steps": self.adam_steps,
            "adam": self.adam.is_some(), "importance": self.importance.is_some(),
            "last_grad_norm": self.last_grad_norm, "seed": self.seed, "draws": self.draws,
            "embedding": self.embedding, "input_variance": self.input_variance,
        })
    }

    /// The site [`Lora::save_state`] wrote, on `device`; `None` when a tensor or key is missing.
    pub fn load_state(
        v: &serde_json::Value,
        prefix: &str,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: Device,
    ) -> Option<Lora> {
        let get = |k: &str| tensors.get(&format!("{prefix}.{k}")).map(|t| t.to_device(device));
        let (a, b) = (get("a")?, get("b")?);
        let moments = |k: &str| Some(Moments { m: get(&format!("adam_{k}_m"))?, v: get(&format!("adam_{k}_v"))? });
        let imp = |k: &str| Some(Importance { i_bar: get(&format!("imp_{k}_i"))?, u_bar: get(&format!("imp_{k}_u"))? });
        let mut l = Lora::from_factors(v["name"].as_str()?, a, b, v["alpha"].as_f64()?, v["rslora"].as_bool()?);
        if v["adam"].as_bool()? {
            l.adam = Some((moments("a")?, moments("b")?));
        }
        if v["importance"].as_bool()? {
            l.importance = Some((imp("a")?, imp("b")?));
        }
        l.adam_steps = v["adam_steps"].as_u64()?;
        l.last_grad_norm = v["last_grad_norm"].as_f64()?;
        l.seed = v["seed"].as_u64()?;
        l.draws = v["draws"].as_u64()?;
        l.embedding = v.get("embedding").and_then(|e| e.as_bool()).unwrap_or(false);
        l.input_basis = get("input_basis");
        l.input_variance =
            serde_json::from_value(v.get("input_variance").cloned().unwrap_or_default()).unwrap_or_default();
        l.lambda = get("lambda").map(param);
        l.lambda_adam = moments("lambda");
        Some(l)
    }

    /// An independent copy of the site: factors, optimizer moments and importance averages (to
    /// roll back a round whose update was lost).
    pub fn deep_copy(&self) -> Lora {
        let copy = |t: &Tensor| t.detach().copy();
        Lora {
            name: self.name.clone(),
            d_in: self.d_in,
            d_out: self.d_out,
            alpha: self.alpha,
            rslora: self.rslora,
            a: param(copy(&self.a)),
            b: param(copy(&self.b)),
            adam: self.adam.as_ref().map(|(ma, mb)| {
                (Moments { m: copy(&ma.m), v: copy(&ma.v) }, Moments { m: copy(&mb.m), v: copy(&mb.v) })
            }),
            adam_steps: self.adam_steps,
            importance: self.importance.as_ref().map(|(ia, ib)| {
                (
                    Importance { i_bar: copy(&ia.i_bar), u_bar: copy(&ia.u_bar) },
                    Importance { i_bar: copy(&ib.i_bar), u_bar: copy(&ib.u_bar) },
                )
            }),
            last_grad_norm: self.last_grad_norm,
            dropout: self.dropout,
            seed: self.seed,
            embedding: self.embedding,
            input_basis: self.input_basis.as_ref().map(|b| b.shallow_clone()),
            input_variance: self.input_variance.clone(),
            captured_inputs: std::cell::RefCell::new(None),
            lambda: self.lambda.as_ref().map(|l| param(copy(l))),
            lambda_adam: self.lambda_adam.as_ref().map(|m| Moments { m: copy(&m.m), v: copy(&m.v) }),
            draws: self.draws,
        }
    }

    /// Optimizer steps taken since creation or the last reset (shrink).
    pub fn adam_steps(&self) -> u64 {
        self.adam_steps
    }

    /// Moves the factors (and any state) to `device`.
    pub fn to_device(&mut self, device: Device) {
        self.a = param(self.a.to_device(device));
        self.b = param(self.b.to_device(device));
        self.lambda = self.lambda.take().map(|l| param(l.to_device(device)));
        if let Some(m) = self.lambda_adam.take() {
            self.lambda_adam = Some(Moments { m: m.m.to_device(device), v: m.v.to_device(device) });
        }
        if let Some((ma, mb)) = self.adam.take() {
            self.adam = Some((
                Moments { m: ma.m.to_device(device), v: ma.v.to_device(device) },
                Moments { m: mb.m.to_device(device), v: mb.v.to_device(device) },
            ));
        }
        if let Some((ia, ib)) = self.importance.take() {
            self.importance = Some((
                Importance { i_bar: ia.i_bar.to_device(device), u_bar: ia.u_bar.to_device(device) },
                Importance { i_bar: ib.i_bar.to_device(device), u_bar: ib.u_bar.to_device(device) },
            ));
        }
    }
}

/// Errors unless `rank ≤ min(d_in, d_out)`.
pub fn check_rank(name: &str, rank: usize, d_in: usize, d_out: usize) -> Result<()> {
    if rank > d_in.min(d_out) {
        bail!(rankpilot_config::BadInput(format!(
            "{name}: rank {rank} exceeds min(d_in, d_out) = min({d_in}, {d_out}) = {}",
            d_in.min(d_out)
        )));
    }
    Ok(())
}

/// FNV-1a hash of a site name (mixes the site into its generator's seed).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Lora {
    /// A `shape` tensor drawn from `N(0, std²)` by the site's own ChaCha8 generator (seed, draw
    /// counter), as [`Lora::kaiming_rows`].
    fn normal(&mut self, shape: &[usize], std: f64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_add(self.draws.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        self.draws += 1;
        let dist = rand_distr::Normal::new(0.0, std).expect("a finite, positive spread");
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng) as f32).collect();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(&v).view(dims.as_slice()).to_device(self.a.device())
    }

    /// `rows × in` drawn from `U(±1/√in)` (PEFT's Kaiming-uniform with `a = √5`) by the site's
    /// own ChaCha8 generator (seed, draw counter).
    fn kaiming_rows(&mut self, rows: usize) -> Tensor {
        use rand::{Rng, SeedableRng};
        let cols = self.d_in;
        // Kaiming-uniform as PEFT's Linear; unit variance (±√3) for a one-hot embedding input.
        let bound = if self.embedding { 3f64.sqrt() } else { 1.0 / (cols as f64).sqrt() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_add(self.draws.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        self.draws += 1;
        let v: Vec<f32> = (0..rows * cols).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
        Tensor::from_slice(&v).view([rows as i64, cols as i64]).to_device(self.a.device())
    }

    /// With an input basis (EVA): its leading directions not yet in the row space of `existing`
    /// (each taken in order of explained variance when at least half of it lies outside that
    /// space, then projected off it and normalised to unit length, as EVA's rows are). `None`
    /// without a basis, or when it has fewer than `extra` such directions left; a grow then
    /// draws random ones.
    fn basis_directions(&self, existing: &Tensor, extra: usize) -> Option<Tensor> {
        let basis = self.input_basis.as_ref()?.to_device(existing.device());
        let q = (existing.size()[0] > 0).then(|| Tensor::linalg_qr(&existing.tr(), "reduced").0);
        let mut picked: Vec<Tensor> = Vec::with_capacity(extra);
        for i in 0..basis.size()[0] {
            if picked.len() == extra {
                break;
            }
            let mut row = basis.get(i).unsqueeze(0);
            if let Some(q) = &q {
                row = &row - row.matmul(q).matmul(&q.tr());
            }
            for p in &picked {
                row = &row - row.matmul(&p.tr()).matmul(p);
            }
            let norm = row.norm().double_value(&[]);
            if norm >= 0.5 {
                picked.push(row / norm);
            }
        }
        (picked.len() == extra).then(|| Tensor::cat(&picked, 0))
    }

    /// Starts a fresh site (`B = 0`) from the principal directions of its inputs, EVA's
    /// initialisation: `A` = the first `rank` rows of `basis` (`[k, in]`, unit rows by explained
    /// variance), and later grows continue down the basis. The output is unchanged (`B = 0`).
    pub fn init_from_basis(&mut self, basis: Tensor) -> Result<()> {
        let r = self.rank();
        if basis.size().len() != 2 || basis.size()[1] as usize != self.d_in {
            bail!("{}: input basis {:?} does not fit in-features {}", self.name, basis.size(), self.d_in);
        }
        if self.b.numel() > 0 && self.b.abs().max().double_value(&[]) != 0.0 {
            bail!("{}: EVA initialisation needs a fresh site (B = 0)", self.name);
        }
        let basis = basis.to_kind(Kind::Float).to_device(self.a.device());
        if r > 0 {
            let k = (basis.size()[0] as usize).min(r);
            let head = basis.narrow(0, 0, k as i64);
            let a = if k < r {
                let rest = tch::no_grad(|| self.new_directions(&head, r - k));
                Tensor::cat(&[head, rest], 0)
            } else {
                head
            };
            self.a = param(a);
        }
        self.input_basis = Some(basis);
        Ok(())
    }

    /// `extra` rows like [`Lora::kaiming_rows`], projected off the row space of `existing` and
    /// rescaled to their original norms: new directions that do not duplicate what `A` spans.
    fn new_directions(&mut self, existing: &Tensor, extra: usize) -> Tensor {
        let cols = self.d_in;
        if let Some(rows) = self.basis_directions(existing, extra) {
            return rows;
        }
        let fresh = self.kaiming_rows(extra);
        if existing.size()[0] == 0 || existing.size()[0] as usize + extra > cols {
            return fresh;
        }
        let norms = fresh.norm_scalaropt_dim(2, [1], true);
        let (q, _) = Tensor::linalg_qr(&existing.tr(), "reduced"); // [cols, r]
        let projected = &fresh - fresh.matmul(&q).matmul(&q.tr());
        let pn = projected.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        projected / pn * norms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).to_kind(Kind::Double).norm().double_value(&[]);
        d / b.to_kind(Kind::Double).norm().double_value(&[]).max(1e-30)
    }

    fn trained_site(rank: usize, true_rank: usize, rslora: bool) -> Lora {
        tch::manual_seed(5);
        let mut l = Lora::new(
            "model.layers.0.self_attn.q_proj",
            (48, 40),
            rank,
            LoraInit { alpha: 16.0, rslora, seed: 0 },
            Device::Cpu,
        )
        .unwrap();
        // A "trained" B whose product with A has rank `true_rank`.
        let b = Tensor::randn([40, true_rank as i64], (Kind::Float, Device::Cpu))
            .matmul(&Tensor::randn([true_rank as i64, rank as i64], (Kind::Float, Device::Cpu)))
            * 0.1;
        l.b = param(b);
        l
    }

    fn out(l: &Lora, x: &Tensor) -> Tensor {
        tch::no_grad(|| l.forward(x).unwrap())
    }

    #[test]
    fn grow_and_shrink_leave_output_unchanged() {
        for rslora in [false, true] {
            let x = Tensor::randn([7, 48], (Kind::Float, Device::Cpu));
            let mut l = trained_site(8, 3, rslora);
            let y0 = out(&l, &x);
            assert_eq!(l.resize(16, Shrink::Svd).unwrap(), ResizeKind::Grow);
            assert_eq!(l.rank(), 16);
            assert!(rel(&out(&l, &x), &y0) < 1e-5, "grow");
            // New rows are orthogonal to the old ones.
            let ov = l.a.narrow(0, 0, 8).matmul(&l.a.narrow(0, 8, 8).tr()).abs().max().double_value(&[]);
            assert!(ov < 1e-4, "{ov}");
            for k in [6, 3] {
                assert_eq!(l.resize(k, Shrink::Svd).unwrap(), ResizeKind::Shrink);
                assert_eq!((l.a.size(), l.b.size()), (vec![k as i64, 48], vec![40, k as i64]));
                assert!(rel(&out(&l, &x), &y0) < 1e-5, "shrink to {k} (rslora {rslora})");
            }
            // Below the true rank: the best rank-2 approximation.
            let sv = l.singular_values();
            l.resize(2, Shrink::Svd).unwrap();
            let err = rel(&l.delta_weight(), &Tensor::zeros([1], (Kind::Float, Device::Cpu)));
            assert!(err > 0.0);
            let kept: f64 = l.singular_values().iter().map(|x| x * x).sum();
            let expect: f64 = sv[..2].iter().map(|x| x * x).sum();
            assert!((kept - expect).abs() < 1e-4 * expect);
        }
    }

    #[test]
    fn shrinking_a_fresh_adapter_keeps_it_trainable() {
        tch::manual_seed(1);
        let mut l = Lora::new("m", (16, 16), 8, LoraInit { alpha: 8.0, rslora: false, seed: 0 }, Device::Cpu).unwrap();
        l.resize(4, Shrink::Svd).unwrap();
        assert_eq!(l.rank(), 4);
        assert!(l.a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "A must not be all zero");
        assert_eq!(l.b.abs().sum(Kind::Float).double_value(&[]), 0.0);
        l.resize(0, Shrink::Svd).unwrap();
        assert!(l.forward(&Tensor::ones([1, 16], (Kind::Float, Device::Cpu))).is_none());
        l.resize(2, Shrink::Svd).unwrap();
        assert_eq!(l.rank(), 2);
    }

    #[test]
    fn rank_above_min_dim_is_rejected() {
        let e = Lora::new(
            "model.layers.0.mlp.down_proj",
            (16, 8),
            9,
            LoraInit { alpha: 8.0, rslora: false, seed: 0 },
            Device::Cpu,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exceeds min(d_in, d_out)"), "{e}");
        assert!(e.is::<rankpilot_config::BadInput>());
    }

    #[test]
    fn adamw_and_importance_track_gradients_and_survive_resizes() {
        let mut l = trained_site(4, 4, false);
        let x = Tensor::randn([5, 48], (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            let loss = l.forward(&x).unwrap().square().mean(Kind::Float);
            loss.backward();
            assert!(l.observe_gradients(true) > 0.0);
            l.adamw_step(&AdamW::default(), 1.0);
        }
        assert!(l.importance() > 0.0);
        assert_eq!(l.component_importance().len(), 4);
        l.resize(6, Shrink::Svd).unwrap();
        assert_eq!(l.adam_steps(), 3);
        assert_eq!(l.component_importance().len(), 6);
        let loss = l.forward(&x).unwrap().square().mean(Kind::Float);
        loss.backward();
        l.observe_gradients(true);
        l.adamw_step(&AdamW::default(), 1.0);
        l.resize(2, Shrink::Svd).unwrap();
        assert_eq!(l.adam_steps(), 0);
        assert_eq!(l.importance(), 0.0);
    }

    #[test]
    fn prune_keeps_the_largest_terms_their_directions_and_their_optimizer_state() {
        // Components with known term sizes ‖b_i‖·‖a_i‖: B's columns scaled 1, 5, 2, 4, 3.
        let mut l = trained_site(5, 5, false);
        let weights = Tensor::from_slice(&[1f32, 5., 2., 4., 3.]);
        let b = Tensor::randn([40, 5], (Kind::Float, Device::Cpu));
        let b = &b / b.norm_scalaropt_dim(2, [0], true) * &weights;
        let a = l.a.detach();
        let a = &a / a.norm_scalaropt_dim(2, [1], true);
        l.a = param(a.copy());
        l.b = param(b.copy());
        let x = Tensor::randn([5, 48], (Kind::Float, Device::Cpu));
        for _ in 0..2 {
            let loss = l.forward(&x).unwrap().square().mean(Kind::Float);
            loss.backward();
            l.observe_gradients(true);
            l.adamw_update(&AdamW { lr: 0.0, weight_decay: 0.0, ..AdamW::default() }, 1.0);
            l.zero_grad();
        }
        let (m_a, v_b) = {
            let (ma, mb) = l.adam.as_ref().unwrap();
            (ma.m.copy(), mb.v.copy())
        };
        let keep = Tensor::from_slice(&[1i64, 3, 4]); // the three largest terms, in their order
        let expected = l.b.detach().index_select(1, &keep).matmul(&l.a.detach().index_select(0, &keep)) * l.scaling();
        assert_eq!(l.resize(3, Shrink::Prune).unwrap(), ResizeKind::Shrink);
        assert_eq!(l.rank(), 3);
        // The kept terms are unchanged (the rescaling c = √(s_5/s_3) cancels against s_3).
        assert!(rel(&(l.b.detach().matmul(&l.a.detach()) * l.scaling()), &expected) < 1e-6);
        // Each kept row of A points where it pointed.
        let c = (scaling(16.0, 5, false) / scaling(16.0, 3, false)).sqrt();
        assert!(rel(&l.a.detach(), &(a.index_select(0, &keep) * c)) < 1e-6);
        // The optimizer state is the kept entries', rescaled like the parameters; the step count
        // and the importance averages go on.
        assert_eq!(l.adam_steps(), 2);
        let (ma, mb) = l.adam.as_ref().unwrap();
        assert!(rel(&ma.m, &(m_a.index_select(0, &keep) * c)) < 1e-6);
        assert!(rel(&mb.v, &(v_b.index_select(1, &keep) * (c * c))) < 1e-6);
        assert_eq!(l.component_importance().len(), 3);
        assert!(l.importance() > 0.0);
        // The SVD shrink of the same site restarts the state instead.
        l.resize(2, Shrink::Svd).unwrap();
        assert_eq!(l.adam_steps(), 0);
    }
}
