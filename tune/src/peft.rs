//! Hugging Face PEFT LoRA adapters: reading any LoRA adapter directory and writing ours.
//!
//! An adapter directory holds `adapter_config.json` (`peft_type: "LORA"`, `r`, `lora_alpha`,
//! `target_modules`, `rank_pattern`, `alpha_pattern`, `use_rslora`, …) and
//! `adapter_model.safetensors` with tensors named `base_model.model.<module>.lora_A.weight`
//! (`[r, in]`) and `…lora_B.weight` (`[out, r]`), header metadata `{"format": "pt"}`. A LoRA on
//! the token embedding (PEFT's `lora.Embedding`) has `…lora_embedding_A` (`[r, vocab]`) and
//! `…lora_embedding_B` (`[hidden, r]`) instead: the same factors of a map whose input is the
//! one-hot token.
//!
//! Per-module rank and alpha follow PEFT's rule (`peft.utils.other.get_pattern_key`): the first
//! key `k` of `rank_pattern` / `alpha_pattern` for which the regex `(.*\.)?(k)$` matches the
//! module name wins, else `r` / `lora_alpha`. The rank itself is read from the tensor shapes; the
//! config's rank must agree with it.
//!
//! We write every site explicitly: `target_modules` lists the full module names of the sites
//! with rank > 0, and `rank_pattern` / `alpha_pattern` map each of them to its rank / alpha, so
//! the file is unambiguous whatever the default `r` is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde_json::{Map, Value, json};
use tch::Tensor;

use rankpilot_config::BadInput;
use runio::checkpoint;

/// The config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The largest matrix side an adapter may declare (2^20; real projections are at most tens of
/// thousands wide).
pub const MAX_DIM: u64 = 1 << 20;
/// Prefix PEFT puts before module names in tensor names.
pub const PREFIX: &str = "base_model.model.";

/// One adapted module of a PEFT adapter.
#[derive(Debug)]
pub struct PeftSite {
    /// Module name in the base model, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Tensor-name prefix before `.lora_A.weight` (usually `base_model.model.<module>`).
    pub tensor_prefix: String,
    /// `lora_A.weight`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Tensor,
    /// The module's `lora_alpha`.
    pub alpha: f64,
    /// An embedding site (`lora_embedding_A` / `lora_embedding_B`, no `.weight`).
    pub embedding: bool,
}

impl PeftSite {
    /// The rank (rows of `A`).
    pub fn rank(&self) -> usize {
        self.a.size()[0] as usize
    }
}

/// A LoRA adapter read from a PEFT directory.
#[derive(Debug)]
pub struct PeftAdapter {
    /// Where it was read from.
    pub dir: PathBuf,
    /// `adapter_config.json` as read (unknown keys kept, so a rewrite preserves them).
    pub config: Map<String, Value>,
    /// Whether `use_rslora` is set (scaling `α/√r`).
    pub rslora: bool,
    /// The adapted modules, in tensor-name order.
    pub sites: Vec<PeftSite>,
    /// Tensors that are not LoRA factors (e.g. `modules_to_save` copies, biases): kept verbatim.
    pub other: Vec<(String, Tensor)>,
}

