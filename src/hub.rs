//! Resolve a model reference to a directory: a local checkpoint directory, or a hub id, taken from the
//! standard Hugging Face cache when complete there (so a cache filled by Python tools is reused, and
//! vice versa), else downloaded into it through `hf-hub`.
//!
//! Environment, as huggingface_hub reads it: `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`,
//! `HF_HUB_OFFLINE`, `HF_TOKEN`, and the timeouts `HF_HUB_ETAG_TIMEOUT` (seconds to wait for a
//! server's first answer about a file) and `HF_HUB_DOWNLOAD_TIMEOUT` (seconds a download may stall),
//! 10 each by default as there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::weights::{pytorch, INDEX_FILE, SINGLE_FILE};

/// The hub repository a short name stands for (the released models moved under organisations).
fn canonical_repo(id: &str) -> String {
    match id {
        "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" => format!("openai-community/{id}"),
        "distilgpt2" => "distilbert/distilgpt2".to_owned(),
        other => other.to_owned(),
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// The hub cache directory, as huggingface_hub finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (with `XDG_CACHE_HOME` honoured).
fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = env("HF_HUB_CACHE") {
        return Some(p.into());
    }
    if let Some(p) = env("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("huggingface").join("hub"))
}

/// `HF_HUB_OFFLINE` set to a true value.
pub fn offline() -> bool {
    env("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// A snapshot directory holds a usable checkpoint: config and all weights.
fn is_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    [
        (SINGLE_FILE, INDEX_FILE),
        (pytorch::SINGLE_FILE, pytorch::INDEX_FILE),
    ]
    .iter()
    .any(|(single, index)| dir.join(single).is_file() || index_complete(dir, index))
}

/// An index and every shard it names are in `dir`.
fn index_complete(dir: &Path, index: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(index)) else {
        return false;
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    index["weight_map"].as_object().is_some_and(|m| {
        m.values()
            .all(|f| f.as_str().is_some_and(|f| dir.join(f).is_file()))
    })
}

/// The complete snapshot of `repo` at `revision` (a branch or tag in `refs/`, or a commit hash).
fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| revision.to_owned());
    let snap = repo_dir.join("snapshots").join(commit);
    is_complete(&snap).then_some(snap)
}

fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Whether `model` names something on this machine rather than a hub id: anything that exists,
/// even a dangling or looping symlink, and anything written as a path (`./x`, `/x`, `a/b/c`).
#[doc(hidden)]
pub fn is_local(model: &str) -> bool {
    Path::new(model).symlink_metadata().is_ok()
        || model.starts_with('.')
        || model.starts_with('/')
        || !is_hub_id(model)
}

/// The error for a local `--model` that is not a usable directory.
fn local_error(model: &str) -> Error {
    let path = Path::new(model);
    let why = match (path.symlink_metadata(), std::fs::metadata(path)) {
        (Ok(_), Ok(m)) if m.is_dir() => "not readable as a directory".to_owned(),
        (Ok(_), Ok(_)) => "not a directory".to_owned(),
        (Ok(l), Err(e)) if l.file_type().is_symlink() => {
            format!("a symlink that leads to no directory: {e}")
        }
        (Ok(_) | Err(_), Err(e)) if e.kind() != std::io::ErrorKind::NotFound => e.to_string(),
        _ => "no such directory".to_owned(),
    };
    Error::Input(format!(
        "--model {model}: {why}; expected a checkpoint directory (config.json and weights) or \
         file (.bin, .gguf, a TensorFlow prefix), or a hub id such as gpt2 or owner/name"
    ))
}

/// A local directory or file as it is; a hub id from the cache, or downloaded (with progress bars) unless
/// offline.
pub fn resolve(model: &str, revision: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    // A local directory or checkpoint file (or a TensorFlow prefix such as `dir/model.ckpt`).
    if path.exists() || crate::weights::tf::prefix(path).is_some() {
        return Ok(path.to_path_buf());
    }
    if is_local(model) {
        return Err(local_error(model));
    }
    let repo = canonical_repo(model);
    let cache = cache_dir().ok_or_else(|| {
        Error::Input("no Hugging Face cache directory: set HF_HUB_CACHE or HF_HOME".into())
    })?;
    if let Some(snap) = cached(&cache, model, revision) {
        return Ok(snap);
    }
    if offline() {
        return Err(Error::Input(format!(
            "{model} (revision {revision}) is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set: \
             run `gpt2 download {model}` while online, or unset HF_HUB_OFFLINE",
            cache.display()
        )));
    }
    download(&cache, &repo, revision, true)
}

/// The complete cached snapshot of a hub id, if any (no network).
#[doc(hidden)]
pub fn find_cached(model: &str, revision: &str) -> Option<PathBuf> {
    cached(&cache_dir()?, model, revision)
}

/// The cached snapshot under the canonical name or the short name's legacy folder (`models--gpt2`).
fn cached(cache: &Path, model: &str, revision: &str) -> Option<PathBuf> {
    let repo = canonical_repo(model);
    cached_snapshot(cache, &repo, revision).or_else(|| cached_snapshot(cache, model, revision))
}

/// Download what a model needs (config, safetensors weights or else PyTorch's `pytorch_model.bin`,
/// tokenizer files when the repo has them)
/// into `cache`; return the snapshot directory. Files already cached are not fetched again.
fn download(cache: &Path, repo: &str, revision: &str, progress: bool) -> Result<PathBuf> {
    let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(endpoint.trim_end_matches('/').to_owned())
        .with_progress(progress)
        .with_retries(2);
    if let Some(token) = env("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| Error::Input(format!("cannot start the Hub client: {e}")))?;
    let timeouts = Timeouts::from_env()?;
    let hub_repo = Repo::with_revision(repo.to_owned(), RepoType::Model, revision.to_owned());
    let cached = Cache::new(cache.to_path_buf()).repo(hub_repo.clone());
    let fetch = |file: &str| -> std::result::Result<PathBuf, Fetch> {
        match cached.get(file) {
            Some(p) => Ok(p),
            None => fetch_watched(&api, &hub_repo, file, progress, timeouts),
        }
    };
    let failed = |what: String| {
        Error::Input(format!(
            "downloading {repo} (revision {revision}) from {endpoint}: {what}"
        ))
    };

    // The first request says whether the Hub can be reached at all; if not, say what to do instead.
    let config = fetch("config.json").map_err(|f| {
        let hint = if f.unreachable { NO_NETWORK_HINT } else { "" };
        failed(format!("{}{hint}", f.msg))
    })?;
    let fetch = |file: &str| fetch(file).map_err(|f| f.msg);
    let snapshot = config.parent().expect("a file in a snapshot").to_path_buf();
    // Weights: one file, else an index and its shards; safetensors, else PyTorch's .bin.
    let weights = |single: &str, index: &str| -> std::result::Result<(), String> {
        let Err(e1) = fetch(single) else {
            return Ok(());
        };
        let index = fetch(index).map_err(|e2| format!("{e1}; {e2}"))?;
        let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a valid index: {e}", index.display()))?;
        let mut shards: Vec<&str> = parsed["weight_map"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, f)| f.as_str())
            .collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            fetch(shard)?;
        }
        Ok(())
    };
    if let Err(st) = weights(SINGLE_FILE, INDEX_FILE) {
        weights(pytorch::SINGLE_FILE, pytorch::INDEX_FILE)
            .map_err(|pt| failed(format!("no usable weights: {st}; {pt}")))?;
    }
    // Tokenizer files are optional: the built-in GPT-2 vocabulary serves without them.
    if fetch("vocab.json").is_ok() {
        fetch("merges.txt").map_err(failed)?;
    } else {
        let _ = fetch("tokenizer.json");
    }
    if !is_complete(&snapshot) {
        return Err(failed(format!(
            "the snapshot at {} is incomplete after downloading",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// What to do when the Hub cannot be reached.
const NO_NETWORK_HINT: &str =
    "\nno network? `gpt2 bench --random gpt2` and `gpt2 serve --random gpt2` need no download; \
     from a checkout, `--model tests/fixtures/models/full-vocab-f16` is a small local model with \
     GPT-2's vocabulary (64 positions); or fetch config.json, model.safetensors, vocab.json and \
     merges.txt elsewhere and pass `--model DIR`";

/// `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`, as huggingface_hub reads them.
#[derive(Clone, Copy)]
struct Timeouts {
    /// From the request to the server's first answer about a file (its size and etag).
    first_answer: Duration,
    /// The longest pause in a download's progress.
    stall: Duration,
}

impl Timeouts {
    fn from_env() -> Result<Self> {
        let secs = |k: &str| -> Result<Duration> {
            match env(k) {
                None => Ok(Duration::from_secs(10)),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        Error::Input(format!("{k}={v:?}: expected a positive number of seconds"))
                    }),
            }
        };
        Ok(Timeouts {
            first_answer: secs("HF_HUB_ETAG_TIMEOUT")?,
            stall: secs("HF_HUB_DOWNLOAD_TIMEOUT")?,
        })
    }
}

/// A failed fetch: the message, and whether the Hub could not be reached at all (no network, no
/// answer) as opposed to answering with an error.
struct Fetch {
    msg: String,
    unreachable: bool,
}

/// A progress sink that also counts activity for the watchdog in [`fetch_watched`].
struct Watched<P> {
    inner: P,
    ticks: Arc<AtomicU64>,
}

impl<P: Progress> Progress for Watched<P> {
    fn init(&mut self, size: usize, filename: &str) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        self.inner.init(size, filename);
    }
    fn update(&mut self, size: usize) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        self.inner.update(size);
    }
    fn finish(&mut self) {
        self.inner.finish();
    }
}

/// Download one file with timeouts. hf-hub's client has no timeout settings (a server that accepts
/// and never answers hung us for ever), so the download runs on its own thread while this one watches
/// its progress: no first answer within `first_answer`, or no progress for `stall`, is an error.
/// The stalled thread is left blocked on its socket; it holds no lock of ours and ends with the
/// process.
fn fetch_watched(
    api: &Api,
    repo: &Repo,
    file: &str,
    progress: bool,
    t: Timeouts,
) -> std::result::Result<PathBuf, Fetch> {
    let ticks = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let (api, repo, name, watch) = (api.clone(), repo.clone(), file.to_owned(), ticks.clone());
    std::thread::spawn(move || {
        let repo = api.repo(repo);
        let r = if progress {
            let inner = indicatif::ProgressBar::new(0);
            repo.download_with_progress(
                &name,
                Watched {
                    inner,
                    ticks: watch,
                },
            )
        } else {
            repo.download_with_progress(
                &name,
                Watched {
                    inner: (),
                    ticks: watch,
                },
            )
        };
        let _ = tx.send(r);
    });
    let (mut seen, mut deadline) = (0, Instant::now() + t.first_answer);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(p)) => return Ok(p),
            Ok(Err(e)) => {
                return Err(Fetch {
                    unreachable: is_unreachable(&e),
                    msg: format!("{file}: {e}"),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Fetch {
                    msg: format!("{file}: the download thread ended without a result"),
                    unreachable: false,
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = ticks.load(Ordering::Relaxed);
                if now != seen {
                    (seen, deadline) = (now, Instant::now() + t.stall);
                } else if Instant::now() >= deadline {
                    let msg = if seen == 0 {
                        format!(
                            "{file}: no answer from the server within {:?} (HF_HUB_ETAG_TIMEOUT)",
                            t.first_answer
                        )
                    } else {
                        format!(
                            "{file}: the download stalled for {:?} (HF_HUB_DOWNLOAD_TIMEOUT)",
                            t.stall
                        )
                    };
                    return Err(Fetch {
                        msg,
                        unreachable: seen == 0,
                    });
                }
            }
        }
    }
}

/// No connection at all (DNS, refused, unreachable), as opposed to an HTTP error status. (ureq is
/// not a dependency of ours by name, so its two kinds are told apart by ureq 2's message for a
/// status, `<url>: status code <n>`.)
fn is_unreachable(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(e) => !e.to_string().contains(": status code "),
        ApiError::TooManyRetries(e) => is_unreachable(e),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_complete_snapshots_in_the_hub_cache_layout() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--openai-community--gpt2");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        // No weights yet: an interrupted download is not a model.
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "main"),
            None
        );
        std::fs::write(
            snap.join(INDEX_FILE),
            r#"{"weight_map":{"a":"s1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "main"),
            None
        );
        std::fs::write(snap.join("s1.safetensors"), "").unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "main"),
            Some(snap.clone())
        );
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "abc123"),
            Some(snap.clone())
        );
        assert_eq!(cached(cache.path(), "gpt2", "main"), Some(snap));
        assert_eq!(canonical_repo("distilgpt2"), "distilbert/distilgpt2");
        assert!(
            is_hub_id("owner/name-1.5")
                && !is_hub_id("../x")
                && !is_hub_id("a/b/c")
                && !is_hub_id("")
        );
    }
}
