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

use super::openai::{ApiError, ApiResult};
use super::request::Message;
use serde::Deserialize;

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
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
        let bad = |msg: String| crate::Error::Config {
            path: format!("--chat-template {}", path.display()),
            msg,
        };
        let t: ChatTemplate = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "{e}; expected a JSON object {{\"message\": \"{{Role}}: {{content}}\\n\", \"generation_prompt\": \"Assistant:\", \"stop\": [\"\\nUser:\"]}}"
            ))
        })?;
        if !t.message.contains("{content}") {
            return Err(bad("\"message\" must contain {content}".into()));
        }
        Ok(t)
    }

    /// The prompt for `messages` (OpenAI's list of `{role, content}`).
    pub fn render(&self, messages: Option<&[Message]>) -> ApiResult<String> {
        let list = messages.ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
        let mut out = String::new();
        for (i, Message { role, content }) in list.iter().enumerate() {
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].role is {role:?}; expected \"system\", \"user\" or \"assistant\" (GPT-2 has no tools)"
                    ),
                ));
            }
            let mut cap = role.to_owned();
            if let Some(c) = cap.get_mut(..1) {
                c.make_ascii_uppercase();
            }
            out.push_str(
                &self
                    .message
                    .replace("{role}", role)
                    .replace("{Role}", &cap)
                    .replace("{content}", content),
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
        let m = [("system", "Be terse."), ("user", "Hi")].map(|(r, c)| Message {
            role: r.into(),
            content: c.into(),
        });
        let p = ChatTemplate::default().render(Some(&m)).unwrap();
        assert_eq!(p, "System: Be terse.\nUser: Hi\nAssistant:");
        assert!(ChatTemplate::default().render(None).is_err());
    }
}
