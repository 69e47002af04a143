//! The hyper-parameters of a Llama-architecture model, read from and written to the Hugging Face
//! `config.json`. The file is deserialized into [`HfConfig`] (serde: every key typed, a wrong
//! type named by its key), then checked and completed into a [`LlamaConfig`].

use std::path::Path;

use anyhow::Result;
use rankpilot_config::BadInput;
use serde::Deserialize;
use serde_json::Value;

use crate::model::Projection;

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
    /// What distinguishes the families on the one forward pass.
    pub arch: Architecture,
}

/// The model families rankpilot reads, by their `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `llama`: Llama 1, 2, 3.x (RoPE scaling `llama3`), optional attention / MLP biases.
    #[default]
    Llama,
    /// `mistral`: Llama with sliding-window attention.
    Mistral,
    /// `qwen2` (Qwen2, Qwen2.5): biases on q/k/v, optional sliding window on the upper layers.
    Qwen2,
    /// `qwen3`: RMSNorm on every query and key head before RoPE.
    Qwen3,
}

impl Family {
    /// The `model_type` string.
    pub const fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The `transformers` class that loads it.
    pub const fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3];
}

/// How RoPE's frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// `default`: the frequencies `θ^(-2i/d)` as they are.
    #[default]
    Default,
    /// `llama3`: long wavelengths divided by `factor`, short ones kept, a smooth blend between
    /// (Llama 3.1+).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained at.
        original_max_position_embeddings: usize,
    },
}

/// The named switches that make one decoder pass each supported family: no family is a copy of
/// another.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Architecture {
    /// Which family `config.json` names (what is written back).
    pub family: Family,
    /// Biases on `q_proj`, `k_proj`, `v_proj` (Qwen2; Llama/Qwen3 `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on `o_proj` (Llama/Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3 `q_norm` / `k_norm`).
    pub qk_norm: bool,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Sliding-window attention span: a query attends to the `w` most recent positions, itself
    /// included. `None`: full causal attention.
    pub sliding_window: Option<usize>,
    /// Layers that keep full attention although `sliding_window` is set (Qwen2/3 `layer_types`).
    pub full_attention_layers: Vec<usize>,
}

impl Architecture {
    /// Whether projection `p` has a bias.
    pub fn has_bias(&self, p: Projection) -> bool {
        match p {
            Projection::Q | Projection::K | Projection::V => self.qkv_bias,
            Projection::O => self.o_bias,
            Projection::Gate | Projection::Up | Projection::Down => self.mlp_bias,
        }
    }

