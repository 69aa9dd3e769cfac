//! The wgpu backend, kernel by kernel against `cpu::reference` (as llama.cpp's test-backend-ops),
//! then whole models against transformers' recorded logits and the CPU, and every consumer through
//! the same `Model` the commands use. Built only with `--features wgpu`. On a machine without an
//! adapter each test prints why and passes, unless `GPT2_REQUIRE_WGPU=1` (CI, which installs Mesa's
//! lavapipe) makes a missing adapter a failure.
#![cfg(feature = "wgpu")]

mod common;

use std::path::Path;
use std::time::Instant;

use common::gpu::{decode_two_slots, one, vs_recorded, EveryCommand, Lengths};
use common::{fixture_dir, recorded, small_config, MODEL_FIXTURES};
use gpt2::internal::{logprob_of, reference, target_stats, WgpuKernels};
use gpt2::{DType, Device, LoadOptions, Logits, Model, Rows, SeqInput};

/// Logits within this of the CPU's f32 and of transformers', relative to max(1, |x|).
const TOL: f32 = 1e-4;

fn on_gpu(dtype: DType) -> LoadOptions {
    LoadOptions::new(Device::Wgpu(0), dtype)
}

/// The largest |a − b| / max(1, |b|).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// None (with the reason printed) when this machine has no adapter and none is required.
fn skip_without_adapter<T>(r: gpt2::Result<T>) -> Option<T> {
    match r {
        Ok(g) => Some(g),
        Err(e) if e.to_string().contains("no wgpu adapter found") => {
            if std::env::var("GPT2_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("GPT2_REQUIRE_WGPU=1 but {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// A random small f32 model of `seed` on the CPU and on the adapter (`None` without one).
fn small_pair(seed: u64) -> Option<(Model, Model)> {
    let cpu = Model::random(small_config(), seed, &LoadOptions::default()).unwrap();
    let gpu = skip_without_adapter(Model::random(small_config(), seed, &on_gpu(DType::F32)))?;
    Some((cpu, gpu))
}

fn gpu(dir: &Path, dtype: DType) -> Option<Model> {
    skip_without_adapter(Model::load_with(dir, &on_gpu(dtype)))
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn devices_parse_and_list() {
    assert_eq!(Device::parse("gpu").unwrap(), Device::Wgpu(0));
    assert_eq!(Device::parse("wgpu").unwrap(), Device::Wgpu(0));
    assert_eq!(Device::parse("gpu:2").unwrap(), Device::Wgpu(2));
    assert_eq!(Device::parse("wgpu:1").unwrap(), Device::Wgpu(1));
    assert_eq!(Device::Wgpu(3).to_string(), "gpu:3");
    for bad in ["gpu:", "gpu:x", "gpux", "wgpu:-1"] {
        assert!(Device::parse(bad).is_err(), "{bad}");
    }
    let list = gpt2::internal::wgpu_adapters().unwrap();
    eprintln!("adapters: {list:#?}");
}

/// Each kernel alone against `cpu::reference`: layer norm; the tiled product with every epilogue
/// (edges not multiples of the 16×16 tiles) and f16/bf16 weights; attention over a ragged batch.
#[test]
fn kernels_match_the_reference() {
    let Some(k) = skip_without_adapter(WgpuKernels::open(0)) else {
        return;
    };
    let t = Instant::now();
    eprintln!("adapter: {}", k.adapter());

    let (rows, e) = (5, 96);
    let x = values(rows * e, 1, 3.0);
    let (w, b) = (values(e, 2, 1.0), values(e, 3, 0.5));
    let got = k.layer_norm(&x, &w, &b, 1e-5).unwrap();
    let mut want = vec![0f32; x.len()];
    for (xr, or) in x.chunks_exact(e).zip(want.chunks_exact_mut(e)) {
        reference::layer_norm(xr, &w, &b, 1e-5, or);
    }
    let d = rel_diff(&got, &want);
    eprintln!("layer_norm: max rel diff {d:.2e}");
    assert!(d < 1e-5, "layer_norm {d}");

    use gpt2::config::Activation;
    // 19 rows take the tiled kernel, 3 the matvec one (decoding's).
    for m in [19, 3] {
        let (kk, n) = (37, 45);
        let x = values(m * kk, 4, 1.0);
        let w = values(n * kk, 5, 0.5);
        let bias = values(n, 6, 0.5);
        let resid = values(m * n, 7, 2.0);
        let mut plain = vec![0f32; m * n];
        reference::matmul(&x, &w, None, kk, &mut plain);
        let mut biased = vec![0f32; m * n];
        reference::matmul(&x, &w, Some(&bias), kk, &mut biased);
        let check = |name: &str, got: Vec<f32>, want: &[f32], tol: f32| {
            let d = rel_diff(&got, want);
            eprintln!("matmul {m} rows {name}: max rel diff {d:.2e}");
            assert!(d < tol, "{name}: {d}");
        };
        let mm = |bias, act, resid, dtype| k.matmul(&x, &w, bias, kk, dtype, act, resid).unwrap();
        check("plain", mm(None, None, None, DType::F32), &plain, 1e-5);
        check(
            "bias",
            mm(Some(&bias), None, None, DType::F32),
            &biased,
            1e-5,
        );
        for act in [
            Activation::GeluNew,
            Activation::Gelu,
            Activation::Relu,
            Activation::Silu,
            Activation::QuickGelu,
        ] {
            let want: Vec<f32> = biased
                .iter()
                .map(|&v| reference::activation(act, v))
                .collect();
            let got = mm(Some(&bias), Some(act), None, DType::F32);
            check(&format!("bias+{act:?}"), got, &want, 1e-5);
        }
        let want: Vec<f32> = biased.iter().zip(&resid).map(|(a, r)| a + r).collect();
        check(
            "bias+residual",
            mm(Some(&bias), None, Some(&resid), DType::F32),
            &want,
            1e-5,
        );
        // 16-bit weights: the reference over the same weights rounded to f16 / bf16.
        for dtype in [DType::F16, DType::Bf16] {
            let rounded: Vec<f32> = w
                .iter()
                .map(|&v| match dtype {
                    DType::F16 => half::f16::from_f32(v).to_f32(),
                    _ => half::bf16::from_f32(v).to_f32(),
                })
                .collect();
            let mut want = vec![0f32; m * n];
            reference::matmul(&x, &rounded, Some(&bias), kk, &mut want);
            check(
                &format!("{dtype:?} weights"),
                mm(Some(&bias), None, None, dtype),
                &want,
                1e-5,
            );
        }
    }

    // Attention: slot 1 holds 7 positions, slot 0 holds 3, interleaved rows; head_dim 24.
    let (e, h, cap) = (96, 4, 8);
    let hd = e / h;
    let slots = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1];
    let mut next = [0usize; 2];
    let positions: Vec<usize> = slots
        .iter()
        .map(|&s| {
            next[s] += 1;
            next[s] - 1
        })
        .collect();
    let qkv = values(slots.len() * 3 * e, 8, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let got = k
        .attention(&qkv, e, h, &slots, &positions, cap, scale)
        .unwrap();
    let mut want = vec![0f32; slots.len() * e];
    for (r, (&s, &p)) in slots.iter().zip(&positions).enumerate() {
        // This row's slot's rows at positions 0..=p, in position order.
        let mut seen: Vec<(usize, usize)> = (slots.iter().zip(&positions).enumerate())
            .filter(|(_, (&s2, &p2))| s2 == s && p2 <= p)
            .map(|(i, (_, &p2))| (p2, i))
            .collect();
        seen.sort();
        for head in 0..h {
            let part = |row: usize, which: usize| {
                let o = row * 3 * e + which * e + head * hd;
                qkv[o..o + hd].to_vec()
            };
            let keys: Vec<f32> = seen.iter().flat_map(|&(_, i)| part(i, 1)).collect();
            let vals: Vec<f32> = seen.iter().flat_map(|&(_, i)| part(i, 2)).collect();
            let out = &mut want[r * e + head * hd..r * e + (head + 1) * hd];
            reference::attention(&part(r, 0), &keys, &vals, scale, out);
        }
    }
    let d = rel_diff(&got, &want);
    eprintln!("attention: max rel diff {d:.2e}");
    assert!(d < 1e-5, "attention {d}");
    eprintln!("kernels: {:.2}s", t.elapsed().as_secs_f64());
}

/// The scoring kernel (each row with a target reduced on the adapter to the target's log-prob,
/// rank and the row's entropy) against the host's `target_stats` over the same logits: GPT-2's
/// vocabulary with targets at the row's max, its min and elsewhere, rows of huge, tiny and offset
/// logits, a row without a target; then short rows with NaNs (in the row, and as the target).
#[test]
fn scoring_kernel_matches_the_host() {
    let Some(k) = skip_without_adapter(WgpuKernels::open(0)) else {
        return;
    };
    let t = Instant::now();
    let first = |row: &[f32], better: fn(f32, f32) -> bool| {
        (0..row.len()).fold(0, |b, i| if better(row[i], row[b]) { i } else { b }) as u32
    };
    let check = |logits: &[f32], v: usize, targets: &[Option<u32>]| {
        let got = k.score(logits, v, targets).unwrap();
        let want: Vec<_> = (logits.chunks_exact(v).zip(targets))
            .filter_map(|(row, t)| t.map(|t| target_stats(row, t)))
            .collect();
        assert_eq!(got.len(), want.len());
        let (mut dl, mut dh) = (0f64, 0f64);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.rank, w.rank, "row {i}: {g:?} vs {w:?}");
            if w.logprob.is_nan() {
                assert!(g.logprob.is_nan() && g.entropy.is_nan(), "row {i}: {g:?}");
                assert!(w.entropy.is_nan());
                continue;
            }
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1.0);
            dl = dl.max(rel(g.logprob, w.logprob));
            dh = dh.max(rel(g.entropy, w.entropy));
            assert!(
                rel(g.logprob, w.logprob) <= TOL as f64,
                "row {i}: {g:?} vs {w:?}"
            );
            assert!(
                rel(g.entropy, w.entropy) <= TOL as f64,
                "row {i}: {g:?} vs {w:?}"
            );
        }
        eprintln!("score, vocab {v}: max rel diff log-prob {dl:.2e}, entropy {dh:.2e}");
    };

    let v = 50257;
    // (scale, offset) of each row's logits.
    let rows = [
        (8.0, 0.0),
        (8.0, 0.0),
        (8.0, 0.0),
        (1e4, 0.0),
        (1e4, 0.0),
        (1e-4, 0.0),
        (30.0, 0.0),
        (30.0, 0.0),
        (5.0, 3e4),
    ];
    let logits: Vec<f32> = (rows.iter().enumerate())
        .flat_map(|(i, &(scale, offset))| {
            values(v, 20 + i as u64, scale)
                .into_iter()
                .map(move |x| x + offset)
        })
        .collect();
    let row = |r: usize| &logits[r * v..(r + 1) * v];
    let (max, min) = (|a: f32, b: f32| a > b, |a: f32, b: f32| a < b);
    let targets = [
        Some(first(row(0), max)),
        Some(first(row(1), min)),
        Some(12345),
        Some(first(row(3), max)),
        Some(777),
        Some(31),
        None,
        Some(50256),
        Some(first(row(8), max)),
    ];
    assert_eq!(target_stats(row(0), targets[0].unwrap()).rank, 1);
    assert_eq!(target_stats(row(1), targets[1].unwrap()).rank as usize, v);
    assert_eq!(
        target_stats(row(2), 12345).logprob,
        logprob_of(row(2), 12345)
    );
    check(&logits, v, &targets);

    // Short rows: a NaN in the row (the log-prob and entropy NaN, the rank over the rest), a NaN
    // target (rank 1: nothing is above it), a +inf (NaN as on the host, and above the target),
    // and a clean row beside them.
    let v = 40;
    let mut logits = values(4 * v, 40, 4.0);
    logits[3] = f32::NAN;
    logits[v + 6] = f32::NAN;
    logits[2 * v + 2] = f32::INFINITY;
    check(&logits, v, &[Some(5), Some(6), Some(7), Some(39)]);
    eprintln!("score kernel: {:.2}s", t.elapsed().as_secs_f64());
}

/// Every fixture in f32: token by token through the cache, and the whole prompt at once (every
/// position), against transformers' logits and the CPU's.
#[test]
fn f32_matches_transformers_and_the_cpu() {
    let t = Instant::now();
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let Some(g) = gpu(&fixture_dir(name), DType::F32) else {
            return;
        };
        let (vs_hf, vs_cpu) = vs_recorded(name, &g, &model, rel_diff);
        eprintln!("{name:>16}: wgpu f32 max rel |Δ logit| vs transformers {vs_hf:.2e}, vs cpu {vs_cpu:.2e}");
        assert!(vs_hf <= TOL && vs_cpu <= TOL, "{name}: {vs_hf} {vs_cpu}");
    }
    eprintln!("fixtures: {:.2}s", t.elapsed().as_secs_f64());
}

/// A ragged batch of more rows than one step carries (64): cut into steps, each sequence's last
/// row picked where it ends; then both decode together; then a copied slot continues as its source.
#[test]
fn ragged_batches_steps_and_slot_copies_equal_the_cpu() {
    let Some((model, g)) = small_pair(3) else {
        return;
    };
    let a: Vec<u32> = (0..71).map(|i| (i * 37 % 1000) as u32).collect();
    let b: Vec<u32> = (0..29).map(|i| (i * 91 % 1000) as u32).collect();
    let batch = [
        SeqInput {
            slot: 1,
            tokens: &a,
        },
        SeqInput {
            slot: 0,
            tokens: &b,
        },
    ];
    let mut st = g.new_state(3, 128).unwrap();
    let mut cpu = model.new_state(3, 128).unwrap();
    let got = g.forward(&mut st, &batch, Logits::Last).unwrap().to_vec();
    let want = model.forward(&mut cpu, &batch, Logits::Last).unwrap();
    assert_eq!(got.len(), 2 * 1000);
    assert!(rel_diff(&got, want) < TOL);
    let d = decode_two_slots((&g, &mut st), (&model, &mut cpu), rel_diff);
    assert!(d < TOL, "{d}");
    st.copy_slot(1, 2).unwrap();
    cpu.copy_slot(1, 2).unwrap();
    st.truncate(2, 60).unwrap();
    cpu.truncate(2, 60).unwrap();
    let step = [SeqInput {
        slot: 2,
        tokens: &[5, 6, 7],
    }];
    let got = g.forward(&mut st, &step, Logits::All).unwrap().to_vec();
    let want = model.forward(&mut cpu, &step, Logits::All).unwrap();
    assert!(rel_diff(&got, want) < TOL);
    assert_eq!((st.len(0), st.len(1), st.len(2)), (32, 74, 63));
}

/// `forward_rows` with every selection in one batch of more rows than a step carries (sequences
/// cut across steps): the selected rows' logits come back, the targets' log-probs are reduced on
/// the adapter; both as the CPU's, and the diagnostics' ranks and entropies of the same rows too.
#[test]
fn selected_rows_and_targets_equal_the_cpu() {
    let Some((model, g)) = small_pair(5) else {
        return;
    };
    let seqs: Vec<Vec<u32>> = [50, 3, 40, 45]
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n).map(|i| ((i * 37 + s * 101) % 1000) as u32).collect())
        .collect();
    let batch: Vec<SeqInput> = (seqs.iter().enumerate())
        .map(|(slot, t)| SeqInput { slot, tokens: t })
        .collect();
    // Every row of the last sequence scored but its last; every other row of the first.
    let targets: Vec<Option<u32>> = (1..=seqs[3].len())
        .map(|j| seqs[3].get(j).copied())
        .collect();
    let first: Vec<Option<u32>> = (0..seqs[0].len())
        .map(|j| (j % 2 == 0).then_some(seqs[0][(j + 1) % seqs[0].len()]))
        .collect();
    let rows = [
        Rows::Targets(&first),
        Rows::Last,
        Rows::All,
        Rows::Targets(&targets),
    ];
    let mut st = g.new_state(4, 64).unwrap();
    let mut cpu = model.new_state(4, 64).unwrap();
    let (got, got_lp) = g.forward_rows(&mut st, &batch, &rows).unwrap();
    let (want, want_lp) = model.forward_rows(&mut cpu, &batch, &rows).unwrap();
    assert_eq!(got.len(), (1 + seqs[2].len()) * 1000);
    assert!(rel_diff(got, want) < TOL);
    assert_eq!(got_lp.len(), 25 + 44);
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let d = rel_diff(&as_f32(&got_lp), &as_f32(&want_lp));
    assert!(d < TOL, "{d}");
    for (s, t) in seqs.iter().enumerate() {
        assert_eq!(st.len(s), t.len());
    }
    // The same targets through scoring: the same log-probs, and ranks and entropies.
    let all: Vec<Option<u32>> = (rows.iter().zip(&seqs))
        .flat_map(|(r, s)| match r {
            Rows::Targets(t) => t.to_vec(),
            _ => vec![None; s.len()],
        })
        .collect();
    let mut st = g.new_state(4, 64).unwrap();
    let mut cpu = model.new_state(4, 64).unwrap();
    let lp = g.forward_logprobs(&mut st, &batch, &all).unwrap();
    assert_eq!(lp, got_lp);
    let lp = model.forward_logprobs(&mut cpu, &batch, &all).unwrap();
    assert_eq!(lp, want_lp);
    // The diagnostics of a text against the host's reduction of the adapter's own logits of it:
    // the same ranks.
    let diag = gpt2::eval::score_diagnostics(&g, &seqs[..1])
        .unwrap()
        .remove(0);
    let mut st = g.new_state(1, 64).unwrap();
    let text = [SeqInput {
        slot: 0,
        tokens: &seqs[0],
    }];
    let logits = g.forward(&mut st, &text, Logits::All).unwrap();
    let host: Vec<_> = (logits.chunks_exact(1000).zip(&seqs[0][1..]))
        .map(|(row, &t)| target_stats(row, t))
        .collect();
    assert_eq!(diag.ranks, host.iter().map(|s| s.rank).collect::<Vec<_>>());
    let close = |a: &[f32], b: Vec<f64>| rel_diff(a, &as_f32(&b)) < TOL;
    assert!(close(
        &diag.logprobs,
        host.iter().map(|s| s.logprob).collect()
    ));
    assert!(close(
        &diag.entropies,
        host.iter().map(|s| s.entropy).collect()
    ));
    eprintln!("forward_rows' log-probs: max rel diff {d:.2e}");
}

