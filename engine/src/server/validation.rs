//! Request bodies of `/v1/completions` and `/v1/chat/completions` and their validation: the
//! JSON becomes a [`ValidRequest`] (prompts as token ids, sampling, logit changes, logprobs,
//! end conditions) before anything reaches the batcher. Every field is either honoured or
//! refused with a 400 that names it; none is silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use mangrove_deploy::http::ApiError;

use super::AppState;
use crate::batcher::GenOptions;
use crate::chat_template::ChatMessage;
use crate::logits::LogitsProcessing;
use crate::sampling::SamplingParams;
use crate::Engine;

/// Default `max_tokens` when the request gives none.
const DEFAULT_MAX_TOKENS: usize = 16;
/// Most stop strings.
const MAX_STOPS: usize = 4;
/// Most choices per prompt (`n`).
pub const MAX_N: usize = 16;
/// Most prompts in one completions request.
const MAX_PROMPTS: usize = 64;
/// Most alternatives per position (`logprobs`, `top_logprobs`; vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// Prompt text longer than this many bytes per context position is refused before tokenizing
/// (real tokenizers average 3–5 bytes per token; one token rarely spans more than a few dozen).
const MAX_BYTES_PER_TOKEN: usize = 64;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<i64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    best_of: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    /// vLLM's sampling extensions: keep the k likeliest tokens (-1 or 0: all) ...
    #[serde(default)]
    top_k: Option<i64>,
    /// ... and tokens at least min_p times as likely as the likeliest.
    #[serde(default)]
    min_p: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    min_tokens: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// vLLM's extension: logprobs name tokens `token_id:{id}` instead of by their text.
    #[serde(default)]
    return_tokens_as_token_ids: Option<bool>,
    /// An end-user id for abuse tracking: accepted, not used.
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

/// A `/v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    #[serde(default)]
    prompt: Option<serde_json::Value>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
    /// Everything else: refused by name unless null.
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// A `/v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    #[serde(default)]
    messages: Option<Vec<MessageBody>>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<i64>,
    /// vLLM's extension: end the prompt with the assistant's turn opener (default true).
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// Only `{"type": "text"}` (the default) is supported.
    #[serde(default)]
    response_format: Option<serde_json::Value>,
    /// Only absent, empty or `"none"`: no tool calling.
    #[serde(default)]
    tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
    #[serde(flatten)]
    common: Common,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// One chat message as sent: `content` a string or a list of parts.
#[derive(Debug, Deserialize)]
struct MessageBody {
    role: String,
    #[serde(default)]
    content: Option<ContentBody>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ContentBody {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

/// Which API shape a response takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Chat,
}

/// One prompt of a request: its token ids and, for `echo`, its text.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    pub ids: Vec<u32>,
    /// The prompt's text (decoded when it came as ids).
    pub text: String,
}

/// A request the batcher can run: every field checked.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub kind: Kind,
    /// Each prompt gets `n` choices (index `prompt * n + j`, as vLLM numbers them).
    pub prompts: Vec<ValidPrompt>,
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Logit changes, logprobs, end tokens.
    pub options: GenOptions,
    /// Completions: the prompt text (and its logprobs) precede the completion.
    pub echo: bool,
    pub stream: bool,
    /// Streaming: a last chunk with empty `choices` and the usage.
    pub include_usage: bool,
    /// Logprobs name tokens `token_id:{id}`.
    pub token_ids_as_text: bool,
}

