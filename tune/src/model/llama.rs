//! A Llama-architecture decoder (RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query
//! attention) and the families built on it (Llama 1–3.x, Mistral, Qwen2/2.5, Qwen3: one forward
//! pass, the differences are the named switches of [`Architecture`]) in the Hugging Face layout: `config.json` + `model.safetensors` (or sharded
//! `model.safetensors.index.json`), tensor names as in `transformers`' `LlamaForCausalLM`
//! (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`, …, `model.norm.weight`,
//! `lm_head.weight`), so real checkpoints load and ours load in `transformers`.
//!
//! Each of the seven projections (`q/k/v/o_proj`, `gate/up/down_proj`), the token embedding and
//! the head may carry a LoRA site ([`crate::lora::Lora`]) added on top of the frozen weight. This file is the architecture and
//! its forward pass; the hyper-parameters are in [`crate::model::config`], reading and writing
//! the weights in [`crate::model::weights`].

use anyhow::{Result, bail};
use rankpilot_config::BadInput;
use tch::{Device, Kind, Tensor, nn};

use crate::lora::Lora;
pub use crate::model::config::{Architecture, Family, LlamaConfig, RopeScaling};
use crate::model::{Projection, Target};

/// A frozen projection weight `[out, in]` (and bias, where the family has one) with an optional
/// LoRA site.
#[derive(Debug)]
pub struct Proj {
    /// The base weight.
    pub weight: Tensor,
    /// The base bias `[out]` (Qwen2's q/k/v, Llama's `attention_bias` / `mlp_bias`).
    pub bias: Option<Tensor>,
    /// The adapter, if this projection is adapted.
    pub lora: Option<Lora>,
}

impl Proj {
    /// `W x + b (+ s · B A x)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match self.lora.as_ref().and_then(|l| l.forward(x)) {
            Some(d) => y + d,
            None => y,
        }
    }
}

/// One decoder layer.
#[derive(Debug)]
pub struct Block {
    /// RMSNorm weight before attention.
    pub input_layernorm: Tensor,
    /// Query projection.
    pub q_proj: Proj,
    /// Key projection.
    pub k_proj: Proj,
    /// Value projection.
    pub v_proj: Proj,
    /// Output projection.
    pub o_proj: Proj,
    /// RMSNorm weights `[head_dim]` applied to every query and key head before RoPE (Qwen3).
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// The attention span of this layer (`None`: full causal; Mistral, Qwen sliding layers).
    pub sliding_window: Option<usize>,
    /// RMSNorm weight before the MLP.
    pub post_attention_layernorm: Tensor,
    /// SwiGLU gate.
    pub gate_proj: Proj,
    /// SwiGLU up projection.
    pub up_proj: Proj,
    /// SwiGLU down projection.
    pub down_proj: Proj,
}

impl Block {
    /// The projection `p`.
    pub fn proj_mut(&mut self, p: Projection) -> &mut Proj {
        match p {
            Projection::Q => &mut self.q_proj,
            Projection::K => &mut self.k_proj,
            Projection::V => &mut self.v_proj,
            Projection::O => &mut self.o_proj,
            Projection::Gate => &mut self.gate_proj,
            Projection::Up => &mut self.up_proj,
            Projection::Down => &mut self.down_proj,
        }
    }

    /// The projection `p`.
    pub fn proj(&self, p: Projection) -> &Proj {
        match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }
}

/// `LlamaForCausalLM`: embeddings, decoder layers, final norm, language-model head.
#[derive(Debug)]
pub struct Llama {
    /// Hyper-parameters.
    pub cfg: LlamaConfig,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// The decoder layers.
    pub layers: Vec<Block>,
    /// `model.norm.weight`.
    pub norm: Tensor,
    /// `lm_head.weight` (the embedding matrix itself when tied).
    pub lm_head: Tensor,
    /// A LoRA site on the token embedding (`model.embed_tokens`, PEFT's `lora.Embedding`).
    pub embed_lora: Option<Lora>,
    /// A LoRA site on `lm_head` (its own, also when the weights are tied).
    pub lm_head_lora: Option<Lora>,
}

