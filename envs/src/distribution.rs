//! Distributions of environments, and the held-out suites drawn from them.
//!
//! An [`EnvDistribution`] starts from an embedded preset and changes it by dotted keys: each
//! `[[pick]]` copies whole tables (e.g. `resource`, `baselines`, `reward`) from one of several
//! presets, chosen uniformly, and each `[[vary]]` draws one number uniformly (or log-uniformly)
//! in a range. Keys reach every generative parameter of a preset (`spectrum.beta.q`,
//! `dynamics.learning_rate`, `sites.layers`, `resource.channel.deadline_s`, …); a key whose base
//! value is an integer draws an integer. A `vary` key that the drawn preset does not have (a
//! channel setting when `budget` was picked) is skipped, but its random number is still drawn, so
//! every draw of a seed sees the same numbers. Every drawn preset passes the same checks as a
//! preset file.
//!
//! An [`EnvSuite`] is a fixed, held-out set of environments: `draws` presets drawn from a
//! distribution with seeds `derive_seed(suite.seed, i)`, plus named presets. The suite's seed is
//! fixed in its file when the suite is created, before any policy is evaluated on it; training
//! draws its environments from the training seed's own stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EnvError;
use crate::presets::{self, EnvPreset};
use crate::vec_env::derive_seed;

/// A distribution of environment presets (a `distributions/*.toml` file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvDistribution {
    /// Name (e.g. `default`).
    pub name: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// The embedded preset every draw starts from.
    pub base: String,
    /// Whole tables copied from one of several presets, applied first.
    #[serde(default)]
    pub pick: Vec<Pick>,
    /// Numbers drawn in ranges, applied after the picks.
    #[serde(default)]
    pub vary: Vec<Vary>,
}

/// Copy `tables` from one of `presets`, chosen uniformly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pick {
    /// Embedded preset names to choose from.
    pub presets: Vec<String>,
    /// Top-level tables (or keys) copied from the chosen preset.
    pub tables: Vec<String>,
}

/// Draw the number at `key` in [`min`, `max`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vary {
    /// Dotted key into the preset (e.g. `dynamics.learning_rate`).
    pub key: String,
    /// Lower end.
    pub min: f64,
    /// Upper end.
    pub max: f64,
    /// Draw log-uniformly (both ends must be positive).
    #[serde(default)]
    pub log: bool,
}

impl rankpilot_config::Validate for EnvDistribution {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.check(presets::NAMES.contains(&self.base.as_str()), "base", &self.base, &presets::NAMES.join(", "));
        for (i, p) in self.pick.iter().enumerate() {
            let key = format!("pick[{i}].presets");
            v.check(!p.presets.is_empty(), &key, &p.presets, "a non-empty list of embedded presets");
            for name in &p.presets {
                v.check(presets::NAMES.contains(&name.as_str()), &key, name, &presets::NAMES.join(", "));
            }
            v.check(!p.tables.is_empty(), &format!("pick[{i}].tables"), &p.tables, "a non-empty list of table names");
        }
        for (i, x) in self.vary.iter().enumerate() {
            v.check(
                x.min.is_finite() && x.max.is_finite() && x.min <= x.max,
                &format!("vary[{i}].max"),
                x.max,
                "a finite number >= min",
            );
            v.check(!x.log || x.min > 0.0, &format!("vary[{i}].min"), x.min, "a number > 0 with log = true");
        }
    }
}

/// Embedded distributions (`envs/distributions/`).
const EMBEDDED_DISTRIBUTIONS: [(&str, &str); 1] = [("default", include_str!("../distributions/default.toml"))];

/// Embedded suites (`envs/suites/`).
const EMBEDDED_SUITES: [(&str, &str); 5] = [
    ("default", include_str!("../suites/default.toml")),
    ("validation", include_str!("../suites/validation.toml")),
    ("selection", include_str!("../suites/selection.toml")),
    ("holdout", include_str!("../suites/holdout.toml")),
    ("holdout2", include_str!("../suites/holdout2.toml")),
];

/// The JSON form of an embedded preset, for editing by key.
fn preset_value(name: &str) -> Result<Value, EnvError> {
    let p = presets::load(name)?;
    Ok(serde_json::to_value(&p).expect("presets serialize"))
}

