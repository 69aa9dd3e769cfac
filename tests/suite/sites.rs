//! Activation sites and patching against transformers (fixtures recorded by
//! `scripts/make_fixtures.py sites` with forward hooks on `GPT2LMHeadModel`'s modules).

use crate::common;

use std::collections::HashMap;

use gpt2::{Activations, BlockSite, DType, Device, Hooked, LoadOptions, Model, Patch, Site};
use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 3] = ["openai-f32", "scale-inv-layer", "headdim-24"];

/// A fixture's `sites.safetensors`: tensors as f32 with shapes, and its metadata.
struct Recorded {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    meta: HashMap<String, String>,
    ids: Vec<u32>,
}

fn recorded(name: &str) -> Recorded {
    let bytes = std::fs::read(common::fixture_dir(name).join("sites.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = HashMap::new();
    let mut ids = Vec::new();
    for (k, t) in st.tensors() {
        match t.dtype() {
            Dtype::F32 => {
                let v = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                tensors.insert(k, (t.shape().to_vec(), v));
            }
            Dtype::I64 => {
                ids = t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                    .collect()
            }
            d => panic!("{d:?}"),
        }
    }
    assert!(
        !ids.is_empty() && tensors.len() > 30,
        "{name}: too little recorded"
    );
    Recorded { tensors, meta, ids }
}

fn load(name: &str, dtype: DType) -> Model {
    Model::load_with(
        &common::fixture_dir(name),
        &LoadOptions::new(Device::Cpu, dtype),
    )
    .unwrap()
}

/// `|a - b| ≤ tol · max(1, |b|)` everywhere (−∞ only where the reference has −∞).
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() {
            assert_eq!(g, w, "{what}[{i}]");
            continue;
        }
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs transformers' {w}"
        );
    }
}

/// The same bits everywhere.
fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: [{i}] is {} instead of {}", got[i], want[i]);
    }
}

/// The same bits in the logits and at every one of `sites`.
fn assert_same_run(what: &str, got: &Activations, want: &Activations, sites: &[Site]) {
    assert_same(
        &format!("{what}: logits"),
        got.logits.as_ref().unwrap(),
        want.logits.as_ref().unwrap(),
    );
    for &site in sites {
        let (g, w) = (got.get(site).unwrap().1, want.get(site).unwrap().1);
        assert_same(&format!("{what}: {site}"), g, w);
    }
}

#[test]
fn every_site_equals_transformers() {
    for name in FIXTURES {
        let rec = recorded(name);
        let model = load(name, DType::F32);
        let all = Site::all(model.config().n_layer);
        let out = model
            .run_with_hooks(
                &[Hooked {
                    ids: &rec.ids,
                    patches: &[],
                }],
                &all,
                true,
            )
            .unwrap();
        let out = &out[0];
        assert_eq!(out.sites.len(), all.len());
        for &site in &all {
            let (shape, got) = out.get(site).unwrap();
            let (want_shape, want) = &rec.tensors[&format!("site.{site}")];
            assert_eq!(shape, want_shape.as_slice(), "{name} {site}: shape");
            assert_close(&format!("{name} {site}"), got, want, 1e-4);
        }
        let (_, logits) = &rec.tensors["logits"];
        assert_close(
            &format!("{name} logits"),
            out.logits.as_ref().unwrap(),
            logits,
            1e-4,
        );
    }
}

#[test]
fn patches_equal_transformers_hooks() {
    for name in FIXTURES {
        let rec = recorded(name);
        let model = load(name, DType::F32);
        let mut cases = 0;
        for i in 0.. {
            let Some(site) = rec.meta.get(&format!("patch.{i}")) else {
                break;
            };
            let site = Site::parse(site, model.config()).unwrap();
            let (_, value) = &rec.tensors[&format!("patch.{i}.value")];
            let (_, want) = &rec.tensors[&format!("patch.{i}.logits")];
            let patches = [Patch { site, value }];
            let out = model
                .run_with_hooks(
                    &[Hooked {
                        ids: &rec.ids,
                        patches: &patches,
                    }],
                    &[],
                    true,
                )
                .unwrap();
            let got = out[0].logits.as_ref().unwrap();
            assert_close(&format!("{name} patched {site}"), got, want, 1e-4);
            cases += 1;
        }
        assert!(cases >= 7, "{name}: {cases} patch cases recorded");
    }
}

