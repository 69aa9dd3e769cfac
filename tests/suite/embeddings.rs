//! Embeddings: the library's against transformers' (the final hidden state pooled, recorded in the
//! sites fixtures), and `/v1/embeddings` against the library, over real HTTP on loopback.

use crate::common;

use base64::Engine as _;
use common::server::{Server, FIXTURE};
use gpt2::embed::{embed, Pooling};
use gpt2::{Model, Tokenizer};
use safetensors::SafeTensors;
use serde_json::{json, Value};

fn load(name: &str) -> Model {
    Model::load(&common::fixture_dir(name)).unwrap()
}

fn recorded(name: &str, tensor: &str) -> Vec<f32> {
    let bytes = std::fs::read(common::fixture_dir(name).join("sites.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(tensor).unwrap();
    match tensor {
        "input_ids" => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        _ => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    }
}

#[test]
fn embeddings_equal_transformers_pooled_hidden_states() {
    for name in ["openai-f32", "scale-inv-layer", "headdim-24"] {
        let model = load(name);
        let ids: Vec<u32> = recorded(name, "input_ids")
            .into_iter()
            .map(|x| x as u32)
            .collect();
        for (pooling, tensor) in [(Pooling::Mean, "embed.mean"), (Pooling::Last, "embed.last")] {
            let got = embed(&model, std::slice::from_ref(&ids), pooling, true).unwrap();
            let want = recorded(name, tensor);
            let diff = common::max_abs_diff(&got[0], &want);
            assert!(diff <= 1e-5, "{name} {pooling:?}: {diff}");
        }
        let raw = embed(&model, &[ids], Pooling::Mean, false).unwrap();
        let norm = raw[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() > 1e-3,
            "{name}: unnormalised is not unit length"
        );
    }
}

#[test]
fn embeddings_are_batch_invariant_and_checked() {
    let model = load("openai-f32");
    let a: Vec<u32> = (0..20).collect();
    let b: Vec<u32> = (100..105).collect();
    let both = embed(&model, &[a.clone(), b.clone()], Pooling::Mean, true).unwrap();
    assert_eq!(
        both[0],
        embed(&model, &[a], Pooling::Mean, true).unwrap()[0]
    );
    assert_eq!(
        both[1],
        embed(&model, &[b], Pooling::Mean, true).unwrap()[0]
    );
    let e = embed(&model, &[vec![]], Pooling::Mean, true).unwrap_err();
    assert!(e.to_string().contains("text 0 has 0 tokens"), "{e}");
    let e = embed(&model, &[vec![1; 33]], Pooling::Mean, true).unwrap_err();
    assert!(e.to_string().contains("context of 32"), "{e}");
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            match &d["embedding"] {
                Value::String(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                e => e
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn the_endpoint_equals_the_library() {
    let server = Server::fixture(&["--parallel", "2"]);
    let dir = common::fixture_dir(FIXTURE);
    let (model, tok) = (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    );
    let texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let want = embed(&model, &ids, Pooling::Mean, true).unwrap();
    let (s, v) = server.post(
        "/v1/embeddings",
        &json!({"input": texts, "model": "fixture"}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(vectors(&v), want);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "fixture");
    let n: usize = ids.iter().map(Vec::len).sum();
    assert_eq!(v["usage"], json!({"prompt_tokens": n, "total_tokens": n}));
    // One string, token ids, base64, last-token pooling.
    let (_, one) = server.post("/v1/embeddings", &json!({"input": texts[1]}));
    assert_eq!(vectors(&one), vec![want[1].clone()]);
    let (_, by_ids) = server.post(
        "/v1/embeddings",
        &json!({"input": ids, "encoding_format": "base64"}),
    );
    assert_eq!(vectors(&by_ids), want);
    let last = embed(&model, &ids[..1], Pooling::Last, true).unwrap();
    let (_, v) = server.post(
        "/v1/embeddings",
        &json!({"input": [ids[0]], "pooling": "last", "dimensions": 16}),
    );
    assert_eq!(vectors(&v), last);
    // Beside a generation: the same bits.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    std::thread::scope(|sc| {
        let gen = sc.spawn(|| server.post("/v1/completions", &body));
        let (s, v) = server.post("/v1/embeddings", &json!({"input": texts}));
        assert_eq!(s, 200);
        assert_eq!(vectors(&v), want);
        assert_eq!(gen.join().unwrap().0, 200);
    });
}

#[test]
fn bad_embedding_requests_are_400s_naming_the_field() {
    let server = Server::fixture(&[]);
    for (body, param, needle) in [
        (json!({}), "input", "input is required"),
        (json!({"input": ""}), "input", "input 0 is empty"),
        (json!({"input": 5}), "input", "must be a string"),
        (
            json!({"input": [[70000]]}),
            "input",
            "beyond the vocabulary",
        ),
        (
            json!({"input": "x", "dimensions": 3}),
            "dimensions",
            "have 16",
        ),
        (
            json!({"input": "x", "encoding_format": "hex"}),
            "encoding_format",
            "base64",
        ),
        (
            json!({"input": "x", "pooling": "max"}),
            "pooling",
            "\"mean\" or \"last\"",
        ),
        (
            json!({"input": "x ".repeat(70)}),
            "input",
            "maximum context length is 64",
        ),
        (json!({"input": vec!["x"; 2049]}), "input", "at most 2048"),
    ] {
        let (s, v) = server.post("/v1/embeddings", &body);
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should say {needle:?}"
        );
    }
    let (s, v) = server.post("/v1/embeddings", &json!({"input": "x", "model": "other"}));
    assert_eq!(s, 404, "{v}");
}
