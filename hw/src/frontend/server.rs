//! The axum application: routes, body limit, OpenAI error bodies for every rejection, SSE
//! streaming, and the TTFT/ITL and per-status request metrics.

use super::api::{
    ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
    ChatCompletionRequest, ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest,
    CompletionResponse, ModelList, ModelObject, Role, Usage, parse_json,
};
use super::{
    Backend, BackendError, FinishReason, GenerateEvent, GenerateInput, GenerateRequest, Metrics,
    ServeTrace, TokenUsage,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Loopback only: exposing the server is an explicit choice of address.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8000));

/// The header that carries a conversation id for session affinity; it wins over `user`.
pub const CONVERSATION_HEADER: &str = "x-conversation-id";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// `max_tokens` of a completion that sets none (OpenAI's default is 16).
    pub completion_default_max_tokens: usize,
    /// `max_tokens` of a chat completion that sets none (OpenAI has no limit but the context;
    /// a bound keeps a forgotten field from holding a worker for the whole context).
    pub chat_default_max_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_body_bytes: 1 << 20,
            completion_default_max_tokens: 16,
            chat_default_max_tokens: 512,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

struct App<B> {
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    next_request: AtomicU64,
    /// Seeds requests that set no `seed`, differently in each process.
    seeds: std::collections::hash_map::RandomState,
    /// Unix seconds at start: the `created` of every model.
    started_unix_s: u64,
}

/// The application, for `axum::serve` or for driving in tests with `tower::ServiceExt`.
pub fn router<B: Backend>(backend: Arc<B>, metrics: Arc<Metrics>, config: ServerConfig) -> Router {
    let max_body_bytes = config.max_body_bytes;
    let app = Arc::new(App {
        backend,
        metrics: Arc::clone(&metrics),
        config,
        next_request: AtomicU64::new(0),
        seeds: Default::default(),
        started_unix_s: unix_now_s(),
    });
    Router::new()
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/chat/completions", post(chat_completions::<B>))
        .route("/v1/models", get(list_models::<B>))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics::<B>))
        .fallback(unknown_route)
        .with_state(app)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(metrics, count_requests))
}

/// Binds `addr` and serves until the process ends.
pub async fn serve<B: Backend>(
    addr: SocketAddr,
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    config: ServerConfig,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, backend, metrics, config, std::future::pending()).await
}

/// Serves on a bound listener until `shutdown` completes, then drains open connections.
pub async fn serve_listener<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(crate::no_delay(listener), router(backend, metrics, config))
        .with_graceful_shutdown(shutdown)
        .await
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fixed label per route, so unknown paths cannot grow the metric's label set.
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