fn get_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    key.split('.').try_fold(v, |v, part| v.get_mut(part))
}

impl EnvDistribution {
    /// Loads a distribution by embedded name or path, checking that every key exists in the
    /// base preset or in one of the picked presets.
    pub fn load(name_or_path: &str) -> Result<Self, EnvError> {
        let d: EnvDistribution = match EMBEDDED_DISTRIBUTIONS.iter().find(|(n, _)| *n == name_or_path) {
            Some((name, text)) => rankpilot_config::from_str(text, format!("envs/distributions/{name}.toml"))?,
            None if std::path::Path::new(name_or_path).exists() => {
                rankpilot_config::load(std::path::Path::new(name_or_path))?
            }
            None => {
                return Err(EnvError::UnknownPreset {
                    name: name_or_path.to_string(),
                    allowed: format!(
                        "distribution {} or a path to a .toml file",
                        EMBEDDED_DISTRIBUTIONS.map(|(n, _)| n).join(", ")
                    ),
                });
            }
        };
        let mut candidates = vec![preset_value(&d.base)?];
        for p in &d.pick {
            for name in &p.presets {
                candidates.push(preset_value(name)?);
            }
        }
        for (i, p) in d.pick.iter().enumerate() {
            for t in &p.tables {
                if candidates.iter_mut().skip(1).all(|c| get_mut(c, t).is_none()) {
                    return Err(bad_key(name_or_path, &format!("pick[{i}].tables"), t));
                }
            }
        }
        for (i, x) in d.vary.iter().enumerate() {
            let ok = candidates.iter_mut().any(|c| get_mut(c, &x.key).is_some_and(|v| v.is_number()));
            if !ok {
                return Err(bad_key(name_or_path, &format!("vary[{i}].key"), &x.key));
            }
        }
        Ok(d)
    }

    /// The preset of draw `seed` (named `<distribution>-<seed>`), checked like a preset file.
    pub fn draw(&self, seed: u64) -> Result<EnvPreset, EnvError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v = preset_value(&self.base)?;
        for p in &self.pick {
            let from = preset_value(&p.presets[rng.random_range(0..p.presets.len())])?;
            for t in &p.tables {
                let src = t.split('.').try_fold(&from, |v, part| v.get(part)).cloned().unwrap_or(Value::Null);
                if let Some(dst) = get_mut(&mut v, t) {
                    *dst = src;
                } else if let Some(obj) = v.as_object_mut() {
                    obj.insert(t.clone(), src);
                }
            }
        }
        for x in &self.vary {
            let u: f64 = rng.random();
            let Some(dst) = get_mut(&mut v, &x.key) else { continue };
            let value =
                if x.log { (x.min.ln() + u * (x.max.ln() - x.min.ln())).exp() } else { x.min + u * (x.max - x.min) };
            *dst = if dst.is_u64() || dst.is_i64() { Value::from(value.round() as i64) } else { Value::from(value) };
        }
        let name = format!("{}-{seed}", self.name);
        v["name"] = Value::from(name.clone());
        v["description"] = Value::from(format!("draw {seed} of distribution `{}`", self.name));
        let preset: EnvPreset = serde_json::from_value(v).map_err(|e| EnvError::Config {
            key: "distribution".into(),
            found: name.clone(),
            allowed: format!("a draw that forms a preset ({e})"),
        })?;
        presets::from_toml(
            &rankpilot_config::to_string(&preset),
            &format!("<draw {seed} of distribution {}>", self.name),
            None,
        )
    }
}

fn bad_key(file: &str, key: &str, found: &str) -> EnvError {
    EnvError::Preset(rankpilot_config::ConfigError::Invalid {
        file: file.into(),
        violations: vec![rankpilot_config::Violation {
            key: key.into(),
            found: format!("{found:?}"),
            allowed: "a key of the base preset or of a picked preset (a number for vary)".into(),
        }],
    })
}

/// A held-out evaluation suite (a `suites/*.toml` file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSuite {
    /// Name.
    pub name: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// The distribution the drawn environments come from.
    pub distribution: String,
    /// How many environments to draw.
    pub draws: usize,
    /// Seed of the draws (fixed when the suite was written).
    pub seed: u64,
    /// Named presets evaluated besides the draws.
    #[serde(default)]
    pub presets: Vec<String>,
}

