//! The tokenizer against transformers' GPT2TokenizerFast (recorded goldens) and tiktoken's r50k_base
//! (differential, on property-generated text), plus round trips, streaming and loading errors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use gpt2::internal::vocab;
use gpt2::{Special, StreamDecoder, Tokenizer};
use proptest::prelude::*;

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(Tokenizer::gpt2)
}

fn tiktoken() -> &'static tiktoken_rs::CoreBPE {
    static T: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
    T.get_or_init(|| tiktoken_rs::r50k_base().unwrap())
}

#[test]
fn golden_cases_from_gpt2_tokenizer_fast() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer/golden.json"
    ))
    .unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok().encode(s);
        assert_eq!(ids, want, "{s:?}");
        let texts: Vec<String> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(tok().token_texts(&ids).unwrap(), texts, "{s:?}");
        assert_eq!(tok().decode(&ids).unwrap(), s);
    }
}

/// Fragments that stress the pre-tokenizer: every class boundary the pattern cares about.
const FRAGMENTS: &[&str] = &[
    "a",
    "Z",
    "word",
    " word",
    "Über",
    "naïve",
    "x",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    "\u{0B}",
    "\u{0C}",
    "0",
    "7",
    "42",
    "2024",
    "3.14",
    "1,000",
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'S",
    "'T",
    "'RE",
    "'Ve",
    "'LL",
    "'D",
    "'",
    "''",
    "\"",
    "!",
    "?",
    ".",
    ",",
    ";",
    ":",
    "-",
    "_",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "#",
    "@",
    "$",
    "%",
    "&",
    "*",
    "/",
    "\\",
    "|",
    "<",
    ">",
    "~",
    "`",
    "^",
    "+",
    "=",
    "<|endoftext|>",
    "<|endoftext",
    "|>",
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇫🇷",
    "❤️",
    "\u{200D}",
    "\u{FE0F}",
    "e\u{301}",
    "\u{301}",
    "\u{308}",
    "\u{20DD}",
    "日本語",
    "中文",
    "한국어",
    "Привет",
    "мир",
    "مرحبا",
    "हिन्दी",
    "ไทย",
    "Ελληνικά",
    "עברית",
    "\u{A0}",
    "\u{2003}",
    "\u{3000}",
    "\u{200B}",
    "\u{85}",
    "\u{2028}",
    "\u{1680}",
    "\u{202F}",
    "½",
    "Ⅳ",
    "²",
    "٣",
    "߁",
    "𝟘",
    "ℕ",
    "ß",
    "ǅ",
    "ʰ",
    "\u{0}",
    "\u{7F}",
    "\u{1F}",
    "\u{FFFD}",
    "\u{10FFFF}",
    "\u{E000}",
    "𐍈",
    "I",
    "I'm",
    "DON'T",
    "you're",
    " 's",
    "x's",
    "https://",
    "www.",
    "==",
    "->",
    "...",
];

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(FRAGMENTS).prop_map(str::to_owned),
        1 => any::<char>().prop_map(|c| c.to_string()),
        1 => "[a-z]{1,300}",
        1 => "[ \t\n]{1,8}",
        1 => "[0-9]{1,40}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(fragment(), 0..40).prop_map(|v| v.concat())
}

