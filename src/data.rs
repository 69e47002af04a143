//! Text corpora, tokenizers and batching for pre-training and fine-tuning.
//!
//! A corpus is read from a file, a directory (every regular, non-hidden file below it, in sorted
//! path order) or a JSONL file (one JSON object per line with a `"text"` string, or one JSON
//! string per line). Every file must be UTF-8 and the whole corpus non-empty; otherwise a
//! [`BadInput`] error names the file (and line, for JSONL).
//!
//! Two built-in corpora need no download — both are files present on every machine after
//! rankpilot's set-up — and give the default task a clear domain shift:
//!
//! * `builtin:prose` — English legal prose: the regular files of `/usr/share/common-licenses`
//!   (Debian's `base-files`: GPL, LGPL, Apache, MPL, GFDL, Artistic, BSD, CC0; ≈ 300 kB).
//!   The default pre-training corpus.
//! * `builtin:code` — Python source: every `*.py` file of the `peft` package (pinned to 0.21.2 in
//!   `scripts/requirements.txt`) in the set-up's venv (≈ 2.9 MB). The default fine-tuning corpus.
//!
//! Files are concatenated in sorted path order, each followed by a blank line, and the SHA-256
//! of the result is reported ([`Corpus::sha256`]) so a run records exactly what it read.
//!
//! Tokenizers ([`Tokenizer`]): raw UTF-8 bytes (vocabulary 256) by default; a model directory's
//! `tokenizer.json` is used when present if it is a byte-level BPE tokenizer (GPT-2 / Llama-3
//! style), otherwise loading fails with a message that says what is supported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::cli::BadInput;

/// Name of the built-in English prose corpus.
pub const BUILTIN_PROSE: &str = "builtin:prose";
/// Name of the built-in Python source corpus.
pub const BUILTIN_CODE: &str = "builtin:code";

/// A loaded text corpus: its documents and where they came from.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// What the user passed (a path or a `builtin:` name).
    pub source: String,
    /// Documents in reading order (one per file, or per JSONL line).
    pub docs: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

impl Corpus {
    /// Loads a corpus from a `builtin:` name, a file, a directory, or a `.jsonl` file.
    pub fn load(spec: &str) -> Result<Corpus> {
        let (files, what) = match spec {
            BUILTIN_PROSE => (builtin_prose_files()?, spec.to_string()),
            BUILTIN_CODE => (builtin_code_files()?, spec.to_string()),
            other if other.starts_with("builtin:") => {
                return Err(BadInput(format!(
                    "unknown built-in corpus `{other}` (known: {BUILTIN_PROSE}, {BUILTIN_CODE})"
                ))
                .into());
            }
            path => {
                let p = Path::new(path);
                let meta = std::fs::metadata(p).map_err(|e| BadInput(format!("data `{path}`: {e}")))?;
                let files = if meta.is_dir() {
                    let mut v = Vec::new();
                    walk_sorted(p, &mut v, &|_| true)?;
                    v
                } else {
                    vec![p.to_path_buf()]
                };
                (files, path.to_string())
            }
        };
        if files.is_empty() {
            return Err(BadInput(format!("data `{what}`: no files found")).into());
        }
        let mut docs = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| BadInput(format!("{}: {e}", f.display())))?;
            let is_jsonl = f.extension().is_some_and(|e| e == "jsonl");
            let text = String::from_utf8(bytes).map_err(|e| {
                BadInput(format!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                ))
            })?;
            if is_jsonl {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    docs.push(jsonl_text(line).map_err(|why| BadInput(format!("{}:{}: {why}", f.display(), i + 1)))?);
                }
            } else {
                docs.push(text);
            }
        }
        if docs.iter().all(|d| d.trim().is_empty()) {
            return Err(BadInput(format!("data `{what}`: the corpus is empty")).into());
        }
        Ok(Corpus { source: what, docs, files })
    }

    /// The corpus as one text: documents joined, each followed by a blank line.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for d in &self.docs {
            s.push_str(d);
            s.push_str("\n\n");
        }
        s
    }

    /// Lower-case hex SHA-256 of [`Corpus::text`]: identifies exactly what was read.
    pub fn sha256(&self) -> String {
        Sha256::digest(self.text().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn jsonl_text(line: &str) -> std::result::Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    match v {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Object(o) => match o.get("text") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err("`text` is not a string".into()),
            None => Err("object has no `text` field".into()),
        },
        _ => Err("expected a JSON object with a `text` field or a JSON string".into()),
    }
}

