//! The HTTP endpoints. Handlers only parse, validate and tokenize; the model runs on the scheduler
//! thread, which sends each request's tokens back over a channel.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::embed::Pooling;
use crate::generate::{FinishReason, GenerationConfig, Sequence};
use crate::sampling::SamplingParams;
use crate::tokenizer::Special;

use super::access_log::{Logged, RequestId};
use super::openai::{
    chat_logprob, parse_object, prompt_logprob_entry, ApiError, ApiResult, LogprobsObject,
};
use super::request::{
    self, Chat, Common, Completion, Kind, KindFields, Limits, PromptIn, Settings,
};
use super::scheduler::{BeamJob, Choice, EmbedJob, Event, Job, Work};
use super::{AppState, InFlight};

type S = State<Arc<AppState>>;

/// CORS for `origins` (`*`: any), or none when empty.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let request_id = HeaderName::from_static("x-request-id");
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                request_id.clone(),
            ])
            .expose_headers([request_id]),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::access_log::middleware,
        ))
        .with_state(state);
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint {}", uri.path())).code("not_found")
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not accept {method}", uri.path()),
    )
}

/// Count the response under `endpoint`, then send it.
fn answer(s: &AppState, endpoint: &str, r: ApiResult<Response>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    s.metrics.request(endpoint, resp.status().as_u16());
    resp
}

/// Equal bytes, in time that depends only on the lengths (no early exit on the first difference).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if s.api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        // Every key is compared, so the time does not say which one matched.
        s.api_keys
            .iter()
            .fold(false, |any, k| same_key(g.as_bytes(), k.as_bytes()) | any)
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send the header \"Authorization: Bearer KEY\"",
        )
        .code("invalid_api_key"))
    }
}

/// The body, at most `body_limit` bytes (413 beyond), as a JSON object.
async fn read_json(s: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the limit of {} bytes",
                s.body_limit
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.body_limit as u64) {
        return Err(too_large());
    }
    let bytes = tokio::time::timeout(s.body_timeout, axum::body::to_bytes(body, s.body_limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    s.body_timeout.as_secs_f64()
                ),
            )
            .code("timeout")
        })?
        .map_err(|_| too_large())?;
    parse_object(&bytes)
}

/// When a request that arrived at `arrived` must end; `None` when `limit` is further away than an
/// [`Instant`] can hold (never a panic, whatever the limit).
pub(crate) fn deadline(arrived: Instant, limit: Duration) -> Option<Instant> {
    arrived.checked_add(limit)
}

fn check_model(s: &AppState, model: Option<&str>) -> ApiResult<()> {
    match model {
        Some(m) if m != s.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model `{m}` does not exist; this server serves `{}`",
                s.model_name
            ),
        )
        .code("model_not_found")),
        _ => Ok(()),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A validated request, ready for the scheduler.
struct Plan {
    kind: Kind,
    id: String,
    /// The request's `X-Request-Id`, for the access log.
    request_id: String,
    stream: bool,
    include_usage: bool,
    echo: bool,
    /// Completions: alternatives per token; chat: `top_logprobs` when `logprobs` is true.
    logprobs: Option<usize>,
    n: usize,
    /// vLLM's `prompt_logprobs`: alternatives per prompt token.
    prompt_logprobs: Option<usize>,
    /// Each prompt's text (for echo) and length.
    prompts: Vec<(String, usize)>,
    choices: Vec<Choice>,
    /// Beam search (`use_beam_search`): each prompt's ids and settings, instead of `choices`.
    beams: Vec<(Vec<u32>, GenerationConfig)>,
    seed: u64,
}

