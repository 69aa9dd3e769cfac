//! A prompt's matrix products (256 rows against each of gpt2's matrices, f32 weights in cache
//! after the first pass), the work that bounds prefill and scoring, and batched decoding's (8 rows:
//! a server's running sequences; the weights stay in the L3 except the unembedding's). Throughput
//! is in FLOP (2·m·n·k per product), so criterion's "elem/s" reads as FLOP/s against the
//! machine's FMA peak.
//!
//! `cargo bench --bench matmul` (threads: one per core; `GPT2_ISA=avx2` measures the AVX2 kernels on
//! an AVX-512 machine)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpt2::internal::{Matrix, Pool};
use gpt2::DType;

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Pool::new(threads).expect("a thread pool");
    // (name, outputs, inputs): attention c_attn and c_proj, MLP c_fc and c_proj, the unembedding.
    let shapes = [
        ("c_attn", 2304, 768),
        ("attn_c_proj", 768, 768),
        ("c_fc", 3072, 768),
        ("mlp_c_proj", 768, 3072),
        ("lm_head", 50257, 768),
    ];
    for m in [256, 8] {
        let mut g = c.benchmark_group(format!("matmul_{m}_rows"));
        g.sample_size(10);
        for (name, n, k) in shapes {
            let rows: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 2001) as f32 * 1e-3 - 1.0)
                .collect();
            let x: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
            let mut out = vec![0.0; m * n];
            for dtype in [DType::F32, DType::Q8] {
                let w = Matrix::pack(&rows, n, k, dtype);
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
                let id = BenchmarkId::new(name, dtype.name());
                g.bench_function(id, |b| {
                    b.iter(|| pool.install(|| w.matmul(&x, None, &mut out)))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
