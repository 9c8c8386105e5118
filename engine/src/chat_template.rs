//! How chat `messages` become prompt text: the checkpoint's own Jinja `chat_template` from
//! `tokenizer_config.json` (a string, or a list of named templates: `default` is used), rendered
//! with minijinja (Python string methods from minijinja-contrib, `raise_exception`,
//! `strftime_now`) and its `bos_token` / `eos_token`; without one, the two built-in formats.
//! Takes messages; gives the text and whether the tokenizer should add its own special tokens
//! (not for a template: it writes them itself, as transformers' `apply_chat_template` does).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// One chat message, its content parts already joined into text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The optional author name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Errors of loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("the chat template does not compile: {0}")]
    Compile(#[source] minijinja::Error),
    /// The template refused the messages (its `raise_exception`).
    #[error("the chat template refused the messages: {0}")]
    Raised(String),
    #[error("the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
    #[error("role '{0}' is not one of system, user, assistant (this checkpoint has no chat template)")]
    UnknownRole(String),
}

/// A built-in format, used only when the checkpoint has no `chat_template`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// `"{role}: {content}\n"` per message, then `"assistant:"`.
    Simple,
    /// bitnet-b1.58-2B-4T's: `"{Role}: {content}<|eot_id|>"` per message, then `"Assistant: "`
    /// (the tokenizer's post-processor adds `<|begin_of_text|>`).
    BitNet,
}

/// The chat format of a checkpoint.
pub enum ChatTemplate {
    /// The checkpoint's Jinja template with its special tokens.
    Jinja { env: Box<minijinja::Environment<'static>>, bos: String, eos: String },
    /// No template in the checkpoint.
    Fallback(Fallback),
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChatTemplate::Jinja { bos, eos, .. } => f.debug_struct("Jinja").field("bos", bos).field("eos", eos).finish(),
            ChatTemplate::Fallback(k) => f.debug_tuple("Fallback").field(k).finish(),
        }
    }
}

/// A rendered chat prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    pub text: String,
    /// Whether encoding should add the tokenizer's special tokens (BOS).
    pub add_special_tokens: bool,
}

/// `bos_token` / `eos_token` as tokenizer_config.json writes them: a string or an added-token object.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    }
}

const TEMPLATE: &str = "chat";

impl ChatTemplate {
    /// Reads `dir/tokenizer_config.json`'s `chat_template`; without the file or the key,
    /// `fallback`.
    pub fn load(dir: &Path, fallback: Fallback) -> Result<Self, ChatTemplateError> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ChatTemplate::Fallback(fallback)),
            Err(source) => return Err(ChatTemplateError::Io { path, source }),
        };
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| ChatTemplateError::Config { path: path.clone(), message: e.to_string() })?;
        let source = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(ChatTemplate::Fallback(fallback)),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let pick = named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default")).or(named.first());
                match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(s) => s.to_string(),
                    None => return Err(ChatTemplateError::Config { path, message: "`chat_template` is a list without a {name, template} entry".into() }),
                }
            }
            Some(_) => return Err(ChatTemplateError::Config { path, message: "`chat_template` must be a string or a list of {name, template}".into() }),
        };
        Self::jinja(source, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))
    }

    /// A Jinja template with its special tokens.
    pub fn jinja(source: String, bos: String, eos: String) -> Result<Self, ChatTemplateError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers renders with trim_blocks and lstrip_blocks on: so must we.
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(ChatTemplateError::Compile)?;
        env.set_syntax(syntax);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("{RAISED}{msg}")))
        });
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template_owned(TEMPLATE, source).map_err(ChatTemplateError::Compile)?;
        Ok(ChatTemplate::Jinja { env: Box::new(env), bos, eos })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ending where the assistant's
    /// reply starts.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<ChatPrompt, ChatTemplateError> {
        match self {
            ChatTemplate::Jinja { env, bos, eos } => {
                let t = env.get_template(TEMPLATE).map_err(ChatTemplateError::Render)?;
                let ctx = minijinja::context! { messages => minijinja::Value::from(minijinja::value::Serde(messages)), add_generation_prompt => add_generation_prompt, bos_token => bos, eos_token => eos };
                let text = t.render(ctx).map_err(|e| match raised(&e) {
                    Some(m) => ChatTemplateError::Raised(m),
                    None => ChatTemplateError::Render(e),
                })?;
                Ok(ChatPrompt { text, add_special_tokens: false })
            }
            ChatTemplate::Fallback(kind) => {
                if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
                    return Err(ChatTemplateError::UnknownRole(m.role.clone()));
                }
                Ok(ChatPrompt { text: fallback_prompt(messages, *kind, add_generation_prompt), add_special_tokens: true })
            }
        }
    }
}

/// Marks a `raise_exception` error so it is told apart from a broken template.
const RAISED: &str = "raise_exception: ";

/// The message a template's `raise_exception` gave, if that is what `e` is.
fn raised(e: &minijinja::Error) -> Option<String> {
    e.detail().and_then(|d| d.strip_prefix(RAISED)).map(str::to_string)
}

/// The built-in formats.
fn fallback_prompt(messages: &[ChatMessage], kind: Fallback, add_generation_prompt: bool) -> String {
    match kind {
        Fallback::Simple => {
            let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
            if add_generation_prompt {
                s.push_str("assistant:");
            }
            s
        }
        Fallback::BitNet => {
            let cap = |r: &str| r.chars().take(1).flat_map(char::to_uppercase).chain(r.chars().skip(1)).collect::<String>();
            let mut s: String = messages.iter().map(|m| format!("{}: {}<|eot_id|>", cap(&m.role), m.content.trim())).collect();
            if add_generation_prompt {
                s.push_str("Assistant: ");
            }
            s
        }
    }
}

/// Today's date (UTC) in `fmt`'s `%d`, `%m`, `%Y`, `%b`, `%B` (Llama 3 templates print it).
fn strftime_now(fmt: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}")).replace("%m", &format!("{m:02}")).replace("%Y", &y.to_string()).replace("%B", month).replace("%b", &month[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), name: None }
    }

    #[test]
    fn fallback_formats() {
        let m = [msg("user", "hi")];
        assert_eq!(fallback_prompt(&m, Fallback::Simple, true), "user: hi\nassistant:");
        assert_eq!(fallback_prompt(&m, Fallback::BitNet, true), "User: hi<|eot_id|>Assistant: ");
        assert!(matches!(ChatTemplate::Fallback(Fallback::Simple).render(&[msg("wizard", "x")], true), Err(ChatTemplateError::UnknownRole(r)) if r == "wizard"));
    }

    #[test]
    fn jinja_template_with_python_methods_and_raise_exception() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
                   [{{ m.role.upper() }}]{{ m.content.strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::jinja(src.into(), "<s>".into(), "</s>".into()).unwrap();
        let p = t.render(&[msg("user", " hi ")], true).unwrap();
        assert_eq!(p, ChatPrompt { text: "<s>[USER]hi</s>[ASSISTANT]".into(), add_special_tokens: false });
        assert_eq!(t.render(&[msg("user", "hi")], false).unwrap().text, "<s>[USER]hi</s>");
        match t.render(&[msg("tool", "x")], true) {
            Err(ChatTemplateError::Raised(m)) => assert_eq!(m, "bad role tool"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strftime_now_formats_a_date() {
        let s = strftime_now("%d %b %Y");
        assert_eq!(s.len(), 11, "{s}");
    }
}
