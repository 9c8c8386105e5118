//! `mangrove serve` under attack and overload, on real sockets: a full queue answers 429 with an
//! OpenAI error and Retry-After at once while a small request still completes; a short prompt is
//! not stuck behind long ones; slow-headers, slow-body and idle clients are cut at the configured
//! timeouts while `/health` keeps answering, also at the connection cap; non-JSON bodies get 415;
//! with an API key, missing or wrong keys get 401 and `/health` stays open.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mangrove::engine::batcher::BatcherConfig;
use mangrove::engine::genmodel::{generate, Preset};
use mangrove::engine::metrics::Metrics;
use mangrove::engine::server::{self, AppState, ServeOptions};
use mangrove::engine::Engine;
use mangrove::http::HttpLimits;
use serde_json::{json, Value};

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start(batcher: BatcherConfig, options: ServeOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    generate(Preset::Tiny, dir.path(), 21).unwrap();
    let engine = Engine::open(dir.path(), "cpu", Some("tiny".into())).unwrap();
    let metrics = Arc::new(Metrics::default());
    let state = AppState::with_config(engine, metrics.clone(), None, batcher);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server::serve_with(listener, state, &options, std::future::pending()).await });
    Server { base: format!("http://{addr}"), addr, metrics, client: reqwest::Client::new(), _dir: dir }
}

/// Tight limits so a test sees the timeouts fire quickly.
fn tight(max_connections: usize) -> ServeOptions {
    let t = Duration::from_millis(500);
    ServeOptions { limits: HttpLimits { header_timeout: t, body_timeout: t, max_connections, ..HttpLimits::default() }, api_key: None }
}

impl Server {
    async fn complete(&self, body: Value) -> (u16, Option<String>, Value) {
        let r = self.client.post(format!("{}/v1/completions", self.base)).json(&body).send().await.unwrap();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, retry, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    /// GET /health on a fresh blocking connection; the status line, within `within`.
    fn health_within(&self, within: Duration) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(within)).unwrap();
        write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines().next().unwrap_or_default().to_string()
    }
}

/// A prompt of about `n` tokens of the tiny tokenizer, as token ids.
fn ids(n: usize) -> Value {
    json!((0..n).map(|i| 3 + (i * 7) % 200).collect::<Vec<_>>())
}

