//! Tokenizers: raw UTF-8 bytes (vocabulary 256) by default; a model directory's
//! `tokenizer.json` is used when present if it is a byte-level BPE tokenizer (GPT-2 / Llama-3
//! style), otherwise loading fails with a message that says what is supported.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use rankpilot_config::BadInput;

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

#[cfg(test)]
mod tests {
    use super::*;

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