async fn count_requests(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let response = next.run(req).await;
    metrics.record_request(route, response.status().as_u16());
    response
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn render_metrics<B: Backend>(State(app): State<Arc<App<B>>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn list_models<B: Backend>(State(app): State<Arc<App<B>>>) -> Json<ModelList> {
    let data = app
        .backend
        .models()
        .into_iter()
        .map(|m| ModelObject {
            max_model_len: app.backend.context_tokens(&m.id),
            id: m.id,
            object: "model".into(),
            created: app.started_unix_s,
            owned_by: m.owned_by,
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

async fn completions<B: Backend>(
    State(app): State<Arc<App<B>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    match app.completion(arrived, &headers, body).await {
        Ok(response) | Err(response) => response,
    }
}

async fn chat_completions<B: Backend>(
    State(app): State<Arc<App<B>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    match app.chat_completion(arrived, &headers, body).await {
        Ok(response) | Err(response) => response,
    }
}

/// The conversation id: the header if present and non-empty, else the body's `user`.
fn conversation_id(headers: &HeaderMap, user: Option<&str>) -> Option<String> {
    headers
        .get(CONVERSATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .or(user.filter(|u| !u.is_empty()))
        .map(str::to_owned)
}

/// What every chunk of one streamed response repeats.
struct ChunkHeader {
    id: String,
    created: u64,
    model: String,
}

/// The two endpoints differ only in the JSON they wrap text and endings in.
enum Shape {
    Completion,
    Chat,
}

impl Shape {
    /// A chunk of generated text; with `finish`, the last chunk of choices, which also carries
    /// the serve trace and, when asked for, every generated token id.
    fn text_chunk(&self, h: &ChunkHeader, text: String, finish: Option<FinishChunk>) -> String {
        let finish_reason = finish.as_ref().map(|f| f.reason.as_str().to_owned());
        let (trace, token_ids) = match finish {
            Some(f) => (Some(f.trace), f.token_ids),
            None => (None, None),
        };
        match self {
            Shape::Completion => to_json(&CompletionResponse {
                id: h.id.clone(),
                object: "text_completion".into(),
                created: h.created,
                model: h.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason,
                    token_ids,
                }],
                usage: None,
                disagg: trace,
            }),
            Shape::Chat => to_json(&ChatCompletionChunk {
                disagg: trace,
                ..chat_chunk(
                    h,
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: None,
                            content: (!text.is_empty() || finish_reason.is_none()).then_some(text),
                        },
                        logprobs: None,
                        finish_reason,
                        token_ids,
                    }],
                    None,
                )
            }),
        }
    }

    /// Chat streams open with a chunk that carries only the assistant role, as OpenAI's do.
    fn opening(&self, h: &ChunkHeader) -> Option<String> {
        match self {
            Shape::Completion => None,
            Shape::Chat => Some(to_json(&chat_chunk(
                h,
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: Some(Role::Assistant),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                    token_ids: None,
                }],
                None,
            ))),
        }
    }

    /// The `stream_options.include_usage` chunk: no choices, only usage.
    fn usage_chunk(&self, h: &ChunkHeader, usage: Usage) -> String {
        match self {
            Shape::Completion => to_json(&CompletionResponse {
                id: h.id.clone(),
                object: "text_completion".into(),
                created: h.created,
                model: h.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
                disagg: None,
            }),
            Shape::Chat => to_json(&chat_chunk(h, Vec::new(), Some(usage))),
        }
    }
}

fn chat_chunk(
    h: &ChunkHeader,
    choices: Vec<ChatChunkChoice>,
    usage: Option<Usage>,
) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: h.id.clone(),
        object: "chat.completion.chunk".into(),
        created: h.created,
        model: h.model.clone(),
        choices,
        usage,
        disagg: None,
    }
}

/// What the finishing chunk of a stream adds to its (empty) text.
struct FinishChunk {
    reason: FinishReason,
    trace: ServeTrace,
    /// Only when the client asked for `return_token_ids`.
    token_ids: Option<Vec<u32>>,
}

/// Our own types always serialize; the fallback keeps the signature infallible.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Records TTFT on a request's first token and ITL on each later one.
struct TokenClock {
    arrived: Instant,
    last_token: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl TokenClock {
    fn on_token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.observe_ttft(now - self.arrived),
            Some(last) => self.metrics.observe_itl(now - last),
        }
        self.metrics.add_tokens_generated(1);
        self.last_token = Some(now);
    }

    /// The prefix-cache hit of a finished request, from its trace.
    fn on_done(&self, usage: &TokenUsage, trace: &ServeTrace) {
        self.metrics.record_prefix_lookup(
            trace.cached_tokens.into(),
            trace.decode_cached_tokens.into(),
            usage.prompt_tokens as u64,
        );
    }
}

fn ended_early() -> BackendError {
    BackendError::Internal("the backend ended the stream without finishing".into())
}

/// A whole generation, as a non-streamed response reports it.
struct Generated {
    text: String,
    finish_reason: FinishReason,
    usage: TokenUsage,
    trace: ServeTrace,
    token_ids: Vec<u32>,
}

/// Drains a non-streamed generation.
async fn collect(
    mut events: mpsc::Receiver<GenerateEvent>,
    mut clock: TokenClock,
) -> Result<Generated, ApiError> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerateEvent::Token { text: piece, .. } => {
                clock.on_token();
                text.push_str(&piece);
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
                trace,
                token_ids,
            } => {
                clock.on_done(&usage, &trace);
                return Ok(Generated {
                    text,
                    finish_reason,
                    usage,
                    trace,
                    token_ids,
                });
            }
            GenerateEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ended_early().into())
}

/// What a client asked of a streamed response beyond the text.
#[derive(Clone, Copy)]
struct StreamExtras {
    include_usage: bool,
    return_token_ids: bool,
}

