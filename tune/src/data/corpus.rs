//! Text corpora for pre-training and fine-tuning.
//!
//! A corpus is read from a file, a directory (every regular, non-hidden file below it, in sorted
//! path order) or a JSONL file (one JSON object per line with a `"text"` string, or one JSON
//! string per line; or instruction data: objects with `"prompt"` and `"completion"` strings,
//! whose prompts are left out of the loss, or `"messages"` conversations rendered with the
//! tokenizer's chat template, trained on the assistant's turns). Every file must be UTF-8 and the whole corpus non-empty; otherwise a
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

use std::path::{Path, PathBuf};

use anyhow::Result;
use rankpilot_config::BadInput;
use sha2::{Digest, Sha256};

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
    /// Instruction examples (JSONL `prompt` / `completion`): trained on the completion only.
    /// Empty for plain text.
    pub examples: Vec<Example>,
    /// Conversations (JSONL `messages`): trained on the assistant's turns only.
    pub chats: Vec<Vec<crate::data::Message>>,
}

/// One instruction example: the model learns the completion given the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Context, masked out of the loss.
    pub prompt: String,
    /// The target text.
    pub completion: String,
}

/// One JSONL line: plain text, an instruction example or a conversation.
enum Line {
    Text(String),
    Example(Example),
    Chat(Vec<crate::data::Message>),
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
        let mut examples = Vec::new();
        let mut chats: Vec<Vec<crate::data::Message>> = Vec::new();
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
                    let at = |why: String| BadInput(format!("{}:{}: {why}", f.display(), i + 1));
                    match jsonl_line(line).map_err(at)? {
                        Line::Text(t) if examples.is_empty() && chats.is_empty() => docs.push(t),
                        Line::Example(e) if docs.len() == examples.len() && chats.is_empty() => {
                            docs.push(format!("{}{}", e.prompt, e.completion));
                            examples.push(e);
                        }
                        Line::Chat(c) if docs.len() == chats.len() && examples.is_empty() => {
                            docs.push(c.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect());
                            chats.push(c);
                        }
                        _ => {
                            return Err(at(
                                "mixes plain `text` lines, `prompt`/`completion` examples and `messages`: allowed: one kind per corpus"
                                    .into(),
                            )
                            .into());
                        }
                    }
                }
            } else {
                docs.push(text);
            }
        }
        if docs.iter().all(|d| d.trim().is_empty()) {
            return Err(BadInput(format!("data `{what}`: the corpus is empty")).into());
        }
        if (!examples.is_empty() && docs.len() != examples.len()) || (!chats.is_empty() && docs.len() != chats.len()) {
            return Err(BadInput(format!(
                "data `{what}`: mixes plain text files with `prompt`/`completion` examples: allowed: one kind per corpus"
            ))
            .into());
        }
        Ok(Corpus { source: what, docs, files, examples, chats })
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

fn jsonl_line(line: &str) -> std::result::Result<Line, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let string = |o: &serde_json::Map<String, serde_json::Value>, k: &str| match o.get(k) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{k}` is not a string")),
        None => Err(format!("object has no `{k}` field")),
    };
    match v {
        serde_json::Value::String(s) => Ok(Line::Text(s)),
        serde_json::Value::Object(o) if o.contains_key("prompt") || o.contains_key("completion") => {
            Ok(Line::Example(Example { prompt: string(&o, "prompt")?, completion: string(&o, "completion")? }))
        }
        serde_json::Value::Object(o) if o.contains_key("messages") => {
            let m: Vec<crate::data::Message> = serde_json::from_value(o["messages"].clone())
                .map_err(|e| format!("`messages`: {e} (allowed: a list of {{\"role\": …, \"content\": …}} objects)"))?;
            if m.is_empty() {
                return Err("`messages` is empty".into());
            }
            Ok(Line::Chat(m))
        }
        serde_json::Value::Object(o) => Ok(Line::Text(string(&o, "text")?)),
        _ => Err("expected a JSON object with a `text` field (or `prompt` + `completion`) or a JSON string".into()),
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
}
