//! Strict TOML presets for rankpilot.
//!
//! Every preset (environment, policy, fine-tuning) is a plain serde struct marked
//! `#[serde(deny_unknown_fields)]` that also implements [`Validate`] for range checks. [`load`]
//! reads a file and returns either the value or a [`ConfigError`] that names the file, the dotted
//! key and what is allowed. The CLI maps a `ConfigError` (and a [`BadInput`] from the other crates)
//! to exit code 2.
//!
//! ```
//! use rankpilot_config::{Validate, Violations, from_str};
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Channel { snr_db: f64, k_factor: f64 }
//! impl Validate for Channel {
//!     fn validate(&self, v: &mut Violations) {
//!         v.check(self.k_factor >= 0.0, "k_factor", self.k_factor, "a number >= 0");
//!     }
//! }
//! let err = from_str::<Channel>("snr_db = 10.0\nk_factor = -1.0", "demo.toml").unwrap_err();
//! assert!(err.to_string().contains("k_factor"));
//! ```

pub mod mutate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A preset that could not be used: which file, which key, what went wrong, what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    // The OS error is part of the message, not a `source`: a chain printer would repeat it.
    #[error("{file}: cannot read: {cause}")]
    Io {
        /// The preset file.
        file: PathBuf,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// TOML syntax error, unknown key, or wrong type.
    #[error("{file}: {}{message}", key_prefix(.key))]
    Parse {
        /// The preset file.
        file: PathBuf,
        /// Dotted path of the offending key (`channel.k_factor`), empty when it is the top level.
        key: String,
        /// What went wrong, including the allowed keys or the expected type.
        message: String,
    },
    /// Values of the right type but outside their allowed range.
    #[error("{file}: {}", .violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// The preset file.
        file: PathBuf,
        /// Every out-of-range value found (all are reported at once).
        violations: Vec<Violation>,
    },
}

/// Input that cannot be used — a flag, a file or a value outside what is allowed — detected
/// outside a preset (a model directory, an adapter, a checkpoint's contents). Like
/// [`ConfigError`], it maps to exit code 2 in the CLI; the message names the file, the key and
/// what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn key_prefix(key: &str) -> String {
    if key.is_empty() || key == "." { String::new() } else { format!("key `{key}`: ") }
}

