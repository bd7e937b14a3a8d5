//! What the frontend, the registry and the workers say to each other over HTTP (JSON bodies,
//! NDJSON streams). KV itself travels on the transport, not here.

use crate::frontend::{BackendError, FinishReason, GenerateEvent, ServeTrace, TokenUsage};
use models::runtime::SamplingParams;
use serde::{Deserialize, Serialize};
use sim::routing::Role;
use std::net::SocketAddr;

/// A worker as it announces itself to the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub role: Role,
    /// Its control API.
    pub addr: SocketAddr,
    /// Where it receives KV (decode workers).
    pub kv_addr: Option<SocketAddr>,
}

/// The registry's answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The worker's index in the cluster (stable per name).
    pub worker: u32,
}

/// [`SamplingParams`] on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
}

impl From<&SamplingParams> for WireSampling {
    fn from(p: &SamplingParams) -> WireSampling {
        WireSampling {
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed,
            max_tokens: p.max_tokens,
            stop_token_ids: p.stop_token_ids.clone(),
            stop_strings: p.stop_strings.clone(),
            ignore_eos: p.ignore_eos,
        }
    }
}

impl From<WireSampling> for SamplingParams {
    fn from(w: WireSampling) -> SamplingParams {
        SamplingParams {
            temperature: w.temperature,
            top_p: w.top_p,
            seed: w.seed,
            max_tokens: w.max_tokens,
            stop_token_ids: w.stop_token_ids,
            stop_strings: w.stop_strings,
            ignore_eos: w.ignore_eos,
        }
    }
}

/// `POST /generate` on an aggregated or decode worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateCall {
    pub tokens: Vec<u32>,
    pub sampling: WireSampling,
    /// A decode worker's prefill worker: its cluster index and control address.
    pub prefill: Option<(u32, SocketAddr)>,
}

/// One line of a `/generate` stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    Token {
        text: String,
        token_id: u32,
    },
    Done {
        finish_reason: WireFinish,
        prompt_tokens: usize,
        completion_tokens: usize,
        trace: ServeTrace,
        token_ids: Vec<u32>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFinish {
    Stop,
    Length,
}

/// A [`BackendError`]'s kind on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    PromptTooLong,
    InvalidPrompt,
    QueueFull,
    Unavailable,
    Internal,
}

/// An error body of a worker's non-200 answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerError {
    pub kind: ErrorKind,
    pub message: String,
    /// For PromptTooLong.
    #[serde(default)]
    pub tokens: usize,
    #[serde(default)]
    pub limit: usize,
}

impl WorkerError {
    pub fn from_backend(e: &BackendError) -> WorkerError {
        let (kind, tokens, limit) = match e {
            BackendError::PromptTooLong { tokens, limit } => {
                (ErrorKind::PromptTooLong, *tokens, *limit)
            }
            BackendError::QueueFull => (ErrorKind::QueueFull, 0, 0),
            BackendError::Unavailable(_) => (ErrorKind::Unavailable, 0, 0),
            BackendError::InvalidPrompt(_) => (ErrorKind::InvalidPrompt, 0, 0),
            BackendError::UnknownModel(_) | BackendError::Internal(_) => {
                (ErrorKind::Internal, 0, 0)
            }
        };
        WorkerError {
            kind,
            message: e.to_string(),
            tokens,
            limit,
        }
    }

    pub fn into_backend(self) -> BackendError {
        match self.kind {
            ErrorKind::PromptTooLong => BackendError::PromptTooLong {
                tokens: self.tokens,
                limit: self.limit,
            },
            ErrorKind::InvalidPrompt => BackendError::InvalidPrompt(self.message),
            ErrorKind::QueueFull => BackendError::QueueFull,
            ErrorKind::Unavailable => BackendError::Unavailable(self.message),
            ErrorKind::Internal => BackendError::Internal(self.message),
        }
    }
}

impl StreamEvent {
    pub fn from_event(event: GenerateEvent) -> StreamEvent {
        match event {
            GenerateEvent::Token { text, token_id } => StreamEvent::Token { text, token_id },
            GenerateEvent::Done {
                finish_reason,
                usage,
                trace,
                token_ids,
            } => StreamEvent::Done {
                finish_reason: match finish_reason {
                    FinishReason::Stop => WireFinish::Stop,
                    FinishReason::Length => WireFinish::Length,
                },
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                trace,
                token_ids,
            },
            GenerateEvent::Error(e) => {
                let w = WorkerError::from_backend(&e);
                StreamEvent::Error {
                    kind: w.kind,
                    message: w.message,
                }
            }
        }
    }

    pub fn into_event(self) -> GenerateEvent {
        match self {
            StreamEvent::Token { text, token_id } => GenerateEvent::Token { text, token_id },
            StreamEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                trace,
                token_ids,
            } => GenerateEvent::Done {
                finish_reason: match finish_reason {
                    WireFinish::Stop => FinishReason::Stop,
                    WireFinish::Length => FinishReason::Length,
                },
                usage: TokenUsage {
                    prompt_tokens,
                    completion_tokens,
                },
                trace,
                token_ids,
            },
            StreamEvent::Error { kind, message } => GenerateEvent::Error(
                WorkerError {
                    kind,
                    message,
                    tokens: 0,
                    limit: 0,
                }
                .into_backend(),
            ),
        }
    }
}

/// `POST /prefill` on a prefill worker: compute the prompt's KV, send it from block
/// `skip_blocks` on to `kv_addr` under `request_id`, and answer once it is acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefillCall {
    pub request_id: u64,
    pub tokens: Vec<u32>,
    pub sampling: WireSampling,
    pub skip_blocks: usize,
    pub kv_addr: SocketAddr,
}

/// A prefill worker's answer: times are ns since it received the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillReply {
    /// Where the request's sampling stream stands after the first token (a decimal string:
    /// JSON numbers do not carry 128 bits everywhere).
    pub sampler_position: String,
    pub cached_tokens: u32,
    pub prefill_start_ns: u64,
    pub prefill_end_ns: u64,
    pub transfer_start_ns: u64,
    pub transfer_end_ns: u64,
    pub transfer_bytes: u64,
}

/// One line of a worker's `/events` stream: the first is a snapshot of every block in its
/// prefix cache, the rest are changes. Each carries the worker's load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsMessage {
    pub snapshot: bool,
    pub stored: Vec<u64>,
    pub removed: Vec<u64>,
    pub running: u32,
    pub waiting: u32,
    pub used_blocks: u32,
    pub capacity_blocks: u32,
}