/// A request's sequences, from its validated settings and its prompts (token ids and text).
fn plan(
    s: &AppState,
    request_id: String,
    common: &Common,
    fields: &KindFields,
    prompt_list: Vec<(Vec<u32>, String)>,
    extra_stop: &[String],
) -> ApiResult<Plan> {
    let kind = fields.kind();
    let limits = Limits {
        n_positions: s.config.n_positions,
        vocab: s.config.vocab_size,
        parallel: s.parallel,
        max_queue: s.max_queue,
    };
    let keep = match common.truncate_prompt_tokens {
        None => None,
        Some(k) if k >= 1 && k <= limits.n_positions as u64 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens is {k}; expected an integer from 1 to {}",
                    limits.n_positions
                ),
            ))
        }
    };
    // An empty prompt runs as the beginning-of-text token, as `Sequence::new` does; with
    // truncate_prompt_tokens k, a longer prompt keeps its last k tokens (vLLM's rule).
    let prompt_list: Vec<(Vec<u32>, String)> = prompt_list
        .into_iter()
        .map(|(mut ids, text)| {
            if ids.is_empty() {
                return (vec![s.config.bos_token_id], text);
            }
            match keep {
                Some(k) if ids.len() > k => {
                    ids.drain(..ids.len() - k);
                    let text = s.tok.decode(&ids).unwrap_or_default();
                    (ids, text)
                }
                _ => (ids, text),
            }
        })
        .collect();
    let lens: Vec<usize> = prompt_list.iter().map(|(ids, _)| ids.len()).collect();
    let mut set = Settings::validate(common, fields, &lens, &limits)?;
    let seed = *set.seed.get_or_insert_with(|| s.next_seed());
    set.stop.extend(extra_stop.iter().cloned());
    let Settings {
        n,
        max_tokens,
        echo,
        logprobs,
        ..
    } = set;
    let bias = Arc::new(std::mem::take(&mut set.logit_bias));
    // A constraint that does not compile is the request's error, with llguidance's message.
    let constraint = match &set.constraint {
        None => None,
        Some((param, spec)) => Some(
            s.grammars()
                .map_err(|e| ApiError::invalid(param, e))?
                .compile(spec)
                .map_err(|e| ApiError::invalid(param, e.to_string()))?,
        ),
    };
    let mut choices = Vec::with_capacity(prompt_list.len() * n);
    let mut prompts_out = Vec::with_capacity(prompt_list.len());
    let mut beams = Vec::new();
    let base = GenerationConfig {
        max_new_tokens: max_tokens.max(1),
        sampling: set.sampling.clone(),
        stop: set.stop.clone(),
        ignore_eos: set.ignore_eos,
        stop_token_ids: set.stop_token_ids.clone(),
        min_tokens: set.min_tokens,
        include_stop_str_in_output: set.include_stop_str_in_output,
        skip_special_tokens: set.skip_special_tokens,
        constraint,
        ..GenerationConfig::default()
    };
    // The engine's alternatives per prompt token: echo's, and at least one for vLLM's
    // prompt_logprobs (whose entries carry ranks, known from the full rows).
    let prompt_alternatives = match (echo && logprobs.is_some(), set.prompt_logprobs) {
        (false, None) => None,
        (e, v) => Some((if e { logprobs.unwrap_or(0) } else { 0 }).max(v.map_or(0, |k| k.max(1)))),
    };
    for (p, (ids, text)) in prompt_list.into_iter().enumerate() {
        prompts_out.push((text, ids.len()));
        if let Some(b) = set.beams {
            let cfg = GenerationConfig {
                num_beams: b.num_beams,
                num_return_sequences: n,
                length_penalty: b.length_penalty,
                early_stopping: b.early_stopping,
                ..base.clone()
            };
            cfg.validate()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            beams.push((ids, cfg));
            continue;
        }
        for j in 0..n {
            let cfg = GenerationConfig {
                sampling: SamplingParams {
                    // Choice j of n samples with seed + j: choice 0 is `gpt2 generate --seed seed`.
                    seed: seed.wrapping_add(j as u64),
                    ..set.sampling.clone()
                },
                ..base.clone()
            };
            let bad = |e: crate::Error| ApiError::new(StatusCode::BAD_REQUEST, e.to_string());
            let seq = if max_tokens > 0 {
                Some(Sequence::new(&s.config, ids.clone(), cfg).map_err(bad)?)
            } else {
                cfg.validate().map_err(bad)?;
                None
            };
            choices.push(Choice {
                index: p * n + j,
                prompt: ids.clone(),
                seq,
                prompt_logprobs: prompt_alternatives,
                logprobs,
                logit_bias: bias.clone(),
            });
        }
    }
    let id = format!(
        "{}-{:x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        s.request_ids.fetch_add(1, Ordering::Relaxed)
    );
    Ok(Plan {
        kind,
        id,
        request_id,
        stream: set.stream,
        include_usage: set.include_usage,
        echo,
        logprobs,
        prompt_logprobs: set.prompt_logprobs,
        n,
        prompts: prompts_out,
        choices,
        beams,
        seed,
    })
}

