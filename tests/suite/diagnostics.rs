//! Token diagnostics (`eval::score_diagnostics`): each scored token's rank and each position's
//! entropy, reduced inside the streamed unembedding. Held against the model's own logits
//! (`Model::forward` with `Logits::All`: ranks exactly, log-probabilities bit for bit) in every
//! format, and against transformers' recorded logits on every fixture.

use crate::common;

use common::{fixture_dir, recorded, reference_ids, small_config, MODEL_FIXTURES};
use gpt2::{eval, DType, Device, LoadOptions, Model};

/// 1 + how many logits of `row` are strictly above `row[target]`.
fn rank_in(row: &[f32], target: u32) -> u32 {
    let t = row[target as usize];
    1 + row.iter().filter(|&&l| l > t).count() as u32
}

/// H = -Σ p ln p of softmax(row), in f64 from the max.
fn entropy_of(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = row.iter().map(|&l| (l as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mean: f64 = e
        .iter()
        .zip(row)
        .map(|(e, &l)| e * (l as f64 - m))
        .sum::<f64>()
        / z;
    z.ln() - mean
}

/// Texts of a fixture: its recorded sequences, its scored text, and (so that one call runs more
/// than 256 rows: several passes of the streamed unembedding) slices of its perplexity text.
fn texts(name: &str, n_pos: usize) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = recorded(name).into_iter().map(|r| r.ids).collect();
    out.push(reference_ids(name, "score.ids"));
    let ppl = reference_ids(name, "ppl.ids");
    out.extend(
        ppl.chunks(n_pos)
            .filter(|c| c.len() >= 2)
            .map(<[u32]>::to_vec),
    );
    out.extend(ppl.windows(n_pos).step_by(7).map(<[u32]>::to_vec));
    out
}

/// Against the model's own logits, in every format: the log-probabilities are `score_batch`'s
/// bits, each rank is the exact count over the stored row (a tie with the target is not counted:
/// the rank is then the better one), each entropy within 2e-6 nats of the f64 entropy of the row.
/// A vocabulary of whole panels, one with a short last panel, and gpt2's (50257).
#[test]
fn diagnostics_equal_those_of_the_models_own_logits() {
    let small = Model::random(
        small_config(),
        3,
        &LoadOptions::new(Device::Cpu, DType::F32),
    );
    let models: Vec<(&str, Model)> = ["openai-f32", "headdim-24", "full-vocab-f16"]
        .iter()
        .map(|&n| (n, Model::load(&fixture_dir(n)).unwrap()))
        .chain([("small random", small.unwrap())])
        .collect();
    for (name, base) in &models {
        let (v, n_pos) = (base.config().vocab_size, base.config().n_positions);
        let texts: Vec<Vec<u32>> = if name.contains("random") {
            (0..6u32)
                .map(|s| {
                    let len = [2, 17, 256, 100, 255, 3][s as usize];
                    (0..len).map(|i| (i * 7919 + s * 31) % v as u32).collect()
                })
                .collect()
        } else {
            texts(name, n_pos)
        };
        assert!(
            texts.iter().map(|t| t.len() - 1).sum::<usize>() > 256,
            "{name}"
        );
        for dtype in DType::ALL {
            let model = base.to_dtype(dtype).unwrap();
            let got = eval::score_diagnostics(&model, &texts).unwrap();
            let scores = eval::score_batch(&model, &texts).unwrap();
            let mut worst = 0f64;
            for ((ids, d), lp) in texts.iter().zip(&got).zip(&scores) {
                let n = ids.len() - 1;
                assert_eq!((d.ranks.len(), d.entropies.len()), (n, n));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&d.logprobs), bits(lp), "{name} {dtype:?}");
                let logits = common::logits_alone(&model, ids);
                for (r, row) in logits.chunks_exact(v).take(n).enumerate() {
                    let t = ids[r + 1];
                    assert_eq!(d.ranks[r], rank_in(row, t), "{name} {dtype:?} row {r}");
                    worst = worst.max((d.entropies[r] as f64 - entropy_of(row)).abs());
                }
            }
            eprintln!("{name:>16} {dtype:?}: max |Δ entropy| vs own logits {worst:.1e}");
            assert!(worst < 2e-6, "{name} {dtype:?}: {worst}");
        }
    }
}

