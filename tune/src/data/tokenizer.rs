//! Tokenizers: a model directory's `tokenizer.json`, read and applied by Hugging Face's own
//! `tokenizers` crate (so every pre-tokenizer, normalizer, model type, added and special token
//! and post-processor behaves exactly as in Python), or raw UTF-8 bytes (vocabulary 256) when
//! the directory has none.
//!
//! The `tokenizers` crate is built with its pure-Rust `fancy-regex` back end instead of the
//! default Oniguruma C library: no C build, and the tests check the ids against the Python
//! library (which uses Oniguruma) on GPT-2-, Llama-3- and Qwen-style files.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rankpilot_config::BadInput;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Turns text into token ids and back.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Raw UTF-8 bytes: id = byte value, vocabulary 256.
    Bytes,
    /// A `tokenizer.json`, applied by the `tokenizers` crate.
    Hf(Box<HfTokenizer>),
}

/// A Hugging Face `tokenizer.json` and where it came from.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    /// The file it was read from.
    pub file: PathBuf,
    /// The tokenizer itself.
    pub inner: tokenizers::Tokenizer,
    /// One past the largest id it can produce (added tokens included).
    pub vocab_size: usize,
    /// The end-of-sequence token of `tokenizer_config.json` (`eos_token`) beside the file.
    pub eos: Option<i64>,
    /// Its `chat_template`, for chat data.
    pub chat: Option<crate::data::ChatTemplate>,
}

impl Tokenizer {
    /// The tokenizer for a model directory: its `tokenizer.json` when present, else bytes.
    pub fn for_model_dir(dir: &Path) -> Result<Tokenizer> {
        let p = dir.join("tokenizer.json");
        if p.is_file() { Ok(Tokenizer::Hf(Box::new(HfTokenizer::load(&p)?))) } else { Ok(Tokenizer::Bytes) }
    }

    /// Number of distinct ids this tokenizer can produce (ids are below this).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(h) => h.vocab_size,
        }
    }

    /// Encodes `text` into ids as `transformers`' `tokenizer(text)` does: special tokens in the
    /// text are matched, and the post-processor adds what the file says (e.g. Llama 3's BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(|b| b as i64).collect()),
            Tokenizer::Hf(h) => {
                let enc = without_panics(|| h.inner.encode(text, true))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| BadInput(format!("{}: encoding failed: {e}", h.file.display())))?;
                Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
            }
        }
    }

    /// Encodes `text` without the post-processor's additions (BOS/EOS): for pieces of a prompt
    /// that are concatenated.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf(h) => {
                let enc = without_panics(|| h.inner.encode(text, false))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| BadInput(format!("{}: encoding failed: {e}", h.file.display())))?;
                Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
            }
        }
    }

    /// Encodes `text` as [`Tokenizer::encode_plain`] does, with each id's start byte in `text`.
    pub fn encode_with_starts(&self, text: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        match self {
            Tokenizer::Bytes => Ok((self.encode(text)?, (0..text.len()).collect())),
            Tokenizer::Hf(h) => {
                let enc = without_panics(|| h.inner.encode(text, false))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| BadInput(format!("{}: encoding failed: {e}", h.file.display())))?;
                let ids = enc.get_ids().iter().map(|&i| i as i64).collect();
                Ok((ids, enc.get_offsets().iter().map(|o| o.0).collect()))
            }
        }
    }

    /// The chat template of the model's `tokenizer_config.json`, if any.
    pub fn chat_template(&self) -> Option<&crate::data::ChatTemplate> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(h) => h.chat.as_ref(),
        }
    }

    /// Turns ids back into text (special tokens kept; invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.clamp(0, 255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(h) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i.clamp(0, u32::MAX as i64) as u32).collect();
                h.inner.decode(&ids, false).map_err(|e| anyhow::anyhow!("{}: decoding failed: {e}", h.file.display()))
            }
        }
    }

    /// The end-of-sequence id (`eos_token` of the model's `tokenizer_config.json`), if any.
    pub fn eos_id(&self) -> Option<i64> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(h) => h.eos,
        }
    }

    /// The id of a special token such as `<|im_end|>`, if this tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(h) => h.inner.token_to_id(token).map(|i| i as i64),
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes (256)".into(),
            Tokenizer::Hf(h) => {
                let model = match h.inner.get_model() {
                    tokenizers::ModelWrapper::BPE(_) => "BPE",
                    tokenizers::ModelWrapper::WordPiece(_) => "WordPiece",
                    tokenizers::ModelWrapper::WordLevel(_) => "WordLevel",
                    tokenizers::ModelWrapper::Unigram(_) => "Unigram",
                };
                format!("{model} tokenizer.json ({} ids)", h.vocab_size)
            }
        }
    }

    /// The byte-level `tokenizer.json` of rankpilot's own models: a BPE without merges over GPT-2's
    /// 256 byte symbols, so that every id is the byte value, exactly as [`Tokenizer::Bytes`].
    /// `transformers`' `AutoTokenizer` loads it (with [`Tokenizer::bytes_tokenizer_config`]).
    pub fn bytes_tokenizer_json() -> Result<String> {
        let vocab: Vec<(String, u32)> = (0..=255u8).map(|b| (byte_symbol(b), b as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), vec![])
            .build()
            .map_err(|e| anyhow::anyhow!("building the byte tokenizer: {e}"))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.to_string(true).map_err(|e| anyhow::anyhow!("serializing the byte tokenizer: {e}"))
    }

    /// The `tokenizer_config.json` written beside [`Tokenizer::bytes_tokenizer_json`].
    pub fn bytes_tokenizer_config(max_length: usize) -> serde_json::Value {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": false,
            "bos_token": null,
            "eos_token": null,
            "pad_token": null,
            "unk_token": null,
        })
    }
}