/// 16-bit weights on the adapter: close to the CPU's model of the same dtype (the same rounded
/// weights; the CPU's 16-bit KV cache and wpe rounding make the rest), and how far from f32.
#[test]
fn sixteen_bit_weights_match_the_cpu_in_their_dtype() {
    let name = "headdim-24";
    let dir = fixture_dir(name);
    let rec = &recorded(name)[0];
    let all = |m: &Model| {
        let mut st = m.new_state(1, rec.ids.len()).unwrap();
        let l = m.forward(&mut st, &one(&rec.ids), Logits::All).unwrap();
        l.to_vec()
    };
    let f32_cpu = all(&Model::load(&dir).unwrap());
    for dtype in [DType::F16, DType::Bf16] {
        let Some(g) = gpu(&dir, dtype) else {
            return;
        };
        assert_eq!(g.dtype(), dtype);
        let cpu = Model::load_with(&dir, &LoadOptions::new(Device::Cpu, dtype)).unwrap();
        let got = all(&g);
        let (same, vs_f32) = (rel_diff(&got, &all(&cpu)), rel_diff(&got, &f32_cpu));
        eprintln!("{dtype:?} weights: max rel |Δ logit| vs the cpu in {dtype:?} {same:.2e}, vs f32 {vs_f32:.2e}");
        assert!(same < 2e-2, "{dtype:?}: {same}");
    }
}

