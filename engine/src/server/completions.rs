//! `/v1/completions` and `/v1/chat/completions`: validate the body, tokenize, submit to the
//! batcher, then either collect the whole text or stream SSE `data: {...}` chunks ending
//! with `data: [DONE]`. `usage` counts prompt and completion tokens.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::mpsc;

use mangrove_deploy::http::ApiError;
use super::AppState;
use crate::batcher::{Finish, GenEvent, GenRequest, SubmitError};
use crate::sampling::SamplingParams;
use crate::tokenizer::{chat_prompt, ChatMessage};

/// Routes of this area.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/completions", post(completions)).route("/v1/chat/completions", post(chat))
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<i64>,
    /// Choices per request: only 1 is supported.
    #[serde(default)]
    n: Option<i64>,
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
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(default)]
    prompt: Option<serde_json::Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    common: Common,
}

/// Default `max_tokens` when the request gives none.
const DEFAULT_MAX_TOKENS: usize = 16;
const MAX_STOPS: usize = 4;
/// Prompt text longer than this many bytes per context position is refused before tokenizing
/// (real tokenizers average 3–5 bytes per token; one token rarely spans more than a few dozen).
const MAX_BYTES_PER_TOKEN: usize = 64;

/// A request body: unreadable (e.g. too large) or invalid JSON is a 4xx ApiError.
type Body = Result<Bytes, BytesRejection>;

fn parse<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError { status: e.status(), ..ApiError::invalid(e.body_text(), None) })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}"), None))
}

/// Which API shape a response takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Chat,
}

/// Everything needed to write response bodies for one request.
#[derive(Debug, Clone)]
struct Ctx {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

fn usage(f: &Finish) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens})
}

impl Ctx {
    fn full(&self, text: &str, f: &Finish) -> serde_json::Value {
        let choice = match self.kind {
            Kind::Text => serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": f.reason.as_str()}),
            Kind::Chat => serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": f.reason.as_str()}),
        };
        let object = if self.kind == Kind::Text { "text_completion" } else { "chat.completion" };
        serde_json::json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage(f)})
    }

    fn chunk(&self, delta: &str, first: bool, f: Option<&Finish>) -> serde_json::Value {
        let reason = f.map(|f| f.reason.as_str());
        let choice = match self.kind {
            Kind::Text => serde_json::json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": reason}),
            Kind::Chat => {
                let d = if first { serde_json::json!({"role": "assistant", "content": delta}) } else { serde_json::json!({"content": delta}) };
                serde_json::json!({"index": 0, "delta": d, "finish_reason": reason})
            }
        };
        let object = if self.kind == Kind::Text { "text_completion" } else { "chat.completion.chunk" };
        let mut v = serde_json::json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if let Some(f) = f {
            v["usage"] = usage(f);
        }
        v
    }
}

