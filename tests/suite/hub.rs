//! Hub downloads against a local HTTP server on loopback that serves fixture repositories in the
//! Hub's URL layout (`/{owner}/{name}/resolve/{revision}/{file}`), through the `gpt2` binary with the
//! environment a user would set.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::fixture_dir;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files of one repository, and which file (if any) the server cuts short.
struct Repo {
    files: HashMap<String, Vec<u8>>,
    truncate: Option<String>,
}

fn fnv(data: &[u8]) -> String {
    let mut h = 0xcbf29ce484222325u64;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn respond(mut s: TcpStream, repos: &HashMap<String, Repo>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut range: Option<(usize, Option<usize>)> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap();
            range = Some((a.parse().unwrap(), b.parse().ok()));
        }
    }
    // /{owner}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let found = (parts.len() == 5 && parts[2] == "resolve")
        .then(|| {
            repos
                .get(&format!("{}/{}", parts[0], parts[1]))
                .map(|r| (r, r.files.get(parts[4])))
        })
        .flatten();
    let (repo, body) = match found {
        Some((repo, Some(body))) => (repo, body),
        _ => {
            let msg = "Entry not found";
            let _ = write!(
                s,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            );
            return;
        }
    };
    let total = body.len();
    let (start, end) = match range {
        Some((a, b)) => (a.min(total), b.map_or(total, |b| (b + 1).min(total))),
        None => (0, total),
    };
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\netag: \"{}\"\r\n\
         x-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end - start,
        end.saturating_sub(1),
        fnv(body)
    );
    let cut = repo.truncate.as_deref() == Some(parts[4]) && end - start > 1;
    // An interrupted transfer: half the promised bytes, then the connection drops.
    let send = if cut {
        &body[start..start + (end - start) / 2]
    } else {
        &body[start..end]
    };
    let _ = s.write_all(send);
}

/// Serve `repos` on a loopback port; returns the endpoint URL. The server lives until the test ends.
fn serve(repos: HashMap<String, Repo>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let repos = Arc::new(repos);
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let repos = repos.clone();
            std::thread::spawn(move || respond(s, &repos));
        }
    });
    format!("http://{addr}")
}

/// A loopback address where nothing listens: any request fails at once.
fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

/// A loopback server that accepts connections and never answers (the requests hang on a socket).
fn silent_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    format!("http://{addr}")
}

/// A loopback server that answers each file's metadata request (a 100-byte file), then sends 10
/// bytes of the download and stalls.
fn stalling_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut metadata = false;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    metadata |= h.to_ascii_lowercase().trim() == "range: bytes=0-0";
                }
                let len = if metadata { 1 } else { 100 };
                let _ = write!(
                    s,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {len}\r\n\
                     Content-Range: bytes 0-{}/100\r\netag: \"e\"\r\nx-repo-commit: {COMMIT}\r\n\r\n",
                    len - 1
                );
                let _ = s.write_all(&[b'{'; 10][..len.min(10)]);
                let _ = s.flush();
                std::thread::sleep(Duration::from_secs(120));
            });
        }
    });
    format!("http://{addr}")
}

fn repo_from(dir: &Path, extra: &[(&str, &[u8])], truncate: Option<&str>) -> Repo {
    let mut files = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        if name != "reference.safetensors" {
            files.insert(name, std::fs::read(&p).unwrap());
        }
    }
    for (n, b) in extra {
        files.insert((*n).to_owned(), b.to_vec());
    }
    Repo {
        files,
        truncate: truncate.map(str::to_owned),
    }
}

fn gpt2(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2"));
    c.args(args);
    for k in [
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_HUB_DOWNLOAD_TIMEOUT",
    ] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().unwrap()
}

fn ok_path(out: Output) -> PathBuf {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(v["path"].as_str().unwrap())
}