#[test]
fn patching_a_site_with_its_own_value_changes_nothing() {
    for dtype in [DType::F32, DType::Q8] {
        let rec = recorded("openai-f32");
        let model = load("openai-f32", dtype);
        let all = Site::all(model.config().n_layer);
        let run = |patches: &[Patch]| {
            model
                .run_with_hooks(
                    &[Hooked {
                        ids: &rec.ids,
                        patches,
                    }],
                    &all,
                    true,
                )
                .unwrap()
                .remove(0)
        };
        let clean = run(&[]);
        // Without hooks, the same logits as the plain forward pass.
        let plain = common::logits_alone(&model, &rec.ids);
        assert_same(
            &format!("{dtype:?} unhooked"),
            clean.logits.as_ref().unwrap(),
            &plain,
        );
        for &site in &all {
            let (_, v) = clean.get(site).unwrap();
            let patched = run(&[Patch { site, value: v }]);
            assert_same_run(
                &format!("{dtype:?} patching {site}"),
                &patched,
                &clean,
                &all,
            );
        }
    }
}

#[test]
fn a_batch_gives_each_sequence_its_own_sites_and_patches() {
    let rec = recorded("openai-f32");
    let model = load("openai-f32", DType::F32);
    let cfg = model.config().clone();
    let sites = Site::select(
        &["blocks.*.attn.hook_pattern", "blocks.1.hook_resid_post"],
        &cfg,
    )
    .unwrap();
    let short = &rec.ids[..4];
    let zeros = vec![0.0; Site::Block(0, BlockSite::ResidPost).len(&cfg, short.len())];
    let patches = [Patch {
        site: Site::Block(0, BlockSite::ResidPost),
        value: &zeros,
    }];
    let alone = |ids: &[u32], patches: &[Patch]| {
        model
            .run_with_hooks(&[Hooked { ids, patches }], &sites, true)
            .unwrap()
            .remove(0)
    };
    let batch = model
        .run_with_hooks(
            &[
                Hooked {
                    ids: &rec.ids,
                    patches: &[],
                },
                Hooked {
                    ids: short,
                    patches: &patches,
                },
            ],
            &sites,
            true,
        )
        .unwrap();
    let (a, b) = (alone(&rec.ids, &[]), alone(short, &patches));
    for s in &sites {
        let (sa, va) = batch[0].get(*s).unwrap();
        let (wa, xa) = a.get(*s).unwrap();
        assert_eq!((sa, va.len()), (wa, xa.len()), "{s}");
        assert_close(&format!("{s} 0"), va, xa, 1e-6);
        let (sb, vb) = batch[1].get(*s).unwrap();
        let (wb, xb) = b.get(*s).unwrap();
        assert_eq!(sb, wb, "{s}");
        assert_close(&format!("{s} 1"), vb, xb, 1e-6);
    }
    assert_close(
        "logits 1",
        batch[1].logits.as_ref().unwrap(),
        b.logits.as_ref().unwrap(),
        1e-6,
    );
}

#[test]
fn a_pass_stops_after_the_last_block_it_needs() {
    let rec = recorded("openai-f32");
    let model = load("openai-f32", DType::F32);
    let site = Site::Block(0, BlockSite::ResidPost);
    let out = model
        .run_with_hooks(
            &[Hooked {
                ids: &rec.ids,
                patches: &[],
            }],
            &[site],
            false,
        )
        .unwrap();
    assert!(out[0].logits.is_none());
    let (_, want) = &rec.tensors[&format!("site.{site}")];
    assert_close("resid_post 0", out[0].get(site).unwrap().1, want, 1e-4);
}

