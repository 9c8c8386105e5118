//! What a vLLM or llama-server user relies on, over a real socket with a real HTTP client against
//! a `gen-model` tiny checkpoint on the CPU backends: logprobs equal to the CPU reference's
//! log-softmax, echo and prompt scoring (an lm-eval loglikelihood request replayed), streaming
//! logprobs, n > 1, include_usage, logit changes, the checkpoint's own chat template, every
//! unsupported parameter a 400 naming it, `/v1/models/{id}`, `/tokenize`, `/detokenize`, and a
//! JSON body on every error status.

use std::sync::Arc;

use mangrove::engine::backend::{KvCache, SeqInput};
use mangrove::engine::genmodel::{generate, Preset};
use mangrove::engine::metrics::Metrics;
use mangrove::engine::model::Model;
use mangrove::engine::server::{self, AppState};
use mangrove::engine::Engine;
use serde_json::{json, Value};

struct Server {
    base: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
}

/// A server on `backend` over a fresh tiny checkpoint; `extra` writes more files into it first.
async fn start_with(backend: &str, extra: impl FnOnce(&std::path::Path)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    generate(Preset::Tiny, dir.path(), 21).unwrap();
    extra(dir.path());
    let engine = Engine::open(dir.path(), backend, Some("tiny".into())).unwrap();
    let state = AppState::new(engine, Arc::new(Metrics::default()), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::serve(listener, state, std::future::pending()));
    Server { base, client: reqwest::Client::new(), dir }
}

async fn start(backend: &str) -> Server {
    start_with(backend, |_| {}).await
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.post(path, body.clone()).await;
        assert_eq!(s, 200, "{body} -> {v}");
        v
    }

    /// SSE payloads of a streamed request, the final `[DONE]` checked and dropped.
    async fn stream(&self, path: &str, mut body: Value) -> Vec<Value> {
        body["stream"] = true.into();
        let r = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    async fn tokenize(&self, prompt: &str) -> Vec<u32> {
        let v = self.ok("/tokenize", json!({"prompt": prompt})).await;
        v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    }
}

/// The CPU reference's log-softmax of `logits / t` at every id.
fn log_softmax(logits: &[f64], t: f64) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max / t + logits.iter().map(|l| ((l - max) / t).exp()).sum::<f64>().ln();
    logits.iter().map(|l| l / t - lse).collect()
}

