//! The modules a LoRA site can sit on, by name: the seven projections of every decoder layer,
//! and the two model-wide matrices PEFT also adapts (`lm_head`, `embed_tokens`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the seven linear projections of a Llama-family decoder layer: the places a LoRA site
/// can sit. Named as in the Hugging Face module paths (`q_proj`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Projection {
    /// Attention query, `self_attn.q_proj`.
    #[serde(rename = "q_proj")]
    Q,
    /// Attention key, `self_attn.k_proj`.
    #[serde(rename = "k_proj")]
    K,
    /// Attention value, `self_attn.v_proj`.
    #[serde(rename = "v_proj")]
    V,
    /// Attention output, `self_attn.o_proj`.
    #[serde(rename = "o_proj")]
    O,
    /// SwiGLU gate, `mlp.gate_proj`.
    #[serde(rename = "gate_proj")]
    Gate,
    /// SwiGLU up projection, `mlp.up_proj`.
    #[serde(rename = "up_proj")]
    Up,
    /// SwiGLU down projection, `mlp.down_proj`.
    #[serde(rename = "down_proj")]
    Down,
}

impl Projection {
    /// Every projection, in the order sites are listed within a layer.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The Hugging Face module name (`q_proj`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The sub-module holding it: `self_attn` or `mlp`.
    pub const fn group(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// Module path in the HF layout, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.group(), self.name())
    }

    /// The names of all projections, comma-separated (for messages).
    pub fn allowed() -> String {
        Projection::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Projection {
    type Err = String;

    /// Parses a module name (`q_proj`); anything else is refused with the allowed names.
    fn from_str(s: &str) -> Result<Projection, String> {
        let s = s.trim();
        Projection::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown projection `{s}`: allowed: {}", Projection::allowed()))
    }
}

/// What `--targets` names: a projection in every layer, or one of the model-wide matrices PEFT's
/// LoRA also adapts. Sites are listed in the order embedding, layers (by [`Projection::ALL`]),
/// head, which is the order of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    /// `model.embed_tokens`: PEFT's `lora.Embedding` (`lora_embedding_A [r, vocab]`,
    /// `lora_embedding_B [hidden, r]`), a LoRA on the one-hot token input.
    EmbedTokens,
    /// The projection in every decoder layer.
    Layer(Projection),
    /// `lm_head`: a plain linear layer `hidden → vocab`.
    LmHead,
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.name().to_string()
    }
}

impl TryFrom<String> for Target {
    type Error = String;
    fn try_from(s: String) -> Result<Target, String> {
        s.parse()
    }
}

impl Target {
    /// The module name PEFT's `target_modules` uses (`q_proj`, `lm_head`, `embed_tokens`).
    pub const fn name(self) -> &'static str {
        match self {
            Target::EmbedTokens => "embed_tokens",
            Target::Layer(p) => p.name(),
            Target::LmHead => "lm_head",
        }
    }

    /// Every target, for messages.
    pub fn allowed() -> String {
        format!("{}, lm_head, embed_tokens", Projection::allowed())
    }

    /// The module path of the embedding site.
    pub const EMBED_MODULE: &'static str = "model.embed_tokens";
    /// The module path of the head site.
    pub const HEAD_MODULE: &'static str = "lm_head";

    /// The layer a site's module belongs to, for per-layer features and labels: the embedding
    /// counts as layer 0 and the head as the last layer.
    pub fn layer_of(module: &str, num_layers: usize) -> usize {
        if module == Target::HEAD_MODULE {
            return num_layers.saturating_sub(1);
        }
        module.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()).unwrap_or(0)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;

    /// Parses a module name (`q_proj`, `lm_head`, `embed_tokens`); anything else is refused with
    /// the allowed names.
    fn from_str(s: &str) -> Result<Target, String> {
        match s.trim() {
            "lm_head" => Ok(Target::LmHead),
            "embed_tokens" => Ok(Target::EmbedTokens),
            other => other
                .parse::<Projection>()
                .map(Target::Layer)
                .map_err(|_| format!("unknown target `{other}`: allowed: {}", Target::allowed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in Projection::ALL {
            assert_eq!(p.name().parse::<Projection>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.name()));
        }
        assert_eq!(Projection::Down.module_name(2), "model.layers.2.mlp.down_proj");
        let e = "down".parse::<Projection>().unwrap_err();
        assert!(e.contains("`down`") && e.contains("q_proj, k_proj"), "{e}");
    }

    #[test]
    fn targets_parse_serialize_and_place_their_sites() {
        for t in ["q_proj", "down_proj", "lm_head", "embed_tokens"] {
            let parsed: Target = t.parse().unwrap();
            assert_eq!(parsed.name(), t);
            assert_eq!(serde_json::to_value(parsed).unwrap(), serde_json::json!(t));
            assert_eq!(serde_json::from_value::<Target>(serde_json::json!(t)).unwrap(), parsed);
        }
        let e = "score".parse::<Target>().unwrap_err();
        assert!(e.contains("`score`") && e.contains("lm_head, embed_tokens"), "{e}");
        assert_eq!(Target::layer_of("model.layers.3.mlp.up_proj", 4), 3);
        assert_eq!(Target::layer_of(Target::EMBED_MODULE, 4), 0);
        assert_eq!(Target::layer_of(Target::HEAD_MODULE, 4), 3);
    }
}