fn err(out: Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn repos() -> HashMap<String, Repo> {
    let vocab = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/gpt2/encoder.json"
    ))
    .unwrap();
    let merges = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/gpt2/vocab.bpe"
    ))
    .unwrap();
    let tiny = fixture_dir("full-vocab-f16");
    let mut m = HashMap::new();
    m.insert(
        "test-org/tiny".into(),
        repo_from(
            &tiny,
            &[("vocab.json", &vocab), ("merges.txt", &merges)],
            None,
        ),
    );
    m.insert(
        "test-org/sharded".into(),
        repo_from(&fixture_dir("sharded"), &[], None),
    );
    m.insert(
        "test-org/broken".into(),
        repo_from(&tiny, &[], Some("model.safetensors")),
    );
    let mut no_weights = repo_from(&tiny, &[], None);
    no_weights.files.remove("model.safetensors");
    m.insert("test-org/no-weights".into(), no_weights);
    // Only PyTorch weights, single and sharded (a bare safetensors name must not be taken).
    let formats = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/formats/");
    let mut bin = repo_from(Path::new(&format!("{formats}pytorch")), &[], None);
    for f in ["legacy.bin", "f16.bin", "bf16.bin"] {
        bin.files.remove(f);
    }
    m.insert("test-org/bin".into(), bin);
    m.insert(
        "test-org/bin-sharded".into(),
        repo_from(Path::new(&format!("{formats}pytorch-sharded")), &[], None),
    );
    let mut no_config = repo_from(&tiny, &[], None);
    no_config.files.remove("config.json");
    m.insert("test-org/no-config".into(), no_config);
    m
}

#[test]
fn download_then_cache_hit_without_network_then_offline() {
    let endpoint = serve(repos());
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", c)];
    let path = ok_path(gpt2(&["download", "test-org/tiny", "--json"], &env));
    // The standard cache layout, as huggingface_hub writes it.
    assert_eq!(
        path,
        cache
            .path()
            .join("models--test-org--tiny/snapshots")
            .join(COMMIT)
    );
    assert_eq!(
        std::fs::read_to_string(cache.path().join("models--test-org--tiny/refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    for f in [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    ] {
        let want = std::fs::read(fixture_dir("full-vocab-f16").join(f)).ok();
        let got = std::fs::read(path.join(f)).unwrap();
        if let Some(w) = want {
            assert_eq!(got, w, "{f}");
        }
    }

    // Nothing listens at this endpoint: the cache alone must serve.
    let dead = dead_endpoint();
    let env = [("HF_ENDPOINT", dead.as_str()), ("HF_HUB_CACHE", c)];
    assert_eq!(
        ok_path(gpt2(&["download", "test-org/tiny", "--json"], &env)),
        path
    );
    let out = gpt2(
        &[
            "generate",
            "-m",
            "test-org/tiny",
            "-p",
            "Hello",
            "-n",
            "3",
            "--greedy",
            "--json",
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Offline: a cached model works, a missing one is a clear error.
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", c),
        ("HF_HUB_OFFLINE", "1"),
    ];
    assert_eq!(
        ok_path(gpt2(&["download", "test-org/tiny", "--json"], &env)),
        path
    );
    let e = err(gpt2(&["download", "test-org/sharded"], &env));
    assert!(
        e.contains("not in the Hugging Face cache")
            && e.contains("HF_HUB_OFFLINE")
            && e.contains("gpt2 download test-org/sharded"),
        "{e}"
    );

    // A sharded repository: the index and every shard.
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", c)];
    let sharded = ok_path(gpt2(&["download", "test-org/sharded", "--json"], &env));
    assert!(sharded.join("model-00007-of-00007.safetensors").is_file());
    gpt2::Model::load(&sharded).unwrap();
}

#[test]
fn missing_files_are_clear_errors() {
    let endpoint = serve(repos());
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
    ];
    let e = err(gpt2(&["download", "test-org/no-config"], &env));
    assert!(e.contains("config.json") && e.contains("404"), "{e}");
    let e = err(gpt2(&["download", "test-org/no-weights"], &env));
    assert!(
        e.contains("no usable weights")
            && e.contains("model.safetensors")
            && e.contains("pytorch_model.bin"),
        "{e}"
    );
    let e = err(gpt2(&["download", "test-org/does-not-exist"], &env));
    assert!(e.contains("404"), "{e}");
}

#[test]
fn an_interrupted_download_leaves_no_corrupt_file() {
    let endpoint = serve(repos());
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", c)];
    let e = err(gpt2(&["download", "test-org/broken"], &env));
    assert!(e.contains("model.safetensors"), "{e}");
    // Whatever reached the snapshot is complete and correct; the weights are not there.
    let snap = cache
        .path()
        .join("models--test-org--broken/snapshots")
        .join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    for f in std::fs::read_dir(&snap).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            std::fs::read(&f).unwrap(),
            std::fs::read(fixture_dir("full-vocab-f16").join(&name)).unwrap(),
            "{name}"
        );
    }
    // Offline, the incomplete snapshot is not taken for a model.
    let offline = [("HF_HUB_CACHE", c), ("HF_HUB_OFFLINE", "1")];
    assert!(err(gpt2(&["download", "test-org/broken"], &offline))
        .contains("not in the Hugging Face cache"));
}