#[test]
fn bad_sites_and_patches_are_clear_errors() {
    let rec = recorded("openai-f32");
    let model = load("openai-f32", DType::F32);
    let cfg = model.config().clone();
    for (name, needle) in [
        ("blocks.2.hook_resid_post", "blocks 0 to 1"),
        ("blocks.0.hook_nothing", "no activation site"),
        ("blocks.*.nothing", "selects no activation site"),
    ] {
        let e = Site::select(&[name], &cfg).unwrap_err().to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
    let short = [1.0f32; 3];
    let e = model
        .run_with_hooks(
            &[Hooked {
                ids: &rec.ids,
                patches: &[Patch {
                    site: Site::Embed,
                    value: &short,
                }],
            }],
            &[],
            true,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("hook_embed") && e.contains("3 values"), "{e}");
    let e = model
        .run_with_hooks(
            &[Hooked {
                ids: &[],
                patches: &[],
            }],
            &[],
            true,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokens"), "{e}");
    let e = model
        .run_with_hooks(
            &[Hooked {
                ids: &[100_000],
                patches: &[],
            }],
            &[],
            true,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

/// One state reused over batches of other shapes (more and fewer sequences, longer and shorter)
/// gives the bits of a fresh state for each; a state too small or far too large is remade.
#[test]
fn a_reused_state_gives_the_bits_of_a_fresh_one() {
    let seq = |n: usize, seed: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 31 + seed * 7) % 1000) as u32)
            .collect()
    };
    let batches: [Vec<Vec<u32>>; 4] = [
        vec![seq(40, 1), seq(25, 2), seq(33, 3)],
        vec![seq(12, 4)],
        vec![seq(150, 5), seq(140, 6)],
        vec![seq(130, 7), seq(9, 8)],
    ];
    for dtype in [DType::F32, DType::Q8] {
        let opts = LoadOptions::new(Device::Cpu, dtype);
        let model = Model::random(common::small_config(), 5, &opts).unwrap();
        let sites = Site::all(model.config().n_layer);
        let mut state = None;
        let mut shapes = Vec::new();
        for (b, docs) in batches.iter().enumerate() {
            let hooked: Vec<Hooked> = docs
                .iter()
                .map(|ids| Hooked { ids, patches: &[] })
                .collect();
            let fresh = model.run_with_hooks(&hooked, &sites, true).unwrap();
            let reused = model
                .run_with_hooks_reusing(&mut state, &hooked, &sites, true)
                .unwrap();
            let s = state.as_ref().unwrap();
            shapes.push((s.slots(), s.capacity()));
            for (d, (f, r)) in fresh.iter().zip(&reused).enumerate() {
                let what = format!("{dtype:?} batch {b} sequence {d}");
                assert_same_run(&what, r, f, &sites);
            }
        }
        // Made for the first batch; remade for the second (3 × 40 is more than twice 1 × 12)
        // and the third (too small); kept for the fourth (2 × 150 ≤ twice 2 × 130).
        assert_eq!(shapes, [(3, 40), (1, 12), (2, 150), (2, 150)], "{dtype:?}");
    }
}

#[test]
fn stacked_captures_are_the_per_site_values_one_after_another() {
    let opts = LoadOptions::new(Device::Cpu, DType::F32);
    let model = Model::random(common::small_config(), 6, &opts).unwrap();
    let config = model.config();
    let docs: Vec<Vec<u32>> = [17usize, 5, 31]
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i * 37 + n as u32) % 1000).collect())
        .collect();
    // Row, head and embedding sites out of forward order, one named twice (kept once).
    let mut sites = Site::all(config.n_layer);
    sites.reverse();
    sites.push(sites[3]);
    let per_site: Vec<Hooked> = docs
        .iter()
        .map(|ids| Hooked { ids, patches: &[] })
        .collect();
    let want = model.run_with_hooks(&per_site, &sites, false).unwrap();
    let ids: Vec<&[u32]> = docs.iter().map(|d| d.as_slice()).collect();
    let mut state = None;
    for round in 0..2 {
        let got = model.capture_stacked(&mut state, &ids, &sites).unwrap();
        assert_eq!(got.len(), docs.len());
        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                w.sites.len(),
                sites.len() - 1,
                "the repeated site is kept once"
            );
            let mut at = 0;
            for (site, shape, values) in &w.sites {
                assert_eq!(*shape, site.shape(config, docs[d].len()));
                let what = format!("round {round} sequence {d} {site}");
                assert_same(&what, &g[at..at + values.len()], values);
                at += values.len();
            }
            assert_eq!(at, g.len(), "sequence {d}: nothing after the last site");
            // The batch gives each sequence the bits it gets alone.
            let alone = model
                .capture_stacked(&mut None, &ids[d..=d], &sites)
                .unwrap();
            assert_same(&format!("round {round} sequence {d} alone"), g, &alone[0]);
        }
    }
}