/// Regular, non-hidden files below `dir` in sorted path order (symlinks to files are skipped so
/// aliases such as `GPL -> GPL-3` are read once).
fn walk_sorted(dir: &Path, out: &mut Vec<PathBuf>, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| BadInput(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') || name == "__pycache__" {
            continue;
        }
        let ft = match e.file_type() {
            Ok(t) => t,
            Err(_) => continue,
        };
        let p = e.path();
        if ft.is_dir() {
            walk_sorted(&p, out, keep)?;
        } else if ft.is_file() && keep(&p) {
            out.push(p);
        }
    }
    Ok(())
}

fn builtin_prose_files() -> Result<Vec<PathBuf>> {
    let dir = Path::new("/usr/share/common-licenses");
    let mut v = Vec::new();
    if dir.is_dir() {
        walk_sorted(dir, &mut v, &|_| true)?;
    }
    if v.is_empty() {
        return Err(BadInput(format!(
            "{BUILTIN_PROSE}: {} has no files (Debian's base-files package provides it); pass --data <path>",
            dir.display()
        ))
        .into());
    }
    Ok(v)
}

/// The set-up's venv: `$RANKPILOT_CACHE/venv`, else the interpreter the build was configured with,
/// else `~/.cache/rankpilot/venv`.
pub fn setup_venv() -> Option<PathBuf> {
    if let Ok(c) = std::env::var("RANKPILOT_CACHE") {
        return Some(PathBuf::from(c).join("venv"));
    }
    if let Some(py) = std::env::var("RANKPILOT_PYTHON").ok().or(option_env!("RANKPILOT_PYTHON").map(String::from)) {
        // <venv>/bin/python
        if let Some(v) = Path::new(&py).parent().and_then(|b| b.parent()) {
            return Some(v.to_path_buf());
        }
    }
    std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache/rankpilot/venv"))
}

fn builtin_code_files() -> Result<Vec<PathBuf>> {
    let venv = setup_venv().ok_or_else(|| BadInput(format!("{BUILTIN_CODE}: no set-up venv found")))?;
    let lib = venv.join("lib");
    let mut pkg = None;
    if let Ok(rd) = std::fs::read_dir(&lib) {
        let mut pys: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        pys.sort();
        for p in pys {
            let cand = p.join("site-packages/peft");
            if cand.is_dir() {
                pkg = Some(cand);
            }
        }
    }
    let pkg = pkg.ok_or_else(|| {
        BadInput(format!(
            "{BUILTIN_CODE}: the peft package was not found under {}/lib/python3.*/site-packages (run scripts/setup.sh, or pass --data <path>)",
            venv.display()
        ))
    })?;
    let mut v = Vec::new();
    walk_sorted(&pkg, &mut v, &|p| p.extension().is_some_and(|e| e == "py"))?;
    Ok(v)
}

/// Turns text into token ids.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Raw UTF-8 bytes: id = byte value, vocabulary 256.
    Bytes,
    /// Byte-level BPE from a `tokenizer.json`.
    Bpe(Box<BpeTokenizer>),
}

impl Tokenizer {
    /// The tokenizer for a model directory: its `tokenizer.json` when present, else bytes.
    pub fn for_model_dir(dir: &Path) -> Result<Tokenizer> {
        let p = dir.join("tokenizer.json");
        if p.is_file() { Ok(Tokenizer::Bpe(Box::new(BpeTokenizer::load(&p)?))) } else { Ok(Tokenizer::Bytes) }
    }

