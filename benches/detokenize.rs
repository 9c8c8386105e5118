//! Host cost of turning a generation's tokens into streamed text, per sequence: decoding the
//! whole sequence after every token (what the batcher did) against the incremental
//! [`TextStream`], over generations of 256 and 1024 tokens with the byte-level BPE tokenizer
//! `gen-model` writes at the bitnet-2b vocabulary size (128256 ids).

use criterion::{criterion_group, criterion_main, Criterion};
use mangrove::engine::genmodel::tokenizer_json;
use mangrove::engine::tokenizer::{TextStream, Tokenizer};

fn detokenize(c: &mut Criterion) {
    let t = Tokenizer::from_inner(tokenizer_json(128_256).to_string().parse().expect("gen-model's tokenizer parses"));
    let paragraph = "The quick brown fox jumps over the lazy dog; naïve café owners say “déjà vu” — 日本語 too. ";
    let all = t.encode(&paragraph.repeat(64)).unwrap();
    for n in [256usize, 1024] {
        let ids = &all[..n];
        let mut g = c.benchmark_group(format!("detokenize a {n}-token generation"));
        g.sample_size(10);
        g.bench_function("whole decode per token", |b| b.iter(|| ids.iter().enumerate().map(|(i, _)| t.decode(&ids[..=i]).unwrap().len()).sum::<usize>()));
        g.bench_function("text stream", |b| {
            b.iter(|| {
                let mut s = TextStream::default();
                ids.iter().for_each(|&id| t.step(&mut s, id).unwrap());
                s.text.len()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, detokenize);
criterion_main!(benches);