#[test]
fn hf_home_is_honoured() {
    let endpoint = serve(repos());
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HOME", home.path().to_str().unwrap()),
    ];
    let path = ok_path(gpt2(&["download", "test-org/tiny", "--json"], &env));
    assert!(path.starts_with(home.path().join("hub/models--test-org--tiny")));
    // And a local directory is used as it is, never looked up.
    let local = fixture_dir("openai-f32");
    let out = gpt2(
        &["inspect", "-m", local.to_str().unwrap(), "--json"],
        &[("HF_ENDPOINT", "http://127.0.0.1:9")],
    );
    assert!(out.status.success());
}

#[test]
fn the_server_speaks_the_hub_protocol() {
    // Guard for the fixture server itself: a range request gets 206 with a Content-Range.
    let endpoint = serve(repos());
    let addr = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /test-org/tiny/resolve/main/config.json HTTP/1.1\r\nRange: bytes=0-0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 206")
            && resp.contains("Content-Range: bytes 0-0/")
            && resp.contains(COMMIT),
        "{resp}"
    );
}

#[test]
fn a_server_that_never_answers_is_a_timeout_not_a_hang() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let silent = silent_endpoint();
    let start = std::time::Instant::now();
    let e = err(gpt2(
        &["download", "gpt2"],
        &[
            ("HF_ENDPOINT", silent.as_str()),
            ("HF_HUB_CACHE", c),
            ("HF_HUB_ETAG_TIMEOUT", "1"),
        ],
    ));
    let took = start.elapsed();
    assert!(
        e.contains("config.json: no answer from the server within 1s (HF_HUB_ETAG_TIMEOUT)"),
        "{e}"
    );
    assert!(e.contains("no network?"), "a next step is suggested: {e}");
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // An answer, then a download that stops moving.
    let stalling = stalling_endpoint();
    let start = std::time::Instant::now();
    let e = err(gpt2(
        &["download", "gpt2"],
        &[
            ("HF_ENDPOINT", stalling.as_str()),
            ("HF_HUB_CACHE", c),
            ("HF_HUB_ETAG_TIMEOUT", "1"),
            ("HF_HUB_DOWNLOAD_TIMEOUT", "1"),
        ],
    ));
    let took = start.elapsed();
    assert!(
        e.contains("config.json: the download stalled for 1s (HF_HUB_DOWNLOAD_TIMEOUT)"),
        "{e}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");

    let e = err(gpt2(
        &["download", "gpt2"],
        &[("HF_HUB_CACHE", c), ("HF_HUB_DOWNLOAD_TIMEOUT", "soon")],
    ));
    assert!(
        e.contains("HF_HUB_DOWNLOAD_TIMEOUT=\"soon\": expected a positive number of seconds"),
        "{e}"
    );
}