/// Turns a generation into SSE: the opening chunk (chat), a chunk per token, a last chunk with
/// the finish reason (and the serve trace), the usage chunk if asked, then `data: [DONE]`. A
/// backend error mid-stream is sent as an OpenAI error body before `[DONE]`. The pump stops,
/// dropping the backend's receiver and so cancelling the request, as soon as the client goes
/// away.
fn stream_response(
    mut events: mpsc::Receiver<GenerateEvent>,
    mut clock: TokenClock,
    shape: Shape,
    chunk: ChunkHeader,
    extras: StreamExtras,
) -> Response {
    let (tx, rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        if let Some(opening) = shape.opening(&chunk)
            && tx.send(opening).await.is_err()
        {
            return;
        }
        loop {
            let data = match events.recv().await {
                Some(GenerateEvent::Token { text, .. }) => {
                    clock.on_token();
                    shape.text_chunk(&chunk, text, None)
                }
                Some(GenerateEvent::Done {
                    finish_reason,
                    usage,
                    trace,
                    token_ids,
                }) => {
                    clock.on_done(&usage, &trace);
                    let cached_tokens = trace.cached_tokens;
                    let finish = FinishChunk {
                        reason: finish_reason,
                        trace,
                        token_ids: extras.return_token_ids.then_some(token_ids),
                    };
                    let last = shape.text_chunk(&chunk, String::new(), Some(finish));
                    if tx.send(last).await.is_err() {
                        return;
                    }
                    if extras.include_usage
                        && tx
                            .send(shape.usage_chunk(&chunk, Usage::new(usage, cached_tokens)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    break;
                }
                Some(GenerateEvent::Error(e)) => {
                    if tx.send(to_json(&ApiError::from(e).body())).await.is_err() {
                        return;
                    }
                    break;
                }
                None => {
                    let body = ApiError::from(ended_early()).body();
                    if tx.send(to_json(&body)).await.is_err() {
                        return;
                    }
                    break;
                }
            };
            if tx.send(data).await.is_err() {
                return;
            }
        }
        // The client may be gone already; nothing is left to do either way.
        let _ = tx.send("[DONE]".to_owned()).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), rx))
    });
    Sse::new(stream).into_response()
}

