//! One streamed completion over HTTP, timed as its bytes arrive. Whatever goes wrong (a
//! refusal, an error event, a connection that breaks or goes silent) ends as a short reason,
//! never as a panic or a wait without end.

use super::sse::SseReader;
use crate::frontend::ServeTrace;
use crate::frontend::api::{CompletionRequest, CompletionResponse, ErrorBody};
use futures_util::StreamExt;
use std::time::Duration;
use tokio::time::Instant;

/// What a completed request brought back. Times are ns since the run's start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// The first chunk with a choice: a token's text, or the finish if no text came.
    pub first_token_ns: Option<u64>,
    pub end_ns: u64,
    /// The arrival of each streamed chunk of text: one per token, except where the server
    /// held a token's text back (an incomplete character) and sent it with the next.
    pub token_times_ns: Vec<u64>,
    /// The generated ids, from `token_ids` (empty when the server does not return them).
    pub token_ids: Vec<u32>,
    /// `usage.completion_tokens`, when the server sent usage.
    pub completion_tokens: Option<u32>,
    /// `usage.prompt_tokens_details.cached_tokens`, when sent.
    pub cached_tokens: Option<u32>,
    /// The `disagg` object of the finishing chunk, when the server is this one.
    pub trace: Option<ServeTrace>,
}

impl Answer {
    /// Tokens generated: the server's count, else what the stream showed.
    pub fn output_tokens(&self) -> u32 {
        self.completion_tokens.unwrap_or_else(|| {
            self.token_ids
                .len()
                .max(self.token_times_ns.len())
                .try_into()
                .unwrap_or(u32::MAX)
        })
    }
}

/// Why a request did not complete, as a record's `reject_reason`.
pub type Reason = String;

/// Sends `body` (a streamed completion) to `url` and reads the stream to `[DONE]`, all within
/// `timeout`.
pub async fn complete(
    http: &reqwest::Client,
    url: &str,
    body: &CompletionRequest,
    start: Instant,
    timeout: Duration,
) -> Result<Answer, Reason> {
    tokio::time::timeout(timeout, exchange(http, url, body, start))
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

async fn exchange(
    http: &reqwest::Client,
    url: &str,
    body: &CompletionRequest,
    start: Instant,
) -> Result<Answer, Reason> {
    let response = http.post(url).json(body).send().await.map_err(|e| {
        if e.is_connect() {
            "connect_failed".to_owned()
        } else {
            "request_failed".to_owned()
        }
    })?;
    match response.status().as_u16() {
        200 => {}
        429 => return Err("queue_full".into()),
        status => return Err(format!("http_{status}")),
    }
    let mut answer = Answer::default();
    let mut finished = false;
    let mut reader = SseReader::default();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|_| "stream_broken".to_owned())?;
        let now_ns = since(start);
        for data in reader.push(&chunk).map_err(|_| "bad_chunk".to_owned())? {
            if data == "[DONE]" {
                if !finished {
                    return Err("stream_broken".into());
                }
                answer.end_ns = now_ns;
                return Ok(answer);
            }
            finished |= read_chunk(&data, now_ns, &mut answer)?;
        }
    }
    Err("stream_broken".into())
}

/// Folds one `data` payload into the answer; true when it carried the finish reason.
fn read_chunk(data: &str, now_ns: u64, answer: &mut Answer) -> Result<bool, Reason> {
    let chunk: CompletionResponse = match serde_json::from_str(data) {
        Ok(chunk) => chunk,
        Err(_) => {
            return Err(match serde_json::from_str::<ErrorBody>(data) {
                Ok(_) => "stream_error".into(),
                Err(_) => "bad_chunk".into(),
            });
        }
    };
    if let Some(usage) = chunk.usage {
        answer.completion_tokens = u32::try_from(usage.completion_tokens).ok();
        if let Some(details) = usage.prompt_tokens_details {
            answer.cached_tokens = u32::try_from(details.cached_tokens).ok();
        }
    }
    if chunk.disagg.is_some() {
        answer.trace = chunk.disagg;
    }
    let mut finished = false;
    for choice in chunk.choices {
        answer.first_token_ns.get_or_insert(now_ns);
        if !choice.text.is_empty() {
            answer.token_times_ns.push(now_ns);
        }
        // Ours sends every id on the finishing chunk; vLLM sends each chunk's own.
        answer
            .token_ids
            .extend(choice.token_ids.unwrap_or_default());
        finished |= choice.finish_reason.is_some();
    }
    Ok(finished)
}
