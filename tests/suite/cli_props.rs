//! Every subcommand of the `gpt2` binary with random flag values drawn from each flag's whole type
//! range (0, 1, context edges, huge, u64::MAX and beyond, negative, NaN, ±inf, tiny floats, empty and
//! random text, lossy random bytes) against the small fixture models, offline. Each run must exit 0,
//! or 1 with a message on stderr (or 2 with clap's usage message, for a value a flag cannot parse:
//! the usual exit code for a usage error), within a time bound: never a panic (101), a signal, or a
//! hang.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::fixture_dir;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A run that takes longer than this is a hang (the fixtures are tiny; the slowest valid runs take
/// well under a second).
const TIME_LIMIT: Duration = Duration::from_secs(20);

/// Cases per subcommand: 9 subcommands × this many runs take under a minute on 2 busy cores
/// (`CLI_PROPS_VERBOSE=1 cargo test --release --test suite cli_props:: -- --nocapture` shows each run).
const CASES: u32 = 32;

/// Files the flags can name: prompts, text, empty, not UTF-8. Made once per test binary.
fn files() -> &'static (tempfile::TempDir, Vec<String>) {
    static FILES: OnceLock<(tempfile::TempDir, Vec<String>)> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(d.join(name), bytes).unwrap();
            d.join(name).display().to_string()
        };
        let files = vec![
            write(
                "prompts.txt",
                b"Hello\n{\"prompt\": \"One two\"}\n\nthree four five\n",
            ),
            write(
                "text.txt",
                "The quick brown fox jumps over the lazy dog. 日本語 <|endoftext|> x\n".as_bytes(),
            ),
            write("empty.txt", b""),
            write("bad.json", b"{\"prompt\": 3}\n{nope\n"),
            write("latin1.txt", b"caf\xe9 \xff\xfe"),
            d.join("missing.txt").display().to_string(),
            d.display().to_string(),
            "-".into(),
        ];
        (dir, files)
    })
}

/// An empty Hugging Face cache, so that hub ids are never found (and offline never downloaded).
fn empty_cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn models() -> Vec<String> {
    let mut m: Vec<String> = [
        "openai-f32",
        "full-vocab-f16",
        "sharded",
        "hf-bf16",
        "headdim-24",
    ]
    .iter()
    .map(|n| fixture_dir(n).display().to_string())
    .collect();
    // Hub ids (not cached, offline) and things that are no model.
    m.extend(["gpt2", "owner/name", "", ".", "/", "a/b/c"].map(String::from));
    m
}

/// Numbers across the range of every numeric type a flag parses (u32, u64, usize, f32), and the
/// edges of the fixtures' contexts (20-64 positions).
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "19",
    "20",
    "23",
    "24",
    "31",
    "32",
    "33",
    "63",
    "64",
    "65",
    "-1",
    "-0",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "0.5",
    "1.5",
    "1e-39",
    "1e-45",
    "1e38",
    "3e38",
    "-3e38",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "0x10",
    "1_000",
    " 1",
];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(NUMBERS).prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<f32>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:e}")),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "",
                " ",
                "-",
                "--",
                "<|endoftext|>",
                "\u{FFFD}",
                "\n",
                "cuda",
                "cpu",
                "q8",
                "f16"
            ][..]
        )
        .prop_map(str::to_owned),
        "\\PC{0,12}",
        proptest::collection::vec(any::<u8>(), 0..16)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    // An argument cannot hold NUL.
    .prop_map(|s| s.replace('\0', ""))
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![3 => number(), 1 => text()]
}

/// Unsigned integers over the whole range (what a u32 / u64 / usize flag parses), edges first.
fn unsigned() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&[
            "0", "1", "2", "3", "19", "20", "24", "31", "32", "33", "64", "65", "4294967295",
            "4294967296", "18446744073709551615",
        ][..])
        .prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<u32>().prop_map(|v| v.to_string()),
    ]
}

/// Token ids (u32): the fixtures' vocabulary edges (384, 50257), then the whole range.
fn token_id() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::sample::select(&["0", "1", "255", "383", "384", "50256", "50257", "4294967295"][..])
            .prop_map(str::to_owned),
        1 => any::<u32>().prop_map(|v| v.to_string()),
    ]
}

/// Floats over the whole f32 range: NaN, ±inf, tiny, huge, subnormal, negative.
fn float() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&[
            "0", "-0", "1", "-1", "0.5", "2", "1e-39", "1e-45", "1e-38", "3.4e38", "-3.4e38",
            "1e39", "NaN", "inf", "-inf",
        ][..])
        .prop_map(str::to_owned),
        1 => any::<f32>().prop_map(|v| v.to_string()),
    ]
}

