//! Reading and writing a model's weights in the Hugging Face layout: `model.safetensors`, or the
//! shards a `model.safetensors.index.json` names. Every expected tensor must be present with the
//! expected shape and a float type; anything else is refused with the file and tensor named.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Result, bail};
use rankpilot_config::BadInput;
use runio::checkpoint;
use serde_json::Value;
use tch::{Device, Kind, Tensor, nn};

use crate::model::llama::{Llama, LlamaConfig};

impl Llama {
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