/// Same ids as tiktoken's r50k_base, special tokens allowed and not; exact round trip; streaming
/// decode equal to one-shot decode. At least 10,000 generated strings per run.
#[test]
fn same_ids_as_tiktoken() {
    let config = ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let checked = AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&text(), |s| {
        let ours = tok().encode(&s);
        prop_assert_eq!(&ours, &tiktoken().encode_with_special_tokens(&s), "{:?}", s);
        let ordinary = tok().encode_with(&s, Special::AsText);
        prop_assert_eq!(&ordinary, &tiktoken().encode_ordinary(&s), "{:?}", s);
        prop_assert_eq!(tok().decode(&ours).unwrap(), s.clone());
        prop_assert_eq!(tok().decode(&ordinary).unwrap(), s.clone());
        let mut dec = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ordinary {
            let out = dec.push(tok().token_bytes(id).unwrap());
            let clean = !out.contains(char::REPLACEMENT_CHARACTER)
                || s.contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(clean);
            streamed += &out;
        }
        streamed += &dec.finish();
        prop_assert_eq!(streamed, s);
        checked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let n = checked.into_inner();
    eprintln!("tokenizer: {n} generated strings identical to tiktoken r50k_base");
    assert!(n >= 10_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any split of any bytes streams to what `from_utf8_lossy` gives for the whole.
    #[test]
    fn streaming_equals_one_shot_for_every_split(bytes in proptest::collection::vec(any::<u8>(), 0..64), cuts in proptest::collection::vec(0usize..64, 0..8)) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.sort();
        let mut dec = StreamDecoder::new();
        let (mut out, mut at) = (String::new(), 0);
        for c in cuts.into_iter().chain([bytes.len()]) {
            out += &dec.push(&bytes[at..c]);
            at = c;
        }
        out += &dec.finish();
        prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
    }
}

#[test]
fn streaming_keeps_multibyte_characters_whole() {
    for s in ["👨‍👩‍👧‍👦 family", "日本語のテキスト", "emoji 😀😀😀 end"]
    {
        let ids = tok().encode(s);
        let mut dec = StreamDecoder::new();
        let mut chunks = Vec::new();
        for &id in &ids {
            chunks.push(dec.push(tok().token_bytes(id).unwrap()));
        }
        chunks.push(dec.finish());
        // Some token held a partial character, so some push returned nothing.
        assert!(
            ids.len() > chunks.iter().filter(|c| !c.is_empty()).count(),
            "{s}"
        );
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
        assert_eq!(chunks.concat(), s);
    }
    // An unfinished character at the end is replaced only then.
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&[0xF0, 0x9F]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
}

#[test]
fn long_inputs_stay_linear() {
    // 1 MB without spaces is one piece: the heap-based merge keeps it O(n log n).
    let s = "a".repeat(1 << 20);
    let ids = tok().encode(&s);
    assert_eq!(tok().decode(&ids).unwrap(), s);
    let mixed: String = (0..(1 << 20) / 7)
        .map(|i| ["abc", "d", "xyz", "q"][i % 4])
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(tok().decode(&tok().encode(&mixed)).unwrap(), mixed);
    // A long piece merges as tiktoken does (the heap path, above 64 bytes).
    let piece: String = (0..2000)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    assert_eq!(tok().encode(&piece), tiktoken().encode_ordinary(&piece));
}

#[test]
fn batch_encoding_equals_one_by_one() {
    let texts: Vec<String> = (0..64)
        .map(|i| format!("text number {i}: {}", "lorem ipsum ".repeat(i)))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = tok().encode_batch(&refs, Special::Allow);
    for (t, ids) in refs.iter().zip(&batch) {
        assert_eq!(ids, &tok().encode(t));
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_file_layout_loads_the_same_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sample = "Hello, world! <|endoftext|> 日本語 I'm here\n\n  x";
    let want = tok().encode(sample);
    // OpenAI names, then HF names.
    write(d, "encoder.json", vocab::BUILTIN_ENCODER);
    write(d, "vocab.bpe", vocab::BUILTIN_MERGES);
    assert_eq!(Tokenizer::from_dir(d).unwrap().encode(sample), want);
    write(d, "vocab.json", vocab::BUILTIN_ENCODER);
    write(d, "merges.txt", vocab::BUILTIN_MERGES);
    let t = Tokenizer::from_dir(d).unwrap();
    assert!(t.source().contains("vocab.json"));
    assert_eq!(t.encode(sample), want);
    // tokenizer.json, with merges in both of the formats transformers writes.
    let vocab: serde_json::Value = serde_json::from_str(vocab::BUILTIN_ENCODER).unwrap();
    let merges: Vec<&str> = vocab::BUILTIN_MERGES
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .collect();
    for merges in [
        serde_json::json!(merges),
        serde_json::json!(merges
            .iter()
            .map(|m| m.split(' ').collect::<Vec<_>>())
            .collect::<Vec<_>>()),
    ] {
        let tj = serde_json::json!({
            "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "special": true}],
            "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        });
        write(d, "tokenizer.json", &tj.to_string());
        let t = Tokenizer::from_dir(d).unwrap();
        assert!(t.source().contains("tokenizer.json"));
        assert_eq!(t.encode(sample), want);
    }
    // A directory with none of them uses the built-in files.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        Tokenizer::from_dir(empty.path()).unwrap().encode(sample),
        want
    );
}

#[test]
fn malformed_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let merges = write(d, "merges.txt", "#version: 0.2\na b\n");
    let check = |vocab: &str, merges_text: &str, want: &str| {
        let v = write(d, "vocab.json", vocab);
        std::fs::write(&merges, merges_text).unwrap();
        let e = match Tokenizer::from_vocab_and_merges(&v, &merges) {
            Ok(_) => panic!("{vocab} / {merges_text} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    };
    // All 256 bytes, then what each case adds.
    let mut base: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(vocab::BUILTIN_ENCODER).unwrap();
    base.retain(|_, id| id.as_u64().unwrap() < 256);
    let with_base = |base: &serde_json::Map<String, serde_json::Value>, extra: &[(&str, u64)]| {
        let mut m = base.clone();
        for (k, v) in extra {
            m.insert((*k).into(), (*v).into());
        }
        serde_json::Value::Object(m).to_string()
    };
    let with = |extra: &[(&str, u64)]| with_base(&base, extra);
    check("{not json", "", "not a valid vocabulary");
    check(
        &with(&[("ab", 256)]),
        "#version: 0.2\na zz\n",
        "merge 1 names \"zz\", which is not in the vocabulary",
    );
    check(
        &with(&[]),
        "#version: 0.2\na b\n",
        "makes \"ab\", which is not in the vocabulary",
    );
    check(&with(&[("ab", 65)]), "", "id 65 is given to both");
    check(
        &with(&[("ab", 256)]),
        "#version: 0.2\na b c\n",
        "line 2: expected a merge of two tokens",
    );
    check(
        &with(&[("a b", 256)]),
        "",
        "not written in GPT-2's byte-level alphabet",
    );
    check(
        r#"{"a": -1}"#,
        "",
        "invalid value: integer `-1`, expected u32",
    );
    // Ids index a table: one far beyond the entries was a 64 GB allocation, then an abort.
    check(
        r#"{"a": 4294967295}"#,
        "",
        "has id 4294967295, but there are only 1 tokens",
    );
    check(&with(&[("ab", 1 << 20)]), "", "ids must be below 65793");
    base.remove("Ġ");
    check(&with_base(&base, &[]), "", "no token for byte 0x20");
    let tj = write(
        d,
        "tokenizer.json",
        r#"{"model":{"type":"WordPiece","vocab":{}}}"#,
    );
    assert!(Tokenizer::from_tokenizer_json(&tj)
        .err()
        .unwrap()
        .to_string()
        .contains("not byte-level BPE"));
    let tj = write(
        d,
        "tokenizer.json",
        r#"{"model":{"vocab":{"a":0},"merges":[]},"added_tokens":[{"id":4294967295,"content":"x"}]}"#,
    );
    let e = Tokenizer::from_tokenizer_json(&tj)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("id 4294967295"),
        "{e}"
    );
}

#[test]
fn half_a_tokenizer_is_an_error_naming_the_missing_file() {
    // One file of a pair used to fall back to the built-in vocabulary without a word.
    for (have, missing) in [
        ("vocab.json", "merges.txt"),
        ("merges.txt", "vocab.json"),
        ("encoder.json", "vocab.bpe"),
        ("vocab.bpe", "encoder.json"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), have, "{}");
        let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains(have) && e.contains(&format!("{missing} is missing")),
            "{have}: {e}"
        );
    }
}
