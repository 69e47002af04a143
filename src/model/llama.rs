//! A Llama-architecture decoder (RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query
//! attention) in the Hugging Face layout: `config.json` + `model.safetensors` (or sharded
//! `model.safetensors.index.json`), tensor names as in `transformers`' `LlamaForCausalLM`
//! (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`, …, `model.norm.weight`,
//! `lm_head.weight`), so real checkpoints load and ours load in `transformers`.
//!
//! Each of the seven projections (`q/k/v/o_proj`, `gate/up/down_proj`) may carry a LoRA site
//! ([`crate::lora::Lora`]) added on top of the frozen weight.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Result, bail};
use serde_json::Value;
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint;
use crate::cli::BadInput;
use crate::lora::Lora;

/// The names of the seven projections, in the order sites are listed.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The model hyper-parameters read from / written to `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden_size / num_attention_heads` unless given).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest sequence the model was configured for.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// The embedded default: a ≈3.3 M-parameter byte-level model (4 layers, width 256).
    pub fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 256,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 1024,
            tie_word_embeddings: false,
        }
    }

    /// Reads and checks `dir/config.json`; errors name the file and the key.
    pub fn load(dir: &Path) -> Result<LlamaConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| BadInput(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_json(&v).map_err(|why| BadInput(format!("{}: {why}", path.display())).into())
    }

    /// Parses a Hugging Face Llama config object.
    pub fn from_json(v: &Value) -> std::result::Result<LlamaConfig, String> {
        if !v.is_object() {
            return Err("not a JSON object".into());
        }
        if let Some(mt) = v.get("model_type").and_then(|m| m.as_str())
            && mt != "llama"
        {
            return Err(format!("`model_type` is `{mt}`: only Llama-architecture models (`llama`) are supported"));
        }
        let uint = |k: &str| -> std::result::Result<usize, String> {
            match v.get(k) {
                None | Some(Value::Null) => Err(format!("missing key `{k}`")),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{k}` must be a positive integer, got {x}")),
            }
        };
        let float_or = |k: &str, d: f64| -> std::result::Result<f64, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(x) => x.as_f64().ok_or_else(|| format!("`{k}` must be a number, got {x}")),
            }
        };
        let hidden_size = uint("hidden_size")?;
        let num_attention_heads = uint("num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => uint("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "`hidden_size` {hidden_size} is not divisible by `num_attention_heads` {num_attention_heads}"
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => uint("head_dim")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "`num_attention_heads` {num_attention_heads} is not a multiple of `num_key_value_heads` {num_key_value_heads}"
            ));
        }
        if head_dim % 2 != 0 {
            return Err(format!("`head_dim` {head_dim} must be even for rotary embeddings"));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str())
            && act != "silu"
        {
            return Err(format!("`hidden_act` is `{act}`: only `silu` (SwiGLU) is supported"));
        }
        for k in ["attention_bias", "mlp_bias"] {
            if v.get(k).and_then(|b| b.as_bool()) == Some(true) {
                return Err(format!("`{k}` = true is not supported (Llama projections have no bias)"));
            }
        }
        // transformers ≥ 5 writes `rope_parameters`, older versions `rope_theta` + `rope_scaling`.
        let mut rope_theta = float_or("rope_theta", 10000.0)?;
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(rp) = v.get(key).filter(|x| !x.is_null()) {
                let ty = rp.get("rope_type").or(rp.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                if ty != "default" {
                    return Err(format!("`{key}.rope_type` is `{ty}`: only the default RoPE is supported"));
                }
                if let Some(t) = rp.get("rope_theta").and_then(|t| t.as_f64()) {
                    rope_theta = t;
                }
            }
        }
        let cfg = LlamaConfig {
            vocab_size: uint("vocab_size")?,
            hidden_size,
            intermediate_size: uint("intermediate_size")?,
            num_hidden_layers: uint("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: float_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: match v.get("max_position_embeddings") {
                None | Some(Value::Null) => 2048,
                Some(_) => uint("max_position_embeddings")?,
            },
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|b| b.as_bool()).unwrap_or(false),
        };
        Ok(cfg)
    }

    /// The `config.json` object `transformers` 5.x reads as a `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "bos_token_id": null,
            "eos_token_id": null,
            "pad_token_id": null,
            "use_cache": false,
            "torch_dtype": "float32",
        })
    }

    /// Number of parameters of the base model.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.num_attention_heads * self.head_dim * 2 + h * self.num_key_value_heads * self.head_dim * 2;
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        emb + self.num_hidden_layers * per_layer + h
    }

    /// `(d_in, d_out)` of a projection.
    pub fn projection_shape(&self, proj: &str) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match proj {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, self.intermediate_size),
            _ => (self.intermediate_size, h),
        }
    }
}

/// A frozen projection weight `[out, in]` with an optional LoRA site.
#[derive(Debug)]
pub struct Proj {
    /// The base weight.
    pub weight: Tensor,
    /// The adapter, if this projection is adapted.
    pub lora: Option<Lora>,
}