/// Queue the plan's choices (429 when the queue is full) and answer.
async fn submit(s: Arc<AppState>, mut plan: Plan) -> ApiResult<Response> {
    let arrived = Instant::now();
    let k = plan.choices.len();
    let shutting_down = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    };
    // Counted before the check (both sequentially consistent, as shutdown's flag and count are):
    // shutdown either sees this request in flight, or this request sees shutdown.
    let in_flight = InFlight::new(&s);
    if s.shutting_down.load(Ordering::SeqCst) {
        return Err(shutting_down());
    }
    if !plan.beams.is_empty() {
        let r = beam_response(&s, plan, arrived).await;
        drop(in_flight);
        return r;
    }
    let queued = s.metrics.queued.fetch_add(k as i64, Ordering::Relaxed);
    // Sequences beyond the free slots wait; at most --max-queue of them.
    let free = (s.parallel as i64 - s.metrics.running.load(Ordering::Relaxed)).max(0);
    if queued + k as i64 > s.max_queue as i64 + free {
        s.metrics.queued.fetch_sub(k as i64, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("the server is busy ({queued} sequences waiting); retry later"),
        )
        .code("queue_full"));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        choices: std::mem::take(&mut plan.choices),
        tx,
        deadline: deadline(arrived, s.time_limit),
    };
    let sent = s.jobs.send(Work::Generate(job)).is_ok();
    if !sent {
        s.metrics.queued.fetch_sub(k as i64, Ordering::Relaxed);
        return Err(shutting_down());
    }
    let out = Output::new(&s, plan, k, arrived);
    if out.plan.stream {
        Ok(stream_response(s, out, rx, in_flight))
    } else {
        let r = collect_response(s, out, rx).await;
        drop(in_flight);
        r
    }
}

/// Give `work` to the scheduler and wait up to `within` for its answer on `rx`. A failure of the
/// work is a `failed` with its message; running out of time or a server shutting down, a 503.
async fn run_job<T>(
    s: &AppState,
    work: Work,
    rx: tokio::sync::oneshot::Receiver<Result<T, String>>,
    within: Duration,
    what: &str,
    failed: StatusCode,
) -> ApiResult<T> {
    let shutting_down = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    };
    if s.jobs.send(work).is_err() {
        return Err(shutting_down());
    }
    match tokio::time::timeout(within, rx).await {
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{what} did not finish within {} s (--time-limit)",
                s.time_limit.as_secs()
            ),
        )
        .code("timeout")),
        Ok(Err(_)) => Err(shutting_down()),
        Ok(Ok(r)) => r.map_err(|e| ApiError::new(failed, e)),
    }
}

