//! OpenAI's request and response shapes: reading request fields with errors that name the field
//! (`param`) and what it accepts, the error body `{"error": {message, type, param, code}}`, and the
//! `logprobs` object of completions.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::tokenizer::Tokenizer;

use super::scheduler::TokenLogprob;

/// An error answered with OpenAI's shape and a 4xx status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 about a request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_owned()),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// The request body as a JSON object.
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
        .code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body must be a JSON object, got {}",
                kind_of(&other)
            ),
        )),
    }
}

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

/// Typed access to a request's fields; `null` counts as absent, as in OpenAI's API.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    pub fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    pub fn f32_in(&self, k: &str, default: f32, lo: f32, hi: f32) -> ApiResult<f32> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| {
                    ApiError::invalid(k, format!("{k} must be a number, got {}", kind_of(v)))
                })?;
                if !(x >= lo as f64 && x <= hi as f64) {
                    return Err(ApiError::invalid(
                        k,
                        format!("{k} is {v}; expected a number from {lo} to {hi}"),
                    ));
                }
                Ok(x as f32)
            }
        }
    }

    pub fn uint(&self, k: &str, default: u64, lo: u64, hi: u64) -> ApiResult<u64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    ApiError::invalid(k, format!("{k} must be a non-negative integer, got {v}"))
                })?;
                if x < lo || x > hi {
                    return Err(ApiError::invalid(
                        k,
                        format!("{k} is {x}; expected an integer from {lo} to {hi}"),
                    ));
                }
                Ok(x)
            }
        }
    }

    pub fn opt_uint(&self, k: &str, lo: u64, hi: u64) -> ApiResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(_) => self.uint(k, 0, lo, hi).map(Some),
        }
    }

    pub fn bool(&self, k: &str, default: bool) -> ApiResult<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::invalid(
                k,
                format!("{k} must be true or false, got {}", kind_of(v)),
            )),
        }
    }

    pub fn string(&self, k: &str) -> ApiResult<Option<&str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(
                k,
                format!("{k} must be a string, got {}", kind_of(v)),
            )),
        }
    }

    /// `stop`: a string or a list of up to 4 non-empty strings.
    pub fn stop(&self) -> ApiResult<Vec<String>> {
        let bad = || ApiError::invalid("stop", "stop must be a string or a list of strings");
        let list = match self.get("stop") {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
                .collect::<ApiResult<_>>()?,
            Some(_) => return Err(bad()),
        };
        if list.len() > 16 {
            return Err(ApiError::invalid("stop", "stop takes at most 16 strings"));
        }
        // An empty stop string is ignored (OpenAI's clients send "" for none).
        Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// `logit_bias`: token id (as a string) → bias in [-100, 100].
    pub fn logit_bias(&self, vocab: usize) -> ApiResult<Vec<(u32, f32)>> {
        let m = match self.get("logit_bias") {
            None => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias must be an object of token id → bias, got {}",
                        kind_of(v)
                    ),
                ))
            }
        };
        let mut out = Vec::with_capacity(m.len());
        for (k, v) in m {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&t: &u32| (t as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias key {k:?} is not a token id below {vocab}"),
                    )
                })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!(
                            "logit_bias of token {k} is {v}; expected a number from -100 to 100"
                        ),
                    )
                })?;
            out.push((id, b as f32));
        }
        Ok(out)
    }
}

/// A prompt as given: text, or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids.
pub fn prompts(f: &Fields, vocab: usize) -> ApiResult<Vec<Prompt>> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let ids = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|v| {
                let t = v.as_u64().ok_or_else(bad)?;
                if t as usize >= vocab {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("prompt token id {t} is beyond the vocabulary of {vocab}"),
                    ));
                }
                Ok(t as u32)
            })
            .collect()
    };
    let out = match f.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "prompt is an empty list"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| Prompt::Text(s.to_owned()))
                        .ok_or_else(bad)
                })
                .collect::<ApiResult<_>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(a)?)],
            Value::Array(_) => a
                .iter()
                .map(|v| match v {
                    Value::Array(inner) => ids(inner).map(Prompt::Ids),
                    _ => Err(bad()),
                })
                .collect::<ApiResult<_>>()?,
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    Ok(out)
}

/// A token's text for `logprobs.tokens` (invalid UTF-8 of a partial character shown as U+FFFD).
pub fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.token_bytes(id)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// Completions' `logprobs`: parallel lists, text offsets counted in characters from `offset`.
#[derive(Default)]
pub struct LogprobsObject {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    next_offset: usize,
}

impl LogprobsObject {
    pub fn starting_at(offset: usize) -> Self {
        LogprobsObject {
            next_offset: offset,
            ..Default::default()
        }
    }

    pub fn push(&mut self, tok: &Tokenizer, lp: &TokenLogprob, with_top: bool) {
        let text = token_text(tok, lp.token);
        self.text_offset.push(self.next_offset);
        self.next_offset += text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(lp.logprob);
        self.top_logprobs.push(match (with_top, lp.logprob) {
            (true, Some(_)) => {
                let mut m = Map::new();
                for &(t, l) in &lp.top {
                    m.entry(token_text(tok, t)).or_insert(json!(l));
                }
                Some(m)
            }
            _ => None,
        });
    }

    /// The offset the next token's text starts at.
    pub fn next_offset(&self) -> usize {
        self.next_offset
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// Chat's `logprobs.content` entry for one token.
pub fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |t: u32, l: f32| {
        let text = token_text(tok, t);
        let bytes = tok.token_bytes(t).map(<[u8]>::to_vec).unwrap_or_default();
        json!({"token": text, "logprob": l, "bytes": bytes})
    };
    let mut v = entry(lp.token, lp.logprob.unwrap_or(0.0));
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
    v
}