impl Proj {
    /// `W x (+ s · B A x)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, None::<Tensor>);
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
    /// The projection called `name` (one of [`PROJECTIONS`]).
    pub fn proj_mut(&mut self, name: &str) -> &mut Proj {
        match name {
            "q_proj" => &mut self.q_proj,
            "k_proj" => &mut self.k_proj,
            "v_proj" => &mut self.v_proj,
            "o_proj" => &mut self.o_proj,
            "gate_proj" => &mut self.gate_proj,
            "up_proj" => &mut self.up_proj,
            _ => &mut self.down_proj,
        }
    }

    /// The projection called `name` (one of [`PROJECTIONS`]).
    pub fn proj(&self, name: &str) -> &Proj {
        match name {
            "q_proj" => &self.q_proj,
            "k_proj" => &self.k_proj,
            "v_proj" => &self.v_proj,
            "o_proj" => &self.o_proj,
            "gate_proj" => &self.gate_proj,
            "up_proj" => &self.up_proj,
            _ => &self.down_proj,
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
}

/// Module path of a projection in the HF layout, e.g. `model.layers.3.self_attn.q_proj`.
pub fn module_name(layer: usize, proj: &str) -> String {
    let group = if matches!(proj, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{proj}")
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
    fn build(vs: &nn::Path, cfg: &LlamaConfig, init: nn::Init, norm_init: nn::Init) -> Llama {
        let var = |name: &str, dims: &[usize], init: nn::Init| {
            let (p, leaf) = sub(vs, name);
            let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            p.var(&leaf, &dims, init)
        };
        let h = cfg.hidden_size;
        let embed_tokens = var("model.embed_tokens.weight", &[cfg.vocab_size, h], init);
        let proj = |l: usize, p: &str| {
            let (i, o) = cfg.projection_shape(p);
            Proj { weight: var(&format!("{}.weight", module_name(l, p)), &[o, i], init), lora: None }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Block {
                input_layernorm: var(&format!("model.layers.{l}.input_layernorm.weight"), &[h], norm_init),
                q_proj: proj(l, "q_proj"),
                k_proj: proj(l, "k_proj"),
                v_proj: proj(l, "v_proj"),
                o_proj: proj(l, "o_proj"),
                post_attention_layernorm: var(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                    norm_init,
                ),
                gate_proj: proj(l, "gate_proj"),
                up_proj: proj(l, "up_proj"),
                down_proj: proj(l, "down_proj"),
            })
            .collect();
        let norm = var("model.norm.weight", &[h], norm_init);
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            var("lm_head.weight", &[cfg.vocab_size, h], init)
        };
        Llama { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head }
    }

    /// Loads `dir` (`config.json` + `model.safetensors` or a sharded index) into a new frozen
    /// VarStore on `device` with parameters of `kind`. Every expected tensor must be present with
    /// the expected shape; unknown tensors are an error (except rotary caches).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<(Llama, nn::VarStore)> {
        let cfg = LlamaConfig::load(dir)?;
        let tensors = read_weights(dir)?;
        let mut vs = nn::VarStore::new(device);
        // Zero-filled variables (cheaper than random ones), overwritten from the files below.
        let model = Llama::build(&vs.root(), &cfg, nn::Init::Const(0.0), nn::Init::Const(0.0));
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let mut by_name: HashMap<String, (String, Tensor)> = HashMap::new();
        for (file, name, t) in tensors {
            by_name.insert(name, (file, t));
        }
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, var) in vars.iter() {
                match by_name.remove(name) {
                    None => missing.push(name.clone()),
                    Some((file, t)) => {
                        if t.size() != var.size() {
                            bail!(BadInput(format!(
                                "{file}: tensor `{name}` has shape {:?}, config.json implies {:?}",
                                t.size(),
                                var.size()
                            )));
                        }
                        if !matches!(t.kind(), Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
                            bail!(BadInput(format!(
                                "{file}: tensor `{name}` has dtype {:?}, expected a float type",
                                t.kind()
                            )));
                        }
                        var.shallow_clone().copy_(&t);
                    }
                }
            }
            Ok(())
        })?;
        // A tied checkpoint may still carry `lm_head.weight`; a rotary cache is not a weight.
        by_name
            .retain(|n, _| !(n.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && n == "lm_head.weight")));
        if !missing.is_empty() {
            missing.sort();
            bail!(BadInput(format!(
                "{}: missing tensor(s) {} (expected Hugging Face Llama names)",
                dir.display(),
                list(&missing)
            )));
        }
        if !by_name.is_empty() {
            let mut extra: Vec<String> = by_name.into_keys().collect();
            extra.sort();
            bail!(BadInput(format!(
                "{}: unexpected tensor(s) {} for a Llama model with this config.json",
                dir.display(),
                list(&extra)
            )));
        }
        vs.freeze();
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Ok((model, vs))
    }

    /// Writes `config.json` and `model.safetensors` (HF names, `{"format": "pt"}`) into `dir`,
    /// each file atomically.
    pub fn save(&self, vs: &nn::VarStore, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let tensors: Vec<(String, Tensor)> = vars.into_iter().map(|(n, t)| (n, t.detach())).collect();
        let md = HashMap::from([("format".to_string(), "pt".to_string())]);
        checkpoint::write_safetensors(&dir.join("model.safetensors"), &tensors, Some(md))?;
        let json = serde_json::to_vec_pretty(&self.cfg.to_hf_json())?;
        checkpoint::atomic_write(&dir.join("config.json"), &json)?;
        Ok(())
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().unwrap_or((1, ids.size()[ids.dim() - 1]));
        let kind = self.embed_tokens.kind();
        let (cos, sin) = rope_tables(&self.cfg, t, ids.device(), kind);
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        for layer in &self.layers {
            let h =
                &x + self.attention(layer, &rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps), &cos, &sin);
            let n = rms_norm(&h, &layer.post_attention_layernorm, self.cfg.rms_norm_eps);
            let mlp = layer.down_proj.forward(&(layer.gate_proj.forward(&n).silu() * layer.up_proj.forward(&n)));
            x = h + mlp;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps).linear(&self.lm_head, None::<Tensor>)
    }

    fn attention(&self, l: &Block, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, t, _) = x.size3().expect("[batch, seq, hidden]");
        let (nh, nkv, hd) =
            (self.cfg.num_attention_heads as i64, self.cfg.num_key_value_heads as i64, self.cfg.head_dim as i64);
        let q = l.q_proj.forward(x).view([b, t, nh, hd]).transpose(1, 2);
        let k = l.k_proj.forward(x).view([b, t, nkv, hd]).transpose(1, 2);
        let v = l.v_proj.forward(x).view([b, t, nkv, hd]).transpose(1, 2);
        let q = apply_rope(&q, cos, sin);
        let k = apply_rope(&k, cos, sin);
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None))
        } else {
            (k, v)
        };
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false);
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

    /// Puts the sites of a PEFT adapter on the matching projections (on the model's device);
    /// modules that are not projections of this model, or whose shapes differ, are an error.
    pub fn attach_adapter(&mut self, adapter: &crate::peft::PeftAdapter) -> Result<()> {
        let device = self.embed_tokens.device();
        for site in &adapter.sites {
            let found = (0..self.cfg.num_hidden_layers)
                .flat_map(|l| PROJECTIONS.iter().map(move |p| (l, *p)))
                .find(|(l, p)| module_name(*l, p) == site.module);
            let Some((l, p)) = found else {
                bail!(BadInput(format!(
                    "{}: module `{}` is not a projection of this Llama model",
                    adapter.dir.display(),
                    site.module
                )));
            };
            let (d_in, d_out) = self.cfg.projection_shape(p);
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
            self.layers[l].proj_mut(p).lora = Some(Lora::from_factors(
                &site.module,
                site.a.to_device(device),
                site.b.to_device(device),
                site.alpha,
                adapter.rslora,
            ));
        }
        Ok(())
    }

    /// Every adapted projection: `(module name, site)`, layer by layer in [`PROJECTIONS`] order.
    pub fn sites(&self) -> Vec<&Lora> {
        self.layers.iter().flat_map(|l| PROJECTIONS.iter().filter_map(move |p| l.proj(p).lora.as_ref())).collect()
    }

    /// Mutable access to every site, in [`Llama::sites`] order.
    pub fn sites_mut(&mut self) -> Vec<&mut Lora> {
        let mut out = Vec::new();
        for l in self.layers.iter_mut() {
            for p in [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ] {
                if let Some(s) = p.lora.as_mut() {
                    out.push(s);
                }
            }
        }
        out
    }
}