async fn completions(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let b: CompletionBody = parse(body)?;
        let prompt = match b.prompt {
            None | Some(serde_json::Value::Null) => return Err(ApiError::invalid("Missing required parameter: 'prompt'", Some("prompt"))),
            Some(serde_json::Value::String(s)) => Prompt::Text(s),
            Some(serde_json::Value::Array(a)) if a.len() == 1 && a[0].is_string() => Prompt::Text(a[0].as_str().unwrap_or_default().into()),
            Some(serde_json::Value::Array(a)) if !a.is_empty() && a.iter().all(|v| v.is_u64()) => {
                // Ids beyond u32 become u32::MAX, which the vocabulary check rejects.
                Prompt::Ids(a.iter().filter_map(|v| v.as_u64()).map(|v| u32::try_from(v).unwrap_or(u32::MAX)).collect())
            }
            Some(_) => return Err(ApiError::invalid("'prompt' must be a string, a list of one string, or a list of token ids", Some("prompt"))),
        };
        start(&st, Kind::Text, prompt, b.common).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let b: ChatBody = parse(body)?;
        let messages = b.messages.ok_or_else(|| ApiError::invalid("Missing required parameter: 'messages'", Some("messages")))?;
        if messages.is_empty() {
            return Err(ApiError::invalid("'messages' must not be empty", Some("messages")));
        }
        let template = st.engine().tokenizer.chat_template();
        start(&st, Kind::Chat, Prompt::Text(chat_prompt(&messages, template)), b.common).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Validates the shared fields, submits the request and shapes the response.
async fn start(st: &AppState, kind: Kind, prompt: Prompt, c: Common) -> Result<Response, ApiError> {
    let engine = st.engine();
    if let Some(m) = &c.model {
        if *m != engine.name {
            return Err(ApiError::unknown_model(m));
        }
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let cfg = engine.config();
    let ids = match prompt {
        // No tokenizer spends seconds on a prompt that cannot fit whatever it tokenizes to.
        Prompt::Text(t) if t.len() > cfg.max_positions.saturating_mul(MAX_BYTES_PER_TOKEN) => {
            return Err(ApiError::invalid(
                format!(
                    "The prompt is {} bytes; the context window is {} tokens (at most {} bytes of text)",
                    t.len(),
                    cfg.max_positions,
                    cfg.max_positions.saturating_mul(MAX_BYTES_PER_TOKEN)
                ),
                Some("prompt"),
            ))
        }
        Prompt::Text(t) => {
            let tok = st.clone();
            tokio::task::spawn_blocking(move || tok.engine().tokenizer.encode(&t))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?
        }
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(ApiError::invalid(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab), Some("prompt")));
            }
            ids
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid("The prompt is empty", Some("prompt")));
    }
    let room = cfg.max_positions.saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError::invalid(format!("The prompt has {} tokens; the context window is {}", ids.len(), cfg.max_positions), Some("prompt")));
    }
    let max_tokens = match c.max_tokens {
        None => DEFAULT_MAX_TOKENS.min(room),
        Some(n) if n < 1 => return Err(ApiError::invalid(format!("max_tokens must be at least 1, got {n}"), Some("max_tokens"))),
        Some(n) if n as u64 > room as u64 => {
            return Err(ApiError::invalid(
                format!("max_tokens {n} is too large: the prompt has {} tokens and the context window is {}", ids.len(), cfg.max_positions),
                Some("max_tokens"),
            ))
        }
        Some(n) => n as usize,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!("temperature must be in [0, 2], got {temperature}"), Some("temperature")));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("top_p must be in (0, 1], got {top_p}"), Some("top_p")));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        k if k == -1 || k == 0 => 0,
        k if k >= 1 && k <= u32::MAX as i64 => k as u32,
        k => return Err(ApiError::invalid(format!("top_k must be -1, 0 or at least 1, got {k}"), Some("top_k"))),
    };
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(format!("min_p must be in [0, 1], got {min_p}"), Some("min_p")));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(format!("at most {MAX_STOPS} stop sequences are allowed"), Some("stop")));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = ids.len();
    let req = GenRequest { prompt: ids, max_tokens, sampling: SamplingParams { temperature, top_p, seed: c.seed, top_k, min_p }, stop, events: tx };
    st.inner.batcher.submit(req).map_err(|e| match e {
        SubmitError::QueueFull { .. } => {
            st.metrics().rejected();
            ApiError::overloaded(format!("{e}; retry later"), 1)
        }
        SubmitError::Stopped => ApiError::unavailable(),
    })?;
    st.metrics().request(prompt_tokens);
    let ctx = Ctx {
        kind,
        id: st.next_id(if kind == Kind::Text { "cmpl" } else { "chatcmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: engine.name.clone(),
    };
    if c.stream {
        Ok(sse(ctx, rx).into_response())
    } else {
        collect(ctx, rx).await.map(|v| Json(v).into_response())
    }
}

async fn collect(ctx: Ctx, mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Result<serde_json::Value, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(GenEvent::Delta(d)) => text.push_str(&d),
            Some(GenEvent::Done(f)) => {
                if let Some(e) = &f.error {
                    return Err(ApiError::internal(e));
                }
                return Ok(ctx.full(&text, &f));
            }
            None => return Err(ApiError::internal("engine dropped the request")),
        }
    }
}

enum StreamState {
    Open { rx: mpsc::UnboundedReceiver<GenEvent>, first: bool },
    Done,
    Closed,
}

fn sse(ctx: Ctx, rx: mpsc::UnboundedReceiver<GenEvent>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(StreamState::Open { rx, first: true }, move |state| {
        let ctx = ctx.clone();
        async move {
            match state {
                StreamState::Open { mut rx, first } => match rx.recv().await {
                    Some(GenEvent::Delta(d)) => {
                        Some((Ok(Event::default().data(ctx.chunk(&d, first, None).to_string())), StreamState::Open { rx, first: false }))
                    }
                    Some(GenEvent::Done(f)) => {
                        let data = match &f.error {
                            Some(e) => {
                                eprintln!("mangrove server: stream failed: {e}");
                                serde_json::json!({"error": {"message": "The server had an error while processing the request",
                                    "type": "server_error", "param": null, "code": null}})
                            }
                            None => ctx.chunk("", first, Some(&f)),
                        };
                        Some((Ok(Event::default().data(data.to_string())), StreamState::Done))
                    }
                    None => Some((Ok(Event::default().data("[DONE]")), StreamState::Closed)),
                },
                StreamState::Done => Some((Ok(Event::default().data("[DONE]")), StreamState::Closed)),
                StreamState::Closed => None,
            }
        }
    });
    Sse::new(stream)
}