/// Beam search (`use_beam_search`): each prompt's search on the scheduler's beam thread, one
/// after another; its `n` best beams are the prompt's choices. Not streamed.
async fn beam_response(s: &Arc<AppState>, mut plan: Plan, arrived: Instant) -> ApiResult<Response> {
    let deadline = deadline(arrived, s.time_limit);
    let searches = std::mem::take(&mut plan.beams);
    let n = plan.n;
    let mut out = Output::new(s, plan, searches.len() * n, arrived);
    for (p, (prompt, cfg)) in searches.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let work = Work::Beam(BeamJob { prompt, cfg, tx });
        let beams = run_job(
            s,
            work,
            rx,
            left,
            "the beam search",
            StatusCode::BAD_REQUEST,
        )
        .await?;
        out.first_token.get_or_insert_with(Instant::now);
        for (j, g) in beams.into_iter().enumerate().take(n) {
            let acc = &mut out.accs[p * n + j];
            acc.text.push_str(&g.text);
            acc.tokens = g.tokens.len();
            acc.finish = Some(match g.finish_reason {
                FinishReason::Length => "length",
                FinishReason::Eos | FinishReason::Stop => "stop",
            });
        }
    }
    s.metrics.generated_tokens.fetch_add(
        out.accs.iter().map(|a| a.tokens as u64).sum(),
        Ordering::Relaxed,
    );
    out.record(s);
    let mut r = Json(out.final_json()).into_response();
    r.extensions_mut().insert(Logged);
    Ok(r)
}

/// One choice's result so far.
struct Acc {
    text: String,
    tokens: usize,
    lp: Option<LogprobsObject>,
    chat_lp: Vec<Value>,
    /// vLLM's `prompt_logprobs`, once the prompt has run.
    prompt_lp: Option<Value>,
    /// Prompt tokens the prefix cache gave.
    cached: usize,
    finish: Option<&'static str>,
}

/// The answer being built from a request's events.
struct Output {
    plan: Plan,
    model: String,
    created: u64,
    accs: Vec<Acc>,
    remaining: usize,
    arrived: Instant,
    /// When the first of its sequences took a slot.
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    error: Option<String>,
}

impl Output {
    fn new(_s: &AppState, plan: Plan, k: usize, arrived: Instant) -> Self {
        let accs = (0..k)
            .map(|i| {
                let prompt = &plan.prompts[i / plan.n].0;
                Acc {
                    text: if plan.echo {
                        prompt.clone()
                    } else {
                        String::new()
                    },
                    tokens: 0,
                    lp: plan.logprobs.map(|_| LogprobsObject::starting_at(0)),
                    chat_lp: Vec::new(),
                    prompt_lp: None,
                    cached: 0,
                    finish: None,
                }
            })
            .collect();
        Output {
            model: _s.model_name.clone(),
            created: now_secs(),
            plan,
            accs,
            remaining: k,
            arrived,
            admitted: None,
            first_token: None,
            error: None,
        }
    }