fn sub<'a>(root: &nn::Path<'a>, dotted: &str) -> (nn::Path<'a>, String) {
    let parts: Vec<&str> = dotted.split('.').collect();
    let mut p = root.clone();
    for s in &parts[..parts.len() - 1] {
        p = &p / *s;
    }
    (p, parts[parts.len() - 1].to_string())
}

impl Llama {
    /// A model with fresh weights in `vs` (normal(0, 0.02) matrices, unit norms) named as in the
    /// HF layout.
    pub fn new(vs: &nn::Path, cfg: &LlamaConfig) -> Llama {
        Self::build(vs, cfg, nn::Init::Randn { mean: 0.0, stdev: 0.02 }, nn::Init::Const(1.0))
    }

    /// The variables of a model, filled with `init` (matrices) and `norm_init` (norm weights).
    pub(crate) fn build(vs: &nn::Path, cfg: &LlamaConfig, init: nn::Init, norm_init: nn::Init) -> Llama {
        let var = |name: &str, dims: &[usize], init: nn::Init| {
            let (p, leaf) = sub(vs, name);
            let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            p.var(&leaf, &dims, init)
        };
        let h = cfg.hidden_size;
        let embed_tokens = var("model.embed_tokens.weight", &[cfg.vocab_size, h], init);
        let proj = |l: usize, p: Projection| {
            let (i, o) = cfg.projection_shape(p);
            let name = p.module_name(l);
            Proj {
                weight: var(&format!("{name}.weight"), &[o, i], init),
                // transformers initialises biases to zero.
                bias: cfg.arch.has_bias(p).then(|| var(&format!("{name}.bias"), &[o], nn::Init::Const(0.0))),
                lora: None,
            }
        };
        let hd = cfg.head_dim;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Block {
                input_layernorm: var(&format!("model.layers.{l}.input_layernorm.weight"), &[h], norm_init),
                q_proj: proj(l, Projection::Q),
                k_proj: proj(l, Projection::K),
                v_proj: proj(l, Projection::V),
                o_proj: proj(l, Projection::O),
                qk_norm: cfg.arch.qk_norm.then(|| {
                    (
                        var(&format!("model.layers.{l}.self_attn.q_norm.weight"), &[hd], norm_init),
                        var(&format!("model.layers.{l}.self_attn.k_norm.weight"), &[hd], norm_init),
                    )
                }),
                sliding_window: cfg.arch.window(l),
                post_attention_layernorm: var(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                    norm_init,
                ),
                gate_proj: proj(l, Projection::Gate),
                up_proj: proj(l, Projection::Up),
                down_proj: proj(l, Projection::Down),
            })
            .collect();
        let norm = var("model.norm.weight", &[h], norm_init);
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            var("lm_head.weight", &[cfg.vocab_size, h], init)
        };
        Llama { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, embed_lora: None, lm_head_lora: None }
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().unwrap_or((1, ids.size()[ids.dim() - 1]));
        let kind = self.embed_tokens.kind();
        let (cos, sin) = rope_tables(&self.cfg, t, ids.device(), kind);
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        if let Some(d) = self.embed_lora.as_ref().and_then(|l| l.forward_ids(ids, kind)) {
            x += d;
        }
        for layer in &self.layers {
            let h =
                &x + self.attention(layer, &rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps), &cos, &sin);
            let n = rms_norm(&h, &layer.post_attention_layernorm, self.cfg.rms_norm_eps);
            let mlp = layer.down_proj.forward(&(layer.gate_proj.forward(&n).silu() * layer.up_proj.forward(&n)));
            x = h + mlp;
        }
        let h = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps);
        let logits = h.linear(&self.lm_head, None::<Tensor>);
        match self.lm_head_lora.as_ref().and_then(|l| l.forward(&h)) {
            Some(d) => logits + d,
            None => logits,
        }
    }

    /// The shape `(d_in, d_out)` a site on `target` has (`(vocab, hidden)` for the embedding,
    /// whose input is the one-hot token).
    pub fn target_shape(&self, target: Target) -> (usize, usize) {
        match target {
            Target::EmbedTokens => (self.cfg.vocab_size, self.cfg.hidden_size),
            Target::LmHead => (self.cfg.hidden_size, self.cfg.vocab_size),
            Target::Layer(p) => self.cfg.projection_shape(p),
        }
    }

    /// Every site's module name, target and layer, in [`Llama::sites`] order (whether or not a
    /// site is attached there).
    pub fn site_modules(&self, targets: &[Target]) -> Vec<(String, Target)> {
        let mut out = Vec::new();
        if targets.contains(&Target::EmbedTokens) {
            out.push((Target::EMBED_MODULE.to_string(), Target::EmbedTokens));
        }
        for l in 0..self.cfg.num_hidden_layers {
            for p in Projection::ALL {
                if targets.contains(&Target::Layer(p)) {
                    out.push((p.module_name(l), Target::Layer(p)));
                }
            }
        }
        if targets.contains(&Target::LmHead) {
            out.push((Target::HEAD_MODULE.to_string(), Target::LmHead));
        }
        out
    }

    /// The slot for the site on `module` (`model.layers.N.<group>.<proj>`, `model.embed_tokens`,
    /// `lm_head`), or `None` when the model has no such module.
    pub fn site_slot(&mut self, module: &str) -> Option<(Target, &mut Option<Lora>)> {
        match module {
            Target::EMBED_MODULE => return Some((Target::EmbedTokens, &mut self.embed_lora)),
            Target::HEAD_MODULE => return Some((Target::LmHead, &mut self.lm_head_lora)),
            _ => {}
        }
        let n = self.cfg.num_hidden_layers;
        let (l, p) = (0..n)
            .flat_map(|l| Projection::ALL.into_iter().map(move |p| (l, p)))
            .find(|(l, p)| p.module_name(*l) == module)?;
        Some((Target::Layer(p), &mut self.layers[l].proj_mut(p).lora))
    }

    fn attention(&self, l: &Block, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, t, _) = x.size3().expect("[batch, seq, hidden]");
        let (nh, nkv, hd) =
            (self.cfg.num_attention_heads as i64, self.cfg.num_key_value_heads as i64, self.cfg.head_dim as i64);
        let mut q = l.q_proj.forward(x).view([b, t, nh, hd]);
        let mut k = l.k_proj.forward(x).view([b, t, nkv, hd]);
        if let Some((q_norm, k_norm)) = &l.qk_norm {
            q = rms_norm(&q, q_norm, self.cfg.rms_norm_eps);
            k = rms_norm(&k, k_norm, self.cfg.rms_norm_eps);
        }
        let q = q.transpose(1, 2);
        let k = k.transpose(1, 2);
        let v = l.v_proj.forward(x).view([b, t, nkv, hd]).transpose(1, 2);
        let q = apply_rope(&q, cos, sin);
        let k = apply_rope(&k, cos, sin);
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None))
        } else {
            (k, v)
        };
        let y = match l.sliding_window.filter(|&w| (w as i64) < t) {
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false),
            // Query i sees keys j with i − w < j ≤ i (transformers' sliding-window mask).
            Some(w) => {
                let pos = Tensor::arange(t, (Kind::Int64, x.device()));
                let lag = pos.unsqueeze(1) - pos.unsqueeze(0);
                let mask = lag.ge(0).logical_and(&lag.lt(w as i64));
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, false)
            }
        };
        l.o_proj.forward(&y.transpose(1, 2).reshape([b, t, nh * hd]))
    }

    /// Mean next-token cross-entropy of `batch` (`[b, seq + 1]` ids: inputs are all but the last
    /// column, targets all but the first).
    pub fn loss(&self, batch: &Tensor) -> Tensor {
        let t = batch.size()[1];
        let inputs = batch.narrow(1, 0, t - 1);
        let targets = batch.narrow(1, 1, t - 1);
        let logits = self.forward(&inputs);
        let v = logits.size()[2];
        logits.view([-1, v]).to_kind(Kind::Float).cross_entropy_for_logits(&targets.reshape([-1]))
    }

    /// [`Llama::loss`] over the targets `mask` marks (`[b, seq + 1]` booleans, as the batch; the
    /// first column is never a target): transformers' loss with `labels = -100` elsewhere.
    /// `None` counts every target. A batch without targets has loss 0.
    pub fn masked_loss(&self, batch: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let Some(mask) = mask else { return self.loss(batch) };
        let t = batch.size()[1];
        let inputs = batch.narrow(1, 0, t - 1);
        let targets = batch.narrow(1, 1, t - 1).reshape([-1]);
        let keep = mask.narrow(1, 1, t - 1).reshape([-1]).to_kind(Kind::Float);
        let logits = self.forward(&inputs);
        let v = logits.size()[2];
        let nll = logits
            .view([-1, v])
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .gather(1, &targets.unsqueeze(1), false)
            .squeeze_dim(1)
            .neg();
        (nll * &keep).sum(Kind::Float) / keep.sum(Kind::Float).clamp_min(1.0)
    }

    /// Puts the sites of a PEFT adapter on the matching projections (on the model's device);
    /// modules that are not projections of this model, or whose shapes differ, are an error.
    pub fn attach_adapter(&mut self, adapter: &crate::peft::PeftAdapter) -> Result<()> {
        let device = self.embed_tokens.device();
        for site in &adapter.sites {
            let Some((target, _)) = self.site_slot(&site.module) else {
                bail!(BadInput(format!(
                    "{}: module `{}` is not a projection, `lm_head` or `model.embed_tokens` of this Llama model",
                    adapter.dir.display(),
                    site.module
                )));
            };
            if site.embedding != (target == Target::EmbedTokens) {
                bail!(BadInput(format!(
                    "{}: `{}` has {} factors: allowed: `lora_embedding_A`/`_B` on `model.embed_tokens`, \
                     `lora_A.weight`/`lora_B.weight` elsewhere",
                    adapter.dir.display(),
                    site.module,
                    if site.embedding { "embedding" } else { "linear" }
                )));
            }
            let (d_in, d_out) = self.target_shape(target);
            if site.a.size()[1] as usize != d_in || site.b.size()[0] as usize != d_out {
                bail!(BadInput(format!(
                    "{}: `{}` has lora_A {:?} / lora_B {:?}, the model's projection is {d_in}→{d_out}",
                    adapter.dir.display(),
                    site.module,
                    site.a.size(),
                    site.b.size()
                )));
            }
            crate::lora::check_rank(&site.module, site.rank(), d_in, d_out)?;
            let mut lora = Lora::from_factors(
                &site.module,
                site.a.to_device(device),
                site.b.to_device(device),
                site.alpha,
                adapter.rslora,
            );
            lora.embedding = site.embedding;
            *self.site_slot(&site.module).expect("found above").1 = Some(lora);
        }
        for (name, t) in &adapter.other {
            let value = self.saved_module_value(adapter, name, t)?;
            *self.param_mut(&crate::peft::base_name(name)).expect("checked") = value;
        }
        Ok(())
    }

    /// The value of a `modules_to_save` tensor of `adapter` on this model's device and dtype,
    /// after checking that it replaces a parameter of the same shape. Anything else in the file
    /// is refused, never dropped.
    pub fn saved_module_value(&mut self, adapter: &crate::peft::PeftAdapter, name: &str, t: &Tensor) -> Result<Tensor> {
        let file = adapter.dir.join(crate::peft::WEIGHTS_FILE);
        let base = crate::peft::base_name(name);
        let Some(current) = self.param_mut(&base) else {
            bail!(BadInput(format!(
                "{}: tensor `{name}` is neither a LoRA factor nor a parameter of this model (`modules_to_save` \
                 must name modules such as lm_head, embed_tokens or a norm)",
                file.display()
            )));
        };
        if current.size() != t.size() {
            bail!(BadInput(format!(
                "{}: `{name}` has shape {:?}, the model's `{base}` is {:?}",
                file.display(),
                t.size(),
                current.size()
            )));
        }
        if !matches!(t.kind(), Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
            bail!(BadInput(format!("{}: `{name}` has dtype {:?}: allowed: a float type", file.display(), t.kind())));
        }
        if t.isfinite().all().int64_value(&[]) != 1 {
            bail!(BadInput(format!(
                "{}: `{name}` holds NaN or infinite values: allowed: finite weights",
                file.display()
            )));
        }
        Ok(t.to_device(current.device()).to_kind(current.kind()))
    }

    /// The base parameter with Hugging Face name `name` (`lm_head.weight`,
    /// `model.layers.3.input_layernorm.weight`, …), to replace it (PEFT's `modules_to_save`).
    /// With tied embeddings, replacing one of `embed_tokens` / `lm_head` unties them, as PEFT's
    /// copy does.
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match name {
            "model.embed_tokens.weight" => return Some(&mut self.embed_tokens),
            "lm_head.weight" => return Some(&mut self.lm_head),
            "model.norm.weight" => return Some(&mut self.norm),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (l, rest) = rest.split_once('.')?;
        let layer = self.layers.get_mut(l.parse::<usize>().ok()?)?;
        match rest {
            "input_layernorm.weight" => return Some(&mut layer.input_layernorm),
            "post_attention_layernorm.weight" => return Some(&mut layer.post_attention_layernorm),
            "self_attn.q_norm.weight" => return layer.qk_norm.as_mut().map(|n| &mut n.0),
            "self_attn.k_norm.weight" => return layer.qk_norm.as_mut().map(|n| &mut n.1),
            _ => {}
        }
        let (module, leaf) = rest.rsplit_once('.')?;
        let p = Projection::ALL.into_iter().find(|p| module == format!("{}.{}", p.group(), p.name()))?;
        let proj = layer.proj_mut(p);
        match leaf {
            "weight" => Some(&mut proj.weight),
            "bias" => proj.bias.as_mut(),
            _ => None,
        }
    }

    /// Every site: the embedding's, then layer by layer in [`Projection::ALL`] order, then the
    /// head's (the order of the forward pass).
    pub fn sites(&self) -> Vec<&Lora> {
        let layers =
            self.layers.iter().flat_map(|l| Projection::ALL.iter().filter_map(move |&p| l.proj(p).lora.as_ref()));
        self.embed_lora.iter().chain(layers).chain(self.lm_head_lora.iter()).collect()
    }

    /// Mutable access to every site, in [`Llama::sites`] order.
    pub fn sites_mut(&mut self) -> Vec<&mut Lora> {
        let mut out: Vec<&mut Lora> = self.embed_lora.iter_mut().collect();
        for l in self.layers.iter_mut() {
            let Block { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, .. } = l;
            // Field by field, in Projection::ALL order (the borrows must be disjoint).
            for p in [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] {
                if let Some(s) = p.lora.as_mut() {
                    out.push(s);
                }
            }
        }
        out.extend(self.lm_head_lora.iter_mut());
        out
    }
}

