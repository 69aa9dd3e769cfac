//! Requests as typed serde structs: every field an endpoint reads, with the JSON type it must have.
//! A body is read once into a JSON object and deserialized into the structs of its endpoint
//! ([`Common`] and [`Completion`] or [`Chat`]); a field of the wrong type is a 400 naming it
//! (`param`, by `serde_path_to_error`). `null` counts as absent, as in OpenAI's API; unknown fields
//! (`user`, `metadata`) are accepted. What a field's value means (ranges, fields that need each
//! other, limits of this server) is checked by [`Settings::validate`].

use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde::Deserialize;
use serde_json::Value;

use crate::generate::{ConstraintSpec, EarlyStopping};
use crate::sampling::SamplingParams;

use super::openai::{ApiError, ApiResult};

/// A chat request's `max_tokens` when it gives none (`max_tokens` and `max_completion_tokens`
/// absent): at most this many tokens, and at most what the context leaves after the prompt.
pub const CHAT_DEFAULT_MAX_TOKENS: usize = 256;

/// The most stop strings a request may give.
pub const MAX_STOPS: usize = 16;

/// Deserialize `T` from a request's JSON object; a wrong field is a 400 with `param` set to it.
pub fn parse<T: DeserializeOwned>(body: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        // `messages[2].content` is about `messages`.
        let param = path
            .split(['.', '['])
            .next()
            .filter(|p| !p.is_empty() && *p != "?")
            .map(str::to_owned);
        let msg = e.into_inner().to_string();
        let message = match &param {
            Some(_) if msg.starts_with("must") || msg.starts_with("is ") => format!("{path} {msg}"),
            Some(_) => format!("{path}: {msg}"),
            None => msg,
        };
        ApiError {
            param,
            ..ApiError::new(axum::http::StatusCode::BAD_REQUEST, message)
        }
    })
}

/// The fields both completions and chat read.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Common {
    #[serde(deserialize_with = "string")]
    pub model: Option<String>,
    #[serde(deserialize_with = "count")]
    pub n: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub best_of: Option<u64>,
    #[serde(deserialize_with = "flag")]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[serde(deserialize_with = "number")]
    pub temperature: Option<f64>,
    #[serde(deserialize_with = "number")]
    pub top_p: Option<f64>,
    #[serde(deserialize_with = "integer")]
    pub top_k: Option<i128>,
    #[serde(deserialize_with = "number")]
    pub min_p: Option<f64>,
    #[serde(deserialize_with = "number")]
    pub repetition_penalty: Option<f64>,
    #[serde(deserialize_with = "number")]
    pub frequency_penalty: Option<f64>,
    #[serde(deserialize_with = "number")]
    pub presence_penalty: Option<f64>,
    #[serde(deserialize_with = "integer")]
    pub seed: Option<i128>,
    #[serde(deserialize_with = "stop")]
    pub stop: Option<Vec<String>>,
    #[serde(deserialize_with = "logit_bias")]
    pub logit_bias: Option<Vec<(u32, f32)>>,
    #[serde(deserialize_with = "flag")]
    pub ignore_eos: Option<bool>,
    #[serde(deserialize_with = "response_format")]
    pub response_format: Option<ResponseFormat>,
    // Structured output: vLLM's guided decoding fields, llama-server's.
    #[serde(deserialize_with = "schema_or_string")]
    pub guided_json: Option<Value>,
    #[serde(deserialize_with = "string")]
    pub guided_regex: Option<String>,
    #[serde(deserialize_with = "string_list")]
    pub guided_choice: Option<Vec<String>>,
    #[serde(deserialize_with = "string")]
    pub guided_grammar: Option<String>,
    #[serde(deserialize_with = "string")]
    pub guided_whitespace_pattern: Option<String>,
    #[serde(deserialize_with = "schema")]
    pub json_schema: Option<Value>,
    #[serde(deserialize_with = "string")]
    pub grammar: Option<String>,
    // vLLM's extensions.
    #[serde(deserialize_with = "token_list")]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(deserialize_with = "count")]
    pub min_tokens: Option<u64>,
    #[serde(deserialize_with = "flag")]
    pub include_stop_str_in_output: Option<bool>,
    #[serde(deserialize_with = "flag")]
    pub skip_special_tokens: Option<bool>,
    #[serde(deserialize_with = "count")]
    pub truncate_prompt_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub no_repeat_ngram_size: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub prompt_logprobs: Option<u64>,
    #[serde(deserialize_with = "flag")]
    pub use_beam_search: Option<bool>,
    #[serde(deserialize_with = "number")]
    pub length_penalty: Option<f64>,
    #[serde(deserialize_with = "early_stopping")]
    pub early_stopping: Option<EarlyStopping>,
}