/// First key of `pattern` whose PEFT regex `(.*\.)?(key)$` matches `module`.
pub fn pattern_lookup<'a>(pattern: &'a Map<String, Value>, module: &str) -> Result<Option<&'a Value>> {
    for (key, v) in pattern {
        let re = regex::Regex::new(&format!("^(.*\\.)?({key})$"))
            .map_err(|e| BadInput(format!("pattern key `{key}` is not a valid regex: {e}")))?;
        if re.is_match(module) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The model's parameter name of an adapter tensor: `base_model.model.lm_head.weight` →
/// `lm_head.weight`, and a targeted layer's saved base weight (`….lm_head.base_layer.weight`) →
/// `lm_head.weight`.
pub fn base_name(tensor: &str) -> String {
    let name = tensor.strip_prefix(PREFIX).unwrap_or(tensor);
    name.replacen(".base_layer.", ".", 1)
}

/// Whether an adapter tensor is the saved base weight of a LoRA-adapted layer
/// (`<module>.base_layer.weight`). PEFT writes those of `embed_tokens` / `lm_head` when they are
/// targets (`save_embedding_layers="auto"`), and loads them into the frozen base; they are not
/// trained.
pub fn is_base_layer(tensor: &str) -> bool {
    tensor.contains(".base_layer.")
}

impl PeftAdapter {
    /// Reads and validates a PEFT LoRA adapter directory. Errors name the file and key/tensor.
    pub fn load(dir: &Path) -> Result<PeftAdapter> {
        let cfg_path = dir.join(CONFIG_FILE);
        let bad = |why: String| -> anyhow::Error { BadInput(format!("{}: {why}", cfg_path.display())).into() };
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| BadInput(format!("{}: {e} (not a PEFT adapter directory?)", cfg_path.display())))?;
        let config: Map<String, Value> = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
        };
        let peft_type = config.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        if peft_type != "LORA" {
            return Err(bad(format!(
                "`peft_type` is `{}`: not a LoRA adapter (only `LORA` is supported)",
                if peft_type.is_empty() { "missing" } else { peft_type }
            )));
        }
        if config.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad("`use_dora` is true: DoRA adapters are not supported".into()));
        }
        let rslora = config.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        let default_alpha = match config.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => v.as_f64().ok_or_else(|| bad(format!("`lora_alpha` must be a number, got {v}")))?,
        };
        let default_r = config.get("r").and_then(|v| v.as_u64());
        let empty = Map::new();
        let obj = |k: &str| -> Result<&Map<String, Value>> {
            match config.get(k) {
                None | Some(Value::Null) => Ok(&empty),
                Some(Value::Object(m)) => Ok(m),
                Some(v) => Err(bad(format!("`{k}` must be an object, got {v}"))),
            }
        };
        let rank_pattern = obj("rank_pattern")?;
        let alpha_pattern = obj("alpha_pattern")?;

        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.is_file() {
            let why = if dir.join("adapter_model.bin").is_file() {
                "only adapter_model.bin (pickle) present: rankpilot reads safetensors adapters"
            } else {
                "missing"
            };
            bail!(BadInput(format!("{}: {why}", w_path.display())));
        }
        let (tensors, _) = checkpoint::read_safetensors(&w_path).map_err(|e| BadInput(e.to_string()))?;
        let wbad = |why: String| -> anyhow::Error { BadInput(format!("{}: {why}", w_path.display())).into() };
        let mut a_map: HashMap<String, Tensor> = HashMap::new();
        let mut b_map: HashMap<String, Tensor> = HashMap::new();
        let mut other = Vec::new();
        // Prefixes whose A / B factor is an embedding factor; both must agree.
        let (mut embedding_a, mut embedding_b) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for (name, t) in tensors {
            if name.contains("lora_magnitude_vector") {
                return Err(wbad(format!("`{name}`: DoRA magnitude vectors are not supported")));
            }
            let split = |suffix: &str| name.strip_suffix(suffix).map(String::from);
            if let Some(p) = split(".lora_A.weight") {
                a_map.insert(p, t);
            } else if let Some(p) = split(".lora_B.weight") {
                b_map.insert(p, t);
            } else if let Some(p) = split(".lora_embedding_A") {
                embedding_a.insert(p.clone());
                a_map.insert(p, t);
            } else if let Some(p) = split(".lora_embedding_B") {
                embedding_b.insert(p.clone());
                b_map.insert(p, t);
            } else if name.contains(".lora_embedding_") {
                return Err(wbad(format!(
                    "`{name}`: unexpected LoRA tensor name (expected `<module>.lora_embedding_A` / `_B`)"
                )));
            } else if name.contains(".lora_A.") || name.contains(".lora_B.") {
                return Err(wbad(format!(
                    "`{name}`: unexpected LoRA tensor name (expected `<module>.lora_A.weight` / `.lora_B.weight`)"
                )));
            } else {
                other.push((name, t));
            }
        }
        if a_map.is_empty() {
            return Err(wbad("no `lora_A.weight` / `lora_B.weight` tensors: not a LoRA adapter".into()));
        }
        let mut prefixes: Vec<String> = a_map.keys().cloned().collect();
        prefixes.sort();
        let mut sites = Vec::new();
        for p in prefixes {
            let a = a_map.remove(&p).expect("key listed");
            let b = b_map
                .remove(&p)
                .ok_or_else(|| wbad(format!("`{p}.lora_A.weight` has no matching `{p}.lora_B.weight`")))?;
            if a.dim() != 2 || b.dim() != 2 {
                return Err(wbad(format!(
                    "`{p}`: lora_A {:?} / lora_B {:?} must be matrices (convolution LoRA is not supported)",
                    a.size(),
                    b.size()
                )));
            }
            let r = a.size()[0];
            if b.size()[1] != r {
                return Err(wbad(format!(
                    "`{p}`: lora_A.weight is {:?} ([r, in]) but lora_B.weight is {:?} ([out, r]): ranks differ",
                    a.size(),
                    b.size()
                )));
            }
            // A matrix side beyond any real model's width is a forged header: refuse it before
            // anything is allocated for it.
            for (what, t) in [("lora_A", &a), ("lora_B", &b)] {
                if let Some(&d) = t.size().iter().find(|&&d| d as u64 > MAX_DIM) {
                    return Err(wbad(format!(
                        "`{p}.{what}.weight` has a dimension of {d}: allowed: at most {MAX_DIM} (the widest real projection is far below)"
                    )));
                }
                if !matches!(t.kind(), tch::Kind::Float | tch::Kind::BFloat16 | tch::Kind::Half | tch::Kind::Double) {
                    return Err(wbad(format!("`{p}.{what}.weight` has dtype {:?}: allowed: a float type", t.kind())));
                }
                if t.numel() > 0 && t.isfinite().all().int64_value(&[]) == 0 {
                    return Err(wbad(format!(
                        "`{p}.{what}.weight` holds NaN or infinite values (a diverged run?): allowed: finite weights"
                    )));
                }
            }
            let module = p.strip_prefix(PREFIX).unwrap_or(&p).to_string();
            let cfg_r = match pattern_lookup(rank_pattern, &module)? {
                Some(v) => v.as_u64(),
                None => default_r,
            };
            if let Some(cr) = cfg_r
                && cr as i64 != r
            {
                return Err(bad(format!(
                    "module `{module}` has rank {cr} in the config but its tensors have rank {r} in {WEIGHTS_FILE}"
                )));
            }
            let alpha = match pattern_lookup(alpha_pattern, &module)? {
                Some(v) => {
                    v.as_f64().ok_or_else(|| bad(format!("alpha_pattern value for `{module}` is not a number")))?
                }
                None => default_alpha,
            };
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(bad(format!(
                    "`lora_alpha` of `{module}` is {alpha}: allowed: a finite number > 0 (the update is scaled by alpha / r)"
                )));
            }
            let embedding = embedding_a.contains(&p);
            if embedding != embedding_b.contains(&p) {
                return Err(wbad(format!(
                    "`{p}`: one factor is `lora_embedding_*` and the other `lora_*.weight`: allowed: both of one kind"
                )));
            }
            sites.push(PeftSite { module, tensor_prefix: p, a, b, alpha, embedding });
        }
        if let Some(p) = b_map.keys().next() {
            return Err(wbad(format!("`{p}.lora_B.weight` has no matching `{p}.lora_A.weight`")));
        }
        Ok(PeftAdapter { dir: dir.to_path_buf(), config, rslora, sites, other })
    }

    /// Writes the adapter into `dir` (created if needed): the config with `r`, `lora_alpha`,
    /// `target_modules`, `rank_pattern` and `alpha_pattern` rewritten from the sites, all other
    /// keys kept; then the tensors. Each file is written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut config = self.config.clone();
        let live: Vec<&PeftSite> = self.sites.iter().filter(|s| s.rank() > 0).collect();
        if live.is_empty() {
            bail!(BadInput(format!(
                "{}: every site has rank 0: allowed: at least one site of rank >= 1 (PEFT cannot represent an empty LoRA adapter)",
                dir.display()
            )));
        }
        let mut ranks = Map::new();
        let mut alphas = Map::new();
        for s in &live {
            ranks.insert(s.module.clone(), json!(s.rank()));
            alphas.insert(s.module.clone(), json!(s.alpha));
        }
        // Default r / alpha: the most common values (PEFT needs them even if every module is listed).
        let mode = |vals: Vec<String>| {
            let mut c: HashMap<String, usize> = HashMap::new();
            for v in vals {
                *c.entry(v).or_default() += 1;
            }
            let mut v: Vec<(String, usize)> = c.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v[0].0.clone()
        };
        let r_mode: u64 = mode(live.iter().map(|s| s.rank().to_string()).collect()).parse().unwrap_or(8);
        let a_mode: f64 = mode(live.iter().map(|s| s.alpha.to_string()).collect()).parse().unwrap_or(8.0);
        config.insert("r".into(), json!(r_mode));
        config.insert("lora_alpha".into(), json!(a_mode));
        config.insert("target_modules".into(), Value::Array(live.iter().map(|s| json!(s.module)).collect()));
        config.insert("rank_pattern".into(), Value::Object(ranks));
        config.insert("alpha_pattern".into(), Value::Object(alphas));
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for s in &live {
            let (a, b) =
                if s.embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
            tensors.push((format!("{}.{a}", s.tensor_prefix), s.a.detach().contiguous()));
            tensors.push((format!("{}.{b}", s.tensor_prefix), s.b.detach().contiguous()));
        }
        for (n, t) in &self.other {
            tensors.push((n.clone(), t.shallow_clone()));
        }
        let md = HashMap::from([("format".to_string(), "pt".to_string())]);
        let config = serde_json::to_vec_pretty(&Value::Object(config))?;
        // Both files land together: never new tensors beside an old config (`squeeze --out` may
        // be the adapter it read).
        checkpoint::write_dir_atomically(dir, |staged| {
            checkpoint::write_safetensors(&staged.join(WEIGHTS_FILE), &tensors, Some(md))?;
            checkpoint::atomic_write(&staged.join(CONFIG_FILE), &config)
        })?;
        Ok(())
    }

    /// A fresh adapter config for a causal LM (what `LoraConfig(task_type="CAUSAL_LM")` writes).
    pub fn new_config(base_model: &str, rslora: bool) -> Map<String, Value> {
        let v = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": null,
            "inference_mode": true,
            "r": 8,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "target_modules": [],
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "bias": "none",
            "use_rslora": rslora,
            "modules_to_save": null,
            "init_lora_weights": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "lora_bias": false,
            "peft_version": "0.21.2",
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("literal object"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn write(dir: &Path, cfg: Value, tensors: &[(&str, &[i64])]) {
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).unwrap();
        let ts: Vec<(String, Tensor)> =
            tensors.iter().map(|(n, s)| (n.to_string(), Tensor::ones(*s, (Kind::Float, Device::Cpu)))).collect();
        checkpoint::write_safetensors(&dir.join(WEIGHTS_FILE), &ts, None).unwrap();
    }

    #[test]
    fn patterns_follow_peft() {
        let m: Map<String, Value> = serde_json::from_str(r#"{"q_proj": 4, "layers.1.self_attn.v_proj": 2}"#).unwrap();
        assert_eq!(pattern_lookup(&m, "model.layers.0.self_attn.q_proj").unwrap(), Some(&json!(4)));
        assert_eq!(pattern_lookup(&m, "model.layers.1.self_attn.v_proj").unwrap(), Some(&json!(2)));
        assert_eq!(pattern_lookup(&m, "model.layers.11.self_attn.v_proj").unwrap(), None);
        assert_eq!(pattern_lookup(&m, "model.layers.0.self_attn.xq_proj").unwrap(), None);
    }

    #[test]
    fn rejects_non_lora_and_inconsistent_adapters() {
        let d = tempfile::tempdir().unwrap();
        let e = PeftAdapter::load(d.path()).unwrap_err().to_string();
        assert!(e.contains(CONFIG_FILE), "{e}");
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        let a = format!("{q}.lora_A.weight");
        let b = format!("{q}.lora_B.weight");
        write(d.path(), json!({"peft_type": "IA3"}), &[]);
        let e = PeftAdapter::load(d.path()).unwrap_err();
        assert!(e.to_string().contains("not a LoRA adapter") && e.is::<BadInput>(), "{e}");
        write(d.path(), json!({"peft_type": "LORA", "r": 4}), &[(&a, &[4, 8]), (&b, &[6, 3])]);
        let e = PeftAdapter::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("ranks differ") && e.contains("q_proj"), "{e}");
        write(d.path(), json!({"peft_type": "LORA", "r": 2}), &[(&a, &[4, 8]), (&b, &[6, 4])]);
        let e = PeftAdapter::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("rank 2 in the config"), "{e}");
        write(d.path(), json!({"peft_type": "LORA", "r": 4}), &[(&a, &[4, 8])]);
        assert!(PeftAdapter::load(d.path()).unwrap_err().to_string().contains("no matching"));
        write(d.path(), json!({"peft_type": "LORA", "r": 4}), &[("x.weight", &[2, 2])]);
        assert!(PeftAdapter::load(d.path()).unwrap_err().to_string().contains("not a LoRA adapter"));
        write(
            d.path(),
            json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8}}),
            &[(&a, &[4, 8]), (&b, &[6, 4]), ("base_model.model.score.weight", &[2, 6])],
        );
        let ad = PeftAdapter::load(d.path()).unwrap();
        assert_eq!(ad.sites[0].module, "model.layers.0.self_attn.q_proj");
        assert_eq!((ad.sites[0].rank(), ad.sites[0].alpha), (4, 8.0));
        assert_eq!(ad.other.len(), 1);
        let out = tempfile::tempdir().unwrap();
        ad.save(out.path()).unwrap();
        let back = PeftAdapter::load(out.path()).unwrap();
        assert_eq!(back.sites.len(), 1);
        assert_eq!(back.config["rank_pattern"]["model.layers.0.self_attn.q_proj"], json!(4));
        assert_eq!(back.other.len(), 1);
    }

    /// Issue 13, item 9: weights a diverged run leaves (NaN, inf), `lora_alpha = 0` and forged
    /// huge dimensions are refused at load, naming the file and the tensor or key.
    #[test]
    fn non_finite_weights_zero_alpha_and_forged_sizes_are_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        let (a, b) = (format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight"));
        let save = |cfg: Value, ta: Tensor, tb: Tensor| {
            std::fs::write(d.path().join(CONFIG_FILE), cfg.to_string()).unwrap();
            checkpoint::write_safetensors(&d.path().join(WEIGHTS_FILE), &[(a.clone(), ta), (b.clone(), tb)], None)
                .unwrap();
        };
        let ones = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
        for bad in [f64::NAN, f64::INFINITY] {
            let ta = ones(&[2, 8]);
            let _ = ta.get(0).get(3).fill_(bad);
            save(json!({"peft_type": "LORA", "r": 2}), ta, ones(&[6, 2]));
            let e = PeftAdapter::load(d.path()).unwrap_err();
            assert!(
                e.is::<BadInput>() && e.to_string().contains("NaN or infinite") && e.to_string().contains("lora_A"),
                "{e}"
            );
        }
        save(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 0}), ones(&[2, 8]), ones(&[6, 2]));
        let e = PeftAdapter::load(d.path()).unwrap_err();
        assert!(e.is::<BadInput>() && e.to_string().contains("lora_alpha") && e.to_string().contains("> 0"), "{e}");
        // Zero elements, but a side of 2^40: nothing may be sized from it.
        save(
            json!({"peft_type": "LORA", "r": 0}),
            Tensor::zeros([0, 1 << 40], (Kind::Float, Device::Cpu)),
            Tensor::zeros([6, 0], (Kind::Float, Device::Cpu)),
        );
        let e = PeftAdapter::load(d.path()).unwrap_err();
        assert!(e.is::<BadInput>() && e.to_string().contains("at most 1048576"), "{e}");
    }
}