/// The flags a subcommand takes.
enum Flag {
    /// `--name VALUE`, the value from any range.
    Value(&'static str),
    /// `--name VALUE` for an integer flag: mostly integers from the whole range, else anything.
    Int(&'static str),
    /// `--name VALUE` for a float flag: mostly floats from the whole range, else anything.
    Float(&'static str),
    /// An integer flag whose useful values are small (token counts on a 20-64 position model):
    /// small values half the time, else as `Int`, so that runs get past the range checks.
    SmallInt(&'static str),
    /// A float flag whose useful values lie in [0, 1] (top-p, min-p): those half the time.
    Unit(&'static str),
    /// `--name`, present or not.
    Switch(&'static str),
    /// `--name VALUE` with the value from a given list (files, models, enums).
    OneOf(&'static str, fn() -> Vec<String>),
    /// A positional value.
    Positional,
    /// A positional integer, mostly from the whole range.
    IntPositional,
}
use Flag::*;

/// `--random` takes a preset name; the presets are real-sized (hundreds of MB), so only names that
/// are refused are drawn here.
fn random_presets() -> Vec<String> {
    ["gpt3", "", "gpt2-", "GPT2"].map(String::from).to_vec()
}

fn file_values() -> Vec<String> {
    files().1.clone()
}

fn early_values() -> Vec<String> {
    ["true", "false", "never", "maybe", ""]
        .map(String::from)
        .to_vec()
}

fn dtypes() -> Vec<String> {
    ["f32", "f16", "q8", "bf16", "f64", "", "cuda"]
        .map(String::from)
        .to_vec()
}

fn devices() -> Vec<String> {
    [
        "cpu",
        "cuda",
        "cuda:0",
        "cuda:18446744073709551616",
        "gpu:99",
        "wgpu:",
        "tpu",
        "",
    ]
    .map(String::from)
    .to_vec()
}

/// `--threads` over its whole range: a huge count is refused before any thread starts.
fn threads() -> Vec<String> {
    [
        "1",
        "2",
        "0",
        "-1",
        "NaN",
        "",
        "1025",
        "100000",
        "4294967296",
        "18446744073709551615",
    ]
    .map(String::from)
    .to_vec()
}

fn flags(command: &str) -> Vec<Flag> {
    let model = OneOf("--model", models);
    let compute = [OneOf("--dtype", dtypes), OneOf("--threads", threads)];
    let mut f = match command {
        "generate" => vec![
            model,
            Value("--prompt"),
            OneOf("--prompt-file", file_values),
            OneOf("--prompts", file_values),
            SmallInt("--max-tokens"),
            Switch("--greedy"),
            Float("--temperature"),
            SmallInt("--top-k"),
            Unit("--top-p"),
            Unit("--min-p"),
            Float("--repetition-penalty"),
            Float("--frequency-penalty"),
            Float("--presence-penalty"),
            SmallInt("--no-repeat-ngram-size"),
            Int("--seed"),
            Value("--stop"),
            SmallInt("--num-beams"),
            Float("--length-penalty"),
            OneOf("--early-stopping", early_values),
            SmallInt("--num-return-sequences"),
            Switch("--ignore-eos"),
            Switch("--truncate-prompt"),
            OneOf("--device", devices),
        ],
        "download" => vec![OneOf("", models), Value("--revision")],
        "inspect" => vec![model],
        "tokenize" => vec![
            model,
            Positional,
            OneOf("--file", file_values),
            Switch("--special-as-text"),
        ],
        "detokenize" => vec![model, IntPositional, IntPositional, IntPositional],
        "top" => vec![model, Value("--prompt"), SmallInt("--top-k")],
        "score" => vec![
            model,
            Value("--text"),
            OneOf("--file", file_values),
            Int("--highlight"),
        ],
        "perplexity" => vec![
            model,
            OneOf("--file", file_values),
            SmallInt("--context"),
            SmallInt("--stride"),
            SmallInt("--batch"),
        ],
        "bench" => vec![
            model,
            OneOf("--random", random_presets),
            SmallInt("--prompt"),
            SmallInt("--decode"),
            SmallInt("--batch"),
            SmallInt("--repeat"),
            OneOf("--device", devices),
        ],
        other => panic!("no flags listed for {other}"),
    };
    if matches!(
        command,
        "generate" | "top" | "score" | "perplexity" | "bench"
    ) {
        f.extend(compute);
    }
    f.push(Switch("--json"));
    f
}

/// One argument list for `command`: each flag present with probability about one half.
fn args(command: &'static str) -> impl Strategy<Value = Vec<String>> {
    let many = flags(command).len() > 8;
    // What a run needs to get past the parser (and --model, to get past the default hub id).
    let required: &[&str] = match command {
        "download" => &[""],
        "detokenize" => &["--model", ""],
        "perplexity" => &["--model", "--file"],
        // Their defaults (50 tokens; 128 + 128) do not fit the fixtures' contexts.
        "bench" => &["--model", "--prompt", "--decode"],
        "generate" => &["--model", "--max-tokens"],
        _ => &["--model"],
    };
    let per_flag: Vec<BoxedStrategy<Vec<String>>> = flags(command)
        .into_iter()
        .map(|f| {
            let name = match f {
                Value(n) | Int(n) | Float(n) | SmallInt(n) | Unit(n) | Switch(n) | OneOf(n, _) => n,
                Positional | IntPositional => "",
            };
            let present = match f {
                Value(name) => value().prop_map(move |v| vec![name.to_owned(), v]).boxed(),
                Int(name) => prop_oneof![12 => unsigned(), 1 => value()]
                    .prop_map(move |v| vec![name.to_owned(), v])
                    .boxed(),
                SmallInt(name) => prop_oneof![
                    6 => (0u32..70).prop_map(|v| v.to_string()),
                    5 => unsigned(),
                    1 => value()
                ]
                .prop_map(move |v| vec![name.to_owned(), v])
                .boxed(),
                Unit(name) => prop_oneof![
                    6 => (0.0f32..=1.0).prop_map(|v| v.to_string()),
                    5 => float(),
                    1 => value()
                ]
                .prop_map(move |v| vec![name.to_owned(), v])
                .boxed(),
                Float(name) => prop_oneof![12 => float(), 1 => value()]
                    .prop_map(move |v| vec![name.to_owned(), v])
                    .boxed(),
                Switch(name) => Just(vec![name.to_owned()]).boxed(),
                // The first entries of each list are the usable ones: mostly those, so that runs
                // get past the checks that the other entries exercise.
                OneOf(name, list) => {
                    let all = list();
                    let usable = all[..all.len().min(3)].to_vec();
                    prop_oneof![3 => proptest::sample::select(usable), 1 => proptest::sample::select(all)]
                        .prop_map(move |v| match name {
                            "" => vec![v],
                            _ => vec![name.to_owned(), v],
                        })
                        .boxed()
                }
                // `--` keeps a value that starts with `-` a value.
                Positional => value().prop_map(|v| vec![v]).boxed(),
                IntPositional => prop_oneof![12 => token_id(), 1 => value()]
                    .prop_map(|v| vec![v])
                    .boxed(),
            };
            // Commands with many flags get fewer at once, or nearly every run would stop at the
            // parser on one unparsable value.
            let absent = if many { 4 } else { 1 };
            if required.contains(&name) {
                return present;
            }
            prop_oneof![absent => Just(Vec::new()), 1 => present].boxed()
        })
        .collect();
    per_flag.prop_map(move |parts| {
        let (mut named, mut positional) = (vec![command.to_owned()], Vec::new());
        for p in parts {
            if p.len() == 1 && !p[0].starts_with("--") {
                positional.extend(p);
            } else {
                named.extend(p);
            }
        }
        if !positional.is_empty() {
            named.push("--".into());
            named.extend(positional);
        }
        named
    })
}

/// Run the binary; the exit code, or an error naming what went wrong (signal, hang).
fn run(args: &[String]) -> Result<(i32, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", empty_cache())
        .env_remove("HF_HOME")
        .env_remove("HF_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    // Drain stderr on a thread so a chatty child never blocks on a full pipe.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {TIME_LIMIT:?} (killed)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap();
    match status.code() {
        Some(c) => Ok((c, err)),
        None => Err(format!("killed by a signal ({status}); stderr: {err}")),
    }
}

fn check(command: &'static str) {
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let codes = std::sync::Mutex::new([0usize; 3]);
    runner
        .run(&args(command), |args| {
            let (code, err) =
                run(&args).map_err(|e| TestCaseError::fail(format!("{args:?}: {e}")))?;
            if let Some(n) = codes.lock().unwrap().get_mut(code as usize) {
                *n += 1;
            }
            prop_assert!(
                code == 0 || code == 1 || (code == 2 && err.contains("try '--help'")),
                "{args:?}: exit {code}; stderr: {err}"
            );
            prop_assert!(!err.contains("panicked"), "{args:?}: {err}");
            if std::env::var_os("CLI_PROPS_VERBOSE").is_some() {
                eprintln!("{code} {args:?}: {}", err.lines().next().unwrap_or(""));
            }
            if code != 0 {
                prop_assert!(
                    !err.trim().is_empty(),
                    "{args:?}: exit {code} without a message"
                );
            }
            Ok(())
        })
        .unwrap();
    // How deep the runs went: exit 0 ran, 1 was refused by the command, 2 by the parser.
    let [ok, refused, usage] = *codes.lock().unwrap();
    eprintln!("{command}: {ok} ran, {refused} refused, {usage} usage errors");
}

#[test]
fn generate_survives_any_flags() {
    check("generate");
}

#[test]
fn download_survives_any_flags() {
    check("download");
}

#[test]
fn inspect_survives_any_flags() {
    check("inspect");
}

#[test]
fn tokenize_survives_any_flags() {
    check("tokenize");
}

#[test]
fn detokenize_survives_any_flags() {
    check("detokenize");
}

#[test]
fn top_survives_any_flags() {
    check("top");
}

#[test]
fn score_survives_any_flags() {
    check("score");
}

#[test]
fn perplexity_survives_any_flags() {
    check("perplexity");
}

#[test]
fn bench_survives_any_flags() {
    check("bench");
}