/// `early_stopping`: true, false or "never" (transformers' beam search).
fn early_stopping<'de, D: Deserializer<'de>>(d: D) -> Result<Option<EarlyStopping>, D::Error> {
    match present(d)? {
        None => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(EarlyStopping::True)),
        Some(Value::Bool(false)) => Ok(Some(EarlyStopping::False)),
        Some(Value::String(s)) if s == "never" => Ok(Some(EarlyStopping::Never)),
        Some(v) => Err(D::Error::custom(format!(
            "must be true, false or \"never\", got {v}"
        ))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StreamOptions {
    #[serde(deserialize_with = "flag")]
    pub include_usage: Option<bool>,
}

/// `/v1/completions`' own fields.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Completion {
    #[serde(deserialize_with = "prompt")]
    pub prompt: Option<Vec<PromptIn>>,
    #[serde(deserialize_with = "string")]
    pub suffix: Option<String>,
    #[serde(deserialize_with = "flag")]
    pub echo: Option<bool>,
    #[serde(deserialize_with = "count")]
    pub logprobs: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub max_tokens: Option<u64>,
}

/// `/v1/chat/completions`' own fields.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Chat {
    #[serde(deserialize_with = "messages")]
    pub messages: Option<Vec<Message>>,
    #[serde(deserialize_with = "flag")]
    pub logprobs: Option<bool>,
    #[serde(deserialize_with = "count")]
    pub top_logprobs: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub max_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    pub max_completion_tokens: Option<u64>,
    /// Tools and the legacy functions: GPT-2 has none, so only their absence is accepted.
    #[serde(deserialize_with = "any")]
    pub tools: Option<Value>,
    #[serde(deserialize_with = "any")]
    pub functions: Option<Value>,
    #[serde(deserialize_with = "any")]
    pub tool_choice: Option<Value>,
    #[serde(deserialize_with = "any")]
    pub function_call: Option<Value>,
}

/// `/v1/embeddings` (OpenAI's fields, and `pooling`: `"mean"` or `"last"`).
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Embeddings {
    #[serde(deserialize_with = "string")]
    pub model: Option<String>,
    #[serde(deserialize_with = "prompt")]
    pub input: Option<Vec<PromptIn>>,
    #[serde(deserialize_with = "string")]
    pub encoding_format: Option<String>,
    #[serde(deserialize_with = "count")]
    pub dimensions: Option<u64>,
    #[serde(deserialize_with = "string")]
    pub pooling: Option<String>,
}

/// vLLM's `/tokenize`: a prompt or chat messages.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Tokenize {
    #[serde(deserialize_with = "string")]
    pub model: Option<String>,
    #[serde(deserialize_with = "string")]
    pub prompt: Option<String>,
    #[serde(deserialize_with = "messages")]
    pub messages: Option<Vec<Message>>,
}

/// vLLM's `/detokenize`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Detokenize {
    #[serde(deserialize_with = "string")]
    pub model: Option<String>,
    #[serde(deserialize_with = "token_list")]
    pub tokens: Option<Vec<u32>>,
}

/// One prompt as given: text, or token ids (checked against the vocabulary by `validate`).
pub enum PromptIn {
    Text(String),
    Ids(Vec<u64>),
}

/// A chat message; content given as a list of parts is joined (only text parts mean anything to
/// GPT-2).
#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, deserialize_with = "content")]
    pub content: String,
}

/// What kind of JSON value `v` is, for error messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// Field readers: each takes the field's JSON value (`null` → absent) and says what it expected.

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(Some(Value::deserialize(d)?).filter(|v| !v.is_null()))
}

fn any<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    present(d)
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    present(d)?
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| D::Error::custom(format!("must be a number, got {}", kind_of(&v))))
        })
        .transpose()
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    present(d)?
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| D::Error::custom(format!("must be a non-negative integer, got {v}")))
        })
        .transpose()
}

fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
    present(d)?
        .map(|v| {
            v.as_i64()
                .map(i128::from)
                .or_else(|| v.as_u64().map(i128::from))
                .ok_or_else(|| D::Error::custom(format!("must be an integer, got {v}")))
        })
        .transpose()
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    present(d)?
        .map(|v| {
            v.as_bool().ok_or_else(|| {
                D::Error::custom(format!("must be true or false, got {}", kind_of(&v)))
            })
        })
        .transpose()
}

fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    present(d)?
        .map(|v| match v {
            Value::String(s) => Ok(s),
            v => Err(D::Error::custom(format!(
                "must be a string, got {}",
                kind_of(&v)
            ))),
        })
        .transpose()
}