/// GPT-2's embedding (147 MiB in f32) exceeds the 128 MiB that lavapipe (and WebGPU by default)
/// binds at once: it is uploaded in parts, and a token of each part embeds and unembeds as on the
/// CPU. (On adapters that bind it whole this runs as one part.)
#[test]
fn an_embedding_beyond_one_binding_equals_the_cpu() {
    let mut cfg = gpt2::GPT2Config::preset("gpt2").unwrap();
    (cfg.n_layer, cfg.n_inner, cfg.n_positions) = (1, 768, 16);
    let model = Model::random(cfg.clone(), 9, &LoadOptions::default()).unwrap();
    let Some(g) = skip_without_adapter(Model::random(cfg, 9, &on_gpu(DType::F32))) else {
        return;
    };
    let ids = [5, 43_689, 43_690, 50_256, 11];
    let mut st = g.new_state(1, 16).unwrap();
    let mut cpu = model.new_state(1, 16).unwrap();
    let got = g
        .forward(&mut st, &one(&ids), Logits::All)
        .unwrap()
        .to_vec();
    let want = model.forward(&mut cpu, &one(&ids), Logits::All).unwrap();
    let d = rel_diff(&got, want);
    eprintln!("split embedding: max rel |Δ logit| vs cpu {d:.2e}");
    assert!(d < TOL, "{d}");
}