impl<B: Backend> App<B> {
    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        let bytes = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(self.config.max_body_bytes)
            } else {
                ApiError::invalid(
                    "",
                    format!("cannot read the request body: {}", rejection.body_text()),
                )
            }
        })?;
        parse_json(&bytes)
    }

    /// 404 unless the backend serves `model`; its context length when known.
    fn check_model(&self, model: &str) -> Result<Option<usize>, ApiError> {
        if !self.backend.models().iter().any(|m| m.id == model) {
            return Err(BackendError::UnknownModel(model.to_owned()).into());
        }
        Ok(self.backend.context_tokens(model))
    }

    /// A fresh request id and the seed used when the client gives none.
    fn next_request(&self, prefix: &str) -> (String, u64) {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        (format!("{prefix}-{n:016x}"), self.seeds.hash_one(n))
    }

    /// Rejects an explicit `max_tokens` larger than the whole context: it can never be met.
    fn check_max_tokens(
        field: &str,
        requested: Option<u64>,
        context_tokens: Option<usize>,
    ) -> Result<(), ApiError> {
        if let (Some(m), Some(ctx)) = (requested, context_tokens)
            && m > ctx as u64
        {
            return Err(ApiError::invalid(
                field,
                format!("{field} = {m} exceeds the model's context of {ctx} tokens"),
            ));
        }
        Ok(())
    }

    async fn completion(
        &self,
        arrived: Instant,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Response, Response> {
        let req: CompletionRequest = self.parse(body).map_err(IntoResponse::into_response)?;
        let context_tokens = self
            .check_model(&req.model)
            .map_err(IntoResponse::into_response)?;
        let (request_id, default_seed) = self.next_request("cmpl");
        let default_max = bounded(self.config.completion_default_max_tokens, context_tokens);
        let sampling = req
            .sampling(default_max, default_seed)
            .and_then(|s| {
                Self::check_max_tokens("max_tokens", req.max_tokens, context_tokens).map(|()| s)
            })
            .map_err(IntoResponse::into_response)?;
        let input = req.prompt_input().map_err(IntoResponse::into_response)?;
        let gen_req = GenerateRequest {
            request_id,
            model: req.model,
            input,
            sampling,
            conversation_id: conversation_id(headers, req.user.as_deref()),
        };
        let return_token_ids = req.return_token_ids.unwrap_or(false);
        let (events, clock, chunk) = self.start(arrived, gen_req).await?;
        if req.stream.unwrap_or(false) {
            let extras = StreamExtras {
                include_usage: req.stream_options.is_some_and(|o| o.include_usage),
                return_token_ids,
            };
            return Ok(stream_response(
                events,
                clock,
                Shape::Completion,
                chunk,
                extras,
            ));
        }
        let done = collect(events, clock)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Json(CompletionResponse {
            id: chunk.id,
            object: "text_completion".into(),
            created: chunk.created,
            model: chunk.model,
            choices: vec![CompletionChoice {
                index: 0,
                text: done.text,
                logprobs: None,
                finish_reason: Some(done.finish_reason.as_str().to_owned()),
                token_ids: return_token_ids.then_some(done.token_ids),
            }],
            usage: Some(Usage::new(done.usage, done.trace.cached_tokens)),
            disagg: Some(done.trace),
        })
        .into_response())
    }

    /// Hands a validated request to the backend; the header names the response's chunks.
    async fn start(
        &self,
        arrived: Instant,
        req: GenerateRequest,
    ) -> Result<
        (
            tokio::sync::mpsc::Receiver<GenerateEvent>,
            TokenClock,
            ChunkHeader,
        ),
        Response,
    > {
        let chunk = ChunkHeader {
            id: req.request_id.clone(),
            created: unix_now_s(),
            model: req.model.clone(),
        };
        let events = self
            .backend
            .generate(req)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        Ok((events, self.clock(arrived), chunk))
    }

    async fn chat_completion(
        &self,
        arrived: Instant,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Response, Response> {
        let req: ChatCompletionRequest = self.parse(body).map_err(IntoResponse::into_response)?;
        req.validate_messages()
            .map_err(IntoResponse::into_response)?;
        let context_tokens = self
            .check_model(&req.model)
            .map_err(IntoResponse::into_response)?;
        let (request_id, default_seed) = self.next_request("chatcmpl");
        let default_max = bounded(self.config.chat_default_max_tokens, context_tokens);
        let (field, requested) = match req.max_completion_tokens {
            Some(m) => ("max_completion_tokens", Some(m)),
            None => ("max_tokens", req.max_tokens),
        };
        let sampling = req
            .sampling(default_max, default_seed)
            .and_then(|s| Self::check_max_tokens(field, requested, context_tokens).map(|()| s))
            .map_err(IntoResponse::into_response)?;
        let gen_req = GenerateRequest {
            request_id,
            model: req.model,
            input: GenerateInput::Chat(req.messages),
            sampling,
            conversation_id: conversation_id(headers, req.user.as_deref()),
        };
        let return_token_ids = req.return_token_ids.unwrap_or(false);
        let (events, clock, chunk) = self.start(arrived, gen_req).await?;
        if req.stream.unwrap_or(false) {
            let extras = StreamExtras {
                include_usage: req.stream_options.is_some_and(|o| o.include_usage),
                return_token_ids,
            };
            return Ok(stream_response(events, clock, Shape::Chat, chunk, extras));
        }
        let done = collect(events, clock)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Json(ChatCompletionResponse {
            id: chunk.id,
            object: "chat.completion".into(),
            created: chunk.created,
            model: chunk.model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: Role::Assistant,
                    content: done.text,
                },
                logprobs: None,
                finish_reason: Some(done.finish_reason.as_str().to_owned()),
                token_ids: return_token_ids.then_some(done.token_ids),
            }],
            usage: Usage::new(done.usage, done.trace.cached_tokens),
            disagg: Some(done.trace),
        })
        .into_response())
    }

    fn clock(&self, arrived: Instant) -> TokenClock {
        TokenClock {
            arrived,
            last_token: None,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// A default `max_tokens` never exceeds the context.
fn bounded(default_max_tokens: usize, context_tokens: Option<usize>) -> usize {
    context_tokens.map_or(default_max_tokens, |ctx| default_max_tokens.min(ctx.max(1)))
}