/// `stop`: a string or a list of up to [`MAX_STOPS`] strings; empty strings are dropped (OpenAI's
/// clients send "" for none).
fn stop<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let bad = || D::Error::custom("must be a string or a list of strings");
    let Some(v) = present(d)? else {
        return Ok(None);
    };
    let list = match v {
        Value::String(s) => vec![s],
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if list.len() > MAX_STOPS {
        return Err(D::Error::custom(format!(
            "is a list of {} strings; at most {MAX_STOPS} are taken",
            list.len()
        )));
    }
    Ok(Some(list.into_iter().filter(|s| !s.is_empty()).collect()))
}

/// `logit_bias`: token id (as a string) → bias from -100 to 100.
fn logit_bias<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<(u32, f32)>>, D::Error> {
    let m = match present(d)? {
        None => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(D::Error::custom(format!(
                "must be an object of token id → bias, got {}",
                kind_of(&v)
            )))
        }
    };
    m.into_iter()
        .map(|(k, v)| {
            let id = k.parse::<u32>().map_err(|_| {
                D::Error::custom(format!(
                    "must map token ids to biases; key {k:?} is not a token id"
                ))
            })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "must map token ids to numbers from -100 to 100; token {k} has {v}"
                    ))
                })?;
            Ok((id, b as f32))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    /// `json_schema.schema`.
    JsonSchema(Value),
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema",
/// "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`; llama-server's
/// `{"type": "json_object", "schema": {...}}` is the schema's constraint.
fn response_format<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ResponseFormat>, D::Error> {
    let o = match present(d)? {
        None => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(v) => {
            return Err(D::Error::custom(format!(
                "must be an object, got {}",
                kind_of(&v)
            )))
        }
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(ResponseFormat::Text)),
        Some("json_object") => match o.get("schema") {
            None | Some(Value::Null) => Ok(Some(ResponseFormat::JsonObject)),
            Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                Ok(Some(ResponseFormat::JsonSchema(s.clone())))
            }
            Some(v) => Err(D::Error::custom(format!(
                "of type \"json_object\" takes its schema as an object, got {}",
                kind_of(v)
            ))),
        },
        Some("json_schema") => match o.get("json_schema").and_then(|j| j.get("schema")) {
            Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                Ok(Some(ResponseFormat::JsonSchema(s.clone())))
            }
            _ => Err(D::Error::custom(
                "of type \"json_schema\" must hold the schema as an object in json_schema.schema",
            )),
        },
        Some(t) => Err(D::Error::custom(format!(
            "type {t:?} is not one of \"text\", \"json_object\", \"json_schema\""
        ))),
        None => Err(D::Error::custom(
            "must be an object with a string \"type\", e.g. {\"type\": \"json_object\"}",
        )),
    }
}

/// A JSON schema: an object (or `true` / `false`).
fn schema<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    match present(d)? {
        None => Ok(None),
        Some(v @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(v)),
        Some(v) => Err(D::Error::custom(format!(
            "must be a JSON schema (an object), got {}",
            kind_of(&v)
        ))),
    }
}

/// vLLM's `guided_json`: a schema, or a string holding one.
fn schema_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    match present(d)? {
        None => Ok(None),
        Some(v @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(v)),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(v)),
            Ok(v) => Err(D::Error::custom(format!(
                "must be a JSON schema (an object, or a string holding one); the string holds {}",
                kind_of(&v)
            ))),
            Err(e) => Err(D::Error::custom(format!(
                "must be a JSON schema (an object, or a string holding one); the string is not JSON: {e}"
            ))),
        },
        Some(v) => Err(D::Error::custom(format!(
            "must be a JSON schema (an object, or a string holding one), got {}",
            kind_of(&v)
        ))),
    }
}

/// A non-empty list of strings (vLLM's `guided_choice`).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let bad = || D::Error::custom("must be a non-empty list of strings");
    match present(d)? {
        None => Ok(None),
        Some(Value::Array(a)) if !a.is_empty() => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(_) => Err(bad()),
    }
}