/// RMSNorm as in `transformers`: normalise in `f32`, cast back, then scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    weight * (xf * (var + eps).rsqrt()).to_kind(kind)
}

/// RoPE's inverse frequencies `θ^(-2i/d)`, `[head_dim / 2]` in `f32`, scaled as the config says.
pub fn rope_inv_freq(cfg: &LlamaConfig, device: Device) -> Tensor {
    let hd = cfg.head_dim as i64;
    let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::from(cfg.rope_theta as f32).to_device(device).pow(&exponents).reciprocal();
    match cfg.arch.rope_scaling {
        RopeScaling::Default => inv_freq,
        // Llama 3.1: wavelengths longer than the pre-training context / low_freq_factor are
        // slowed by `factor`, those shorter than context / high_freq_factor kept, and the band
        // between blended linearly in context / wavelength.
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let context = original_max_position_embeddings as f64;
            let wavelen = (inv_freq.ones_like() * (2.0 * std::f64::consts::PI)) / &inv_freq;
            let scaled = inv_freq.where_self(&wavelen.le(context / low_freq_factor), &(&inv_freq / factor));
            let smooth =
                ((wavelen.ones_like() * context) / &wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let blended: Tensor = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(context / high_freq_factor).logical_and(&wavelen.le(context / low_freq_factor));
            blended.where_self(&medium, &scaled)
        }
    }
}

