//! OpenAI's response shapes: the error body `{"error": {message, type, param, code}}` (with the
//! request field it is about as `param`), and the `logprobs` objects of completions and chat.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::tokenizer::Tokenizer;

use super::request::kind_of;
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

/// The request body, which must be a JSON object.
pub fn parse_object(body: &[u8]) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
        .code("invalid_json")
    })?;
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body must be a JSON object, got {}",
                kind_of(&v)
            ),
        ));
    }
    Ok(v)
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

    /// One token, with at most `top` alternatives (none: `top_logprobs` null).
    pub fn push(&mut self, tok: &Tokenizer, lp: &TokenLogprob, top: usize) {
        let text = token_text(tok, lp.token);
        self.text_offset.push(self.next_offset);
        self.next_offset += text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(lp.logprob);
        self.top_logprobs.push(match (top, lp.logprob) {
            (1.., Some(_)) => {
                let mut m = Map::new();
                for &(t, l) in lp.top.iter().take(top) {
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

/// vLLM's `prompt_logprobs` entry for one prompt token: `null` for the first (no prefix), else
/// `{"id": {"logprob", "rank", "decoded_token"}}` for the token and its `top` best alternatives.
pub fn prompt_logprob_entry(tok: &Tokenizer, lp: &TokenLogprob, top: usize) -> Value {
    let Some(l) = lp.logprob else {
        return Value::Null;
    };
    let mut m = Map::new();
    let entry = |l: f32, rank: Option<u32>, t: u32| json!({"logprob": l, "rank": rank, "decoded_token": token_text(tok, t)});
    m.insert(lp.token.to_string(), entry(l, lp.rank, lp.token));
    for (i, &(t, l)) in lp.top.iter().take(top).enumerate() {
        m.entry(t.to_string())
            .or_insert_with(|| entry(l, Some(i as u32 + 1), t));
    }
    Value::Object(m)
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