/// The one constraint (structured output) a request asks for, with the field that asked, or a
/// 400: two of them, llama-server's GBNF `grammar`, a whitespace pattern without JSON.
fn constraint(c: &Common) -> ApiResult<Option<(&'static str, ConstraintSpec)>> {
    let mut given: Vec<(&'static str, ConstraintSpec)> = Vec::new();
    match &c.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            given.push(("response_format", ConstraintSpec::JsonObject))
        }
        Some(ResponseFormat::JsonSchema(s)) => {
            given.push(("response_format", ConstraintSpec::JsonSchema(s.clone())))
        }
    }
    if let Some(s) = &c.guided_json {
        given.push(("guided_json", ConstraintSpec::JsonSchema(s.clone())));
    }
    if let Some(s) = &c.json_schema {
        given.push(("json_schema", ConstraintSpec::JsonSchema(s.clone())));
    }
    if let Some(r) = &c.guided_regex {
        given.push(("guided_regex", ConstraintSpec::Regex(r.clone())));
    }
    if let Some(l) = &c.guided_choice {
        given.push(("guided_choice", ConstraintSpec::Choice(l.clone())));
    }
    if let Some(g) = &c.guided_grammar {
        given.push(("guided_grammar", ConstraintSpec::Grammar(g.clone())));
    }
    if let Some(g) = &c.grammar {
        // llama.cpp built with llguidance reads a grammar that begins `%llguidance` as Lark; GBNF
        // it converts with its own code, which llguidance lacks.
        if !g.trim_start().starts_with("%llguidance") {
            return Err(ApiError::invalid(
                "grammar",
                "grammar (llama-server's GBNF) is not supported: this server's grammars are llguidance's Lark; send one as guided_grammar, or begin grammar with %llguidance {} as llama.cpp's llguidance build reads it",
            ));
        }
        given.push(("grammar", ConstraintSpec::Grammar(g.clone())));
    }
    if given.len() > 1 {
        return Err(ApiError::invalid(
            given[1].0,
            format!(
                "{} and {} were both given; a request takes one constraint (structured output) at most",
                given[0].0, given[1].0
            ),
        ));
    }
    let Some((param, spec)) = given.pop() else {
        if c.guided_whitespace_pattern.is_some() {
            return Err(ApiError::invalid(
                "guided_whitespace_pattern",
                "guided_whitespace_pattern applies to JSON output: send it with guided_json, json_schema or response_format",
            ));
        }
        return Ok(None);
    };
    let spec = match &c.guided_whitespace_pattern {
        None => spec,
        Some(p) => spec
            .with_whitespace_pattern(p)
            .map_err(|e| ApiError::invalid("guided_whitespace_pattern", e.to_string()))?,
    };
    Ok(Some((param, spec)))
}

