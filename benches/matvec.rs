//! One row against a weight matrix (what decoding does per layer), per dtype, at gpt2-medium's
//! shapes, streaming from memory as decoding does: each iteration takes the next of enough copies
//! of the matrix to fill 1 GiB, so no cache holds them. Throughput is the weight bytes read per
//! second, the figure that bounds decode speed.
//!
//! `cargo bench --bench matvec` (threads: one per core; `GPT2_ISA=avx2` measures the AVX2 kernels on
//! an AVX-512 machine)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpt2::internal::{Matrix, Pool};
use gpt2::DType;

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Pool::new(threads).expect("a thread pool");
    // (name, outputs, inputs): MLP c_fc, MLP c_proj, the unembedding.
    let shapes = [
        ("c_fc", 4096, 1024),
        ("mlp_c_proj", 1024, 4096),
        ("lm_head", 50257, 1024),
    ];
    for (name, n, k) in shapes {
        let rows: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 2001) as f32 * 1e-3 - 1.0)
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        let mut out = vec![0.0; n];
        let mut g = c.benchmark_group(format!("matvec_{name}_{n}x{k}"));
        for dtype in DType::ALL {
            let one = Matrix::pack(&rows, n, k, dtype);
            let copies = (1usize << 30).div_ceil(one.bytes());
            let mats: Vec<Matrix> = std::iter::once(one)
                .chain((1..copies).map(|_| Matrix::pack(&rows, n, k, dtype)))
                .collect();
            g.throughput(Throughput::Bytes(mats[0].bytes() as u64));
            let mut i = 0;
            g.bench_function(BenchmarkId::from_parameter(dtype.name()), |b| {
                b.iter(|| {
                    i = (i + 1) % mats.len();
                    pool.install(|| mats[i].matmul(&x, None, &mut out))
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
