//! One streamed completion against an OpenAI-compatible `/v1/completions`: takes the request
//! (prompt, `max_tokens`, extra body fields), gives when each piece of text arrived
//! ([`Timing`]) or why the request failed ([`RequestError`]).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;

use super::workload::RequestSpec;

/// How one request went, measured from just before it was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Time to the first non-empty text chunk (to the first chunk when no text came: a
    /// completion that ended at once, e.g. on an end-of-sequence token).
    pub ttft: Duration,
    /// Time to the end of the stream.
    pub e2e: Duration,
    /// Gaps between consecutive text chunks (inter-token latency).
    pub gaps: Vec<Duration>,
    /// Generated tokens: the server's `usage.completion_tokens`, else the text chunks counted.
    pub output_tokens: usize,
    /// Chunks that carried text (0: an empty completion).
    pub text_chunks: usize,
    /// The server's `usage.prompt_tokens`, when it reports usage.
    pub prompt_tokens: Option<usize>,
}

impl Timing {
    /// Time per output token after the first: (e2e − TTFT) / (tokens − 1); None for one token.
    pub fn tpot(&self) -> Option<Duration> {
        let n = u32::try_from(self.output_tokens.checked_sub(1)?).ok().filter(|&n| n > 0)?;
        Some(self.e2e.saturating_sub(self.ttft) / n)
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("sending the request: {0}")]
    Send(#[source] reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("reading the stream: {0}")]
    Stream(#[source] reqwest::Error),
    #[error("the server sent an error event: {0}")]
    Server(String),
    #[error("an event is not a completion chunk: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("the stream ended without [DONE]")]
    Truncated,
    #[error("the stream ended with no completion chunk")]
    NoChunk,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl RequestError {
    /// A short name for counting failures by kind in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::Send(_) => "send",
            RequestError::Status { .. } => "status",
            RequestError::Stream(_) => "stream",
            RequestError::Server(_) => "server_error",
            RequestError::Malformed(_) => "malformed",
            RequestError::Truncated => "truncated",
            RequestError::NoChunk => "no_chunk",
            RequestError::Timeout(_) => "timeout",
        }
    }
}

/// The endpoint and what every request carries.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Base URL, e.g. `http://127.0.0.1:8000` (no trailing slash).
    pub base: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Fields merged into every request body (e.g. `{"ignore_eos": true}` for vLLM).
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    /// Limit on one whole request, first byte to `[DONE]`.
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

impl Endpoint {
    /// Sends `req` streamed and times its chunks.
    pub async fn complete(&self, http: &reqwest::Client, req: &RequestSpec) -> Result<Timing, RequestError> {
        match tokio::time::timeout(self.timeout, self.stream(http, req)).await {
            Ok(r) => r,
            Err(_) => Err(RequestError::Timeout(self.timeout)),
        }
    }

    async fn stream(&self, http: &reqwest::Client, req: &RequestSpec) -> Result<Timing, RequestError> {
        let mut body = self.extra_body.clone();
        body.insert("model".into(), self.model.clone().into());
        body.insert("prompt".into(), req.prompt.clone().into());
        body.insert("max_tokens".into(), req.max_tokens.into());
        body.insert("stream".into(), true.into());
        body.entry("temperature").or_insert(0.0.into());
        let mut post = http.post(format!("{}/v1/completions", self.base)).json(&body);
        if let Some(k) = &self.api_key {
            post = post.bearer_auth(k);
        }
        let start = Instant::now();
        let resp = post.send().await.map_err(RequestError::Send)?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(RequestError::Status { status: status.as_u16(), body: body.chars().take(300).collect() });
        }
        let mut events = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut arrivals: Vec<Instant> = Vec::new();
        let mut first_chunk: Option<Instant> = None;
        let mut usage: Option<Usage> = None;
        while let Some(bytes) = events.next().await {
            buf.extend_from_slice(&bytes.map_err(RequestError::Stream)?);
            while let Some((event, rest)) = split_event(&buf) {
                let now = Instant::now();
                for data in event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                    if data == "[DONE]" {
                        return finish(start, first_chunk, &arrivals, usage);
                    }
                    let chunk: Chunk = serde_json::from_str(data).map_err(RequestError::Malformed)?;
                    if let Some(e) = chunk.error {
                        return Err(RequestError::Server(e.to_string()));
                    }
                    let text: usize = chunk.choices.iter().map(|c| c.text.as_deref().or(c.delta.as_ref().and_then(|d| d.content.as_deref())).map_or(0, str::len)).sum();
                    first_chunk.get_or_insert(now);
                    if text > 0 {
                        arrivals.push(now);
                    }
                    usage = chunk.usage.or(usage);
                }
                buf.drain(..buf.len() - rest);
            }
        }
        Err(RequestError::Truncated)
    }
}

/// The first complete SSE event of `buf` (text before a blank line) and how many bytes follow it.
fn split_event(buf: &[u8]) -> Option<(String, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    let (end, sep) = [lf, crlf].into_iter().flatten().min()?;
    let event = String::from_utf8_lossy(&buf[..end]).replace('\r', "");
    Some((event, buf.len() - end - sep))
}

fn finish(start: Instant, first_chunk: Option<Instant>, arrivals: &[Instant], usage: Option<Usage>) -> Result<Timing, RequestError> {
    let first = arrivals.first().copied().or(first_chunk).ok_or(RequestError::NoChunk)?;
    let gaps = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Timing {
        ttft: first - start,
        e2e: start.elapsed(),
        gaps,
        output_tokens: usage.as_ref().and_then(|u| u.completion_tokens).unwrap_or(arrivals.len()),
        text_chunks: arrivals.len(),
        prompt_tokens: usage.and_then(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines() {
        let buf = b"data: {\"a\":1}\n\ndata: [DO";
        let (ev, rest) = split_event(buf).unwrap();
        assert_eq!((ev.as_str(), rest), ("data: {\"a\":1}", 9));
        assert!(split_event(b"data: [DO").is_none());
        assert_eq!(split_event(b"data: x\r\n\r\n").unwrap(), ("data: x".to_string(), 0));
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let t = Timing { ttft: Duration::from_millis(100), e2e: Duration::from_millis(400), gaps: vec![], output_tokens: 4, text_chunks: 4, prompt_tokens: None };
        assert_eq!(t.tpot(), Some(Duration::from_millis(100)));
        assert_eq!(Timing { output_tokens: 1, ..t }.tpot(), None);
    }
}