/// `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids.
fn prompt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PromptIn>>, D::Error> {
    let bad = || {
        D::Error::custom(
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let ids = |a: Vec<Value>| -> Result<Vec<u64>, D::Error> {
        a.iter().map(|v| v.as_u64().ok_or_else(bad)).collect()
    };
    let Some(v) = present(d)? else {
        return Ok(None);
    };
    let list = match v {
        Value::String(s) => vec![PromptIn::Text(s)],
        Value::Array(a) if a.is_empty() => return Err(D::Error::custom("is an empty list")),
        Value::Array(a) => match &a[0] {
            Value::String(_) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(PromptIn::Text(s)),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![PromptIn::Ids(ids(a)?)],
            Value::Array(_) => a
                .into_iter()
                .map(|v| match v {
                    Value::Array(inner) => ids(inner).map(PromptIn::Ids),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    Ok(Some(list))
}

/// `messages`: a non-empty list of `{role, content}` objects.
fn messages<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Message>>, D::Error> {
    let list = Option::<Vec<Message>>::deserialize(d)?;
    if list.as_ref().is_some_and(Vec::is_empty) {
        return Err(D::Error::custom("is an empty list"));
    }
    Ok(list)
}

/// A message's `content`: a string, null, or a list of `{"type": "text", "text": ...}` parts.
fn content<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match present(d)? {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in &parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => return Err(D::Error::custom("may hold only text parts")),
                }
            }
            Ok(s)
        }
        Some(v) => Err(D::Error::custom(format!(
            "must be a string, got {}",
            kind_of(&v)
        ))),
    }
}

/// `/detokenize`'s `tokens`: a list of ids.
fn token_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
    let bad = || D::Error::custom("must be a list of token ids");
    match present(d)? {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(_) => Err(bad()),
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Completion,
    Chat,
}

/// What the server allows, for [`Settings::validate`].
pub struct Limits {
    pub n_positions: usize,
    pub vocab: usize,
    /// Sequences run at once (--parallel) and waiting at most (--max-queue).
    pub parallel: usize,
    pub max_queue: usize,
}

/// A request's settings, validated against each other and the server's limits.
pub struct Settings {
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    /// Completions: alternatives per token; chat: `top_logprobs` when `logprobs` is true.
    pub logprobs: Option<usize>,
    /// Tokens to generate (0: echo only, the prompt's log-probs).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Sampling with the request's seed, or `None` for one the server picks.
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub logit_bias: Vec<(u32, f32)>,
    pub stop_token_ids: Vec<u32>,
    pub min_tokens: usize,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// vLLM's `prompt_logprobs`: the prompt tokens' log-probs with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Beam search instead of sampling.
    pub beams: Option<Beams>,
    /// Structured output: the field that asked for it and what it asks (compiled by the routes,
    /// which hold the compiler).
    pub constraint: Option<(&'static str, ConstraintSpec)>,
}

/// Beam search settings (vLLM's `use_beam_search`).
#[derive(Debug, Clone, Copy)]
pub struct Beams {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
}

/// The widest beam search a request may ask for.
pub const MAX_BEAMS: usize = 16;

/// `v` (given as `k`) within `lo..=hi`, else a 400 naming both.
fn within(k: &str, v: f64, lo: f64, hi: f64) -> ApiResult<f32> {
    if !(v >= lo && v <= hi) {
        // As JSON writes it (1e+308, not 309 digits).
        let shown = serde_json::Number::from_f64(v).map_or(v.to_string(), |n| n.to_string());
        return Err(ApiError::invalid(
            k,
            format!("{k} is {shown}; expected a number from {lo} to {hi}"),
        ));
    }
    Ok(v as f32)
}

fn at_most(k: &str, v: u64, lo: u64, hi: u64) -> ApiResult<u64> {
    if v < lo || v > hi {
        return Err(ApiError::invalid(
            k,
            format!("{k} is {v}; expected an integer from {lo} to {hi}"),
        ));
    }
    Ok(v)
}

impl Settings {
    /// Check what `c` and the endpoint's fields ask for; `prompt_lens` are the prompts' lengths in
    /// tokens (as they run: at least 1).
    pub fn validate(
        c: &Common,
        kind: &KindFields,
        prompt_lens: &[usize],
        l: &Limits,
    ) -> ApiResult<Settings> {
        let constraint = constraint(c)?;
        if let KindFields::Chat(ch) = kind {
            refuse_tools(ch)?;
        }
        let n = c.n.unwrap_or(1);
        if n == 0 || n > l.parallel as u64 {
            let why = if n == 0 {
                String::new()
            } else {
                format!(
                    ", more than the {p} sequences this server runs at once (--parallel {p})",
                    p = l.parallel
                )
            };
            return Err(ApiError::invalid(
                "n",
                format!(
                    "n is {n}{why}; expected an integer from 1 to {}",
                    l.parallel
                ),
            ));
        }
        let n = n as usize;
        let beam = c.use_beam_search.unwrap_or(false);
        if let Some(b) = c.best_of.filter(|&b| b != n as u64 && !beam) {
            return Err(ApiError::invalid(
                "best_of",
                format!("best_of other than n is only taken with use_beam_search (its beam width); best_of is {b}, n is {n}"),
            ));
        }
        let beams = if beam {
            let width = c.best_of.unwrap_or(n as u64);
            if width < n as u64 || width as usize > MAX_BEAMS {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("the beam width (best_of, else n) is {width}; expected n ({n}) to {MAX_BEAMS}"),
                ));
            }
            if c.stream == Some(true) {
                return Err(ApiError::invalid(
                    "use_beam_search",
                    "use_beam_search does not stream: the beams are known only at the end",
                ));
            }
            Some(Beams {
                num_beams: width as usize,
                length_penalty: c
                    .length_penalty
                    .map_or(Ok(1.0), |v| within("length_penalty", v, -10.0, 10.0))?,
                early_stopping: c.early_stopping.unwrap_or_default(),
            })
        } else {
            for (k, given) in [
                ("length_penalty", c.length_penalty.is_some()),
                ("early_stopping", c.early_stopping.is_some()),
            ] {
                if given {
                    return Err(ApiError::invalid(
                        k,
                        format!("{k} applies to beam search: send it with use_beam_search: true"),
                    ));
                }
            }
            None
        };
        // A request's sequences all run or wait at once: more than the slots and the queue
        // together could never be taken, however long the client retried.
        let sequences = prompt_lens.len().saturating_mul(n);
        let most = l.parallel.saturating_add(l.max_queue);
        if sequences > most {
            return Err(ApiError::invalid(
                if prompt_lens.len() > 1 { "prompt" } else { "n" },
                format!(
                    "{} prompts × n = {n} is {sequences} sequences; this server takes at most {most} in one request ({p} running at once with --parallel {p}, {q} waiting with --max-queue {q})",
                    prompt_lens.len(),
                    p = l.parallel,
                    q = l.max_queue
                ),
            )
            .code("too_many_sequences"));
        }
        let (echo, logprobs) = match kind {
            KindFields::Completion(co) => {
                if co.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
                    return Err(ApiError::invalid("suffix", "suffix is not supported"));
                }
                let lp = co
                    .logprobs
                    .map(|k| at_most("logprobs", k, 0, 20))
                    .transpose()?;
                (co.echo.unwrap_or(false), lp.map(|k| k as usize))
            }
            KindFields::Chat(ch) => {
                let top = ch
                    .top_logprobs
                    .map(|k| at_most("top_logprobs", k, 0, 20))
                    .transpose()?;
                let on = ch.logprobs.unwrap_or(false);
                if top.is_some() && !on {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "top_logprobs needs logprobs: true",
                    ));
                }
                (false, on.then(|| top.unwrap_or(0) as usize))
            }
        };
        let n_pos = l.n_positions;
        let longest = prompt_lens.iter().copied().max().unwrap_or(1);
        let max_tokens = match kind {
            KindFields::Completion(co) => co.max_tokens.unwrap_or(16),
            KindFields::Chat(ch) => {
                let (k, given) = match ch.max_completion_tokens {
                    Some(v) => ("max_completion_tokens", Some(v)),
                    None => ("max_tokens", ch.max_tokens),
                };
                let room = n_pos.saturating_sub(longest).max(1);
                let v = given.unwrap_or(CHAT_DEFAULT_MAX_TOKENS.min(room) as u64);
                if v == 0 {
                    return Err(ApiError::invalid(
                        k,
                        format!(
                            "{k} is 0; expected an integer from 1 to {room} (the context of {n_pos} tokens less the prompt's {longest})"
                        ),
                    ));
                }
                v
            }
        };
        let max_tokens = usize::try_from(max_tokens).unwrap_or(usize::MAX);
        if max_tokens == 0 && !echo {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens 0 generates nothing; it is only useful with echo (the prompt's log-probs)",
            ));
        }
        // max_tokens 0 (echo) runs only the prompt: it may fill the whole context.
        for &len in prompt_lens {
            let need = len.saturating_add(max_tokens);
            if need > n_pos {
                return Err(ApiError::invalid(
                    if matches!(kind, KindFields::Chat(_)) { "messages" } else { "prompt" },
                    format!(
                        "this model's maximum context length is {n_pos} tokens, but {need} were requested ({len} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens"
                    ),
                )
                .code("context_length_exceeded"));
            }
        }
        let min_tokens = c.min_tokens.unwrap_or(0);
        if min_tokens > max_tokens as u64 {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens is {min_tokens}; expected at most max_tokens ({max_tokens})"),
            ));
        }
        let stop_token_ids = c.stop_token_ids.clone().unwrap_or_default();
        if let Some(t) = stop_token_ids.iter().find(|&&t| t as usize >= l.vocab) {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("stop token {t} is beyond the vocabulary of {}", l.vocab),
            ));
        }
        let prompt_logprobs = c
            .prompt_logprobs
            .map(|k| at_most("prompt_logprobs", k, 0, 20))
            .transpose()?
            .map(|k| k as usize);
        let no_repeat_ngram_size = c.no_repeat_ngram_size.map_or(Ok(0), |k| {
            at_most("no_repeat_ngram_size", k, 0, l.n_positions as u64)
        })? as usize;
        if beams.is_some() {
            let unsupported = [
                ("logprobs", logprobs.is_some()),
                ("echo", echo),
                ("prompt_logprobs", prompt_logprobs.is_some()),
                ("stop", c.stop.as_ref().is_some_and(|s| !s.is_empty())),
                ("stop_token_ids", !stop_token_ids.is_empty()),
                ("min_tokens", min_tokens > 0),
                (
                    "logit_bias",
                    c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
                ),
                ("skip_special_tokens", c.skip_special_tokens == Some(true)),
                (
                    constraint.as_ref().map_or("", |c| c.0),
                    constraint.is_some(),
                ),
            ];
            if let Some((k, _)) = unsupported.iter().find(|(_, on)| *on) {
                return Err(ApiError::invalid(
                    k,
                    format!("{k} is not supported with use_beam_search"),
                ));
            }
        }
        let top_k = match c.top_k {
            None | Some(-1) => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!(
                        "top_k is {k}; expected -1 (off) or an integer from 0 to {}",
                        l.vocab
                    ),
                ))
            }
            Some(k) => at_most("top_k", k as u64, 0, l.vocab as u64)? as usize,
        };
        // A negative seed (which clients written for other servers send) is taken as its two's
        // complement.
        let seed = c.seed.map(|s| s as u64);
        let num = |k: &str, v: Option<f64>, default: f32, lo: f64, hi: f64| {
            v.map_or(Ok(default), |v| within(k, v, lo, hi))
        };
        let top_p = num("top_p", c.top_p, 1.0, 0.0, 1.0)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid(
                "top_p",
                "top_p is 0; expected a number in (0, 1]",
            ));
        }
        let repetition_penalty = num("repetition_penalty", c.repetition_penalty, 1.0, 0.0, 100.0)?;
        if repetition_penalty == 0.0 {
            return Err(ApiError::invalid(
                "repetition_penalty",
                "repetition_penalty is 0; expected a number above 0 (1 is off)",
            ));
        }
        let sampling = SamplingParams {
            temperature: num("temperature", c.temperature, 1.0, 0.0, 2.0)?,
            top_k,
            top_p,
            min_p: num("min_p", c.min_p, 0.0, 0.0, 1.0)?,
            repetition_penalty,
            frequency_penalty: num("frequency_penalty", c.frequency_penalty, 0.0, -2.0, 2.0)?,
            presence_penalty: num("presence_penalty", c.presence_penalty, 0.0, -2.0, 2.0)?,
            no_repeat_ngram_size,
            seed: seed.unwrap_or(0),
        };
        let logit_bias = c.logit_bias.clone().unwrap_or_default();
        if let Some(&(t, _)) = logit_bias.iter().find(|(t, _)| *t as usize >= l.vocab) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias key \"{t}\" is not a token id below {}", l.vocab),
            ));
        }
        Ok(Settings {
            n,
            stream: c.stream.unwrap_or(false),
            include_usage: c
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            echo,
            logprobs,
            max_tokens,
            stop: c.stop.clone().unwrap_or_default(),
            sampling,
            seed,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            logit_bias,
            stop_token_ids,
            min_tokens: min_tokens as usize,
            include_stop_str_in_output: c.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: c.skip_special_tokens.unwrap_or(false),
            prompt_logprobs,
            beams,
            constraint,
        })
    }
}