impl rankpilot_config::Validate for EnvSuite {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.check((0..=1000).contains(&self.draws), "draws", self.draws, "an integer in [0, 1000]");
        v.check(self.draws > 0 || !self.presets.is_empty(), "presets", &self.presets, "at least one environment");
    }
}

impl EnvSuite {
    /// Loads a suite by embedded name or path.
    pub fn load(name_or_path: &str) -> Result<Self, EnvError> {
        match EMBEDDED_SUITES.iter().find(|(n, _)| *n == name_or_path) {
            Some((name, text)) => Ok(rankpilot_config::from_str(text, format!("envs/suites/{name}.toml"))?),
            None if std::path::Path::new(name_or_path).exists() => {
                Ok(rankpilot_config::load(std::path::Path::new(name_or_path))?)
            }
            None => Err(EnvError::UnknownPreset {
                name: name_or_path.to_string(),
                allowed: format!("suite {} or a path to a .toml file", EMBEDDED_SUITES.map(|(n, _)| n).join(", ")),
            }),
        }
    }

    /// The suite's environments: the draws in order, then the named presets.
    pub fn environments(&self) -> Result<Vec<EnvPreset>, EnvError> {
        let dist = EnvDistribution::load(&self.distribution)?;
        let mut out = Vec::with_capacity(self.draws + self.presets.len());
        for i in 0..self.draws {
            let mut p = dist.draw(derive_seed(self.seed, i as u64))?;
            p.name = format!("{}-{i:02}", self.name);
            out.push(p);
        }
        for p in &self.presets {
            out.push(presets::load(p)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_valid_and_different() {
        let d = EnvDistribution::load("default").unwrap();
        let a = d.draw(5).unwrap();
        let b = d.draw(5).unwrap();
        assert_eq!(serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());
        let kinds: std::collections::HashSet<String> =
            (0..40).map(|s| format!("{:?}", d.draw(s).unwrap().resource.kind)).collect();
        assert_eq!(kinds.len(), 3, "every resource kind is drawn");
        let layers: std::collections::HashSet<_> = (0..40).map(|s| d.draw(s).unwrap().sites.layers).collect();
        assert!(layers.len() > 5, "{layers:?}");
    }

    #[test]
    fn the_default_suite_has_twelve_draws_and_every_preset() {
        let s = EnvSuite::load("default").unwrap();
        let envs = s.environments().unwrap();
        assert!(s.draws >= 12);
        assert_eq!(envs.len(), s.draws + presets::NAMES.len());
        for name in presets::NAMES {
            assert!(envs.iter().any(|e| e.name == name), "{name}");
        }
    }

    #[test]
    fn the_selection_and_both_holdout_suites_share_no_environment_with_the_test_suite_or_each_other() {
        let key = |p: &EnvPreset| {
            let mut v = serde_json::to_value(p).unwrap();
            v["name"] = Value::Null;
            v.to_string()
        };
        let keys = |name: &str| -> std::collections::HashSet<String> {
            EnvSuite::load(name).unwrap().environments().unwrap().iter().map(key).collect()
        };
        let (test, val, sel, hold) = (keys("default"), keys("validation"), keys("selection"), keys("holdout"));
        let hold2 = keys("holdout2");
        assert_eq!((val.len(), sel.len(), hold.len(), hold2.len()), (12, 48, 96, 96), "distinct draws");
        assert!(val.is_disjoint(&test) && sel.is_disjoint(&test) && sel.is_disjoint(&val));
        assert!(hold.is_disjoint(&test) && hold.is_disjoint(&val) && hold.is_disjoint(&sel));
        assert!([&test, &val, &sel, &hold].iter().all(|other| hold2.is_disjoint(other)));
    }

    #[test]
    fn unknown_keys_are_refused_with_the_key_named() {
        let text = "name = \"x\"\nbase = \"wireless-rayleigh\"\n[[vary]]\nkey = \"dynamics.learnin_rate\"\nmin = 0.1\nmax = 0.2\n";
        let dir = std::env::temp_dir().join(format!("rankpilot-dist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let e = EnvDistribution::load(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("vary[0].key") && e.contains("learnin_rate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