    /// Number of distinct ids this tokenizer can produce (ids are below this).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Bpe(b) => b.max_id + 1,
        }
    }

    /// Encodes `text` into ids.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        match self {
            Tokenizer::Bytes => text.bytes().map(|b| b as i64).collect(),
            Tokenizer::Bpe(b) => b.encode(text),
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes (256)".into(),
            Tokenizer::Bpe(b) => format!("byte-level BPE ({} ids, {} merges)", b.max_id + 1, b.ranks.len()),
        }
    }
}

/// A byte-level BPE tokenizer (the GPT-2 scheme used by GPT-2, Llama-3, Qwen...) read from a
/// Hugging Face `tokenizer.json` with `model.type == "BPE"` and a `ByteLevel` pre-tokenizer.
///
/// Pre-tokenization splits on the GPT-2 pattern approximated without look-ahead (contractions,
/// letter runs, digit runs, punctuation runs, whitespace runs), which matches Hugging Face on
/// ordinary text; special/added tokens are not matched inside text.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    vocab: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_to_char: [char; 256],
    max_id: usize,
}

impl BpeTokenizer {
    /// Reads `tokenizer.json`; errors say what is supported when the file is something else.
    pub fn load(path: &Path) -> Result<BpeTokenizer> {
        let bad = |why: String| BadInput(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let model = v.get("model").ok_or_else(|| bad("no `model` key".into()))?;
        let ty = model.get("type").and_then(|t| t.as_str()).unwrap_or("?");
        let pre = v.get("pre_tokenizer").map(|p| p.to_string()).unwrap_or_default();
        if ty != "BPE" || !pre.contains("ByteLevel") {
            return Err(bad(format!(
                "tokenizer model `{ty}` is not supported: rankpilot reads byte-level BPE tokenizers \
                 (model.type \"BPE\" with a ByteLevel pre-tokenizer, as GPT-2/Llama-3) or uses raw \
                 bytes when the model directory has no tokenizer.json"
            ))
            .into());
        }
        let vocab_v = model
            .get("vocab")
            .and_then(|x| x.as_object())
            .ok_or_else(|| bad("`model.vocab` is not an object".into()))?;
        let mut vocab = HashMap::new();
        let mut max_id = 0usize;
        for (k, id) in vocab_v {
            let id = id.as_i64().ok_or_else(|| bad(format!("vocab entry `{k}` is not an integer")))?;
            max_id = max_id.max(id as usize);
            vocab.insert(k.clone(), id);
        }
        if let Some(added) = v.get("added_tokens").and_then(|a| a.as_array()) {
            for t in added {
                if let Some(id) = t.get("id").and_then(|i| i.as_u64()) {
                    max_id = max_id.max(id as usize);
                }
            }
        }
        let mut ranks = HashMap::new();
        for (i, m) in model
            .get("merges")
            .and_then(|x| x.as_array())
            .ok_or_else(|| bad("`model.merges` is not a list".into()))?
            .iter()
            .enumerate()
        {
            let pair = match m {
                serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            }
            .ok_or_else(|| bad(format!("merge {i} is not a pair")))?;
            ranks.insert(pair, i);
        }
        Ok(BpeTokenizer { vocab, ranks, byte_to_char: bytes_to_unicode(), max_id })
    }

    /// Encodes text (see the type's documentation for the pre-tokenization used).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut out = Vec::new();
        for piece in pretokenize(text) {
            let mut parts: Vec<String> = piece.bytes().map(|b| self.byte_to_char[b as usize].to_string()).collect();
            loop {
                let best = parts
                    .windows(2)
                    .enumerate()
                    .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|r| (*r, i)))
                    .min();
                let Some((_, i)) = best else { break };
                let merged = format!("{}{}", parts[i], parts[i + 1]);
                parts.splice(i..i + 2, [merged]);
            }
            for p in parts {
                match self.vocab.get(&p) {
                    Some(&id) => out.push(id),
                    None => {
                        // Fall back to single byte symbols (always in a byte-level vocabulary).
                        for c in p.chars() {
                            if let Some(&id) = self.vocab.get(&c.to_string()) {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// GPT-2's reversible byte → printable-character map.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    table
}

/// GPT-2 pre-tokenization (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
/// written out by hand, since the `regex` crate has no look-ahead.
fn pretokenize(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Space,
        Other,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let idx: Vec<(usize, char)> = text.char_indices().collect();
    let at = |j: usize| if j < idx.len() { idx[j].0 } else { text.len() };
    let mut out = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let start = idx[i].0;
        // Contractions.
        if idx[i].1 == '\'' {
            let rest = &text[start + 1..];
            if let Some(n) =
                ["s", "t", "re", "ve", "m", "ll", "d"].iter().find(|c| rest.starts_with(*c)).map(|c| c.len())
            {
                let end = start + 1 + n;
                out.push(&text[start..end]);
                while i < idx.len() && idx[i].0 < end {
                    i += 1;
                }
                continue;
            }
        }
        let mut j = i;
        // A single ' ' joins a following letter/digit/other run.
        if idx[j].1 == ' ' && j + 1 < idx.len() && class(idx[j + 1].1) != Class::Space {
            j += 1;
        }
        let c = class(idx[j].1);
        j += 1;
        if c == Class::Space {
            while j < idx.len() && class(idx[j].1) == Class::Space {
                j += 1;
            }
            // `\s+(?!\S)`: leave the last whitespace character for what follows.
            if j < idx.len() && j - i > 1 {
                j -= 1;
            }
        } else {
            while j < idx.len() && class(idx[j].1) == c {
                j += 1;
            }
        }
        out.push(&text[start..at(j)]);
        i = j;
    }
    out
}

/// A tokenized corpus cut into a training stream and a held-out validation stream.
#[derive(Debug)]
pub struct TokenData {
    /// Training ids.
    pub train: Vec<i64>,
    /// Validation ids (the last `val_fraction` of the corpus).
    pub val: Vec<i64>,
}

impl TokenData {
    /// Tokenizes `corpus` and holds out the last `val_fraction` of its ids for validation.
    /// Needs at least `2·(seq_len + 1)` ids in each part.
    pub fn new(corpus: &Corpus, tok: &Tokenizer, val_fraction: f64, seq_len: usize) -> Result<TokenData> {
        let ids = tok.encode(&corpus.text());
        let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
        let need = 2 * (seq_len + 1);
        if ids.len() < 2 * need || n_val < need {
            return Err(BadInput(format!(
                "data `{}`: {} tokens is too little for sequences of {seq_len} (need at least {} with {:.0}% held out for validation)",
                corpus.source,
                ids.len(),
                ((2 * need) as f64).max(need as f64 / val_fraction.max(1e-9)).ceil(),
                val_fraction * 100.0
            ))
            .into());
        }
        let split = ids.len() - n_val;
        Ok(TokenData { train: ids[..split].to_vec(), val: ids[split..].to_vec() })
    }

    /// A random training batch `[batch, seq_len + 1]` of windows drawn with `rng`.
    pub fn train_batch(&self, rng: &mut ChaCha8Rng, batch: usize, seq_len: usize, device: Device) -> Tensor {
        let hi = self.train.len() - seq_len - 1;
        let mut v = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let s = rng.random_range(0..=hi);
            v.extend_from_slice(&self.train[s..s + seq_len + 1]);
        }
        Tensor::from_slice(&v).view([batch as i64, seq_len as i64 + 1]).to_device(device)
    }

    /// The fixed validation batches: up to `max_batches` batches of `batch` evenly spaced windows.
    pub fn val_batches(&self, max_batches: usize, batch: usize, seq_len: usize, device: Device) -> Vec<Tensor> {
        let n_windows = (self.val.len() - 1) / (seq_len + 1);
        let total = n_windows.min(max_batches * batch).max(1);
        let stride = if total > 1 { (self.val.len() - seq_len - 1) / (total - 1) } else { 0 };
        let starts: Vec<usize> = (0..total).map(|i| i * stride).collect();
        starts
            .chunks(batch)
            .map(|c| {
                let mut v = Vec::with_capacity(c.len() * (seq_len + 1));
                for &s in c {
                    v.extend_from_slice(&self.val[s..s + seq_len + 1]);
                }
                Tensor::from_slice(&v).view([c.len() as i64, seq_len as i64 + 1]).to_device(device)
            })
            .collect()
    }
}

/// The seeded generator for data order (independent of libtorch's generator).
pub fn data_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a)
}

/// Ids as an `i64` tensor with `kind` checks left to the caller.
pub fn ids_tensor(ids: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(ids).to_kind(Kind::Int64).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_dirs_and_jsonl_and_rejects_bad_input() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("b.txt"), "bee").unwrap();
        std::fs::write(d.path().join("sub/a.txt"), "ay").unwrap();
        std::fs::write(d.path().join(".hidden"), "no").unwrap();
        let c = Corpus::load(d.path().to_str().unwrap()).unwrap();
        assert_eq!(c.docs, vec!["bee", "ay"]);
        let j = d.path().join("x.jsonl");
        std::fs::write(&j, "{\"text\": \"one\"}\n\n\"two\"\n").unwrap();
        assert_eq!(Corpus::load(j.to_str().unwrap()).unwrap().docs, vec!["one", "two"]);
        std::fs::write(&j, "{\"text\": \"one\"}\n{\"txt\": 1}\n").unwrap();
        let e = Corpus::load(j.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2") && e.contains("`text`"), "{e}");
        let bin = d.path().join("bin.txt");
        std::fs::write(&bin, [b'a', 0xff, 0xfe]).unwrap();
        let e = Corpus::load(bin.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("bin.txt") && e.contains("not UTF-8"), "{e}");
        let empty = d.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        let e = Corpus::load(empty.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(e.is::<BadInput>());
        assert!(Corpus::load("/nonexistent/x").unwrap_err().is::<BadInput>());
        assert!(Corpus::load("builtin:nope").unwrap_err().is::<BadInput>());
    }

    #[test]
    fn batches_are_deterministic() {
        let c = Corpus { source: "t".into(), docs: vec!["abcdefghijklmnopqrstuvwxyz".repeat(20)], files: vec![] };
        let d = TokenData::new(&c, &Tokenizer::Bytes, 0.2, 8).unwrap();
        let a = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        let b = d.train_batch(&mut data_rng(3), 4, 8, Device::Cpu);
        assert_eq!(a.size(), vec![4, 9]);
        assert!(a.equal(&b));
        let v = d.val_batches(2, 3, 8, Device::Cpu);
        assert!(!v.is_empty() && v[0].size()[1] == 9);
    }

    #[test]
    fn byte_level_bpe_applies_merges_and_rejects_other_models() {
        let d = tempfile::tempdir().unwrap();
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), i.into());
        }
        let sp = table[b' ' as usize];
        vocab.insert("he".into(), 256.into());
        vocab.insert("hel".into(), 257.into());
        vocab.insert(format!("{sp}w"), 258.into());
        let tj = serde_json::json!({
            "model": {"type": "BPE", "vocab": vocab, "merges": ["h e", "he l", format!("{sp} w")]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
            "added_tokens": [{"id": 300, "content": "<eos>"}]
        });
        std::fs::write(d.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let tok = Tokenizer::for_model_dir(d.path()).unwrap();
        assert_eq!(tok.vocab_size(), 301);
        assert_eq!(
            tok.encode("hello world"),
            vec![257, b'l' as i64, b'o' as i64, 258, b'o' as i64, b'r' as i64, b'l' as i64, b'd' as i64]
        );
        std::fs::write(d.path().join("tokenizer.json"), r#"{"model": {"type": "Unigram"}}"#).unwrap();
        let e = Tokenizer::for_model_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("Unigram") && e.contains("byte-level BPE"), "{e}");
    }

    #[test]
    fn pretokenizer_keeps_every_byte() {
        let s = "def f(x):\n    return  x+1 # it's";
        assert_eq!(pretokenize(s).concat(), s);
        assert_eq!(pretokenize("hello world")[1], " world");
        assert_eq!(pretokenize("it's  x\n\nab"), vec!["it", "'s", " ", " x", "\n", "\n", "ab"]);
    }
}