impl ValidRequest {
    /// Choices of the response: `n` per prompt.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

fn invalid(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// OpenAI and vLLM parameters this server does not implement (named in `param` when refused;
/// any other unknown field is refused too, named in the message).
const UNSUPPORTED: &[&str] = &[
    "suffix", "functions", "function_call", "parallel_tool_calls", "audio", "modalities", "prediction", "reasoning_effort",
    "web_search_options", "store", "metadata", "service_tier", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs", "prompt_logprobs", "use_beam_search", "length_penalty", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
    "chat_template", "chat_template_kwargs", "continue_final_message", "documents", "echo", "priority", "typical_p",
];

/// Refuses every field left over (not null) by name.
fn refuse_rest(rest: &BTreeMap<String, serde_json::Value>) -> Result<(), ApiError> {
    match rest.iter().find(|(_, v)| !v.is_null()) {
        Some((k, _)) => Err(ApiError::invalid(format!("Unsupported parameter: '{k}' is not supported by this server"), UNSUPPORTED.iter().find(|&&u| u == k).copied())),
        None => Ok(()),
    }
}

/// Validates a completions body, tokenizing its prompts.
pub async fn completion(st: &AppState, b: CompletionBody) -> Result<ValidRequest, ApiError> {
    refuse_rest(&b.rest)?;
    let echo = b.echo.unwrap_or(false);
    let logprobs = match b.logprobs {
        None => None,
        Some(n) if (0..=MAX_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => return Err(invalid(format!("logprobs must be in [0, {MAX_LOGPROBS}], got {n}"), "logprobs")),
    };
    let inputs = prompt_inputs(b.prompt)?;
    let mut prompts = Vec::with_capacity(inputs.len());
    for input in inputs {
        prompts.push(tokenize(st, input).await?);
    }
    let mut r = common(st.engine(), Kind::Text, prompts, b.common, echo)?;
    r.echo = echo;
    r.options.logprobs = logprobs;
    r.options.prompt_logprobs = echo && logprobs.is_some();
    Ok(r)
}

/// Validates a chat body: the messages are rendered by the checkpoint's chat template.
pub async fn chat(st: &AppState, b: ChatBody) -> Result<ValidRequest, ApiError> {
    refuse_rest(&b.rest)?;
    if let Some(f) = &b.response_format {
        if f.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(invalid("response_format: only {\"type\": \"text\"} is supported", "response_format"));
        }
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid("tools are not supported by this server", "tools"));
    }
    if b.tool_choice.as_ref().is_some_and(|c| !c.is_null() && c.as_str() != Some("none")) {
        return Err(invalid("tool_choice: only \"none\" is supported", "tool_choice"));
    }
    let top = match (b.logprobs.unwrap_or(false), b.top_logprobs) {
        (false, Some(_)) => return Err(invalid("top_logprobs needs logprobs: true", "top_logprobs")),
        (false, None) => None,
        (true, None) => Some(0),
        (true, Some(n)) if (0..=MAX_LOGPROBS as i64).contains(&n) => Some(n as usize),
        (true, Some(n)) => return Err(invalid(format!("top_logprobs must be in [0, {MAX_LOGPROBS}], got {n}"), "top_logprobs")),
    };
    let messages = b.messages.ok_or_else(|| invalid("Missing required parameter: 'messages'", "messages"))?;
    if messages.is_empty() {
        return Err(invalid("'messages' must not be empty", "messages"));
    }
    let messages = messages.into_iter().map(message).collect::<Result<Vec<_>, _>>()?;
    let engine = st.engine();
    let prompt = render_chat(engine, &messages, b.add_generation_prompt.unwrap_or(true))?;
    let prompt = tokenize(st, prompt).await?;
    let mut r = common(engine, Kind::Chat, vec![prompt], b.common, false)?;
    r.options.logprobs = top;
    Ok(r)
}

/// The prompt a chat template makes of `messages`; a template's refusal is the client's error.
fn render_chat(engine: &Engine, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<PromptInput, ApiError> {
    use crate::chat_template::ChatTemplateError as E;
    match engine.chat.render(messages, add_generation_prompt) {
        Ok(p) => Ok(PromptInput::Text { text: p.text, add_special_tokens: p.add_special_tokens }),
        Err(e @ (E::Raised(_) | E::UnknownRole(_))) => Err(invalid(e.to_string(), "messages")),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Validates `messages` alone and renders them (for `/tokenize`).
pub fn chat_messages(engine: &Engine, messages: Vec<serde_json::Value>, add_generation_prompt: bool) -> Result<(String, bool), ApiError> {
    let messages = messages
        .into_iter()
        .map(|m| serde_json::from_value::<MessageBody>(m).map_err(|e| invalid(format!("invalid message: {e}"), "messages")).and_then(message))
        .collect::<Result<Vec<_>, _>>()?;
    match render_chat(engine, &messages, add_generation_prompt)? {
        PromptInput::Text { text, add_special_tokens } => Ok((text, add_special_tokens)),
        PromptInput::Ids(_) => unreachable!("a chat template renders text"),
    }
}

/// A message with its text parts joined.
fn message(m: MessageBody) -> Result<ChatMessage, ApiError> {
    let content = match m.content {
        None if m.role == "assistant" => String::new(),
        None => return Err(invalid(format!("a '{}' message needs 'content'", m.role), "messages")),
        Some(ContentBody::Text(t)) => t,
        Some(ContentBody::Parts(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => texts.push(t.to_string()),
                    (Some("text"), None) => return Err(invalid("a text content part needs a string 'text'", "messages")),
                    (other, _) => {
                        return Err(invalid(format!("content parts of type {} are not supported (only 'text')", other.map_or("(none)".into(), |o| format!("'{o}'"))), "messages"))
                    }
                }
            }
            texts.join("\n")
        }
    };
    Ok(ChatMessage { role: m.role, content, name: m.name })
}

/// A prompt as sent (or rendered from messages).
enum PromptInput {
    Text { text: String, add_special_tokens: bool },
    Ids(Vec<u32>),
}

impl PromptInput {
    fn text(text: String) -> Self {
        PromptInput::Text { text, add_special_tokens: true }
    }
}

/// `prompt`: a string, a list of strings, a list of ids or a list of lists of ids.
fn prompt_inputs(v: Option<serde_json::Value>) -> Result<Vec<PromptInput>, ApiError> {
    use serde_json::Value;
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        // Ids beyond u32 become u32::MAX, which the vocabulary check rejects.
        a.iter().map(|v| v.as_u64().map(|v| u32::try_from(v).unwrap_or(u32::MAX))).collect()
    };
    let shape = "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids";
    let out = match v {
        None | Some(Value::Null) => return Err(invalid("Missing required parameter: 'prompt'", "prompt")),
        Some(Value::String(s)) => vec![PromptInput::text(s)],
        Some(Value::Array(a)) if a.is_empty() => return Err(invalid("'prompt' must not be an empty list", "prompt")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.into_iter().map(|s| PromptInput::text(s.as_str().unwrap_or_default().into())).collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![PromptInput::Ids(ids(&a).ok_or_else(|| invalid(shape, "prompt"))?)],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|p| p.as_array().and_then(|p| ids(p)).map(PromptInput::Ids).ok_or_else(|| invalid(shape, "prompt")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid(shape, "prompt")),
    };
    if out.len() > MAX_PROMPTS {
        return Err(invalid(format!("at most {MAX_PROMPTS} prompts per request, got {}", out.len()), "prompt"));
    }
    Ok(out)
}

/// Token ids (and text) of one prompt.
async fn tokenize(st: &AppState, input: PromptInput) -> Result<ValidPrompt, ApiError> {
    let cfg = st.engine().config();
    match input {
        // No tokenizer spends seconds on a prompt that cannot fit whatever it tokenizes to.
        PromptInput::Text { text, .. } if text.len() > cfg.max_positions.saturating_mul(MAX_BYTES_PER_TOKEN) => Err(invalid(
            format!(
                "The prompt is {} bytes; the context window is {} tokens (at most {} bytes of text)",
                text.len(),
                cfg.max_positions,
                cfg.max_positions.saturating_mul(MAX_BYTES_PER_TOKEN)
            ),
            "prompt",
        )),
        PromptInput::Text { text, add_special_tokens } => {
            let tok = st.clone();
            let t = text.clone();
            let ids = tokio::task::spawn_blocking(move || tok.engine().tokenizer.encode_with(&t, add_special_tokens))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
            Ok(ValidPrompt { ids, text })
        }
        PromptInput::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(invalid(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab), "prompt"));
            }
            let text = st.engine().tokenizer.decode(&ids).map_err(ApiError::internal)?;
            Ok(ValidPrompt { ids, text })
        }
    }
}