/// One out-of-range value.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Dotted key.
    pub key: String,
    /// The value found, as text.
    pub found: String,
    /// What is allowed, in words (`"a number in [0, 1)"`).
    pub allowed: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}` = {}: allowed: {}", self.key, self.found, self.allowed)
    }
}

/// Collects range violations while validating a preset; nested structs push a key prefix.
#[derive(Debug, Default)]
pub struct Violations {
    prefix: Vec<String>,
    found: Vec<Violation>,
}

impl Violations {
    /// Records a violation unless `ok` holds.
    pub fn check(&mut self, ok: bool, key: &str, found: impl fmt::Debug, allowed: &str) {
        if !ok {
            self.push(key, format!("{found:?}"), allowed);
        }
    }

    /// Records a violation unconditionally.
    pub fn push(&mut self, key: &str, found: String, allowed: &str) {
        let mut full = self.prefix.join(".");
        if !full.is_empty() && !key.is_empty() {
            full.push('.');
        }
        full.push_str(key);
        self.found.push(Violation { key: full, found, allowed: allowed.to_string() });
    }

    /// Validates a nested value with `key` prefixed to its keys.
    pub fn nested<T: Validate + ?Sized>(&mut self, key: &str, value: &T) {
        self.prefix.push(key.to_string());
        value.validate(self);
        self.prefix.pop();
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// The recorded violations.
    pub fn into_vec(self) -> Vec<Violation> {
        self.found
    }
}

/// Range and consistency checks that serde's types cannot express.
pub trait Validate {
    /// Pushes every violation found into `v`; keys are relative to this value.
    fn validate(&self, v: &mut Violations);
}

/// Reads and validates a TOML preset file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io { file: path.to_path_buf(), cause })?;
    from_str(&text, path)
}

/// Parses and validates TOML text; `file` is only used in error messages.
pub fn from_str<T: DeserializeOwned + Validate>(text: &str, file: impl AsRef<Path>) -> Result<T, ConfigError> {
    let file = file.as_ref().to_path_buf();
    let value: T = parse(text, &file)?;
    let mut v = Violations::default();
    // `inf` and `nan` are valid TOML floats and pass every `> 0` check: refuse them everywhere,
    // whatever the key, before the preset's own range checks.
    if let Ok(table) = text.parse::<toml::Table>() {
        non_finite_floats(&toml::Value::Table(table), "", &mut v);
    }
    value.validate(&mut v);
    if v.is_empty() { Ok(value) } else { Err(ConfigError::Invalid { file, violations: v.into_vec() }) }
}

fn parse<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
        file: file.to_path_buf(),
        key: String::new(),
        message: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut message = one_line(inner.message());
        if let Some(span) = inner.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            message = format!("{message} (line {line})");
        }
        ConfigError::Parse { file: file.to_path_buf(), key, message }
    })
}

/// Pushes a violation for every non-finite float below `value` (`key` is its dotted path).
fn non_finite_floats(value: &toml::Value, key: &str, v: &mut Violations) {
    match value {
        toml::Value::Float(x) if !x.is_finite() => v.push(key, x.to_string(), "a finite number"),
        toml::Value::Table(t) => {
            for (k, x) in t {
                let key = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                non_finite_floats(x, &key, v);
            }
        }
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                non_finite_floats(x, &format!("{key}[{i}]"), v);
            }
        }
        _ => {}
    }
}

/// Longest error message passed on (a parser may quote a whole line of the file, which can be
/// hundreds of kilobytes long).
const MAX_MESSAGE: usize = 400;

fn one_line(s: &str) -> String {
    let line = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ");
    match line.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}… ({} more characters)", &line[..cut], line.len() - cut),
        None => line,
    }
}

/// Serializes a preset back to TOML text (for logging the effective config).
pub fn to_string<T: serde::Serialize>(value: &T) -> String {
    toml::to_string_pretty(value).unwrap_or_else(|e| format!("# could not serialize: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        rho: f64,
        ranks: Vec<u32>,
    }

    impl Validate for Outer {
        fn validate(&self, v: &mut Violations) {
            v.nested("inner", &self.inner);
        }
    }
    impl Validate for Inner {
        fn validate(&self, v: &mut Violations) {
            v.check((0.0..1.0).contains(&self.rho), "rho", self.rho, "a number in [0, 1)");
            v.check(!self.ranks.is_empty(), "ranks", &self.ranks, "a non-empty list");
        }
    }

    #[test]
    fn accepts_valid() {
        let o: Outer = from_str("name = 'a'\n[inner]\nrho = 0.5\nranks = [1, 2]\n", "x.toml").unwrap();
        assert_eq!(o.name, "a");
        assert_eq!(o.inner.ranks, vec![1, 2]);
    }

    #[test]
    fn unknown_key_names_file_key_and_allowed() {
        let e = from_str::<Outer>("name = 'a'\n[inner]\nrho = 0.5\nranks = [1]\nrhoo = 1\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.toml: "), "{e}");
        assert!(e.contains("unknown field `rhoo`"), "{e}");
        assert!(e.contains("`rho`") && e.contains("`ranks`"), "allowed keys listed: {e}");
        assert!(e.contains("inner"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e =
            from_str::<Outer>("name = 'a'\n[inner]\nrho = 'high'\nranks = [1]\n", "p.toml").unwrap_err().to_string();
        assert!(e.contains("key `inner.rho`"), "{e}");
        assert!(e.contains("f64") || e.contains("float"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn out_of_range_lists_every_violation() {
        let e = from_str::<Outer>("name = 'a'\n[inner]\nrho = 1.0\nranks = []\n", "p.toml").unwrap_err();
        match &e {
            ConfigError::Invalid { violations, .. } => {
                assert_eq!(violations.len(), 2);
                assert_eq!(violations[0].key, "inner.rho");
                assert_eq!(violations[0].allowed, "a number in [0, 1)");
                assert_eq!(violations[1].key, "inner.ranks");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = from_str::<Outer>("name = \n", "p.toml").unwrap_err().to_string();
        assert!(e.starts_with("p.toml: "), "{e}");
    }

    #[test]
    fn missing_file() {
        let e = load::<Outer>(Path::new("/nonexistent/x.toml")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.toml: cannot read"), "{e}");
    }

    /// Issue 13, items 8 and 13: `inf`/`nan` pass `> 0` checks, so they are refused for every key;
    /// a parser message quoting a huge line is cut.
    #[test]
    fn non_finite_floats_are_refused_by_key_and_messages_stay_short() {
        let e = from_str::<Outer>("name = 'x'\n[inner]\nrho = inf\nranks = [1]", "p.toml").unwrap_err().to_string();
        assert!(e.contains("p.toml") && e.contains("key `inner.rho` = inf: allowed: a finite number"), "{e}");
        let e = from_str::<Outer>("name = 'x'\n[inner]\nrho = nan\nranks = [1]", "p.toml").unwrap_err().to_string();
        assert!(e.contains("inner.rho") && e.contains("finite"), "{e}");
        let deep = format!("name = {}1{}", "[".repeat(200_000), "]".repeat(200_000));
        let e = from_str::<Outer>(&deep, "deep.toml").unwrap_err().to_string();
        assert!(e.len() < 1000 && e.contains("deep.toml"), "{} bytes: {}", e.len(), &e[..e.len().min(300)]);
    }
}
