//! Serving counters: requests, tokens, active sequences, and the path counters — one per
//! (layer family, kernel variant) that ran, and one per (layer family, fallback reason).
//! Rendered as Prometheus text for `/metrics` and as JSON at shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use mangrove_core::step::Family;
use mangrove_deploy::provision::FallbackReason;

/// Shared serving counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: AtomicU64,
    rejected: AtomicU64,
    prompt_tokens: AtomicU64,
    tokens_generated: AtomicU64,
    active: AtomicI64,
    steps: AtomicU64,
    step_nanos: AtomicU64,
    step_tokens: AtomicU64,
    paths: Mutex<BTreeMap<(String, String), u64>>,
    fallbacks: Mutex<BTreeMap<(String, String), u64>>,
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Counts one accepted request with its prompt length.
    pub fn request(&self, prompt_tokens: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }

    /// Counts one request refused because the queue was full (HTTP 429).
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused because the queue was full.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Counts generated tokens.
    pub fn generated(&self, n: usize) {
        self.tokens_generated.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts one forward step that fed `tokens` tokens and took `elapsed`.
    pub fn step(&self, tokens: usize, elapsed: std::time::Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_nanos.fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Sets the number of sequences in the running batch.
    pub fn set_active(&self, n: usize) {
        self.active.store(n as i64, Ordering::Relaxed);
    }

    /// Sequences in the running batch.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Tokens generated so far.
    pub fn tokens_generated(&self) -> u64 {
        self.tokens_generated.load(Ordering::Relaxed)
    }

    /// Counts one run of each (family, variant).
    pub fn paths_ran(&self, paths: &[(Family, &str)]) {
        let mut m = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        for &(f, v) in paths {
            *m.entry((f.as_str().into(), v.into())).or_default() += 1;
        }
    }

    /// Counts one fallback of `family`.
    pub fn fallback(&self, family: Family, reason: FallbackReason) {
        let mut m = self.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((family.as_str().into(), reason.as_str().into())).or_default() += 1;
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, v: String| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        counter("mangrove_requests_total", "Completion requests accepted.", "counter", self.requests.load(Ordering::Relaxed).to_string());
        counter("mangrove_rejected_total", "Completion requests refused with 429 (queue full).", "counter", self.rejected_total().to_string());
        counter("mangrove_prompt_tokens_total", "Prompt tokens of accepted requests.", "counter", self.prompt_tokens.load(Ordering::Relaxed).to_string());
        counter("mangrove_tokens_generated_total", "Tokens generated.", "counter", self.tokens_generated().to_string());
        counter("mangrove_active_sequences", "Sequences in the running batch.", "gauge", self.active().to_string());
        counter("mangrove_forward_steps_total", "Batched forward steps run.", "counter", self.steps.load(Ordering::Relaxed).to_string());
        counter("mangrove_forward_seconds_total", "Wall time spent in forward steps.", "counter", format!("{:.6}", self.step_nanos.load(Ordering::Relaxed) as f64 * 1e-9));
        counter("mangrove_forward_tokens_total", "Tokens fed to forward steps (prefill and decode).", "counter", self.step_tokens.load(Ordering::Relaxed).to_string());
        s.push_str("# HELP mangrove_path_total Forward steps that ran a (layer family, kernel variant).\n# TYPE mangrove_path_total counter\n");
        for ((f, v), n) in self.paths.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.push_str(&format!("mangrove_path_total{{family=\"{}\",variant=\"{}\"}} {n}\n", label(f), label(v)));
        }
        s.push_str("# HELP mangrove_fallback_total Fallbacks from the tuned kernel, by layer family and reason.\n# TYPE mangrove_fallback_total counter\n");
        for ((f, r), n) in self.fallbacks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.push_str(&format!("mangrove_fallback_total{{family=\"{}\",reason=\"{}\"}} {n}\n", label(f), label(r)));
        }
        s
    }

    /// The same counters as JSON (dumped at shutdown).
    pub fn json(&self) -> serde_json::Value {
        let table = |m: &Mutex<BTreeMap<(String, String), u64>>, second: &str| -> Vec<serde_json::Value> {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|((f, x), n)| serde_json::json!({"family": f, second: x, "count": n}))
                .collect()
        };
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "rejected": self.rejected_total(),
            "prompt_tokens": self.prompt_tokens.load(Ordering::Relaxed),
            "tokens_generated": self.tokens_generated(),
            "active_sequences": self.active(),
            "forward_steps": self.steps.load(Ordering::Relaxed),
            "forward_seconds": self.step_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            "forward_tokens": self.step_tokens.load(Ordering::Relaxed),
            "paths": table(&self.paths, "variant"),
            "fallbacks": table(&self.fallbacks, "reason"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_path_and_fallback_counters() {
        let m = Metrics::default();
        m.paths_ran(&[(Family::Attention, "cpu_reference"), (Family::Attention, "cpu_reference")]);
        m.fallback(Family::MlpDown, FallbackReason::NoTunedKernel);
        m.generated(3);
        m.step(5, std::time::Duration::from_millis(1500));
        let t = m.prometheus();
        assert!(t.contains("mangrove_path_total{family=\"attention\",variant=\"cpu_reference\"} 2"), "{t}");
        assert!(t.contains("mangrove_fallback_total{family=\"mlp_down\",reason=\"no_tuned_kernel\"} 1"), "{t}");
        assert!(t.contains("mangrove_tokens_generated_total 3"));
        assert!(t.contains("mangrove_forward_seconds_total 1.500000"), "{t}");
        assert!(t.contains("mangrove_forward_tokens_total 5"), "{t}");
        assert_eq!(m.json()["paths"][0]["count"], 2);
    }
}