/// `cos`, `sin` tables `[seq, head_dim]` (frequencies repeated twice, HF's "rotate_half" layout),
/// computed in `f32` and cast to `kind`.
pub fn rope_tables(cfg: &LlamaConfig, seq: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
    let inv_freq = rope_inv_freq(cfg, device);
    let pos = Tensor::arange(seq, (Kind::Float, device));
    let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], 1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.size()[3];
    let x1 = x.narrow(3, 0, hd / 2);
    let x2 = x.narrow(3, hd / 2, hd / 2);
    let rotated = Tensor::cat(&[-x2, x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            arch: Architecture::default(),
        }
    }

    #[test]
    fn save_load_round_trip_and_causality() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Llama::new(&vs.root(), &small());
        let dir = tempfile::tempdir().unwrap();
        m.save(&vs, dir.path()).unwrap();
        let (m2, _vs2) = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(m2.cfg, m.cfg);
        let ids = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2]).view([1, 6]);
        let a = tch::no_grad(|| m.forward(&ids));
        let b = tch::no_grad(|| m2.forward(&ids));
        assert!(a.allclose(&b, 0.0, 0.0, false));
        // Changing a later token leaves earlier logits alone.
        let ids2 = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 60]).view([1, 6]);
        let c = tch::no_grad(|| m.forward(&ids2));
        assert!(a.narrow(1, 0, 5).allclose(&c.narrow(1, 0, 5), 1e-6, 1e-6, false));
        assert_eq!(small().num_params(), vs.variables().values().map(|t| t.numel()).sum::<usize>());
    }

    #[test]
    fn bad_configs_and_weights_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        let mut cfg = small().to_hf_json();
        cfg.as_object_mut().unwrap().remove("hidden_size");
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("`hidden_size`"), "{e}");
        let mut cfg = small().to_hf_json();
        cfg["num_key_value_heads"] = 3.into();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut cfg = small().to_hf_json();
        cfg["model_type"] = "gpt2".into();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        assert!(Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string().contains("gpt2"));
        // Weights that do not fit the config.
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Llama::new(&vs.root(), &small());
        m.save(&vs, dir.path()).unwrap();
        let mut cfg = small();
        cfg.intermediate_size = 40;
        std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string()).unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
        assert!(e.to_string().contains("has shape"), "{e}");
        assert!(e.is::<BadInput>());
        let mut cfg = small();
        cfg.num_hidden_layers = 3;
        std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string()).unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("missing tensor") && e.contains("model.layers.2"), "{e}");
        cfg.num_hidden_layers = 1;
        std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string()).unwrap();
        let e = Llama::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
        assert!(e.contains("unexpected tensor") && e.contains("model.layers.1"), "{e}");
    }
}