/// A text's diagnostics are the same whatever is scored beside it, and a bad text is refused by
/// its index before any work, as `score_batch` refuses it.
#[test]
fn diagnostics_are_batch_invariant_and_check_their_input() {
    let model = Model::load(&fixture_dir("openai-f32")).unwrap();
    let texts = texts("openai-f32", 32);
    let together = eval::score_diagnostics(&model, &texts).unwrap();
    for (t, d) in texts.iter().zip(&together) {
        let alone = eval::score_diagnostics(&model, std::slice::from_ref(t)).unwrap();
        assert_eq!(&alone[0], d);
    }
    let err = |t: &[Vec<u32>]| eval::score_diagnostics(&model, t).unwrap_err().to_string();
    assert!(err(&[vec![1, 2], vec![5]]).contains("text 1: scoring needs at least 2 tokens"));
    assert!(err(&[vec![1, 999]]).contains("text 0: token 1 has id 999"));
    assert!(err(&[(0..33).collect()]).contains("more than the context of 32"));
    assert!(eval::score_diagnostics(&model, &[]).unwrap().is_empty());
}

/// Against transformers' recorded logits (`logits.{i}` for `input_ids.{i}`) on every fixture:
/// entropies within 1e-4 nats, ranks equal except where float noise can reorder two logits.
///
/// Our logits differ from transformers' by up to ~1e-5 (`model_parity`), so a logit that close to
/// the target's may fall on either side of it. For each row the noise is measured, not assumed:
/// `band` is twice the row's largest |ours - transformers'| (the target's error plus the other
/// logit's). The rank must then lie between 1 + #{ref > ref_t + band} and
/// 1 + #{ref > ref_t - band}; where no reference logit lies within the band of the target's that
/// interval is one value, and the rank must equal transformers' exactly. The test also counts the
/// rows where the band allowed anything, and fails if they are not rare (a band too wide would
/// accept anything).
#[test]
fn diagnostics_match_transformers() {
    let (mut rows, mut loose, mut differ) = (0, 0, 0);
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let v = model.config().vocab_size;
        let (mut worst_h, mut worst_noise) = (0f64, 0f32);
        for rec in recorded(name) {
            let d = eval::score_diagnostics(&model, std::slice::from_ref(&rec.ids)).unwrap();
            let d = &d[0];
            let ours = common::logits_alone(&model, &rec.ids);
            let rows_ref = rec.logits.chunks_exact(v);
            for (r, (want, own)) in rows_ref.zip(ours.chunks_exact(v)).enumerate() {
                if r + 1 == rec.ids.len() {
                    break;
                }
                rows += 1;
                let t = rec.ids[r + 1] as usize;
                let h = entropy_of(want);
                worst_h = worst_h.max((d.entropies[r] as f64 - h).abs());
                let noise = want
                    .iter()
                    .zip(own)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                worst_noise = worst_noise.max(noise);
                let band = 2.0 * noise;
                // 1 + how many logits other than the target's are above x.
                let above = |x: f32| {
                    let others = want.iter().enumerate().filter(|&(j, _)| j != t);
                    1 + others.filter(|&(_, &l)| l > x).count() as u32
                };
                let (best, worst) = (above(want[t] + band), above(want[t] - band));
                let rank = d.ranks[r];
                assert!(
                    best <= rank && rank <= worst,
                    "{name} row {r}: rank {rank}, transformers' within noise {best}..={worst}"
                );
                if best != worst {
                    loose += 1;
                }
                if rank != rank_in(want, t as u32) {
                    differ += 1;
                    eprintln!(
                        "{name} row {r}: rank {rank} vs transformers' {} (logits within {band:.1e} of the target's: ranks {best}..={worst})",
                        rank_in(want, t as u32)
                    );
                }
            }
        }
        eprintln!("{name:>16}: max |Δ entropy| {worst_h:.1e}, max |Δ logit| {worst_noise:.1e}");
        assert!(worst_h <= 1e-4, "{name}: {worst_h}");
    }
    eprintln!(
        "{rows} rows: {loose} with a logit within noise of the target's, {differ} ranks differ"
    );
    assert!(
        loose * 20 <= rows,
        "{loose} of {rows} rows needed the noise band"
    );
    assert!(differ <= loose);
}