/// The endpoint's own fields, for [`Settings::validate`].
// One per request, moved once: boxing the chat fields would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum KindFields {
    Completion(Completion),
    Chat(Chat),
}

impl KindFields {
    pub fn kind(&self) -> Kind {
        match self {
            KindFields::Completion(_) => Kind::Completion,
            KindFields::Chat(_) => Kind::Chat,
        }
    }
}

/// What value of a field [`refuse_unimplemented`] lets pass: the one that changes nothing.
#[derive(Clone, Copy)]
enum Neutral {
    False,
    True,
    Empty,
    /// Only absence (or `null`).
    Absent,
}

/// Fields of vLLM's API that would change the reply and that this server does not implement, with
/// the value that changes nothing, the endpoint (`true`: chat only) and what to do instead.
const UNIMPLEMENTED: &[(&str, Neutral, bool, &str)] = &[
    (
        "allowed_token_ids",
        Neutral::Empty,
        false,
        "use logit_bias, or a guided_choice/guided_regex constraint",
    ),
    (
        "bad_words",
        Neutral::Empty,
        false,
        "use logit_bias against their tokens",
    ),
    (
        "logits_processors",
        Neutral::Empty,
        false,
        "use logit_bias or a constraint",
    ),
    (
        "return_tokens_as_token_ids",
        Neutral::False,
        false,
        "tokens come back as text; /tokenize maps text to ids",
    ),
    (
        "structural_tag",
        Neutral::Absent,
        false,
        "use guided_grammar or a JSON schema",
    ),
    ("echo", Neutral::False, true, "/v1/completions has echo"),
    (
        "add_generation_prompt",
        Neutral::True,
        true,
        "send the prompt to /v1/completions",
    ),
    (
        "continue_final_message",
        Neutral::False,
        true,
        "send the prompt to /v1/completions",
    ),
    (
        "chat_template",
        Neutral::Absent,
        true,
        "the server's template is set by --chat-template",
    ),
    (
        "chat_template_kwargs",
        Neutral::Empty,
        true,
        "the server's template takes no arguments",
    ),
    (
        "documents",
        Neutral::Empty,
        true,
        "put them in the messages",
    ),
];

