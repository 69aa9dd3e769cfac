//! Resolve a model reference to a directory: a local checkpoint directory, or a hub id, taken from the
//! standard Hugging Face cache when complete there (so a cache filled by Python tools is reused, and
//! vice versa), else downloaded into it through `hf-hub`.
//!
//! Environment, as huggingface_hub reads it: `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`,
//! `HF_HUB_OFFLINE`, `HF_TOKEN`.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::weights::{pytorch, INDEX_FILE, SINGLE_FILE};

/// The hub repository a short name stands for (the released models moved under organisations).
pub fn canonical_repo(id: &str) -> String {
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
pub fn cache_dir() -> Option<PathBuf> {
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

/// A local directory or file as it is; a hub id from the cache, or downloaded (with progress bars) unless
/// offline.
pub fn resolve(model: &str, revision: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    // A local directory or checkpoint file (or a TensorFlow prefix such as `dir/model.ckpt`).
    if path.exists() || crate::weights::tf::prefix(path).is_some() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(Error::Input(format!(
            "--model {model}: no such directory, and not a hub id (owner/name)"
        )));
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
pub fn download(cache: &Path, repo: &str, revision: &str, progress: bool) -> Result<PathBuf> {
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
    let api = api.repo(Repo::with_revision(
        repo.to_owned(),
        RepoType::Model,
        revision.to_owned(),
    ));
    let fetch = |file: &str| api.get(file).map_err(|e| format!("{file}: {e}"));
    let failed = |what: String| {
        Error::Input(format!(
            "downloading {repo} (revision {revision}) from {endpoint}: {what}"
        ))
    };

    let config = fetch("config.json").map_err(failed)?;
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
