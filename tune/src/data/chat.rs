//! Chat data: a tokenizer's `chat_template` (Jinja, from `tokenizer_config.json`) rendered with
//! `minijinja` (plus its Python-compatible string methods, as HF templates call `.strip()` and
//! the like), and the spans of the assistant's turns, which are the targets of the loss.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One chat message (`{"role": …, "content": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer's chat template with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` of `tokenizer_config.json`.
    pub bos_token: Option<String>,
    /// `eos_token` of `tokenizer_config.json`.
    pub eos_token: Option<String>,
}

impl ChatTemplate {
    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers renders with trim_blocks and lstrip_blocks on.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| format!("`chat_template` does not parse: {e}"))?;
        let t = env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| format!("`chat_template` failed: {e}"))
    }

    /// The conversation rendered, and the byte ranges of its assistant turns: for the i-th
    /// message (an assistant's), the text the template adds after the conversation up to i with
    /// a generation prompt, up to the conversation through i. Templates whose renderings are not
    /// prefixes of one another cannot be split this way and are refused.
    pub fn render_with_targets(&self, messages: &[Message]) -> Result<(String, Vec<(usize, usize)>), String> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "the chat template does not render message {i} as a continuation of the ones before: its assistant turns cannot be told apart"
                ));
            }
            spans.push((before.len(), through.len()));
        }
        Ok((full, spans))
    }
}