/// Checks the shared fields against the engine and the prompts.
fn common(engine: &Engine, kind: Kind, prompts: Vec<ValidPrompt>, c: Common, echo: bool) -> Result<ValidRequest, ApiError> {
    if let Some(m) = &c.model {
        if *m != engine.name {
            return Err(ApiError::unknown_model(m));
        }
    }
    let cfg = engine.config();
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if prompts.iter().any(|p| p.ids.is_empty()) {
        return Err(invalid("The prompt is empty", "prompt"));
    }
    if longest > cfg.max_positions {
        return Err(invalid(format!("The prompt has {longest} tokens; the context window is {}", cfg.max_positions), "prompt"));
    }
    let room = cfg.max_positions - longest;
    // Scoring a prompt (lm-eval's loglikelihood) generates nothing: it may fill the context.
    let scoring = echo && c.max_tokens == Some(0);
    if room == 0 && !scoring {
        return Err(invalid(format!("The prompt has {longest} tokens; the context window is {}", cfg.max_positions), "prompt"));
    }
    // What the request omits, the checkpoint's generation_config.json may set.
    let d = &engine.defaults;
    let max_tokens = match c.max_tokens {
        None => d.max_new_tokens.map_or(DEFAULT_MAX_TOKENS, |m| m.max(1) as usize).min(room),
        Some(0) if scoring => 0,
        Some(n) if n < 1 => {
            let hint = if kind == Kind::Text { " (0 only with echo, to score the prompt)" } else { "" };
            return Err(invalid(format!("max_tokens must be at least 1{hint}, got {n}"), "max_tokens"));
        }
        Some(n) if n as u64 > room as u64 => {
            return Err(invalid(format!("max_tokens {n} is too large: the prompt has {longest} tokens and the context window is {}", cfg.max_positions), "max_tokens"))
        }
        Some(n) => n as usize,
    };
    let temperature = c.temperature.or(d.temperature).unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(format!("temperature must be in [0, 2], got {temperature}"), "temperature"));
    }
    let top_p = c.top_p.or(d.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("top_p must be in (0, 1], got {top_p}"), "top_p"));
    }
    let top_k = match c.top_k.or(d.top_k).unwrap_or(0) {
        k if k == -1 || k == 0 => 0,
        k if k >= 1 && k <= u32::MAX as i64 => k as u32,
        k => return Err(invalid(format!("top_k must be -1, 0 or at least 1, got {k}"), "top_k")),
    };
    let min_p = c.min_p.or(d.min_p).unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid(format!("min_p must be in [0, 1], got {min_p}"), "min_p"));
    }
    let sampling = SamplingParams { temperature, top_p, seed: c.seed, top_k, min_p };
    let n = match c.n.unwrap_or(1) {
        n if (1..=MAX_N as i64).contains(&n) => n as usize,
        n => return Err(invalid(format!("n must be in [1, {MAX_N}], got {n}"), "n")),
    };
    if n > 1 && sampling.greedy() {
        return Err(invalid("n > 1 needs sampling: greedy choices would all be the same (set temperature > 0)", "n"));
    }
    if c.best_of.is_some_and(|b| b != n as i64) {
        return Err(invalid("best_of other than n is not supported", "best_of"));
    }
    let penalty = |v: Option<f64>, name: &'static str| match v.unwrap_or(0.0) {
        p if (-2.0..=2.0).contains(&p) => Ok(p),
        p => Err(invalid(format!("{name} must be in [-2, 2], got {p}"), name)),
    };
    let presence = penalty(c.presence_penalty, "presence_penalty")?;
    let frequency = penalty(c.frequency_penalty, "frequency_penalty")?;
    let repetition = match c.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0) {
        p if p > 0.0 && p <= 10.0 => p,
        p => return Err(invalid(format!("repetition_penalty must be in (0, 10], got {p}"), "repetition_penalty")),
    };
    let mut bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| invalid(format!("logit_bias keys are token ids, got '{k}'"), "logit_bias"))?;
        if id as usize >= cfg.vocab {
            return Err(invalid(format!("logit_bias: token id {id} is outside the vocabulary of {}", cfg.vocab), "logit_bias"));
        }
        if !(-100.0..=100.0).contains(&v) {
            return Err(invalid(format!("logit_bias values must be in [-100, 100], got {v} for token {id}"), "logit_bias"));
        }
        bias.push((id, v));
    }
    let stop_ids: Vec<u32> = c
        .stop_token_ids
        .unwrap_or_default()
        .into_iter()
        .map(|t| match u32::try_from(t) {
            Ok(t) if (t as usize) < cfg.vocab => Ok(t),
            _ => Err(invalid(format!("stop_token_ids: {t} is outside the vocabulary of {}", cfg.vocab), "stop_token_ids")),
        })
        .collect::<Result<_, _>>()?;
    let min_tokens = match c.min_tokens.unwrap_or(0) {
        m if m >= 0 && m as u64 <= max_tokens as u64 => m as usize,
        m => return Err(invalid(format!("min_tokens must be in [0, max_tokens = {max_tokens}], got {m}"), "min_tokens")),
    };
    let ignore_eos = c.ignore_eos.unwrap_or(false);
    let mut end: Vec<u32> = if ignore_eos { Vec::new() } else { engine.eos.clone() };
    end.extend(&stop_ids);
    let processing = LogitsProcessing { repetition, presence, frequency, bias, min_tokens, end };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(invalid(format!("at most {MAX_STOPS} stop sequences are allowed"), "stop"));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(invalid("stream_options needs stream: true", "stream_options"));
    }
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    let options = GenOptions { processing, logprobs: None, prompt_logprobs: false, stop_ids, ignore_eos };
    let token_ids_as_text = c.return_tokens_as_token_ids.unwrap_or(false);
    Ok(ValidRequest { kind, prompts, n, max_tokens, sampling, stop, options, echo: false, stream, include_usage, token_ids_as_text })
}
