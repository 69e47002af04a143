//! The adapted projections of a decoder layer, by name.

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
}