    fn usage(&self) -> Value {
        let prompt: usize = self.plan.prompts.iter().map(|p| p.1).sum();
        let completion: usize = self.accs.iter().map(|a| a.tokens).sum();
        // A prompt's tokens that came from the cache for every one of its choices.
        let n = self.plan.n.max(1);
        let cached: usize = self
            .accs
            .chunks(n)
            .map(|c| c.iter().map(|a| a.cached).min().unwrap_or(0))
            .sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    /// Fold one event in; returns the streaming chunk it makes, if any.
    fn apply(&mut self, s: &AppState, ev: Event) -> Option<Value> {
        let top = self.plan.logprobs.unwrap_or(0);
        match ev {
            Event::Admitted => {
                self.admitted.get_or_insert_with(Instant::now);
                None
            }
            Event::Cached { index, tokens } => {
                self.accs[index].cached = tokens;
                None
            }
            Event::Error(e) => {
                self.error = Some(e);
                self.remaining = 0;
                None
            }
            Event::Prompt { index, logprobs } => {
                let echo = self.plan.echo;
                let acc = &mut self.accs[index];
                let mut chunk_lp = None;
                if let (true, Some(lp)) = (echo, &mut acc.lp) {
                    let mut one = LogprobsObject::starting_at(lp.next_offset());
                    for l in &logprobs {
                        lp.push(&s.tok, l, top);
                        one.push(&s.tok, l, top);
                    }
                    chunk_lp = Some(one.to_json());
                }
                let vllm = self.plan.prompt_logprobs.map(|k| {
                    Value::Array(
                        logprobs
                            .iter()
                            .map(|l| prompt_logprob_entry(&s.tok, l, k))
                            .collect(),
                    )
                });
                acc.prompt_lp = vllm.clone();
                let text = if echo {
                    self.plan.prompts[index / self.plan.n].0.clone()
                } else {
                    String::new()
                };
                let mut c = self.chunk(index, &text, chunk_lp, None);
                if let Some(v) = vllm {
                    c["choices"][0]["prompt_logprobs"] = v;
                }
                Some(c)
            }
            Event::Token {
                index,
                text,
                logprob,
                finish,
                ..
            } => {
                self.first_token.get_or_insert_with(Instant::now);
                let kind = self.plan.kind;
                let acc = &mut self.accs[index];
                acc.tokens += 1;
                acc.text.push_str(&text);
                let mut lp_json = None;
                if let (Some(l), Some(obj)) = (&logprob, &mut acc.lp) {
                    if kind == Kind::Chat {
                        let v = chat_logprob(&s.tok, l);
                        acc.chat_lp.push(v.clone());
                        lp_json = Some(json!({"content": [v]}));
                    } else {
                        // Offsets into the whole text, as the non-streaming reply gives them.
                        let mut one = LogprobsObject::starting_at(obj.next_offset());
                        obj.push(&s.tok, l, top);
                        one.push(&s.tok, l, top);
                        lp_json = Some(one.to_json());
                    }
                }
                if finish.is_some() {
                    acc.finish = finish;
                    self.remaining -= 1;
                }
                if text.is_empty() && finish.is_none() && lp_json.is_none() {
                    return None;
                }
                Some(self.chunk(index, &text, lp_json, finish))
            }
            Event::Done { index, finish } => {
                if self.accs[index].finish.is_none() {
                    self.accs[index].finish = Some(finish);
                    self.remaining -= 1;
                }
                Some(self.chunk(index, "", None, Some(finish)))
            }
        }
    }

    fn chunk(&self, index: usize, text: &str, lp: Option<Value>, finish: Option<&str>) -> Value {
        match self.plan.kind {
            Kind::Completion => json!({
                "id": self.plan.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({
                    "id": self.plan.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": self.fingerprint(),
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                })
            }
        }
    }

    /// The seed a request ran with, as OpenAI's `system_fingerprint` (the seed is random when the
    /// request gives none; repeating it with this seed repeats the result).
    fn fingerprint(&self) -> String {
        format!("seed-{}", self.plan.seed)
    }

    /// The metrics of a request that has ended, and its access log line.
    fn record(&self, s: &AppState) {
        let secs = |t: Option<Instant>| t.map(|t| t.duration_since(self.arrived).as_secs_f64());
        if let Some(first) = self.first_token {
            s.metrics
                .observe_ttft(first.duration_since(self.arrived).as_secs_f64());
            let most = self.accs.iter().map(|a| a.tokens).max().unwrap_or(0);
            if most > 1 {
                s.metrics
                    .observe_tpot(first.elapsed().as_secs_f64() / (most - 1) as f64);
            }
        }
        if let Some(q) = secs(self.admitted) {
            s.metrics.observe_queue(q);
        }
        let total = self.arrived.elapsed().as_secs_f64();
        s.metrics.observe_e2e(total);
        let usage = self.usage();
        s.access_log.write(json!({
            "request_id": self.plan.request_id,
            "id": self.plan.id,
            "path": if self.plan.kind == Kind::Chat { "/v1/chat/completions" } else { "/v1/completions" },
            "status": if self.error.is_some() { 500 } else { 200 },
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "queue_s": secs(self.admitted),
            "ttft_s": secs(self.first_token),
            "total_s": total,
            "finish_reasons": self.accs.iter().map(|a| a.finish).collect::<Vec<_>>(),
            "error": self.error,
        }));
    }

    fn final_json(&self) -> Value {
        let choices: Vec<Value> = self
            .accs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut c = match self.plan.kind {
                    Kind::Completion => json!({
                        "index": i, "text": a.text,
                        "logprobs": a.lp.as_ref().map(LogprobsObject::to_json),
                        "finish_reason": a.finish.unwrap_or("length"),
                    }),
                    Kind::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": a.text},
                        "logprobs": a.lp.as_ref().map(|_| json!({"content": a.chat_lp})),
                        "finish_reason": a.finish.unwrap_or("length"),
                    }),
                };
                if self.plan.prompt_logprobs.is_some() {
                    c["prompt_logprobs"] = a.prompt_lp.clone().unwrap_or(Value::Null);
                }
                c
            })
            .collect();
        json!({
            "id": self.plan.id,
            "object": if self.plan.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint(),
            "choices": choices,
            "usage": self.usage(),
        })
    }
}