/// Runs `f`, turning a panic inside the `tokenizers` library into an error message. The library
/// panics on some malformed files (0.23: `expect("Helper")` when a `decoder` object does not
/// deserialize), and a hostile file must give exit 2, never a panic. The panic hook is silenced
/// meanwhile so that no panic text reaches the user.
fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::sync::Mutex;
    static HOOK: Mutex<()> = Mutex::new(());
    let _serial = HOOK.lock().unwrap_or_else(|p| p.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    r.map_err(|p| {
        let why = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        format!("the tokenizers library failed on it ({})", why.unwrap_or_else(|| "no message".into()))
    })
}

/// GPT-2's printable symbol for byte `b`: printable Latin-1 bytes stand for themselves, the
/// others are shifted past 255 in byte order. (The `tokenizers` crate keeps its table private.)
fn byte_symbol(b: u8) -> String {
    let printable = |x: u32| (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
    let x = b as u32;
    let c = if printable(x) { x } else { 256 + (0..x).filter(|&y| !printable(y)).count() as u32 };
    char::from_u32(c).map(String::from).expect("below U+0200")
}

impl HfTokenizer {
    /// Reads `tokenizer.json`; errors name the file.
    pub fn load(path: &Path) -> Result<HfTokenizer> {
        let text = std::fs::read_to_string(path).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
        let inner: tokenizers::Tokenizer = without_panics(|| text.parse::<tokenizers::Tokenizer>())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                BadInput(format!("{}: not a tokenizer.json the `tokenizers` library reads: {e}", path.display()))
            })?;
        let vocab_size = inner.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
        if vocab_size == 0 {
            return Err(BadInput(format!("{}: the tokenizer has an empty vocabulary", path.display())).into());
        }
        // Special tokens are strings or AddedToken objects ({"content": …}) in tokenizer_config.json.
        let config = path
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join("tokenizer_config.json")).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .unwrap_or_default();
        let token = |k: &str| match &config[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        };
        let eos = token("eos_token").and_then(|t| inner.token_to_id(&t)).map(|i| i as i64);
        // `chat_template`: a string, or a list of named templates of which `default` is used.
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(String::from)
            }
            _ => None,
        };
        let chat = source.map(|source| crate::data::ChatTemplate {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        });
        Ok(HfTokenizer { file: path.to_path_buf(), inner, vocab_size, eos, chat })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_tokenizer_json_gives_the_byte_ids() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer.json"), Tokenizer::bytes_tokenizer_json().unwrap()).unwrap();
        let tok = Tokenizer::for_model_dir(d.path()).unwrap();
        assert_eq!(tok.vocab_size(), 256);
        let text = "def f(x):\n\t return  x+1 # it's naïve — 東京 \u{0}\u{7f}";
        assert_eq!(tok.encode(text).unwrap(), Tokenizer::Bytes.encode(text).unwrap());
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }

    #[test]
    fn a_file_the_library_cannot_read_is_refused_with_its_name() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer.json"), r#"{"model": {"type": "Unigram"}}"#).unwrap();
        let e = Tokenizer::for_model_dir(d.path()).unwrap_err();
        assert!(e.is::<BadInput>() && e.to_string().contains("tokenizer.json"), "{e}");
    }
}