#[test]
fn bad_devices_and_requests_are_clear_errors() {
    let dir = fixture_dir("openai-f32");
    match Model::load_with(&dir, &LoadOptions::new(Device::Wgpu(99), DType::F32)) {
        Ok(_) => panic!("adapter 99 exists?"),
        Err(e) => {
            let e = e.to_string();
            eprintln!("gpu:99: {e}");
            assert!(
                e.contains("no wgpu adapter 99") || e.contains("no wgpu adapter found"),
                "{e}"
            );
        }
    }
    let e = Model::load_with(&dir, &on_gpu(DType::Q8)).err().unwrap();
    assert!(e.to_string().contains("CPU only"), "{e}");
    let Some(g) = gpu(&dir, DType::F32) else {
        return;
    };
    assert!(g.describe().starts_with("gpu:0 ("), "{}", g.describe());
    let sites = gpt2::Site::select(&["blocks.0.hook_resid_post"], g.config()).unwrap();
    let e = g
        .run_with_hooks(
            &[gpt2::Hooked {
                ids: &[1, 2],
                patches: &[],
            }],
            &sites,
            false,
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("CPU backend"), "{e}");
    let e = g.to_dtype(DType::F16).err().unwrap();
    assert!(e.to_string().contains("CPU models"), "{e}");
}

/// Every consumer of the model through wgpu: greedy and sampled generation of a batch (streamed),
/// beam search (cache slots copied on the adapter), top, score, diagnostics and strided
/// perplexity, each equal to the CPU's.
#[test]
fn every_command_equals_the_cpu() {
    let t = Instant::now();
    let dir = fixture_dir("full-vocab-f16");
    let model = Model::load(&dir).unwrap();
    let Some(g) = gpu(&dir, DType::F32) else {
        return;
    };
    let lengths = Lengths {
        new_tokens: 12,
        beam_tokens: 8,
        beams: 3,
    };
    let (a, b) = EveryCommand::both(&model, &g, &lengths);
    assert_eq!(a.events, b.events);
    a.assert_same_choices(&b);
    let close = |a: &[f32], b: &[f32]| a.len() == b.len() && rel_diff(b, a) <= TOL;
    assert!(close(&a.score, &b.score));
    let (da, db) = (&a.diagnostics, &b.diagnostics);
    assert!(close(&da.logprobs, &db.logprobs));
    assert!(close(&da.entropies, &db.entropies));
    eprintln!(
        "wgpu: generate, beam search, top, score, diagnostics and perplexity equal to the cpu ({:.2}s)",
        t.elapsed().as_secs_f64()
    );
}