async fn collect_response(
    s: Arc<AppState>,
    mut out: Output,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> ApiResult<Response> {
    while out.remaining > 0 {
        match rx.recv().await {
            Some(ev) => {
                out.apply(&s, ev);
            }
            None => break,
        }
    }
    out.record(&s);
    if let Some(e) = out.error {
        let mut r = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e).into_response();
        r.extensions_mut().insert(Logged);
        return Ok(r);
    }
    let mut r = Json(out.final_json()).into_response();
    r.extensions_mut().insert(Logged);
    Ok(r)
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(
    s: Arc<AppState>,
    mut out: Output,
    mut rx: mpsc::UnboundedReceiver<Event>,
    in_flight: InFlight,
) -> Response {
    let (btx, brx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        // Nothing can be sent once the client has gone: returning drops `rx`, which the scheduler
        // sees at its next step and frees the slots.
        let mut opening = Vec::new();
        for i in 0..out.accs.len() {
            match out.plan.kind {
                Kind::Chat => {
                    let mut c = out.chunk(i, "", None, None);
                    c["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                    opening.push(c);
                }
                // Echoed here unless a Prompt event (with log-probs) will carry the prompt.
                Kind::Completion
                    if out.plan.echo
                        && out.plan.logprobs.is_none()
                        && out.plan.prompt_logprobs.is_none() =>
                {
                    let text = out.plan.prompts[i / out.plan.n].0.clone();
                    opening.push(out.chunk(i, &text, None, None));
                }
                Kind::Completion => {}
            }
        }
        for c in opening {
            if btx.send(Ok(sse(&c))).await.is_err() {
                return;
            }
        }
        while out.remaining > 0 {
            let Some(ev) = rx.recv().await else { break };
            if let Some(chunk) = out.apply(&s, ev) {
                if btx.send(Ok(sse(&chunk))).await.is_err() {
                    return;
                }
            }
        }
        if let Some(e) = &out.error {
            let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone());
            let _ = btx.send(Ok(sse(&err.body()))).await;
        }
        out.record(&s);
        if out.plan.include_usage {
            let v = json!({
                "id": out.plan.id,
                "object": if out.plan.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": out.created, "model": out.model, "choices": [], "usage": out.usage(),
            });
            let _ = btx.send(Ok(sse(&v))).await;
        }
        let _ = btx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    // The request counts as in flight until hyper has taken the body's last chunk (or dropped it).
    let chunks =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(brx), move |c| {
            let _held = &in_flight;
            c
        });
    let body = Body::from_stream(chunks);
    let mut r = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    // The stream's task writes the access log line when it ends.
    r.extensions_mut().insert(Logged);
    r
}

/// A request's CPU work (parsing, tokenizing, rendering a chat, planning: bodies of up to 4 MiB)
/// on tokio's blocking pool, so that the async workers go on serving other connections.
async fn blocking<T: Send + 'static>(
    s: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("preparing the request failed: {e}"),
            )
        })?
}

