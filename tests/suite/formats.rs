//! Checkpoints beyond safetensors: PyTorch (zip and legacy), OpenAI's TensorFlow release, GGUF.
//! Every format gives the logits of the same weights in safetensors bit for bit (q8_0: those of our
//! q8 of the same weights); `gpt2 convert` round-trips; broken and hostile files are refused with
//! errors that say what and where, and nothing in a pickle ever runs.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpt2::{DType, Logits, Model, SeqInput, Tokenizer};

fn formats() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

/// All logits of a few sequences (a prompt, then two decode steps), as bits.
fn logits(m: &Model) -> Vec<u32> {
    let mut out = Vec::new();
    let mut st = m.new_state(1, m.config().n_positions).unwrap();
    for chunk in [&[1u32, 5, 260, 7, 299, 42][..], &[17], &[298]] {
        let seq = [SeqInput {
            slot: 0,
            tokens: chunk,
        }];
        let l = m.forward(&mut st, &seq, Logits::All).unwrap();
        out.extend(l.iter().map(|x| x.to_bits()));
    }
    out
}

fn load(p: &Path, dtype: DType) -> Model {
    Model::load_with(p, &gpt2::LoadOptions::new(gpt2::Device::Cpu, dtype))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn load_err(p: &Path) -> String {
    match Model::load(p) {
        Ok(_) => panic!("{} loaded but should not", p.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} should mention {p:?}");
    }
}

#[test]
fn every_format_gives_the_logits_of_the_same_weights_in_safetensors() {
    let f = formats();
    let cases: &[(&str, &[&str])] = &[
        (
            "tiny",
            &[
                "pytorch",
                "pytorch/pytorch_model.bin",
                "pytorch/legacy.bin",
                "pytorch-sharded",
                "pytorch-sharded/pytorch_model.bin.index.json",
                "tf",
                "tf/model.ckpt.index",
                "tf/model.ckpt",
                "gguf/tiny-f32.gguf",
            ],
        ),
        ("tiny-f16", &["pytorch/f16.bin", "gguf/tiny-f16.gguf"]),
        ("tiny-bf16", &["pytorch/bf16.bin"]),
    ];
    for (reference, others) in cases {
        for dtype in DType::ALL {
            let want = logits(&load(&f.join(reference), dtype));
            for o in *others {
                let got = logits(&load(&f.join(o), dtype));
                assert!(got == want, "{o} in {dtype:?} differs from {reference}");
            }
        }
    }
}

/// llama.cpp's q8_0 (written by gguf-py from the f32 weights) runs exactly as our `--dtype q8` of
/// those weights: the same codes and scales (our quantizer rounds as ggml's), the same kernels.
#[test]
fn q8_0_gguf_equals_our_q8_of_the_same_weights() {
    let f = formats();
    let want = logits(&load(&f.join("tiny"), DType::Q8));
    let got = logits(&load(&f.join("gguf/tiny-q8_0.gguf"), DType::Q8));
    assert!(got == want, "q8_0 GGUF differs from our q8");
    // In other dtypes it loads dequantized: as the dequantized weights in f32 would.
    let deq = load(&f.join("gguf/tiny-q8_0.gguf"), DType::F32);
    assert_eq!(deq.dtype(), DType::F32);
}

#[test]
fn configs_and_tokenizers_come_with_each_format() {
    let f = formats();
    let want = gpt2::weights::open(&f.join("tiny")).unwrap();
    let tok = Tokenizer::from_dir(&f.join("tiny")).unwrap();
    let text = "the cat sat on the mat<|endoftext|> and then";
    let ids = tok.encode(text);
    for (p, format) in [
        ("pytorch/legacy.bin", "pytorch"),
        ("tf", "tensorflow"),
        ("gguf/tiny-q8_0.gguf", "gguf"),
        ("gguf/tiny-f16.gguf", "gguf"),
    ] {
        let o = gpt2::weights::open(&f.join(p)).unwrap();
        assert_eq!(o.format.name(), format);
        let (a, b) = (&o.config, &want.config);
        assert_eq!(
            (
                a.n_layer,
                a.n_embd,
                a.n_head,
                a.n_positions,
                a.vocab_size,
                a.n_inner
            ),
            (
                b.n_layer,
                b.n_embd,
                b.n_head,
                b.n_positions,
                b.vocab_size,
                b.n_inner
            ),
            "{p}"
        );
        assert_eq!(a.layer_norm_epsilon as f32, b.layer_norm_epsilon as f32);
        if format == "gguf" {
            assert_eq!((a.bos_token_id, a.eos_token_id), (299, 299));
        }
        let t = o.tokenizer().unwrap();
        assert_eq!(t.encode(text), ids, "{p}");
        assert_eq!(t.special_id("<|endoftext|>"), Some(299));
        let t = gpt2::weights::tokenizer_for(&f.join(p)).unwrap();
        assert_eq!(t.encode(text), ids, "{p}");
    }
    assert_eq!(ids.iter().filter(|&&i| i == 299).count(), 1);
}

fn gpt2_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .output()
        .unwrap()
}

