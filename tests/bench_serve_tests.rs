//! `mangrove bench serve` against a real CPU `mangrove serve` of the tiny checkpoint: a sweep of
//! two levels with its JSON / CSV / SVG, the TTFT-target search, and the stress verdict (a clean
//! 200 @ 8 against a server bench serve launches passes, a server that refuses requests fails it).

mod common;

use std::process::{Command, Output};

use common::server::{gen_tiny, serve};

fn bench_serve(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["bench", "serve", "--url", url]).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn sweep_writes_json_csv_svg_and_finds_the_ttft_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    gen_tiny(&model);
    let server = serve(&model, &["--max-batch", "4"], dir.path());
    let url = format!("http://{}", server.addr);
    let pid = server.pid().to_string();
    let json = dir.path().join("serve.json");
    let o = bench_serve(
        &url,
        &["--concurrency", "1,2", "--num-prompts", "6", "--max-tokens", "8", "--prompt-words", "4:12", "--ttft-target-ms", "60000", "--max-concurrency", "4"]
            .into_iter()
            .chain(["--server-pid", &pid, "--json", json.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["model"], "tiny");
    let levels = r["levels"].as_array().unwrap();
    // 1 and 2 from the sweep, then the search doubles to its cap of 4.
    let conc: Vec<u64> = levels.iter().map(|l| l["concurrency"].as_u64().unwrap()).collect();
    assert_eq!(conc, vec![1, 2, 4]);
    for l in levels {
        assert_eq!((l["requests"].as_u64(), l["succeeded"].as_u64(), l["failed"].as_u64()), (Some(6), Some(6), Some(0)), "{l}");
        for m in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            for q in ["p50", "p95", "p99"] {
                assert!(l[m][q].as_f64().is_some_and(|v| v > 0.0), "{m}.{q} in {l}");
            }
        }
        assert!(l["e2e_ms"]["p50"].as_f64() >= l["ttft_ms"]["p50"].as_f64());
        assert!(l["output_tokens"].as_u64().unwrap() > 6 && l["tokens_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["server_memory"]["peak_bytes"].as_u64().unwrap() > 0, "{l}");
    }
    assert_eq!(r["ttft_target"]["max_concurrency"], 4);
    // mangrove gives every sequence a slot of the model's whole context.
    assert_eq!(r["ttft_target"]["kv_budget"], serde_json::json!({"tokens_per_user": 512, "source": "per_sequence_slot"}));
    assert!(r["provenance"]["command"].as_str().unwrap().contains("bench serve"));

    let csv = std::fs::read_to_string(json.with_extension("csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("concurrency,requests,succeeded,failed,") && lines[0].contains("ttft_p95_ms"), "{csv}");
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[2].starts_with("2,6,6,0,"), "{csv}");
    let svg = std::fs::read_to_string(json.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("TTFT p95 ms") && svg.contains("output tokens/s"), "{}", &svg[..svg.len().min(300)]);

    // A target nothing meets: the search stops at 1 and says so.
    let o = bench_serve(&url, &["--num-prompts", "2", "--max-tokens", "4", "--ttft-target-ms", "0.001"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no concurrency meets TTFT p95 <= 0.001 ms"), "{}", text(&o));
}

#[test]
fn stress_200_at_8_passes_and_a_refusing_server_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    gen_tiny(&model);
    // The server launched by bench serve itself (`-- SERVE_ARGS`), in its own process group.
    let json = dir.path().join("stress.json");
    let o = Command::new(env!("CARGO_BIN_EXE_mangrove"))
        .args(["bench", "serve", "--stress", "--max-tokens", "4", "--prompt-words", "4", "--json", json.to_str().unwrap()])
        .args(["--", "--model", model.to_str().unwrap(), "--max-batch", "8"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let s = &r["stress"];
    assert_eq!((s["requests"].as_u64(), s["concurrency"].as_u64(), s["failed"].as_u64(), s["passed"].as_bool()), (Some(200), Some(8), Some(0), Some(true)), "{s}");
    assert!(s["rss_growth_bytes"].is_i64(), "the launched server's RSS was sampled: {s}");
    let exit = &r["server_exit"];
    assert_eq!((exit["clean"].as_bool(), exit["killed"].as_bool()), (Some(true), Some(false)), "{exit}");
    let log = std::fs::read_to_string(json.with_extension("server.log")).unwrap();
    assert!(log.contains("serving"), "{log}");
    let pid = r["levels"][0]["server_memory"]["pid"].as_u64().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "no server left behind");

    // One sequence and one queue place for 8 clients: the rest are refused with 429.
    let server = serve(&model, &["--max-batch", "1", "--max-queue", "1"], dir.path());
    let o = bench_serve(&format!("http://{}", server.addr), &["--stress", "--num-prompts", "16", "--max-tokens", "16", "--warmup", "0"]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("stress FAIL") && t.contains("HTTP 429"), "{t}");
}