/// A 400 naming the first field of [`UNIMPLEMENTED`] that `body` (a request to `kind`'s
/// endpoint) sends with a value that would change the reply: never accepted and ignored.
pub fn refuse_unimplemented(body: &Value, kind: Kind) -> ApiResult<()> {
    for &(field, neutral, chat_only, instead) in UNIMPLEMENTED {
        if chat_only && kind != Kind::Chat {
            continue;
        }
        let passes = match (body.get(field), neutral) {
            (None | Some(Value::Null), _) => true,
            (Some(v), Neutral::False) => v == &Value::Bool(false),
            (Some(v), Neutral::True) => v == &Value::Bool(true),
            (Some(Value::Array(a)), Neutral::Empty) => a.is_empty(),
            (Some(Value::Object(o)), Neutral::Empty) => o.is_empty(),
            (Some(Value::String(s)), Neutral::Empty) => s.is_empty(),
            _ => false,
        };
        if !passes {
            return Err(ApiError::invalid(
                field,
                format!("{field} is not supported by this server ({instead})"),
            ));
        }
    }
    Ok(())
}

/// Tools (and the legacy functions): an empty list asks for nothing, and a choice of "none" (or
/// "auto" without tools, which means none) leaves the reply as it is.
fn refuse_tools(ch: &Chat) -> ApiResult<()> {
    for (list, l, choice, c) in [
        ("tools", &ch.tools, "tool_choice", &ch.tool_choice),
        (
            "functions",
            &ch.functions,
            "function_call",
            &ch.function_call,
        ),
    ] {
        if l.as_ref()
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                list,
                format!("GPT-2 has no tool calling: {list} is not supported (send none, or an empty list)"),
            ));
        }
        match c {
            None => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(v) => {
                return Err(ApiError::invalid(
                    choice,
                    format!(
                        "GPT-2 has no tool calling: {choice} {v} is not supported (only \"none\")"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Token ids of field `param` below `vocab`.
pub fn check_ids(ids: Vec<u64>, vocab: usize, param: &str) -> ApiResult<Vec<u32>> {
    ids.into_iter()
        .map(|t| {
            if t >= vocab as u64 {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} token id {t} is beyond the vocabulary of {vocab}"),
                ));
            }
            Ok(t as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<T: DeserializeOwned>(v: Value) -> ApiError {
        match parse::<T>(&v) {
            Ok(_) => panic!("{v} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err::<Common>(json!({"temperature": "hot"}));
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(e.message, "temperature must be a number, got a string");
        let e = err::<Common>(json!({"stream_options": {"include_usage": 1}}));
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        assert!(e
            .message
            .starts_with("stream_options.include_usage must be true or false"));
        let e = err::<Chat>(json!({"messages": [{"role": "user"}, {"content": "x"}]}));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.contains("messages[1]") && e.message.contains("role"),
            "{}",
            e.message
        );
        let e = err::<Completion>(json!({"prompt": [1, "x"]}));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = err::<Common>(json!({"stop": vec!["x"; 17]}));
        assert!(e.message.contains("at most 16"), "{}", e.message);
    }

    #[test]
    fn null_is_absent_and_unknown_fields_are_accepted() {
        let c: Common = parse(&json!({"temperature": null, "user": "u", "metadata": {}})).unwrap();
        assert!(c.temperature.is_none());
        let ch: Chat = parse(&json!({"messages": [{"role": "user", "content": null}]})).unwrap();
        assert_eq!(ch.messages.unwrap()[0].content, "");
    }

    #[test]
    fn settings_check_ranges_and_limits() {
        let limits = Limits {
            n_positions: 64,
            vocab: 100,
            parallel: 4,
            max_queue: 4,
        };
        let run = |c: Value, k: Value| {
            let common: Common = parse(&c).unwrap();
            let co: Completion = parse(&k).unwrap();
            Settings::validate(&common, &KindFields::Completion(co), &[3], &limits)
        };
        let s = run(json!({"top_k": -1, "seed": -1}), json!({}))
            .map_err(|e| e.message)
            .unwrap();
        assert_eq!(
            (s.sampling.top_k, s.seed, s.max_tokens),
            (0, Some(u64::MAX), 16)
        );
        for (c, k, param) in [
            (json!({"temperature": 2.5}), json!({}), "temperature"),
            (json!({"top_k": 101}), json!({}), "top_k"),
            (json!({"n": 5}), json!({}), "n"),
            (json!({"logit_bias": {"100": 1}}), json!({}), "logit_bias"),
            (json!({}), json!({"max_tokens": 62}), "prompt"),
            (json!({}), json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                json!({}),
                "guided_regex",
            ),
            (json!({"grammar": "root ::= \"a\""}), json!({}), "grammar"),
            (
                json!({"guided_whitespace_pattern": " "}),
                json!({}),
                "guided_whitespace_pattern",
            ),
            (
                json!({"guided_choice": ["a"], "use_beam_search": true, "best_of": 2}),
                json!({}),
                "guided_choice",
            ),
        ] {
            let e = run(c.clone(), k)
                .err()
                .unwrap_or_else(|| panic!("{c} passed"));
            assert_eq!(e.param.as_deref(), Some(param), "{c}: {}", e.message);
        }
    }
}