fn convert(src: &Path, out: &Path, format: &str, dtype: &str) -> PathBuf {
    let o = gpt2_cli(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
        "--dtype",
        dtype,
        "--json",
    ]);
    assert!(
        o.status.success(),
        "convert {} {format} {dtype}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    PathBuf::from(v["files"][0].as_str().unwrap())
}

/// The raw bytes of every tensor of a checkpoint, by normalised name.
fn tensor_bytes(p: &Path) -> Vec<(String, String, Vec<u8>)> {
    let o = gpt2::weights::open(p).unwrap();
    o.checkpoint
        .tensor_infos()
        .into_iter()
        .map(|t| {
            let bytes = gpt2::internal::stored_bytes(&o.checkpoint, &t.name).unwrap();
            (t.name, t.dtype, bytes.to_vec())
        })
        .collect()
}

#[test]
fn convert_round_trips_through_safetensors_and_gguf() {
    let f = formats();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for src in ["tiny", "pytorch/legacy.bin", "tf", "gguf/tiny-f32.gguf"] {
        let name = src.replace('/', "_");
        for (format, dtype, run_as) in [
            ("safetensors", "f32", DType::F32),
            ("safetensors", "f16", DType::F16),
            ("safetensors", "bf16", DType::Bf16),
            ("gguf", "f32", DType::F32),
            ("gguf", "f16", DType::F16),
            ("gguf", "q8", DType::Q8),
        ] {
            let out = t.join(format!("{name}-{format}-{dtype}"));
            let written = convert(&f.join(src), &out, format, dtype);
            let got = logits(&load(&written, run_as));
            let want = logits(&load(&f.join("tiny"), run_as));
            assert!(got == want, "{src} → {format} {dtype}");
            // The tokenizer travels with the weights.
            let tok = gpt2::weights::tokenizer_for(&written).unwrap();
            assert_eq!(tok.vocab_size(), 300);
            let want = Tokenizer::from_dir(&f.join("tiny")).unwrap();
            assert_eq!(
                tok.encode("the cat<|endoftext|>"),
                want.encode("the cat<|endoftext|>")
            );
        }
    }
    // Our q8_0 is byte for byte what gguf-py's quantizer writes, and converting q8_0 to q8_0 again
    // changes nothing.
    // Our GGUF also holds the tied head as `output.weight` (llama.cpp's gpt2 loader requires it, and
    // its converter writes it so), a copy of `token_embd.weight`.
    let without_head = |p: &Path| {
        let mut t = tensor_bytes(p);
        let head = t.iter().position(|(n, _, _)| n == "lm_head.weight");
        let head = t.remove(head.expect("the GGUF has output.weight"));
        let wte = t.iter().find(|(n, _, _)| n == "wte.weight").unwrap();
        assert!(
            head.1 == wte.1 && head.2 == wte.2,
            "output.weight is token_embd.weight"
        );
        t
    };
    let ours = convert(&f.join("tiny"), &t.join("q8.gguf"), "gguf", "q8");
    let theirs = f.join("gguf/tiny-q8_0.gguf");
    assert!(without_head(&ours) == tensor_bytes(&theirs));
    let again = convert(&theirs, &t.join("again.gguf"), "gguf", "q8");
    assert!(without_head(&again) == tensor_bytes(&theirs));
    // What cannot be written is refused.
    let o = gpt2_cli(&[
        "convert",
        "-m",
        f.join("tiny").to_str().unwrap(),
        "--out",
        t.join("x").to_str().unwrap(),
        "--dtype",
        "q8",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("q8_0"));
    let o = gpt2_cli(&[
        "convert",
        "-m",
        common::fixture_dir("sharded").to_str().unwrap(),
        "--out",
        t.join("y").to_str().unwrap(),
        "--format",
        "gguf",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("gelu_new only"));
}

#[test]
fn the_cli_takes_files_and_directories_of_every_format() {
    let f = formats();
    let run = |m: &Path| {
        let o = gpt2_cli(&[
            "top",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the cat",
            "-k",
            "3",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let want = run(&f.join("tiny"));
    for p in [
        "pytorch/pytorch_model.bin",
        "tf",
        "tf/model.ckpt",
        "gguf/tiny-f32.gguf",
    ] {
        assert_eq!(run(&f.join(p)), want, "{p}");
    }
    let o = gpt2_cli(&[
        "inspect",
        "-m",
        f.join("gguf/tiny-q8_0.gguf").to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "gguf");
    assert!(v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "h.0.attn.c_attn.weight"
            && t["dtype"] == "Q8_0"
            && t["shape"] == serde_json::json!([32, 96])));
    // Several GGUF files in one directory: which one is meant must be said.
    assert_mentions(&load_err(&f.join("gguf")), &["several .gguf files"]);
}

// ---------------------------------------------------------------------------------------------
// Broken files

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

/// Every prefix cut of a file (at many lengths) is refused with an error, never a panic.
#[test]
fn truncated_files_are_refused() {
    let f = formats();
    for (dir, file) in [
        ("pytorch", "pytorch_model.bin"),
        ("pytorch", "legacy.bin"),
        ("tf", "model.ckpt.index"),
        ("tf", "model.ckpt.data-00000-of-00001"),
        ("gguf", "tiny-q8_0.gguf"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&f.join(dir), tmp.path());
        let target = tmp.path().join(file);
        let bytes = std::fs::read(f.join(dir).join(file)).unwrap();
        let mut cuts: Vec<usize> = (0..64).chain((64..bytes.len()).step_by(331)).collect();
        cuts.push(bytes.len() - 1);
        for cut in cuts {
            std::fs::write(&target, &bytes[..cut]).unwrap();
            let path = if dir == "tf" {
                tmp.path().to_path_buf()
            } else {
                target.clone()
            };
            let e = load_err(&path);
            assert!(!e.is_empty(), "{file} cut at {cut}");
        }
    }
}

/// Flipped bytes anywhere in a file: loaded or refused, never a panic or a hang.
#[test]
fn corrupted_bytes_never_panic() {
    let f = formats();
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (dir, file) in [
        ("pytorch", "pytorch_model.bin"),
        ("pytorch", "legacy.bin"),
        ("tf", "model.ckpt.index"),
        ("gguf", "tiny-f16.gguf"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&f.join(dir), tmp.path());
        let target = tmp.path().join(file);
        let clean = std::fs::read(f.join(dir).join(file)).unwrap();
        for _ in 0..150 {
            let mut bytes = clean.clone();
            // Headers are where the structure is: bias the flips towards the first 4 KiB and the end.
            for _ in 0..1 + next() % 4 {
                let at = match next() % 3 {
                    0 => (next() as usize) % bytes.len().min(4096),
                    1 => bytes.len() - 1 - (next() as usize) % bytes.len().min(1024),
                    _ => (next() as usize) % bytes.len(),
                };
                bytes[at] ^= 1 << (next() % 8);
            }
            std::fs::write(&target, &bytes).unwrap();
            let path = if dir == "tf" {
                tmp.path().to_path_buf()
            } else {
                target.clone()
            };
            let _ = Model::load(&path);
        }
    }
}

#[test]
fn not_a_checkpoint_and_bad_magic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("weights.dat");
    std::fs::write(&p, b"hello, this is not a model at all, just text\n").unwrap();
    assert_mentions(
        &load_err(&p),
        &["weights.dat", "not a checkpoint this engine reads"],
    );
    // Under a known extension, that format's own complaint.
    let p = tmp.path().join("weights.bin");
    std::fs::write(&p, b"hello, this is not a model at all, just text\n").unwrap();
    assert_mentions(&load_err(&p), &["weights.bin", "not a PyTorch file"]);
    std::fs::write(&p, b"GGUF\x01\x00\x00\x00").unwrap();
    assert_mentions(&load_err(&p), &["GGUF version 1"]);
    std::fs::write(&p, b"PK\x03\x04 not really a zip").unwrap();
    assert_mentions(&load_err(&p), &["not a valid zip archive"]);
    // A pytorch_model.bin that is really safetensors is read as what it is.
    let d = tmp.path().join("st");
    std::fs::create_dir(&d).unwrap();
    let f = formats();
    std::fs::copy(
        f.join("tiny/model.safetensors"),
        d.join("pytorch_model.bin"),
    )
    .unwrap();
    std::fs::copy(f.join("tiny/config.json"), d.join("config.json")).unwrap();
    assert_eq!(
        logits(&load(&d, DType::F32)),
        logits(&load(&f.join("tiny"), DType::F32))
    );
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}

/// A copy of a GGUF fixture with `edit` applied to its bytes.
fn gguf_edited(edit: impl Fn(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let mut b = std::fs::read(formats().join("gguf/tiny-f32.gguf")).unwrap();
    edit(&mut b);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, b).unwrap();
    (dir, p)
}

/// The offset of a GGUF tensor info's type field.
fn gguf_type_at(b: &[u8], name: &str) -> usize {
    let at = find(
        b,
        &[&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat(),
    ) + 8
        + name.len();
    let nd = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * nd
}

#[test]
fn gguf_problems_name_the_tensor_and_what_was_expected() {
    let (_d, p) = gguf_edited(|b| {
        let at = gguf_type_at(b, "blk.1.ffn_up.weight");
        b[at..at + 4].copy_from_slice(&12u32.to_le_bytes()); // Q4_K
    });
    assert_mentions(
        &load_err(&p),
        &["blk.1.ffn_up.weight", "Q4_K", "not supported", "Q8_0"],
    );
    // An offset past the end of the file.
    let (_d, p) = gguf_edited(|b| {
        let at = gguf_type_at(b, "output_norm.bias") + 4;
        b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    assert_mentions(&load_err(&p), &["output_norm.bias", "outside the file"]);
    // Counts larger than the file.
    let (_d, p) = gguf_edited(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()));
    assert_mentions(&load_err(&p), &["more than the file holds"]);
    let (_d, p) = gguf_edited(|b| b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes()));
    assert_mentions(&load_err(&p), &["more than the file holds"]);
    // A string length that lies.
    let (_d, p) = gguf_edited(|b| {
        let at = find(b, b"general.architecture") - 8;
        b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    });
    assert_mentions(&load_err(&p), &["truncated"]);
    // Another architecture, and a shape that does not match the metadata.
    let (_d, p) = gguf_edited(|b| {
        let at = find(b, b"general.architecture") + 20 + 4 + 8; // key, type, value length
        b[at..at + 4].copy_from_slice(b"gptj");
    });
    assert_mentions(&load_err(&p), &["architecture \"gptj\"", "only \"gpt2\""]);
    let (_d, p) = gguf_edited(|b| {
        let at = find(b, b"gpt2.feed_forward_length") + 24 + 4;
        b[at..at + 4].copy_from_slice(&64u32.to_le_bytes());
    });
    assert_mentions(
        &load_err(&p),
        &[
            "blk.0.ffn_up.weight",
            "expected shape [32, 64]",
            "found [32, 128]",
        ],
    );
}

#[test]
fn tf_problems_are_clear() {
    let f = formats();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&f.join("tf"), tmp.path());
    let data = tmp.path().join("model.ckpt.data-00000-of-00001");
    let mut b = std::fs::read(&data).unwrap();
    b[1000] ^= 0x40;
    std::fs::write(&data, &b).unwrap();
    assert_mentions(
        &load_err(tmp.path()),
        &[
            "model.ckpt.data-00000-of-00001",
            "checksum mismatch",
            "model/",
        ],
    );
    copy_dir(&f.join("tf"), tmp.path());
    let index = tmp.path().join("model.ckpt.index");
    let mut b = std::fs::read(&index).unwrap();
    b[20] ^= 1;
    std::fs::write(&index, &b).unwrap();
    assert_mentions(
        &load_err(tmp.path()),
        &["model.ckpt.index", "checksum mismatch"],
    );
    copy_dir(&f.join("tf"), tmp.path());
    std::fs::remove_file(tmp.path().join("hparams.json")).unwrap();
    assert_mentions(&load_err(tmp.path()), &["config.json"]);
    copy_dir(&f.join("tf"), tmp.path());
    std::fs::write(
        tmp.path().join("hparams.json"),
        r#"{"n_vocab": 300, "n_ctx": 16, "n_embd": 32, "n_head": 2}"#,
    )
    .unwrap();
    assert_mentions(&load_err(tmp.path()), &["hparams.json", "`n_layer`"]);
    std::fs::write(
        tmp.path().join("hparams.json"),
        r#"{"n_vocab": 300, "n_ctx": 16, "n_embd": 32, "n_head": 2, "n_layer": 3}"#,
    )
    .unwrap();
    assert_mentions(&load_err(tmp.path()), &["h.2.ln_1.weight", "missing"]);
}

// ---------------------------------------------------------------------------------------------
// Pickles, hostile and broken

/// Pickle building blocks (protocol 2).
fn s(x: &str) -> Vec<u8> {
    [&[b'X'][..], &(x.len() as u32).to_le_bytes(), x.as_bytes()].concat()
}
fn g(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}
fn int(v: u8) -> Vec<u8> {
    vec![b'K', v]
}

/// `_rebuild_tensor_v2(storage '0' of `numel` floats, offset, size, stride, False, OrderedDict())`.
fn tensor(numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
    let tup = |v: &[u8]| {
        [
            vec![b'('],
            v.iter().flat_map(|&x| int(x)).collect(),
            vec![b't'],
        ]
        .concat()
    };
    [
        g("torch._utils", "_rebuild_tensor_v2"),
        vec![b'('],
        vec![b'('],
        s("storage"),
        g("torch", "FloatStorage"),
        s("0"),
        s("cpu"),
        int(numel),
        vec![b't', b'Q'],
        int(offset),
        tup(size),
        tup(stride),
        vec![0x89],
        g("collections", "OrderedDict"),
        vec![b')', b'R'],
        vec![b't', b'R'],
    ]
    .concat()
}

/// `{name: value}` as an OrderedDict.
fn state_dict(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(g("collections", "OrderedDict"));
    p.extend([b')', b'R', b'(']);
    for (k, v) in entries {
        p.extend(s(k));
        p.extend(v);
    }
    p.extend([b'u', b'.']);
    p
}

/// A torch.save-style zip: `archive/data.pkl` and the storages `archive/data/<key>`.
fn torch_zip(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    for (k, data) in storages {
        w.start_file(format!("archive/data/{k}"), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn pickle_err(pkl: &[u8], storages: &[(&str, &[u8])]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pytorch_model.bin");
    std::fs::write(&p, torch_zip(pkl, storages)).unwrap();
    std::fs::copy(
        formats().join("tiny/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = load_err(tmp.path());
    // The same bytes as a legacy file are refused as firmly.
    let mut legacy = vec![
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    legacy.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']); // protocol 1001
    legacy.extend([0x80, 2, b'}', b'(']);
    legacy.extend(s("little_endian"));
    legacy.extend([0x88, b'u', b'.']);
    legacy.extend(pkl);
    std::fs::write(&p, legacy).unwrap();
    let e2 = load_err(tmp.path());
    assert!(e2.contains("pytorch_model.bin"), "{e2}");
    e
}

#[test]
fn hostile_pickles_run_nothing_and_name_the_global() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    let call = |m: &str, n: &str| [g(m, n), vec![b'('], s(&cmd), vec![b't', b'R']].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // The classic: os.system("...") as the whole pickle.
        (
            [vec![0x80, 2], call("os", "system"), vec![b'.']].concat(),
            "os.system",
        ),
        (
            [vec![0x80, 2], call("posix", "system"), vec![b'.']].concat(),
            "posix.system",
        ),
        // builtins.eval through STACK_GLOBAL (protocol 4).
        (
            [
                vec![0x80, 4],
                vec![0x8c, 8],
                b"builtins".to_vec(),
                vec![0x8c, 4],
                b"eval".to_vec(),
                vec![0x93, b'('],
                s("__import__('os').system('true')"),
                vec![b't', b'R', b'.'],
            ]
            .concat(),
            "builtins.eval",
        ),
        (
            state_dict(&[("wte.weight", call("subprocess", "Popen"))]),
            "subprocess.Popen",
        ),
        // Nested: a tensor whose storage offset is the result of a call.
        (
            state_dict(&[(
                "wte.weight",
                [
                    g("torch._utils", "_rebuild_tensor_v2"),
                    vec![b'('],
                    call("os", "system"),
                    vec![b't', b'R'],
                ]
                .concat(),
            )]),
            "os.system",
        ),
        // A callable hidden in a dict value, reduced later.
        (
            [
                vec![0x80, 2, b'}', b'q', 0],
                s("x"),
                g("builtins", "exec"),
                vec![b's', b'0', b'h', 0],
                vec![b'.'],
            ]
            .concat(),
            "builtins.exec",
        ),
        (
            [vec![0x80, 2], g("torch", "load"), vec![b'.']].concat(),
            "torch.load",
        ),
        (
            [
                vec![0x80, 2],
                g("torch.serialization", "_get_layout"),
                vec![b'.'],
            ]
            .concat(),
            "torch.serialization._get_layout",
        ),
    ];
    for (pkl, global) in cases {
        let e = pickle_err(&pkl, &[]);
        assert_mentions(&e, &[&format!("`{global}`"), "refusing", "nothing was run"]);
    }
    // Opcodes that construct objects without a GLOBAL we could vet are refused as such.
    for (op, name) in [
        (b'i', "INST"),
        (b'o', "OBJ"),
        (0x81, "NEWOBJ"),
        (0x82, "EXT1"),
    ] {
        let e = pickle_err(&[0x80, 2, b'(', op, b'.'], &[]);
        assert_mentions(&e, &[&format!("opcode 0x{op:02x}"), "nothing was run"]);
        let _ = name;
    }
    assert!(!marker.exists(), "a pickle ran a command");
}

#[test]
fn broken_pickles_and_storages_are_refused() {
    let four = [0u8; 16];
    // A well-formed one first, so that the others fail for the reason they mean to.
    let ok = state_dict(&[("x", tensor(4, 0, &[4], &[1]))]);
    let e = pickle_err(&ok, &[("0", &four)]);
    assert_mentions(&e, &["`wte.weight`", "missing"]);
    // Non-contiguous.
    let e = pickle_err(
        &state_dict(&[("x", tensor(4, 0, &[2, 2], &[1, 2]))]),
        &[("0", &four)],
    );
    assert_mentions(&e, &["`x`", "non-contiguous", "[1, 2]"]);
    // Beyond its storage, by offset or by size.
    let e = pickle_err(
        &state_dict(&[("x", tensor(4, 2, &[4], &[1]))]),
        &[("0", &four)],
    );
    assert_mentions(&e, &["`x`", "outside its storage"]);
    // The storage's bytes do not match what the pickle says.
    let e = pickle_err(
        &state_dict(&[("x", tensor(200, 0, &[4], &[1]))]),
        &[("0", &four)],
    );
    assert_mentions(&e, &["storage 0 holds 16 bytes", "200 elements"]);
    // Missing storage, truncated pickle, not a dict, an unknown protocol.
    let e = pickle_err(&ok, &[]);
    assert_mentions(&e, &["archive/data/0"]);
    let e = pickle_err(&ok[..ok.len() - 5], &[("0", &four)]);
    assert_mentions(&e, &["truncated pickle"]);
    let e = pickle_err(&[0x80, 2, b']', b'.'], &[]);
    assert_mentions(&e, &["a list, not a state dict"]);
    let e = pickle_err(&[0x80, 9, b'.'], &[]);
    assert_mentions(&e, &["protocol 9"]);
    // Memo references that were never written, and stack underflow.
    assert_mentions(&pickle_err(&[0x80, 2, b'h', 7, b'.'], &[]), &["memo key 7"]);
    assert_mentions(&pickle_err(&[0x80, 2, b'R', b'.'], &[]), &["underflow"]);
    // A state dict entry that is not a tensor.
    let e = pickle_err(&state_dict(&[("x", int(3))]), &[]);
    assert_mentions(&e, &["\"x\" is an int, not a tensor"]);
}