    /// The attention window of `layer` (`None`: full causal).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.full_attention_layers.contains(&layer))
    }
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
            arch: Architecture::default(),
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

    /// Checks and completes a Hugging Face Llama config object (the defaults are transformers').
    pub fn from_json(v: &Value) -> std::result::Result<LlamaConfig, String> {
        if !v.is_object() {
            return Err("not a JSON object".into());
        }
        let raw: HfConfig = serde_path_to_error::deserialize(v).map_err(|e| match e.path().to_string() {
            p if p == "." => e.inner().to_string(),
            p => format!("`{p}`: {}", e.inner()),
        })?;
        raw.check()
    }

    /// The `config.json` object `transformers` 5.x reads as this family's `…ForCausalLM`.
    pub fn to_hf_json(&self) -> Value {
        let a = &self.arch;
        let mut rope = serde_json::to_value(&a.rope_scaling).expect("plain data");
        rope["rope_theta"] = self.rope_theta.into();
        let mut v = serde_json::json!({
            "architectures": [a.family.architecture()],
            "model_type": a.family.model_type(),
            "attention_dropout": 0.0,
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
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "bos_token_id": null,
            "eos_token_id": null,
            "pad_token_id": null,
            "use_cache": false,
            "torch_dtype": "float32",
        });
        let layer_types: Vec<&str> = (0..self.num_hidden_layers)
            .map(|l| if a.window(l).is_some() { "sliding_attention" } else { "full_attention" })
            .collect();
        let o = v.as_object_mut().expect("an object");
        match a.family {
            Family::Llama => {
                o.insert("attention_bias".into(), a.qkv_bias.into());
                o.insert("mlp_bias".into(), a.mlp_bias.into());
            }
            Family::Mistral => {
                o.insert("sliding_window".into(), serde_json::json!(a.sliding_window));
            }
            Family::Qwen2 | Family::Qwen3 => {
                if a.family == Family::Qwen3 {
                    o.insert("attention_bias".into(), a.qkv_bias.into());
                }
                o.insert("use_sliding_window".into(), a.sliding_window.is_some().into());
                o.insert("sliding_window".into(), serde_json::json!(a.sliding_window));
                o.insert("max_window_layers".into(), self.num_hidden_layers.into());
                o.insert("layer_types".into(), serde_json::json!(layer_types));
            }
        }
        v
    }

    /// Number of parameters of the base model.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.num_attention_heads * self.head_dim * 2 + h * self.num_key_value_heads * self.head_dim * 2;
        let mlp = 3 * h * self.intermediate_size;
        let biases: usize =
            Projection::ALL.iter().filter(|&&p| self.arch.has_bias(p)).map(|&p| self.projection_shape(p).1).sum();
        let qk_norm = if self.arch.qk_norm { 2 * self.head_dim } else { 0 };
        let per_layer = attn + mlp + 2 * h + biases + qk_norm;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        emb + self.num_hidden_layers * per_layer + h
    }

    /// `(d_in, d_out)` of a projection.
    pub fn projection_shape(&self, proj: Projection) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match proj {
            Projection::Q => (h, q),
            Projection::K | Projection::V => (h, kv),
            Projection::O => (q, h),
            Projection::Gate | Projection::Up => (h, self.intermediate_size),
            Projection::Down => (self.intermediate_size, h),
        }
    }
}

/// `config.json` as transformers writes it for the supported families: the keys rankpilot
/// reads, each with its type. Other keys (`initializer_range`, token ids, …) do not change the
/// forward pass and are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3` (absent in some hand-written Llama files).
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: Option<u64>,
    /// Model width.
    pub hidden_size: Option<u64>,
    /// SwiGLU inner width.
    pub intermediate_size: Option<u64>,
    /// Decoder layers.
    pub num_hidden_layers: Option<u64>,
    /// Query heads.
    pub num_attention_heads: Option<u64>,
    /// Key/value heads (default: the query heads).
    pub num_key_value_heads: Option<u64>,
    /// Per-head width (default: `hidden_size / num_attention_heads`; Qwen3: 128).
    pub head_dim: Option<u64>,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (default 10000), as transformers < 5 writes it.
    pub rope_theta: Option<f64>,
    /// RoPE settings as transformers ≥ 5 writes them.
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE scaling as transformers < 5 writes it.
    pub rope_scaling: Option<RopeParameters>,
    /// Fraction of each head that is rotated; only 1.
    pub partial_rotary_factor: Option<f64>,
    /// Longest configured sequence (default 2048).
    pub max_position_embeddings: Option<u64>,
    /// `lm_head` shares the embedding matrix (default false).
    pub tie_word_embeddings: Option<bool>,
    /// Activation of the MLP; only `silu` (SwiGLU).
    pub hidden_act: Option<String>,
    /// Biases on the attention projections (Llama: all four; Qwen3: all four).
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections (Llama).
    pub mlp_bias: Option<bool>,
    /// Sliding-window span (Mistral: default 4096; Qwen2/3: used when `use_sliding_window`).
    #[serde(default, deserialize_with = "explicit_null")]
    pub sliding_window: Option<Option<u64>>,
    /// Qwen2/3: whether `sliding_window` applies at all (default false).
    pub use_sliding_window: Option<bool>,
    /// Qwen2/3: layers below this index keep full attention (default 28).
    pub max_window_layers: Option<u64>,
    /// Qwen2/3: `full_attention` / `sliding_attention` per layer (overrides `max_window_layers`).
    pub layer_types: Option<Vec<String>>,
    /// Mixture-of-experts keys: refused when present.
    pub num_experts: Option<u64>,
    /// Mixture-of-experts keys (Mixtral spelling): refused when present.
    pub num_local_experts: Option<u64>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent key (`None`).