#[test]
fn no_network_errors_say_what_to_do() {
    let cache = tempfile::tempdir().unwrap();
    let dead = dead_endpoint();
    let e = err(gpt2(
        &["generate", "--prompt", "Hello"],
        &[
            ("HF_ENDPOINT", dead.as_str()),
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ],
    ));
    assert!(
        e.contains("no network?")
            && e.contains("gpt2 bench --random gpt2")
            && e.contains("gpt2 serve --random gpt2")
            && e.contains("--model tests/fixtures/models/full-vocab-f16")
            && !e.contains("openai-f32")
            && e.contains("--model DIR"),
        "{e}"
    );
    // A server that answers "not found" is not a network problem.
    let endpoint = serve(repos());
    let e = err(gpt2(
        &["download", "test-org/does-not-exist"],
        &[
            ("HF_ENDPOINT", endpoint.as_str()),
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ],
    ));
    assert!(e.contains("404") && !e.contains("no network?"), "{e}");
}

#[test]
fn local_looking_models_are_never_hub_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::os::unix::fs::symlink(d.join("loop_b"), d.join("loop_a")).unwrap();
    std::os::unix::fs::symlink(d.join("loop_a"), d.join("loop_b")).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
    std::fs::write(d.join("file"), "x").unwrap();
    let dead = dead_endpoint();
    let env = [
        ("HF_ENDPOINT", dead.as_str()),
        ("HF_HUB_CACHE", d.to_str().unwrap()),
    ];
    let run = |model: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2"));
        c.current_dir(d)
            .args(["inspect", "--model", model])
            .env_remove("HF_HUB_OFFLINE")
            .envs(env);
        err(c.output().unwrap())
    };
    for (model, want) in [
        ("loop_a", "a symlink that leads to no directory"),
        ("dangling", "a symlink that leads to no directory"),
        // A file is a checkpoint file to read (issue 20), and this one is none.
        ("file", "not a checkpoint this engine reads"),
        ("./missing", "no such directory"),
        ("/nonexistent/model", "no such directory"),
        ("a/b/c", "no such directory"),
    ] {
        let e = run(model);
        assert!(
            (e.contains(&format!("--model {model}: {want}"))
                || (model == "file" && e.contains(want)))
                && !e.contains("downloading"),
            "{model}: {e}"
        );
    }
}

#[test]
fn repos_without_safetensors_fall_back_to_pytorch_bin() {
    let endpoint = serve(repos());
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", c)];
    let formats = fixture_dir("../formats");
    let want = gpt2::Model::load(&formats.join("tiny")).unwrap();
    for (repo, file) in [
        ("test-org/bin", "pytorch_model.bin"),
        ("test-org/bin-sharded", "pytorch_model-00002-of-00002.bin"),
    ] {
        let path = ok_path(gpt2(&["download", repo, "--json"], &env));
        assert!(path.join(file).is_file(), "{repo}");
        let got = gpt2::Model::load(&path).unwrap();
        let ids = [1u32, 5, 260, 7];
        let run = |m: &gpt2::Model| {
            let mut st = m.new_state(1, ids.len()).unwrap();
            let seq = [gpt2::SeqInput {
                slot: 0,
                tokens: &ids,
            }];
            m.forward(&mut st, &seq, gpt2::Logits::All)
                .unwrap()
                .to_vec()
        };
        assert_eq!(run(&got), run(&want), "{repo}");
        // Cached now: found again with no network.
        let dead = dead_endpoint();
        let env = [("HF_ENDPOINT", dead.as_str()), ("HF_HUB_CACHE", c)];
        assert_eq!(ok_path(gpt2(&["download", repo, "--json"], &env)), path);
    }
}
