//! The OpenAI-compatible HTTP frontend: `POST /v1/completions`, `POST /v1/chat/completions`
//! (SSE streaming or not), `GET /v1/models`, `GET /health` and Prometheus `GET /metrics`.
//!
//! It is written against the [`Backend`] trait, so the HTTP layer is tested with a fake backend
//! and wired to the real cluster (router, prefill and decode workers) by implementing the trait
//! there. The backend owns tokenization, so it is the one that reports a prompt longer than the
//! context; the frontend validates everything it can see without a tokenizer.

pub mod api;
pub mod metrics;
pub mod server;
#[cfg(test)]
mod tests;

pub use api::{ApiError, ChatMessage, Role};
pub use metrics::Metrics;
pub use models::runtime::SamplingParams;
pub use server::{DEFAULT_ADDR, ServerConfig, router, serve, serve_listener};

use std::future::Future;
use tokio::sync::mpsc;

/// A model the backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// The name clients put in `model`.
    pub id: String,
    pub owned_by: String,
}

/// What a request asks the model to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerateInput {
    /// `/v1/completions`: raw text, no template.
    Text(String),
    /// `/v1/chat/completions`: the backend applies the model's chat template.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions` with token ids: used as they are, no special tokens added.
    Tokens(Vec<u32>),
}

/// Where and when the serving side handled one request: ns since the backend accepted it
/// (0 where a stage did not happen), workers by their cluster index. Sent to clients as the
/// response's `disagg` object, so a load generator records what only the server knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServeTrace {
    pub prefill_worker: Option<u32>,
    pub decode_worker: Option<u32>,
    /// Prompt tokens the prefilling worker found in its prefix cache.
    pub cached_tokens: u32,
    /// Prompt tokens the decode worker already held, whose KV did not cross the link (on an
    /// aggregated worker, the same as `cached_tokens`).
    pub decode_cached_tokens: u32,
    pub routed_ns: u64,
    pub prefill_start_ns: u64,
    pub prefill_end_ns: u64,
    pub transfer_start_ns: u64,
    pub transfer_end_ns: u64,
    pub transfer_bytes: u64,
    /// The decode worker's copy of the landed KV into its cache, between two of its steps.
    #[serde(default)]
    pub import_start_ns: u64,
    #[serde(default)]
    pub import_end_ns: u64,
    pub preemptions: u32,
}

/// One generation, as the frontend hands it to the backend.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// Unique per frontend process; also the `id` of the response.
    pub request_id: String,
    pub model: String,
    pub input: GenerateInput,
    pub sampling: SamplingParams,
    /// For session affinity: the header `x-conversation-id`, else the body's `user`.
    pub conversation_id: Option<String>,
}

/// Why a generation ended, as OpenAI reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl From<models::runtime::FinishReason> for FinishReason {
    fn from(reason: models::runtime::FinishReason) -> FinishReason {
        match reason {
            models::runtime::FinishReason::Length => FinishReason::Length,
            models::runtime::FinishReason::StopToken(_)
            | models::runtime::FinishReason::StopString(_) => FinishReason::Stop,
        }
    }
}

/// Token counts of a finished generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a backend streams for one request: tokens as they are sampled, then exactly one `Done`
/// or `Error`. Token text is already cut at a stop string.
#[derive(Debug)]
pub enum GenerateEvent {
    Token {
        text: String,
        token_id: u32,
    },
    Done {
        finish_reason: FinishReason,
        usage: TokenUsage,
        trace: ServeTrace,
        /// Every generated token id, in order.
        token_ids: Vec<u32>,
    },
    Error(BackendError),
}

/// Why a backend refused or failed a request; each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("the prompt is {tokens} tokens, longer than the model's context of {limit} tokens")]
    PromptTooLong { tokens: usize, limit: usize },
    /// A prompt the backend cannot read (a token id outside the vocabulary); a 400 naming
    /// `prompt`.
    #[error("{0}")]
    InvalidPrompt(String),
    #[error("every worker's queue is full; retry later")]
    QueueFull,
    #[error("the backend is unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The serving side the frontend talks to: the cluster in production, a fake in tests.
pub trait Backend: Send + Sync + 'static {
    fn models(&self) -> Vec<ModelInfo>;

    /// The context length of `model` in tokens (prompt plus generated), if it is served.
    fn context_tokens(&self, model: &str) -> Option<usize>;

    /// Admits a request and returns its event stream. Dropping the receiver cancels it.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> impl Future<Output = Result<mpsc::Receiver<GenerateEvent>, BackendError>> + Send;
}