fn list(v: &[String]) -> String {
    let shown: Vec<String> = v.iter().take(5).map(|s| format!("`{s}`")).collect();
    if v.len() > 5 { format!("{} and {} more", shown.join(", "), v.len() - 5) } else { shown.join(", ") }
}

/// Reads `model.safetensors`, or every shard named by `model.safetensors.index.json`:
/// `(file, name, tensor)` triples on the CPU.
fn read_weights(dir: &Path) -> Result<Vec<(String, String, Tensor)>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&index).map_err(|e| BadInput(format!("{}: {e}", index.display())))?,
        )
        .map_err(|e| BadInput(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| BadInput(format!("{}: no `weight_map` object", index.display())))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        bail!(BadInput(format!(
            "{}: no model.safetensors (or model.safetensors.index.json) in the model directory",
            dir.display()
        )));
    };
    let mut out = Vec::new();
    for f in files {
        let (ts, _) = checkpoint::read_safetensors(&f).map_err(|e| BadInput(e.to_string()))?;
        for (n, t) in ts {
            out.push((f.display().to_string(), n, t));
        }
    }
    Ok(out)
}

/// RMSNorm as in `transformers`: normalise in `f32`, cast back, then scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    weight * (xf * (var + eps).rsqrt()).to_kind(kind)
}

/// `cos`, `sin` tables `[seq, head_dim]` (frequencies repeated twice, HF's "rotate_half" layout),
/// computed in `f32` and cast to `kind`.
pub fn rope_tables(cfg: &LlamaConfig, seq: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
    let hd = cfg.head_dim as i64;
    let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::from(cfg.rope_theta as f32).to_device(device).pow(&exponents).reciprocal();
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