/// The reference logits after each of `tokens`, fed one at a time through the f64 CPU forward.
fn reference_logits(dir: &std::path::Path, tokens: &[u32]) -> Vec<Vec<f64>> {
    let model = Model::load(dir).unwrap();
    let mut cache = KvCache::new(&model.config);
    tokens
        .iter()
        .map(|t| {
            let mut batch = [SeqInput { tokens: std::slice::from_ref(t), cache: &mut cache }];
            mangrove::engine::cpu::forward(&model, &mut batch).unwrap().remove(0)
        })
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_logprobs_are_the_reference_log_softmax_after_temperature() {
    let s = start("cpu-ref").await;
    let prompt = s.tokenize("Hello there").await;
    for temperature in [0.0, 0.7] {
        let body = json!({"prompt": "Hello there", "max_tokens": 4, "temperature": temperature, "seed": 3, "logprobs": 5,
            "ignore_eos": true, "return_tokens_as_token_ids": true});
        let v = s.ok("/v1/completions", body).await;
        let lp = &v["choices"][0]["logprobs"];
        let id = |name: &str| name.strip_prefix("token_id:").unwrap().parse::<u32>().unwrap();
        let generated: Vec<u32> = lp["tokens"].as_array().unwrap().iter().map(|t| id(t.as_str().unwrap())).collect();
        assert_eq!(generated.len(), 4, "{v}");
        let t = if temperature > 0.0 { temperature } else { 1.0 };
        let mut seq = prompt.clone();
        let mut max_diff = 0f64;
        for (pos, &tok) in generated.iter().enumerate() {
            let want = log_softmax(&reference_logits(s.dir.path(), &seq).pop().unwrap(), t);
            let top = lp["top_logprobs"][pos].as_object().unwrap();
            assert_eq!(top.len(), 5, "{top:?}");
            // The top-5 sum to at most 1; each is the reference's value at its id.
            let mass: f64 = top.values().map(|l| f(l).exp()).sum();
            assert!(mass <= 1.0 + 1e-9, "{mass}");
            for (name, l) in top {
                max_diff = max_diff.max((want[id(name) as usize] - f(l)).abs());
            }
            // The top-1 is the reference's best, and the chosen token's logprob its value.
            let best = want.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let got_best = top.values().map(f).fold(f64::NEG_INFINITY, f64::max);
            max_diff = max_diff.max((best - got_best).abs());
            max_diff = max_diff.max((want[tok as usize] - f(&lp["token_logprobs"][pos])).abs());
            if temperature == 0.0 {
                assert_eq!(tok, mangrove::engine::sampling::argmax(&want), "greedy picks the top token");
            }
            seq.push(tok);
        }
        assert!(max_diff < 1e-4, "top-1 logprob differs from the reference by {max_diff}");
        assert_eq!(lp["text_offset"][0], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_the_prompt_and_lm_eval_loglikelihood_replays() {
    let s = start("cpu-ref").await;
    let text = "The quick brown fox";
    let ids = s.tokenize(text).await;
    let logits = reference_logits(s.dir.path(), &ids);
    // Scoring alone: max_tokens 0, echo, logprobs.
    let v = s.ok("/v1/completions", json!({"prompt": text, "echo": true, "logprobs": 2, "max_tokens": 0, "return_tokens_as_token_ids": true})).await;
    let c = &v["choices"][0];
    assert_eq!(c["text"], text);
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let lp = &c["logprobs"];
    let names: Vec<String> = ids.iter().map(|i| format!("token_id:{i}")).collect();
    assert_eq!(lp["tokens"], json!(names), "the prompt's own tokens");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    for i in 1..ids.len() {
        let want = log_softmax(&logits[i - 1], 1.0)[ids[i] as usize];
        let got = f(&lp["token_logprobs"][i]);
        assert!((got - want).abs() < 1e-4, "position {i}: {got} vs {want}");
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 2);
    }
    // lm-eval-harness's `local-completions` loglikelihood payload: token-id prompts (context +
    // continuation) in a batch, echo, max_tokens 1, logprobs 1, temperature 0; it reads
    // token_logprobs[ctxlen:-1] and compares each top_logprobs entry with the token.
    let ctxlen = 2;
    let other: Vec<u32> = ids.iter().rev().cloned().collect();
    let payload = json!({"model": "tiny", "prompt": [ids, other], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true});
    let v = s.ok("/v1/completions", payload).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{v}");
    for (choice, seq) in choices.iter().zip([&ids, &other]) {
        let lp = &choice["logprobs"];
        let all = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(all.len(), seq.len() + 1, "prompt tokens plus the generated one");
        let cont = &all[ctxlen..all.len() - 1];
        let sum: f64 = cont.iter().map(f).sum();
        let logits = reference_logits(s.dir.path(), seq);
        let want: f64 = (ctxlen..seq.len()).map(|i| log_softmax(&logits[i - 1], 1.0)[seq[i] as usize]).sum();
        assert!((sum - want).abs() < 1e-4, "{sum} vs {want}");
        let tops = &lp["top_logprobs"].as_array().unwrap()[ctxlen..all.len() - 1];
        let tokens = &lp["tokens"].as_array().unwrap()[ctxlen..all.len() - 1];
        let greedy = tops.iter().zip(tokens).all(|(top, tok)| top.as_object().unwrap().keys().next().map(String::as_str) == tok.as_str());
        let want_greedy = (ctxlen..seq.len()).all(|i| mangrove::engine::sampling::argmax(&logits[i - 1]) == seq[i]);
        assert_eq!(greedy, want_greedy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_logprobs_match_the_whole_response() {
    let s = start("cpu").await;
    let body = json!({"prompt": "abc", "max_tokens": 6, "temperature": 0.9, "seed": 8, "logprobs": 3, "echo": true, "ignore_eos": true});
    let whole = s.ok("/v1/completions", body.clone()).await;
    let chunks = s.stream("/v1/completions", body).await;
    let mut lps = Vec::new();
    let mut text = String::new();
    for c in &chunks {
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
        if let Some(l) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            lps.extend(l.iter().cloned());
        }
    }
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(&lps, whole["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap());
    // The SIMD backend's distribution is one too.
    for top in whole["choices"][0]["logprobs"]["top_logprobs"].as_array().unwrap().iter().skip(1) {
        let mass: f64 = top.as_object().unwrap().values().map(|l| f(l).exp()).sum();
        assert!(mass <= 1.0 + 1e-9 && mass > 0.0, "{mass}");
    }
    // Chat: logprobs true with top_logprobs, streamed and whole alike.
    let chat = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2, "ignore_eos": true});
    let v = s.ok("/v1/chat/completions", chat.clone()).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(e["logprob"], top[0]["logprob"], "greedy: the chosen token is the likeliest");
        assert!(f(&top[0]["logprob"]) >= f(&top[1]["logprob"]));
        assert_eq!(e["bytes"].as_array().unwrap().len(), e["token"].as_str().unwrap().len());
    }
    let chunks = s.stream("/v1/chat/completions", chat).await;
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().cloned().collect();
    assert_eq!(&streamed, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_include_usage_and_logit_changes() {
    let s = start("cpu").await;
    let v = s.ok("/v1/completions", json!({"prompt": "go", "n": 3, "max_tokens": 5, "temperature": 1.0, "seed": 4, "ignore_eos": true})).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(v["usage"]["completion_tokens"], 15);
    // include_usage: a last chunk with no choices carries the usage; the others none.
    let chunks = s.stream("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "n": 2,
        "temperature": 0.5, "stream_options": {"include_usage": true}, "ignore_eos": true})).await;
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.get("usage").is_none()));
    let ends = chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|c| c["finish_reason"] == "length")).count();
    assert_eq!(ends, 2);
    // logit_bias +100 on one token makes greedy decoding pick it every time.
    let v = s.ok("/v1/completions", json!({"prompt": "go", "max_tokens": 4, "temperature": 0, "logit_bias": {"65": 100}, "ignore_eos": true})).await;
    assert_eq!(v["choices"][0]["text"], "AAAA");
    // That token as a stop_token_id ends the sequence at once; min_tokens holds it back.
    let v = s.ok("/v1/completions", json!({"prompt": "go", "max_tokens": 4, "temperature": 0, "logit_bias": {"65": 100}, "stop_token_ids": [65]})).await;
    assert_eq!((v["choices"][0]["finish_reason"].as_str(), v["usage"]["completion_tokens"].as_u64()), (Some("stop"), Some(1)));
    let v = s.ok("/v1/completions", json!({"prompt": "go", "max_tokens": 4, "temperature": 0, "logit_bias": {"65": 100}, "stop_token_ids": [65], "min_tokens": 3})).await;
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    // A penalty changes the logprobs by exactly its definition: frequency 1 on the token
    // generated once lowers its logit, so its log-odds against any other token, by 1.
    let base = json!({"prompt": "go", "max_tokens": 2, "temperature": 0, "logit_bias": {"65": 5}, "logprobs": 20,
        "ignore_eos": true, "return_tokens_as_token_ids": true});
    let plain = s.ok("/v1/completions", base.clone()).await;
    let mut pen = base.clone();
    pen["frequency_penalty"] = json!(1.0);
    let pen = s.ok("/v1/completions", pen).await;
    let lps = |v: &Value| v["choices"][0]["logprobs"].clone();
    assert_eq!(lps(&plain)["tokens"][0], "token_id:65");
    assert_eq!(lps(&plain)["token_logprobs"][0], lps(&pen)["token_logprobs"][0], "no output yet: no penalty");
    let (a, b) = (lps(&plain)["top_logprobs"][1].as_object().unwrap().clone(), lps(&pen)["top_logprobs"][1].as_object().unwrap().clone());
    let other = b.keys().find(|k| *k != "token_id:65" && a.contains_key(*k)).expect("a token in both top lists");
    let da = f(&a["token_id:65"]) - f(&a[other]);
    let db = f(&b["token_id:65"]) - f(&b[other]);
    assert!(((da - db) - 1.0).abs() < 1e-4, "{da} {db}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsupported_parameter_is_a_400_naming_it() {
    let s = start("cpu").await;
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ("/v1/chat/completions", b)
    };
    let text = |extra: Value| {
        let mut b = json!({"prompt": "x", "max_tokens": 2});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ("/v1/completions", b)
    };
    let cases = [
        (text(json!({"suffix": "end"})), "suffix"),
        (text(json!({"best_of": 3})), "best_of"),
        (text(json!({"logprobs": 21})), "logprobs"),
        (text(json!({"guided_json": {"type": "object"}})), "guided_json"),
        (text(json!({"frobnicate": 1})), "frobnicate"),
        (text(json!({"presence_penalty": 3})), "presence_penalty"),
        (text(json!({"repetition_penalty": 0})), "repetition_penalty"),
        (text(json!({"logit_bias": {"99999": 1}})), "logit_bias"),
        (text(json!({"stop_token_ids": [100000]})), "stop_token_ids"),
        (text(json!({"min_tokens": 5})), "min_tokens"),
        (text(json!({"stream_options": {"include_usage": true}})), "stream_options"),
        (chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})), "tools"),
        (chat(json!({"tool_choice": "auto"})), "tool_choice"),
        (chat(json!({"response_format": {"type": "json_object"}})), "response_format"),
        (chat(json!({"top_logprobs": 2})), "top_logprobs"),
        (chat(json!({"functions": []})), "functions"),
        (chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})), "messages"),
        (chat(json!({"messages": [{"role": "wizard", "content": "x"}]})), "messages"),
    ];
    for ((path, body), name) in cases {
        let (st, v) = s.post(path, body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(v["error"]["param"] == name || msg.contains(name), "{body}: {v}");
    }
    // Known-harmless fields and nulls pass.
    s.ok("/v1/completions", json!({"prompt": "x", "max_tokens": 1, "user": "u", "suffix": null, "best_of": 1})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_by_id_tokenize_detokenize_and_json_error_bodies() {
    let s = start("cpu").await;
    let r = s.client.get(format!("{}/v1/models/tiny", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["id"].as_str(), v["object"].as_str()), (Some("tiny"), Some("model")));
    let r = s.client.get(format!("{}/v1/models/other", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "model_not_found");
    // A wrong method is a JSON 405 too.
    let r = s.client.get(format!("{}/v1/completions", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("GET"));
    let ids = s.tokenize("hello world").await;
    let v = s.ok("/tokenize", json!({"prompt": "hello world", "add_special_tokens": false, "return_token_strs": true})).await;
    assert_eq!(v["count"].as_u64().unwrap() as usize, ids.len());
    assert_eq!(v["max_model_len"], 512);
    assert_eq!(v["token_strs"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), "hello world");
    let v = s.ok("/detokenize", json!({"tokens": ids})).await;
    assert_eq!(v["prompt"], "hello world");
    let (st, v) = s.post("/detokenize", json!({"tokens": [4000]})).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("tokens")));
    // Response ids do not repeat.
    let a = s.ok("/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
    let b = s.ok("/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
    assert_ne!(a["id"], b["id"]);
    assert!(a["id"].as_str().unwrap().len() > "cmpl-0".len());
    // The id is also the x-request-id header (the access log names it).
    let r = s.client.post(format!("{}/v1/completions", s.base)).json(&json!({"prompt": "x", "max_tokens": 1})).send().await.unwrap();
    let header = r.headers().get("x-request-id").unwrap().to_str().unwrap().to_string();
    assert_eq!(r.json::<Value>().await.unwrap()["id"], header);
}

/// A ChatML-style template of the kind checkpoints ship, with a role check.
const TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}\
{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n\
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoints_chat_template_makes_the_prompt() {
    let s = start_with("cpu", |dir| {
        let cfg = json!({"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>",
            "chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": TEMPLATE}]});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    })
    .await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": " Hi! "}]}]);
    let v = s.ok("/tokenize", json!({"messages": messages})).await;
    let got: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    // The text the template defines, tokenized without the tokenizer's own specials (the
    // template wrote BOS): ids of the tiny byte-level vocabulary.
    let want_text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n";
    let tok = mangrove::engine::tokenizer::Tokenizer::load(s.dir.path()).unwrap();
    let mut want = vec![297]; // <|begin_of_text|>
    want.extend(tok.encode_with(want_text, false).unwrap());
    assert_eq!(got, want);
    // The same prompt reaches the model.
    let v = s.ok("/v1/chat/completions", json!({"messages": messages, "max_tokens": 1})).await;
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, want.len());
    // Without the generation prompt the assistant opener is gone.
    let v = s.ok("/tokenize", json!({"messages": messages, "add_generation_prompt": false})).await;
    assert_eq!(v["count"].as_u64().unwrap() as usize, want.len() - tok.encode_with("<|im_start|>assistant\n", false).unwrap().len());
    // The template's raise_exception is the client's 400, with its message.
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": [{"role": "tool", "content": "x"}]})).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("Unknown role: tool"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_latency_and_length_histograms() {
    let s = start("cpu").await;
    s.ok("/v1/completions", json!({"prompt": "abc", "max_tokens": 4, "n": 2, "temperature": 1.0, "ignore_eos": true})).await;
    s.ok("/v1/completions", json!({"prompt": "abcdef", "max_tokens": 3, "temperature": 0, "ignore_eos": true})).await;
    let text = s.client.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let one = |name: &str| -> &prometheus_parse::Value {
        &scrape.samples.iter().find(|x| x.metric == name).unwrap_or_else(|| panic!("{name} missing: {text}")).value
    };
    // Total observations of a histogram: its +Inf bucket.
    let observed = |name: &str| match one(name) {
        prometheus_parse::Value::Histogram(b) => b.iter().find(|b| b.less_than.is_infinite()).map(|b| b.count).unwrap(),
        other => panic!("{name} is not a histogram: {other:?}"),
    };
    for name in ["mangrove_e2e_request_latency_seconds", "mangrove_time_to_first_token_seconds", "mangrove_request_queue_time_seconds",
        "mangrove_request_prompt_tokens", "mangrove_request_generation_tokens"] {
        assert_eq!(observed(name), 3.0, "{name}: three sequences");
    }
    // 4 + 4 + 3 tokens: all but each sequence's first have an inter-token time.
    assert_eq!(observed("mangrove_time_per_output_token_seconds"), 8.0);
    let gauge = |name: &str| match one(name) {
        prometheus_parse::Value::Gauge(v) => *v,
        other => panic!("{name} is not a gauge: {other:?}"),
    };
    assert_eq!(gauge("mangrove_active_sequences"), 0.0);
    assert_eq!(gauge("mangrove_num_requests_waiting"), 0.0);
    assert_eq!(gauge("mangrove_kv_slots_total"), 16.0);
    assert!(matches!(one("mangrove_requests_total"), prometheus_parse::Value::Counter(v) if *v == 2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_config_defaults_apply_where_the_request_is_silent() {
    let s = start_with("cpu", |dir| {
        std::fs::write(dir.join("generation_config.json"), r#"{"do_sample": false, "temperature": 0.0, "max_new_tokens": 3, "transformers_version": "4.57"}"#).unwrap();
    })
    .await;
    let a = s.ok("/v1/completions", json!({"prompt": "abc", "ignore_eos": true})).await;
    let b = s.ok("/v1/completions", json!({"prompt": "abc", "ignore_eos": true})).await;
    assert_eq!(a["usage"]["completion_tokens"], 3, "max_new_tokens is the default max_tokens");
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "temperature 0: greedy");
    // The request's own values win.
    let v = s.ok("/v1/completions", json!({"prompt": "abc", "max_tokens": 5, "n": 2, "temperature": 1.0, "ignore_eos": true})).await;
    assert_eq!(v["usage"]["completion_tokens"], 10);
}
