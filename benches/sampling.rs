//! Host cost of choosing one token from a bitnet-2b sized vocabulary (128256 logits): greedy,
//! temperature 1.0 (the API default) and temperature + top_p 0.9. The server pays this per
//! sequence per step, so at batch 16 it adds up next to a ~10 ms GPU step.

use criterion::{criterion_group, criterion_main, Criterion};
use mangrove::engine::sampling::{Sampler, SamplingParams};

fn logits(n: usize) -> Vec<f64> {
    // A deterministic, bumpy distribution (a few strong tokens over a flat tail).
    (0..n).map(|i| ((i as f64 * 0.618).sin() * 3.0) + if i % 997 == 0 { 6.0 } else { 0.0 }).collect()
}

fn sampling(c: &mut Criterion) {
    let l = logits(128_256);
    for (name, temperature, top_p) in [("greedy", 0.0, 1.0), ("temperature 1", 1.0, 1.0), ("temperature 1, top_p 0.9", 1.0, 0.9)] {
        let mut s = Sampler::new(SamplingParams { temperature, top_p, seed: Some(1), ..SamplingParams::default() });
        c.bench_function(&format!("sample 128256 logits: {name}"), |b| b.iter(|| s.sample(&l)));
    }
}

/// What the CUDA backend does to each downloaded f32 logits row before sampling.
fn widening(c: &mut Criterion) {
    let l: Vec<f32> = logits(128_256).into_iter().map(|v| v as f32).collect();
    c.bench_function("widen 128256 f32 logits to f64", |b| b.iter(|| l.iter().map(|&v| v as f64).collect::<Vec<f64>>()));
}

criterion_group!(benches, sampling, widening);
criterion_main!(benches);