async fn completions(
    State(s): S,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        authorize(&s, &headers)?;
        let body = read_json(&s, &headers, body).await?;
        let p = blocking(&s, move |s| {
            request::refuse_unimplemented(&body, Kind::Completion)?;
            let common: Common = request::parse(&body)?;
            let mut fields: Completion = request::parse(&body)?;
            check_model(s, common.model.as_deref())?;
            let vocab = s.config.vocab_size;
            let list = fields
                .prompt
                .take()
                .ok_or_else(|| ApiError::invalid("prompt", "prompt is required"))?
                .into_iter()
                .map(|p| match p {
                    PromptIn::Text(t) => Ok((s.tok.encode(&t), t)),
                    PromptIn::Ids(ids) => {
                        let ids = request::check_ids(ids, vocab, "prompt")?;
                        let text = s.tok.decode(&ids).unwrap_or_default();
                        Ok((ids, text))
                    }
                })
                .collect::<ApiResult<_>>()?;
            plan(
                s,
                rid.0,
                &common,
                &KindFields::Completion(fields),
                list,
                &[],
            )
        })
        .await?;
        submit(s.clone(), p).await
    }
    .await;
    answer(&s, "/v1/completions", r)
}

async fn chat_completions(
    State(s): S,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        authorize(&s, &headers)?;
        let body = read_json(&s, &headers, body).await?;
        let p = blocking(&s, move |s| {
            request::refuse_unimplemented(&body, Kind::Chat)?;
            let common: Common = request::parse(&body)?;
            let fields: Chat = request::parse(&body)?;
            check_model(s, common.model.as_deref())?;
            let text = s.chat.render(fields.messages.as_deref())?;
            let ids = s.tok.encode_with(&text, Special::AsText);
            plan(
                s,
                rid.0,
                &common,
                &KindFields::Chat(fields),
                vec![(ids, text)],
                &s.chat.stop,
            )
        })
        .await?;
        submit(s.clone(), p).await
    }
    .await;
    answer(&s, "/v1/chat/completions", r)
}

/// The most texts one `/v1/embeddings` request may hold (OpenAI's limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// OpenAI's `/v1/embeddings`: the final hidden state pooled over each input's tokens (mean, or
/// `"pooling": "last"`), unit length; run by the scheduler between generation steps.
async fn embeddings(State(s): S, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&s, &headers)?;
        let body = read_json(&s, &headers, body).await?;
        let (texts, pooling, base64) = blocking(&s, move |s| {
            let req: request::Embeddings = request::parse(&body)?;
            check_model(s, req.model.as_deref())?;
            let n_embd = s.config.n_embd;
            if let Some(d) = req.dimensions.filter(|&d| d != n_embd as u64) {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("dimensions is {d}; this model's embeddings have {n_embd}"),
                ));
            }
            let base64 = match req.encoding_format.as_deref() {
                None | Some("float") => false,
                Some("base64") => true,
                Some(f) => {
                    return Err(ApiError::invalid(
                        "encoding_format",
                        format!("encoding_format {f:?}; expected \"float\" or \"base64\""),
                    ))
                }
            };
            let pooling = Pooling::parse(req.pooling.as_deref().unwrap_or("mean"))
                .map_err(|e| ApiError::invalid("pooling", e.to_string()))?;
            let inputs = req
                .input
                .ok_or_else(|| ApiError::invalid("input", "input is required"))?;
            if inputs.len() > MAX_EMBEDDING_INPUTS {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input holds {} texts; at most {MAX_EMBEDDING_INPUTS} are taken in one request",
                        inputs.len()
                    ),
                ));
            }
            let (vocab, n_pos) = (s.config.vocab_size, s.config.n_positions);
            let mut texts = Vec::with_capacity(inputs.len());
            for (i, p) in inputs.into_iter().enumerate() {
                let ids = match p {
                    PromptIn::Text(t) => s.tok.encode(&t),
                    PromptIn::Ids(ids) => request::check_ids(ids, vocab, "input")?,
                };
                if ids.is_empty() {
                    return Err(ApiError::invalid("input", format!("input {i} is empty")));
                }
                if ids.len() > n_pos {
                    return Err(ApiError::invalid(
                        "input",
                        format!(
                            "input {i} has {} tokens; this model's maximum context length is {n_pos}",
                            ids.len()
                        ),
                    )
                    .code("context_length_exceeded"));
                }
                texts.push(ids);
            }
            Ok((texts, pooling, base64))
        })
        .await?;
        let in_flight = InFlight::new(&s);
        if s.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        let tokens: usize = texts.iter().map(Vec::len).sum();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = EmbedJob {
            texts,
            pooling,
            tx,
        };
        let vectors = run_job(
            &s,
            Work::Embed(job),
            rx,
            s.time_limit,
            "the embeddings",
            StatusCode::INTERNAL_SERVER_ERROR,
        )
        .await?;
        drop(in_flight);
        // Embedded tokens are prefilled, never cached: misses, so that hits and misses still sum
        // to the prompt tokens.
        s.metrics
            .prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        s.metrics
            .prefix_miss_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    // OpenAI's base64 form: the little-endian float32 bytes.
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        bytes
                    ))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": s.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    answer(&s, "/v1/embeddings", r)
}

