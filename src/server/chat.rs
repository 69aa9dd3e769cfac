//! Chat messages → one prompt. GPT-2 has no chat format, so the default is plain text:
//!
//! ```text
//! System: You are terse.
//! User: Hi
//! Assistant:
//! ```
//!
//! Each message is `message` with `{role}` (as sent, e.g. `user`), `{Role}` (capitalised) and
//! `{content}` replaced; then `generation_prompt` is appended; generation stops at any of `stop`
//! (the next turn's header). `--chat-template FILE` replaces it: a JSON object with those three
//! fields, e.g. `{"message": "<|{role}|>{content}\n", "generation_prompt": "<|assistant|>",
//! "stop": ["<|user|>"]}`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::openai::{kind_of, ApiError, ApiResult};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    pub message: String,
    pub generation_prompt: String,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for ChatTemplate {
    fn default() -> Self {
        ChatTemplate {
            message: "{Role}: {content}\n".into(),
            generation_prompt: "Assistant:".into(),
            stop: vec!["\nUser:".into(), "\nSystem:".into()],
        }
    }
}

impl ChatTemplate {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--chat-template {}: {e}", path.display()))?;
        let t: ChatTemplate = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--chat-template {}: {e}; expected a JSON object {{\"message\": \"{{Role}}: {{content}}\\n\", \"generation_prompt\": \"Assistant:\", \"stop\": [\"\\nUser:\"]}}",
                path.display()
            )
        })?;
        if !t.message.contains("{content}") {
            anyhow::bail!(
                "--chat-template {}: \"message\" must contain {{content}}",
                path.display()
            );
        }
        Ok(t)
    }

    /// The prompt for `messages` (OpenAI's list of `{role, content}`).
    pub fn render(&self, messages: Option<&Value>) -> ApiResult<String> {
        let list = match messages {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid("messages", "messages is an empty list"))
            }
            None => return Err(ApiError::invalid("messages", "messages is required")),
            Some(v) => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages must be a list of {{role, content}} objects, got {}",
                        kind_of(v)
                    ),
                ))
            }
        };
        let mut out = String::new();
        for (i, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("messages", format!("messages[{i}] needs a string \"role\""))
            })?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                // The list-of-parts form: only text parts are meaningful to GPT-2.
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    "messages",
                                    format!("messages[{i}].content: only text parts are supported"),
                                ))
                            }
                        }
                    }
                    s
                }
                Some(v) => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}].content must be a string, got {}", kind_of(v)),
                    ))
                }
            };
            let mut cap = role.to_owned();
            if let Some(c) = cap.get_mut(..1) {
                c.make_ascii_uppercase();
            }
            out.push_str(
                &self
                    .message
                    .replace("{role}", role)
                    .replace("{Role}", &cap)
                    .replace("{content}", &content),
            );
        }
        out.push_str(&self.generation_prompt);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_renders_turns() {
        let m = serde_json::json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]);
        let p = ChatTemplate::default().render(Some(&m)).unwrap();
        assert_eq!(p, "System: Be terse.\nUser: Hi\nAssistant:");
        assert!(ChatTemplate::default()
            .render(Some(&serde_json::json!([{"content": "x"}])))
            .is_err());
    }
}
