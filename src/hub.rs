//! Resolve a model reference to a directory: a local checkpoint directory, or a hub id already in the
//! standard Hugging Face cache (so a cache filled by Python tools is reused).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub repository a short name stands for (the released models moved under organisations).
pub fn canonical_repo(id: &str) -> String {
    match id {
        "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" => format!("openai-community/{id}"),
        "distilgpt2" => "distilbert/distilgpt2".to_owned(),
        other => other.to_owned(),
    }
}

/// The hub cache directory, as huggingface_hub finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (with `XDG_CACHE_HOME` honoured).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return Some(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Some(p.join("hub"));
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))?;
    Some(cache.join("huggingface").join("hub"))
}

/// The snapshot of `repo` at `revision` (a branch or tag in `refs/`, or a commit hash) in `cache`.
fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| revision.to_owned());
    let snap = repo_dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// A local directory as it is; otherwise a hub id looked up in the local cache.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Input(format!(
            "--model {model}: not a directory (expected a checkpoint directory holding config.json and model.safetensors, or a hub id)"
        )));
    }
    let repo = canonical_repo(model);
    let looks_like_id = repo.split('/').count() <= 2 && !repo.is_empty() && !repo.starts_with('.');
    if looks_like_id {
        if let Some(cache) = cache_dir() {
            // The short name's legacy cache folder (`models--gpt2`) is tried too.
            for r in [repo.as_str(), model] {
                if let Some(snap) = cached_snapshot(&cache, r, "main") {
                    return Ok(snap);
                }
            }
        }
    }
    Err(Error::Input(format!(
        "--model {model}: no such directory, and not found in the Hugging Face cache ({}). \
         Download it first, e.g. `huggingface-cli download {repo} config.json model.safetensors vocab.json merges.txt`, \
         or pass a local checkpoint directory",
        cache_dir().map(|p| p.display().to_string()).unwrap_or_else(|| "no cache directory".into())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_snapshot_in_the_hub_cache_layout() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--openai-community--gpt2");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "main"),
            None
        );
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "main"),
            Some(snap.clone())
        );
        assert_eq!(
            cached_snapshot(cache.path(), "openai-community/gpt2", "abc123"),
            Some(snap)
        );
        assert_eq!(canonical_repo("distilgpt2"), "distilbert/distilgpt2");
    }
}
