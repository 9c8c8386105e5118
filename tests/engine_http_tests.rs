//! The HTTP server on a real socket: OpenAI-shaped completions and chat, SSE streaming,
//! concurrent requests through continuous batching, stop strings, usage, metrics, and
//! OpenAI-style 4xx errors for bad requests.

use std::sync::Arc;

use mangrove::engine::genmodel::{generate, Preset};
use mangrove::engine::metrics::Metrics;
use mangrove::engine::server::{self, AppState};
use mangrove::engine::Engine;
use serde_json::{json, Value};

/// The kernel variant the default CPU backend (`--backend cpu`) reports on this machine.
fn cpu_variant() -> &'static str {
    mangrove::engine::cpu_simd::Isa::from_env().unwrap().variant()
}

struct Server {
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start(preset: Preset) -> Server {
    let dir = tempfile::tempdir().unwrap();
    generate(preset, dir.path(), 21).unwrap();
    let engine = Engine::open(dir.path(), "cpu", Some("tiny".into())).unwrap();
    let state = AppState::new(engine, Arc::new(Metrics::default()), Some("tuning_db/h100".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::serve(listener, state, std::future::pending()));
    Server { base, client: reqwest::Client::new(), _dir: dir }
}

impl Server {
    async fn post_raw(&self, path: &str, body: String) -> (u16, String) {
        let r = self.client.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, t) = self.post_raw(path, body.to_string()).await;
        (s, serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Text of a non-streamed completion.
    async fn complete(&self, body: Value) -> Value {
        let (s, v) = self.post("/v1/completions", body).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// SSE chunks of a streamed request (without the final `[DONE]`, which is checked).
    async fn stream(&self, path: &str, mut body: Value) -> Vec<Value> {
        body["stream"] = true.into();
        let (s, text) = self.post_raw(path, body.to_string()).await;
        assert_eq!(s, 200, "{text}");
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_has_text_usage_and_is_deterministic_under_seed() {
    let s = start(Preset::Tiny).await;
    let body = json!({"model": "tiny", "prompt": "Hello there", "max_tokens": 7, "temperature": 0.8, "top_p": 0.9, "seed": 99});
    let a = s.complete(body.clone()).await;
    let b = s.complete(body).await;
    assert_eq!(text_of(&a), text_of(&b));
    // vLLM's top_k / min_p extensions are honoured and seeded alike.
    let filtered = json!({"prompt": "Hello there", "max_tokens": 7, "temperature": 1.0, "top_k": 5, "min_p": 0.05, "seed": 99});
    assert_eq!(text_of(&s.complete(filtered.clone()).await), text_of(&s.complete(filtered).await));
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["model"], "tiny");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(a["usage"]["completion_tokens"], 7);
    assert_eq!(a["usage"]["prompt_tokens"].as_u64().unwrap() + 7, a["usage"]["total_tokens"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_and_moe_model() {
    let s = start(Preset::TinyMoe).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0});
    let (st, v) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // Streaming gives the same text in chunks, role first, usage last.
    let chunks = s.stream("/v1/chat/completions", body).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, v["choices"][0]["message"]["content"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 5);
    let (_, m) = s.get("/metrics").await;
    assert!(m.contains(&format!("mangrove_path_total{{family=\"moe_gate_up\",variant=\"{}\"}} 10", cpu_variant())), "{m}");
    assert!(!m.contains("family=\"mlp_gate_up\""), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_matches_non_streamed_text() {
    let s = start(Preset::Tiny).await;
    let body = json!({"prompt": "The quick brown fox", "max_tokens": 10, "seed": 5, "temperature": 1.0});
    let full = text_of(&s.complete(body.clone()).await);
    let chunks = s.stream("/v1/completions", body).await;
    assert!(chunks.len() >= 2, "{chunks:?}");
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, full);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_and_match_sequential_results() {
    let s = Arc::new(start(Preset::Tiny).await);
    let prompts: Vec<String> = (0..6).map(|i| format!("prompt number {i} says")).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 8, "temperature": 0});
    let mut sequential = Vec::new();
    for p in &prompts {
        sequential.push(text_of(&s.complete(body(p)).await));
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (s, b) = (s.clone(), body(p));
            tokio::spawn(async move { text_of(&s.complete(b).await) })
        })
        .collect();
    let concurrent: Vec<String> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(concurrent, sequential);
    let (st, m) = s.get("/metrics").await;
    assert_eq!(st, 200);
    assert!(m.contains("mangrove_requests_total 12"), "{m}");
    assert!(m.contains("mangrove_tokens_generated_total 96"), "{m}");
    let attention = format!("mangrove_path_total{{family=\"attention\",variant=\"{}\"}} ", cpu_variant());
    assert!(m.contains(&attention), "{m}");
    assert!(m.contains("mangrove_active_sequences 0"), "{m}");
    // 96 tokens took fewer than 96 forward steps: concurrent requests shared steps.
    let steps: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix(attention.as_str()))
        .unwrap()
        .parse()
        .unwrap();
    assert!(steps < 96, "{steps} steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let s = start(Preset::Tiny).await;
    let body = json!({"prompt": "abc", "max_tokens": 24, "temperature": 0});
    let full = text_of(&s.complete(body.clone()).await);
    // Stop at an ASCII character from the second half of the greedy text.
    let (at, ch) = full.char_indices().skip(full.chars().count() / 2).find(|(_, c)| c.is_ascii_graphic()).expect("ascii in output");
    let expect = &full[..full.find(ch).unwrap()];
    assert!(expect.len() <= at);
    let mut b = body.clone();
    b["stop"] = json!([ch.to_string(), "never-appears"]);
    let v = s.complete(b.clone()).await;
    assert_eq!(text_of(&v), expect);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let chunks = s.stream("/v1/completions", b).await;
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, expect);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_openai_style_4xx() {
    let s = start(Preset::Tiny).await;
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        ("/v1/completions", "".into(), 400, None),
        ("/v1/completions", json!({"max_tokens": 3}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": 5}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": ""}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": [100000]}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": [4294967301u64]}).to_string(), 400, Some("prompt")),
        ("/v1/chat/completions", json!({"max_tokens": 3}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": [{"role": "user"}]}).to_string(), 400, None),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": -4}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 100000}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "x", "temperature": -0.5}).to_string(), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": "x", "top_p": 0}).to_string(), 400, Some("top_p")),
        ("/v1/completions", json!({"prompt": "x", "top_k": -2}).to_string(), 400, Some("top_k")),
        ("/v1/completions", json!({"prompt": "x", "min_p": 1.5}).to_string(), 400, Some("min_p")),
        ("/v1/completions", json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).to_string(), 400, Some("stop")),
        ("/v1/completions", json!({"prompt": "x", "model": "gpt-9"}).to_string(), 404, Some("model")),
        ("/v1/completions", json!({"prompt": "x", "n": 2, "temperature": 0}).to_string(), 400, Some("n")),
        ("/v1/completions", json!({"prompt": "x", "n": 17}).to_string(), 400, Some("n")),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}).to_string(), 400, Some("max_tokens")),
        ("/v1/nope", "{}".into(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let (st, text) = s.post_raw(path, body.clone()).await;
        assert_eq!(st, status, "{path} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {body}: not JSON ({e}): {text}"));
        let err = &v["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(err["type"].is_string(), "{v}");
        assert!(err.get("code").is_some() && err.get("param").is_some(), "{v}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{path} {body}: {v}");
        }
    }
    // An oversized body is a JSON 413, not a bare text error, and closes the connection (the
    // rest of the body was never read, so the connection cannot be reused).
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(3 << 20));
    let r = s.client.post(format!("{}/v1/completions", s.base)).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(r.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));
    let text = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string(), "{text}");
    // Still healthy afterwards.
    assert_eq!(s.get("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let s = start(Preset::Tiny).await;
    let (st, m) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "tiny");
    let (st, h) = s.get("/health").await;
    assert_eq!(st, 200);
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!((h["status"].as_str(), h["backend"].as_str(), h["tuning_db"].as_str()), (Some("ok"), Some("cpu"), Some("tuning_db/h100")));
    // Unseeded sampling may draw EOS early: count against the reported usage.
    let v = s.complete(json!({"prompt": "x", "max_tokens": 2})).await;
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n == 2 || v["choices"][0]["finish_reason"] == "stop", "{v}");
    let (_, t) = s.get("/metrics").await;
    for needle in [
        "mangrove_requests_total 1".to_string(),
        format!("mangrove_tokens_generated_total {n}"),
        // (the fallback family shows once a fallback is counted: the client omits empty families)
        "# TYPE mangrove_time_to_first_token_seconds histogram".into(),
        "mangrove_time_to_first_token_seconds_count 1".into(),
        format!("mangrove_forward_steps_total {n}"),
        format!("mangrove_path_total{{family=\"lm_head\",variant=\"{}\"}} {n}", cpu_variant()),
    ] {
        assert!(t.contains(&needle), "{needle}: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_retires_its_sequence() {
    use futures::StreamExt;
    let s = start(Preset::Tiny).await;
    let body = json!({"prompt": "go", "max_tokens": 400, "stream": true, "temperature": 0});
    let r = s.client.post(format!("{}/v1/completions", s.base)).json(&body).send().await.unwrap();
    let mut bytes = r.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(bytes);
    // The engine notices the closed channel and stops generating well before 400 tokens.
    let mut active = String::new();
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        active = s.get("/metrics").await.1;
        if active.contains("mangrove_active_sequences 0") {
            break;
        }
    }
    assert!(active.contains("mangrove_active_sequences 0"), "{active}");
    let generated: u64 = active.lines().find_map(|l| l.strip_prefix("mangrove_tokens_generated_total ")).unwrap().parse().unwrap();
    assert!(generated < 400, "{generated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_router_answers_without_a_socket() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    generate(Preset::Tiny, dir.path(), 1).unwrap();
    let engine = Engine::open(dir.path(), "cpu", Some("tiny".into())).unwrap();
    let app = server::app(AppState::new(engine, Arc::new(Metrics::default()), None));
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(json!({"prompt": "hi", "max_tokens": 3, "temperature": 0}).to_string()))
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let r = app.oneshot(Request::get("/health").body(Body::empty()).unwrap()).await.unwrap();
    let v: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert!(v["tuning_db"].is_null(), "{v}");
}
