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

/// `config.json` as transformers writes it for a Llama model: the keys rankpilot reads, each with
/// its type. Other keys (`initializer_range`, token ids, …) do not change the forward pass and are
/// ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    /// `llama` (absent in some hand-written files).
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
    /// Per-head width (default: `hidden_size / num_attention_heads`).
    pub head_dim: Option<u64>,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (default 10000), as transformers < 5 writes it.
    pub rope_theta: Option<f64>,
    /// RoPE settings as transformers ≥ 5 writes them.
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE scaling as transformers < 5 writes it.
    pub rope_scaling: Option<RopeParameters>,
    /// Longest configured sequence (default 2048).
    pub max_position_embeddings: Option<u64>,
    /// `lm_head` shares the embedding matrix (default false).
    pub tie_word_embeddings: Option<bool>,
    /// Activation of the MLP; only `silu` (SwiGLU).
    pub hidden_act: Option<String>,
    /// Biases on the attention projections; only false.
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections; only false.
    pub mlp_bias: Option<bool>,
}

/// `rope_parameters` / `rope_scaling`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    /// `default` (others are refused).
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
}

impl HfConfig {
    /// Checks every value and fills in transformers' defaults.
    pub fn check(&self) -> std::result::Result<LlamaConfig, String> {
        if let Some(mt) = &self.model_type
            && mt != "llama"
        {
            return Err(format!("`model_type` is `{mt}`: only Llama-architecture models (`llama`) are supported"));
        }
        // Upper bounds far above any released model, so that a forged file cannot make the
        // loader ask libtorch for more memory than exists.
        let positive = |k: &str, v: Option<u64>| -> std::result::Result<usize, String> {
            let max = match k {
                "vocab_size" => 1 << 22,
                "hidden_size" | "head_dim" => 1 << 16,
                "intermediate_size" => 1 << 18,
                "max_position_embeddings" => 1 << 24,
                _ => 1 << 10,
            };
            match v {
                None => Err(format!("missing key `{k}`")),
                Some(0) => Err(format!("`{k}` must be a positive integer, got 0")),
                Some(n) if n > max => Err(format!("`{k}` = {n}: allowed: at most {max}")),
                Some(n) => Ok(n as usize),
            }
        };
        let hidden_size = positive("hidden_size", self.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", self.num_attention_heads)?;
        let num_key_value_heads = match self.num_key_value_heads {
            None => num_attention_heads,
            v => positive("num_key_value_heads", v)?,
        };
        let head_dim = match self.head_dim {
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "`hidden_size` {hidden_size} is not divisible by `num_attention_heads` {num_attention_heads}"
                    ));
                }
                hidden_size / num_attention_heads
            }
            v => positive("head_dim", v)?,
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
        for (k, v) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)] {
            if v == Some(true) {
                return Err(format!("`{k}` = true is not supported (Llama projections have no bias)"));
            }
        }
        // transformers ≥ 5 writes `rope_parameters`, older versions `rope_theta` + `rope_scaling`.
        let mut rope_theta = self.rope_theta.unwrap_or(10000.0);
        for (key, rp) in [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)] {
            if let Some(rp) = rp {
                let ty = rp.rope_type.as_deref().or(rp.kind.as_deref()).unwrap_or("default");
                if ty != "default" {
                    return Err(format!("`{key}.rope_type` is `{ty}`: only the default RoPE is supported"));
                }
                if let Some(t) = rp.rope_theta {
                    rope_theta = t;
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
        Ok(LlamaConfig {
            vocab_size: positive("vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size: positive("intermediate_size", self.intermediate_size)?,
            num_hidden_layers: positive("num_hidden_layers", self.num_hidden_layers)?,
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
        })
    }
}