/// Reads until the peer closes; returns how long that took (None if still open after `limit`).
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_fast_with_429_while_a_small_request_completes() {
    let cfg = BatcherConfig { max_seqs: 2, max_queue: 2, prefill_chunk: 64, step_tokens: 128 };
    let s = Arc::new(start(cfg, ServeOptions::default()).await);
    let long = json!({"prompt": ids(200), "max_tokens": 200, "temperature": 0});
    let burst: Vec<_> = (0..24)
        .map(|_| {
            let (s, b) = (s.clone(), long.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let (status, retry, v) = s.complete(b).await;
                (status, retry, v, t0.elapsed())
            })
        })
        .collect();
    // Meanwhile a 1-token request, retried as a client does on 429 (after Retry-After).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let small = loop {
        let (status, retry, v) = s.complete(json!({"prompt": "hi", "max_tokens": 1})).await;
        if status != 429 {
            break (status, v);
        }
        assert_eq!(retry.as_deref(), Some("1"), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(t0.elapsed() < Duration::from_secs(60), "the small request never got in");
    };
    assert_eq!(small.0, 200, "{}", small.1);
    assert_eq!(small.1["usage"]["completion_tokens"], 1);
    let results: Vec<_> = futures::future::join_all(burst).await.into_iter().map(Result::unwrap).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    assert!(refused.len() >= 12, "2 run and 2 wait at a time, 24 arrive at once: only {} refused", refused.len());
    assert_eq!(served + refused.len(), 24, "every request is served or refused: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    for (_, retry, v, took) in &refused {
        assert!(*took < Duration::from_secs(1), "a refusal took {took:?}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(v["error"]["code"], "queue_full", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("capacity"), "{v}");
    }
    assert!(s.metrics.rejected_total() >= refused.len() as u64);
    let h: Value = s.client.get(format!("{}/health", s.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["queued_requests"], 0, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_is_refused_before_tokenizing() {
    let s = start(BatcherConfig::default(), ServeOptions::default()).await;
    let t0 = Instant::now();
    let (status, _, v) = s.complete(json!({"prompt": "word ".repeat(380_000), "max_tokens": 1})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt");
    assert!(v["error"]["message"].as_str().unwrap().contains("bytes"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_prompt_is_not_stuck_behind_long_prefills() {
    // Three 480-token prompts prefill 32 tokens a step between them; a 3-token request admitted
    // after them is fed in its first step and finishes while they are still prefilling.
    let cfg = BatcherConfig { max_seqs: 4, max_queue: 4, prefill_chunk: 32, step_tokens: 40 };
    let s = Arc::new(start(cfg, ServeOptions::default()).await);
    let long: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.complete(json!({"prompt": ids(480), "max_tokens": 8, "temperature": 0})).await })
        })
        .collect();
    for _ in 0..500 {
        if s.metrics.active() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let steps = |m: &Metrics| m.json()["forward_steps"].as_u64().unwrap();
    let before = steps(&s.metrics);
    let (status, _, v) = s.complete(json!({"prompt": ids(3), "max_tokens": 2, "temperature": 0})).await;
    let took = steps(&s.metrics) - before;
    assert_eq!(status, 200, "{v}");
    // Prefilling the long prompts alone takes 3 * 480 / 40 = 36 steps.
    assert!(took < 12, "the short request took {took} forward steps");
    for r in futures::future::join_all(long).await {
        assert_eq!(r.unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_waiting_behind_long_ones_gets_the_next_free_slot() {
    // One slot: a long request runs, three more wait; a short one queued last goes next.
    let cfg = BatcherConfig { max_seqs: 1, max_queue: 8, prefill_chunk: 64, step_tokens: 64 };
    let s = Arc::new(start(cfg, ServeOptions::default()).await);
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |name: &'static str, body: Value| {
        let (s, finished) = (s.clone(), finished.clone());
        tokio::spawn(async move {
            let (status, _, v) = s.complete(body).await;
            assert_eq!(status, 200, "{name}: {v}");
            finished.lock().unwrap().push(name);
        })
    };
    let long = || json!({"prompt": ids(300), "max_tokens": 40, "temperature": 0});
    let mut tasks = vec![send("running", long())];
    for _ in 0..200 {
        if s.metrics.active() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for name in ["long-1", "long-2", "long-3"] {
        tasks.push(send(name, long()));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    tasks.push(send("short", json!({"prompt": ids(2), "max_tokens": 1})));
    for t in tasks {
        t.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    let at = order.iter().position(|n| *n == "short").unwrap();
    assert!(at <= 2, "the short request finished {at}th: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_slow_bodies_and_idle_connections_are_cut_while_health_answers() {
    let s = start(BatcherConfig::default(), tight(1024)).await;
    // Slow loris: headers that never end.
    let mut loris: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            c
        })
        .collect();
    // Health is answered meanwhile.
    let line = tokio::task::block_in_place(|| s.health_within(Duration::from_secs(2)));
    assert!(line.contains("200"), "{line}");
    for c in &mut loris {
        let took = tokio::task::block_in_place(|| closed_within(c, Duration::from_secs(5)));
        let took = took.expect("a slow-headers client was not disconnected");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    // A body announced but never sent in full.
    let mut slow_body = TcpStream::connect(s.addr).unwrap();
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        .unwrap();
    let took = tokio::task::block_in_place(|| {
        let t0 = Instant::now();
        slow_body.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = slow_body.read_to_end(&mut out);
        (t0.elapsed(), String::from_utf8_lossy(&out).into_owned())
    });
    assert!(took.0 < Duration::from_secs(3), "slow body held for {:?}", took.0);
    assert!(took.1.is_empty() || took.1.starts_with("HTTP/1.1 4"), "{}", took.1);
    // An idle keep-alive connection is closed after the header timeout too.
    let mut idle = TcpStream::connect(s.addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let took = tokio::task::block_in_place(|| closed_within(&mut idle, Duration::from_secs(5)));
    assert!(took.is_some_and(|t| t < Duration::from_secs(3)), "idle connection kept: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_health_waits_only_until_stalled_clients_are_cut() {
    let s = start(BatcherConfig::default(), tight(4)).await;
    let _stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let line = tokio::task::block_in_place(|| s.health_within(Duration::from_secs(5)));
    assert!(line.contains("200"), "health was not answered at the cap: {line:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_bodies_get_415_and_the_api_key_guards_every_route_but_health() {
    let options = ServeOptions { api_key: Some("s3cret".into()), ..ServeOptions::default() };
    let s = start(BatcherConfig::default(), options).await;
    let url = format!("{}/v1/completions", s.base);
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let send = |auth: Option<&str>, ct: Option<&str>| {
        let mut r = s.client.post(&url).body(body.clone());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        if let Some(c) = ct {
            r = r.header("content-type", c);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    for auth in [None, Some("Bearer wrong"), Some("s3cret"), Some("Bearer s3cret2"), Some("Basic s3cret")] {
        let (status, text) = send(auth, Some("application/json")).await;
        assert_eq!(status, 401, "{auth:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    }
    let (status, text) = send(Some("Bearer s3cret"), Some("application/json; charset=utf-8")).await;
    assert_eq!(status, 200, "{text}");
    for ct in [Some("text/plain"), None, Some("application/x-www-form-urlencoded")] {
        let (status, text) = send(Some("Bearer s3cret"), ct).await;
        assert_eq!(status, 415, "{ct:?}: {text}");
        assert!(text.contains("application/json"), "{text}");
    }
    let get = |path: &str, auth: bool| {
        let mut r = s.client.get(format!("{}{path}", s.base));
        if auth {
            r = r.bearer_auth("s3cret");
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get("/health", false).await, 200);
    assert_eq!(get("/metrics", false).await, 401);
    assert_eq!(get("/v1/models", false).await, 401);
    assert_eq!(get("/v1/models", true).await, 200);
}