fn explicit_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<u64>>, D::Error> {
    Ok(Some(Option::<u64>::deserialize(d)?))
}

/// `rope_parameters` / `rope_scaling`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    /// `default` or `llama3` (others are refused).
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// `llama3`: divisor of the low frequencies.
    pub factor: Option<f64>,
    /// `llama3`: the low-frequency bound.
    pub low_freq_factor: Option<f64>,
    /// `llama3`: the high-frequency bound.
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the pre-training context.
    pub original_max_position_embeddings: Option<u64>,
    /// Only the default (1.0) is supported.
    pub attention_factor: Option<f64>,
}

impl HfConfig {
    /// Checks every value and fills in transformers' defaults.
    pub fn check(&self) -> std::result::Result<LlamaConfig, String> {
        let family = match self.model_type.as_deref() {
            None => Family::Llama,
            Some(mt) => Family::ALL.into_iter().find(|f| f.model_type() == mt).ok_or_else(|| {
                format!(
                    "`model_type` is `{mt}`: allowed: {} (dense decoders of the Llama architecture)",
                    Family::ALL.map(|f| format!("`{}`", f.model_type())).join(", ")
                )
            })?,
        };
        // Upper bounds far above any released model, so that a forged file cannot make the
        // loader ask libtorch for more memory than exists.
        let positive = |k: &str, v: Option<u64>| -> std::result::Result<usize, String> {
            let max = match k {
                "vocab_size" => 1 << 22,
                "hidden_size" | "head_dim" => 1 << 16,
                "intermediate_size" => 1 << 18,
                "max_position_embeddings" | "sliding_window" | "original_max_position_embeddings" => 1 << 24,
                _ => 1 << 10,
            };
            match v {
                None => Err(format!("missing key `{k}`")),
                Some(0) => Err(format!("`{k}` must be a positive integer, got 0")),
                Some(n) if n > max => Err(format!("`{k}` = {n}: allowed: at most {max}")),
                Some(n) => Ok(n as usize),
            }
        };
        for (k, v) in [("num_experts", self.num_experts), ("num_local_experts", self.num_local_experts)] {
            if v.is_some_and(|n| n > 0) {
                return Err(format!("`{k}`: mixture-of-experts models are not supported (dense decoders only)"));
            }
        }
        let hidden_size = positive("hidden_size", self.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", self.num_attention_heads)?;
        let num_hidden_layers = positive("num_hidden_layers", self.num_hidden_layers)?;
        let num_key_value_heads = match self.num_key_value_heads {
            None => num_attention_heads,
            v => positive("num_key_value_heads", v)?,
        };
        let head_dim = match (self.head_dim, family) {
            (None, Family::Qwen3) => 128,
            (None, _) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "`hidden_size` {hidden_size} is not divisible by `num_attention_heads` {num_attention_heads}"
                    ));
                }
                hidden_size / num_attention_heads
            }
            (v, _) => positive("head_dim", v)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "`num_attention_heads` {num_attention_heads} is not a multiple of `num_key_value_heads` {num_key_value_heads}"
            ));
        }
        if head_dim % 2 != 0 {
            return Err(format!("`head_dim` {head_dim} must be even for rotary embeddings"));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(format!("`hidden_act` is `{act}`: only `silu` (SwiGLU) is supported"));
        }
        if let Some(f) = self.partial_rotary_factor
            && f != 1.0
        {
            return Err(format!("`partial_rotary_factor` = {f}: allowed: 1 (every head dimension rotated)"));
        }
        let only_in = |k: &str, v: Option<bool>, ok: &[Family]| -> std::result::Result<bool, String> {
            match v {
                Some(true) if !ok.contains(&family) => {
                    Err(format!("`{k}` = true is not part of the `{}` architecture", family.model_type()))
                }
                v => Ok(v.unwrap_or(false)),
            }
        };
        let attention_bias =
            only_in("attention_bias", self.attention_bias, &[Family::Llama, Family::Qwen2, Family::Qwen3])?;
        let mlp_bias = only_in("mlp_bias", self.mlp_bias, &[Family::Llama])?;
        let (qkv_bias, o_bias) = match family {
            // Qwen2 always has q/k/v biases and none on o_proj.
            Family::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };

        // transformers ≥ 5 writes `rope_parameters`, older versions `rope_theta` + `rope_scaling`.
        let mut rope_theta = self.rope_theta.unwrap_or(10000.0);
        let mut rope_scaling = RopeScaling::Default;
        for (key, rp) in [("rope_scaling", &self.rope_scaling), ("rope_parameters", &self.rope_parameters)] {
            let Some(rp) = rp else { continue };
            if let Some(t) = rp.rope_theta {
                rope_theta = t;
            }
            if let Some(f) = rp.attention_factor
                && f != 1.0
            {
                return Err(format!("`{key}.attention_factor` = {f}: allowed: 1"));
            }
            match rp.rope_type.as_deref().or(rp.kind.as_deref()).unwrap_or("default") {
                "default" => {}
                "llama3" => {
                    let num = |k: &str, v: Option<f64>| match v {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                        Some(x) => Err(format!("`{key}.{k}` = {x}: allowed: a finite number > 0")),
                        None => Err(format!("`{key}.{k}` is missing (required by rope_type `llama3`)")),
                    };
                    let (low, high) =
                        (num("low_freq_factor", rp.low_freq_factor)?, num("high_freq_factor", rp.high_freq_factor)?);
                    if high <= low {
                        return Err(format!(
                            "`{key}.high_freq_factor` {high} must exceed `{key}.low_freq_factor` {low}"
                        ));
                    }
                    rope_scaling = RopeScaling::Llama3 {
                        factor: num("factor", rp.factor)?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: positive(
                            "original_max_position_embeddings",
                            rp.original_max_position_embeddings,
                        )
                        .map_err(|e| format!("`{key}`: {e}"))?,
                    };
                }
                ty => {
                    return Err(format!("`{key}.rope_type` is `{ty}`: allowed: `default`, `llama3`"));
                }
            }
        }
        for (k, x) in [("rms_norm_eps", self.rms_norm_eps), ("rope_theta", Some(rope_theta))] {
            if let Some(x) = x
                && !(x.is_finite() && x > 0.0)
            {
                return Err(format!("`{k}` = {x}: allowed: a finite number > 0"));
            }
        }

        if let Some(types) = &self.layer_types
            && types.len() != num_hidden_layers
        {
            return Err(format!(
                "`layer_types` has {} entries, `num_hidden_layers` is {num_hidden_layers}",
                types.len()
            ));
        }
        // Sliding windows: Mistral on every layer (default 4096, `null` for none); Qwen2/3 only
        // with `use_sliding_window`, on the layers `layer_types` (or `max_window_layers`) names.
        let window = |v: Option<Option<u64>>| match v {
            None => Ok(Some(4096)),
            Some(None) => Ok(None),
            Some(w) => positive("sliding_window", w).map(Some),
        };
        let (sliding_window, full_attention_layers) = match family {
            Family::Llama => {
                if let Some(Some(_)) = self.sliding_window {
                    return Err("`sliding_window` is not part of the `llama` architecture".into());
                }
                (None, Vec::new())
            }
            Family::Mistral => (window(self.sliding_window)?, Vec::new()),
            Family::Qwen2 | Family::Qwen3 => {
                let w = if self.use_sliding_window.unwrap_or(false) { window(self.sliding_window)? } else { None };
                let full: Vec<usize> = match (&self.layer_types, w) {
                    (_, None) => Vec::new(),
                    (Some(types), Some(_)) => {
                        let mut full = Vec::new();
                        for (l, t) in types.iter().enumerate() {
                            match t.as_str() {
                                "full_attention" => full.push(l),
                                "sliding_attention" => {}
                                t => {
                                    return Err(format!(
                                        "`layer_types[{l}]` is `{t}`: allowed: `full_attention`, `sliding_attention`"
                                    ));
                                }
                            }
                        }
                        full
                    }
                    (None, Some(_)) => {
                        (0..num_hidden_layers.min(self.max_window_layers.unwrap_or(28) as usize)).collect()
                    }
                };
                (w, full)
            }
        };
        if family != Family::Qwen2 && family != Family::Qwen3 && self.layer_types.is_some() {
            return Err(format!("`layer_types` is not supported for `{}` models", family.model_type()));
        }
        Ok(LlamaConfig {
            vocab_size: positive("vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size: positive("intermediate_size", self.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: match self.max_position_embeddings {
                None => 2048,
                v => positive("max_position_embeddings", v)?,
            },
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            arch: Architecture {
                family,
                qkv_bias,
                o_bias,
                mlp_bias,
                qk_norm: family == Family::Qwen3,
                rope_scaling,
                sliding_window,
                full_attention_layers,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: Value) -> Value {
        let mut v = serde_json::json!({"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn each_family_reads_its_switches_and_writes_them_back() {
        let qwen2 = LlamaConfig::from_json(&base(serde_json::json!({"model_type": "qwen2",
            "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1})))
        .unwrap();
        assert!(qwen2.arch.qkv_bias && !qwen2.arch.o_bias);
        assert_eq!((qwen2.arch.window(0), qwen2.arch.window(1)), (None, Some(8)));
        let mistral = LlamaConfig::from_json(&base(serde_json::json!({"model_type": "mistral"}))).unwrap();
        assert_eq!(mistral.arch.sliding_window, Some(4096), "transformers' default");
        let mistral =
            LlamaConfig::from_json(&base(serde_json::json!({"model_type": "mistral", "sliding_window": null})));
        assert_eq!(mistral.unwrap().arch.sliding_window, None);
        let qwen3 = LlamaConfig::from_json(&base(serde_json::json!({"model_type": "qwen3"}))).unwrap();
        assert!(qwen3.arch.qk_norm && qwen3.head_dim == 128);
        let llama3 = LlamaConfig::from_json(&base(serde_json::json!({"rope_scaling": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, "rope_theta": 500000.0})))
        .unwrap();
        assert!(matches!(llama3.arch.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(llama3.rope_theta, 500000.0);
        for cfg in [qwen2, mistral_window(), qwen3, llama3] {
            assert_eq!(LlamaConfig::from_json(&cfg.to_hf_json()).unwrap(), cfg);
        }
    }

    fn mistral_window() -> LlamaConfig {
        LlamaConfig::from_json(&base(serde_json::json!({"model_type": "mistral", "sliding_window": 16}))).unwrap()
    }

    #[test]
    fn unsupported_options_are_refused_with_the_key_named() {
        for (extra, key) in [
            (serde_json::json!({"model_type": "mixtral"}), "`model_type`"),
            (serde_json::json!({"model_type": "qwen2", "num_experts": 8}), "`num_experts`"),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
                "`rope_parameters.rope_type`",
            ),
            (serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}), "`rope_scaling.rope_type`"),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "`rope_scaling.low_freq_factor`",
            ),
            (serde_json::json!({"partial_rotary_factor": 0.5}), "`partial_rotary_factor`"),
            (serde_json::json!({"model_type": "mistral", "mlp_bias": true}), "`mlp_bias`"),
            (serde_json::json!({"sliding_window": 4}), "`sliding_window`"),
            (
                serde_json::json!({"model_type": "qwen3", "use_sliding_window": true, "layer_types": ["full_attention"]}),
                "`layer_types`",
            ),
            (serde_json::json!({"hidden_act": "gelu"}), "`hidden_act`"),
        ] {
            let e = LlamaConfig::from_json(&base(extra.clone())).err().unwrap_or_else(|| panic!("accepted: {extra}"));
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