async fn models(State(s): S, headers: HeaderMap) -> Response {
    let r = authorize(&s, &headers).map(|_| {
        Json(json!({"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": s.started, "owned_by": "gpt2",
            "max_model_len": s.config.n_positions,
        }]}))
        .into_response()
    });
    answer(&s, "/v1/models", r)
}

async fn health(State(s): S) -> Response {
    answer(&s, "/health", Ok(StatusCode::OK.into_response()))
}

async fn metrics(State(s): S) -> Response {
    let text = s.metrics.render();
    let r = (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response();
    answer(&s, "/metrics", Ok(r))
}

/// vLLM's `/tokenize`: `{prompt, add_special_tokens?}` or `{messages}` → `{tokens, count,
/// max_model_len}`.
async fn tokenize(State(s): S, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&s, &headers)?;
        let body = read_json(&s, &headers, body).await?;
        let ids = blocking(&s, move |s| {
            let req: request::Tokenize = request::parse(&body)?;
            check_model(s, req.model.as_deref())?;
            let text = match (req.messages, req.prompt) {
                (Some(m), _) => s.chat.render(Some(&m))?,
                (None, Some(p)) => p,
                (None, None) => {
                    return Err(ApiError::invalid("prompt", "prompt (a string) is required"))
                }
            };
            Ok(s.tok.encode(&text))
        })
        .await?;
        Ok(
            Json(json!({"tokens": ids, "count": ids.len(), "max_model_len": s.config.n_positions}))
                .into_response(),
        )
    }
    .await;
    answer(&s, "/tokenize", r)
}

/// vLLM's `/detokenize`: `{tokens}` → `{prompt}`.
async fn detokenize(State(s): S, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&s, &headers)?;
        let body = read_json(&s, &headers, body).await?;
        let req: request::Detokenize = request::parse(&body)?;
        check_model(&s, req.model.as_deref())?;
        let ids = req
            .tokens
            .ok_or_else(|| ApiError::invalid("tokens", "tokens must be a list of token ids"))?;
        let text = s
            .tok
            .decode(&ids)
            .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        Ok(Json(json!({"prompt": text})).into_response())
    }
    .await;
    answer(&s, "/detokenize", r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_never_panic() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::MAX), None);
        let _ = deadline(now, Duration::from_secs(i64::MAX as u64));
        let day = deadline(now, Duration::from_secs(super::super::MAX_TIMEOUT_SECS));
        assert_eq!(day, Some(now + Duration::from_secs(86_400)));
    }
}
