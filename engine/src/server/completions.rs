//! `/v1/completions` and `/v1/chat/completions`: the body is validated
//! ([`super::validation`]), each (prompt, choice) is submitted to the batcher as its own
//! sequence, then the choices are either collected into one body or streamed as SSE
//! `data: {...}` chunks ending with `data: [DONE]` (shapes in [`super::response`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;

use super::response::{ChoiceAcc, Ctx};
use super::validation::{self, ValidRequest};
use super::AppState;
use crate::batcher::{GenEvent, GenRequest, SubmitError};
use mangrove_deploy::http::ApiError;

/// Routes of this area.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/completions", post(completions)).route("/v1/chat/completions", post(chat))
}

/// A request body: unreadable (e.g. too large) or invalid JSON is a 4xx ApiError.
pub type Body = Result<Bytes, BytesRejection>;

/// The JSON of `body` as `T`.
pub fn parse<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError { status: e.status(), ..ApiError::invalid(e.body_text(), None) })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}"), None))
}

async fn completions(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let req = validation::completion(&st, parse(body)?).await?;
        start(&st, req).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let req = validation::chat(&st, parse(body)?).await?;
        start(&st, req).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// (choice index, event) of all the request's sequences, as they come.
type Events = BoxStream<'static, (usize, GenEvent)>;

/// Submits every choice of `req` and shapes the response.
async fn start(st: &AppState, req: ValidRequest) -> Result<Response, ApiError> {
    let mut receivers = Vec::with_capacity(req.choices());
    for i in 0..req.choices() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sampling = req.sampling;
        // Choices of one seeded request differ from each other and repeat run to run.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add((i % req.n) as u64));
        let prompt = req.prompts[i / req.n].ids.clone();
        let gen = GenRequest { prompt, max_tokens: req.max_tokens, sampling, stop: req.stop.clone(), events: tx, options: req.options.clone() };
        // On an error the receivers so far are dropped, which retires their sequences.
        st.inner.batcher.submit(gen).map_err(|e| match e {
            SubmitError::QueueFull { .. } => {
                st.metrics().rejected();
                ApiError::overloaded(format!("{e}; retry later"), 1)
            }
            SubmitError::Stopped => ApiError::unavailable(),
        })?;
        receivers.push(rx);
    }
    st.metrics().request(req.prompts.iter().map(|p| p.ids.len()).sum());
    let events: Events = futures::stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        futures::stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed()
    }))
    .boxed();
    let ctx = Ctx {
        id: st.next_id(if req.kind == validation::Kind::Text { "cmpl" } else { "chatcmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: st.engine().name.clone(),
        req,
    };
    let id = axum::http::HeaderValue::from_str(&ctx.id).ok();
    let mut r = if ctx.req.stream {
        sse(st.clone(), ctx, events).into_response()
    } else {
        collect(st, &ctx, events).await.map(|v| Json(v).into_response())?
    };
    if let Some(id) = id {
        r.headers_mut().insert(super::REQUEST_ID, id);
    }
    Ok(r)
}

/// Every choice to its end, as one body.
async fn collect(st: &AppState, ctx: &Ctx, mut events: Events) -> Result<serde_json::Value, ApiError> {
    let mut choices: Vec<ChoiceAcc> = (0..ctx.req.choices()).map(|_| ChoiceAcc::default()).collect();
    let mut done = 0;
    while done < choices.len() {
        let Some((i, e)) = events.next().await else { return Err(ApiError::internal("engine dropped the request")) };
        let c = &mut choices[i];
        match e {
            GenEvent::Prompt(p) => c.prompt = Some(p),
            GenEvent::Tokens(t) => c.tokens.extend(t),
            GenEvent::Delta(d) => c.text.push_str(&d),
            GenEvent::Done(f) => {
                if let Some(e) = &f.error {
                    return Err(ApiError::internal(e));
                }
                c.finish = Some(f);
                done += 1;
            }
        }
    }
    log_done(ctx, &choices);
    Ok(ctx.full(&st.engine().tokenizer, &choices))
}

/// The access log's completion line: id and token counts.
fn log_done(ctx: &Ctx, choices: &[ChoiceAcc]) {
    let u = ctx.usage(choices);
    tracing::info!(target: "mangrove::access", id = ctx.id, choices = choices.len(), prompt_tokens = u["prompt_tokens"].as_u64(), completion_tokens = u["completion_tokens"].as_u64(), stream = ctx.req.stream, "completion");
}

/// A streamed response in progress.
struct Streaming {
    st: AppState,
    ctx: Ctx,
    events: Events,
    choices: Vec<ChoiceAcc>,
    done: usize,
    /// `data:` payloads ready to go.
    out: VecDeque<String>,
    closed: bool,
}

impl Streaming {
    /// Turns one event of choice `i` into chunks.
    fn on_event(&mut self, i: usize, e: GenEvent) {
        let tok = &self.st.engine().tokenizer;
        let c = &mut self.choices[i];
        // The echoed prompt goes first, with its logprobs when they were asked.
        if self.ctx.req.echo && !c.started {
            let prompt = match &e {
                GenEvent::Prompt(p) => Some(p.clone()),
                _ => None,
            };
            let text = self.ctx.prompt_of(i).text.clone();
            let chunk = self.ctx.chunk(tok, i, c, &text, prompt.as_deref());
            self.out.push_back(chunk.to_string());
        }
        match e {
            GenEvent::Prompt(_) => {}
            GenEvent::Tokens(t) => c.tokens.extend(t),
            GenEvent::Delta(d) => {
                let chunk = self.ctx.chunk(tok, i, c, &d, None);
                self.out.push_back(chunk.to_string());
            }
            GenEvent::Done(f) => {
                if let Some(e) = &f.error {
                    tracing::error!(id = self.ctx.id, "stream failed: {e}");
                    let err = serde_json::json!({"error": {"message": "The server had an error while processing the request",
                        "type": "server_error", "param": null, "code": null}});
                    self.out.push_back(err.to_string());
                    self.finish();
                    return;
                }
                c.finish = Some(f);
                self.done += 1;
                let mut chunk = self.ctx.chunk(tok, i, c, "", None);
                if self.done == self.choices.len() {
                    log_done(&self.ctx, &self.choices);
                    if self.ctx.req.include_usage {
                        self.out.push_back(chunk.to_string());
                        chunk = self.ctx.usage_chunk(&self.choices);
                    } else {
                        chunk["usage"] = self.ctx.usage(&self.choices);
                    }
                    self.out.push_back(chunk.to_string());
                    self.finish();
                } else {
                    self.out.push_back(chunk.to_string());
                }
            }
        }
    }

    fn finish(&mut self) {
        self.out.push_back("[DONE]".into());
        self.closed = true;
    }
}

fn sse(st: AppState, ctx: Ctx, events: Events) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let choices = (0..ctx.req.choices()).map(|_| ChoiceAcc::default()).collect();
    let state = Streaming { st, ctx, events, choices, done: 0, out: VecDeque::new(), closed: false };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                return Some((Ok(Event::default().data(data)), s));
            }
            if s.closed {
                return None;
            }
            match s.events.next().await {
                Some((i, e)) => s.on_event(i, e),
                // The engine dropped a sequence without ending it (its step panicked).
                None => {
                    s.on_event(0, GenEvent::Done(crate::batcher::Finish {
                        reason: crate::batcher::FinishReason::Stop,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        error: Some("engine dropped the request".into()),
                    }))
                }
            }
        }
    });
    Sse::new(stream)
}
