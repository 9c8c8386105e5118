//! `/tokenize` and `/detokenize` in vLLM's shapes: a prompt (or chat messages, rendered by the
//! checkpoint's template) to token ids, and ids back to text.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::completions::{parse, Body};
use super::validation;
use super::AppState;
use mangrove_deploy::http::ApiError;

/// Routes of this area.
pub fn routes() -> Router<AppState> {
    Router::new().route("/tokenize", post(tokenize)).route("/detokenize", post(detokenize))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// Default: true for a prompt, false for messages (the template writes its own).
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<i64>,
}

fn check_model(st: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != st.engine().name => Err(ApiError::unknown_model(m)),
        _ => Ok(()),
    }
}

async fn tokenize(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let b: TokenizeBody = parse(body)?;
        check_model(&st, &b.model)?;
        let engine = st.engine();
        let (text, special) = match (b.prompt, b.messages) {
            (Some(p), None) => (p, b.add_special_tokens.unwrap_or(true)),
            (None, Some(m)) => {
                let (text, special) = validation::chat_messages(engine, m, b.add_generation_prompt.unwrap_or(true))?;
                (text, b.add_special_tokens.unwrap_or(special))
            }
            _ => return Err(ApiError::invalid("give exactly one of 'prompt' and 'messages'", Some("prompt"))),
        };
        let tok = st.clone();
        let ids = tokio::task::spawn_blocking(move || tok.engine().tokenizer.encode_with(&text, special))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
        let strs = b.return_token_strs.unwrap_or(false).then(|| ids.iter().map(|&t| engine.tokenizer.token_text(t)).collect::<Vec<_>>());
        Ok::<_, ApiError>(Json(serde_json::json!({"count": ids.len(), "max_model_len": engine.config().max_positions, "tokens": ids, "token_strs": strs})))
    };
    run.await.into_response()
}

async fn detokenize(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let b: DetokenizeBody = parse(body)?;
        check_model(&st, &b.model)?;
        let vocab = st.engine().config().vocab;
        let ids: Vec<u32> = b
            .tokens
            .iter()
            .map(|&t| u32::try_from(t).ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| ApiError::invalid(format!("token id {t} is outside the vocabulary of {vocab}"), Some("tokens"))))
            .collect::<Result<_, _>>()?;
        let text = st.engine().tokenizer.decode(&ids).map_err(ApiError::internal)?;
        Ok::<_, ApiError>(Json(serde_json::json!({"prompt": text})))
    };
    run.await.into_response()
}
