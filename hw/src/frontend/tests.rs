//! The HTTP layer end to end against a fake backend that echoes the prompt's words (or token
//! ids) as tokens.

use super::api::{
    ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorBody, ModelList,
};
use super::metrics::parse_sample;
use super::*;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tower::ServiceExt;

const MODEL: &str = "fake";
const CONTEXT_TOKENS: usize = 64;

/// Each whitespace-separated word of the prompt (or of every chat message) is one token, id
/// its position; a token-id prompt's ids are its tokens. It generates them back in order,
/// honouring `max_tokens` and stop strings that equal a word, and finishes with `trace`.
#[derive(Default)]
struct Fake {
    /// Returned by `generate` instead of admitting the request.
    refuse_with: Mutex<Option<BackendError>>,
    /// Sends this error after this many tokens instead of finishing.
    fail_after_tokens: Mutex<Option<usize>>,
    last_request: Mutex<Option<GenerateRequest>>,
    trace: Mutex<ServeTrace>,
}

impl Fake {
    fn last(&self) -> GenerateRequest {
        self.last_request
            .lock()
            .unwrap()
            .clone()
            .expect("no request reached the backend")
    }
}

impl Backend for Fake {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            owned_by: "disagg".into(),
        }]
    }

    fn context_tokens(&self, model: &str) -> Option<usize> {
        (model == MODEL).then_some(CONTEXT_TOKENS)
    }

    async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        *self.last_request.lock().unwrap() = Some(req.clone());
        if let Some(e) = self.refuse_with.lock().unwrap().clone() {
            return Err(e);
        }
        let words: Vec<(String, u32)> = match &req.input {
            GenerateInput::Text(text) => text
                .split_whitespace()
                .zip(0..)
                .map(|(w, i)| (w.to_owned(), i))
                .collect(),
            GenerateInput::Chat(messages) => messages
                .iter()
                .flat_map(|m| m.content.split_whitespace())
                .zip(0..)
                .map(|(w, i)| (w.to_owned(), i))
                .collect(),
            GenerateInput::Tokens(ids) => ids.iter().map(|&id| (id.to_string(), id)).collect(),
        };
        if words.len() > CONTEXT_TOKENS {
            return Err(BackendError::PromptTooLong {
                tokens: words.len(),
                limit: CONTEXT_TOKENS,
            });
        }
        let fail_after = *self.fail_after_tokens.lock().unwrap();
        let trace = self.trace.lock().unwrap().clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = 0;
            let mut token_ids = Vec::new();
            let mut finish_reason = FinishReason::Stop;
            for (i, (word, token_id)) in words.iter().enumerate() {
                if fail_after == Some(sent) {
                    let _ = tx
                        .send(GenerateEvent::Error(BackendError::Internal(
                            "worker died".into(),
                        )))
                        .await;
                    return;
                }
                if req.sampling.stop_strings.contains(word) {
                    break;
                }
                if sent == req.sampling.max_tokens {
                    finish_reason = FinishReason::Length;
                    break;
                }
                let text = if i == 0 {
                    word.clone()
                } else {
                    format!(" {word}")
                };
                let token = GenerateEvent::Token {
                    text,
                    token_id: *token_id,
                };
                if tx.send(token).await.is_err() {
                    return;
                }
                token_ids.push(*token_id);
                sent += 1;
            }
            let usage = TokenUsage {
                prompt_tokens: words.len(),
                completion_tokens: sent,
            };
            let _ = tx
                .send(GenerateEvent::Done {
                    finish_reason,
                    usage,
                    trace,
                    token_ids,
                })
                .await;
        });
        Ok(rx)
    }
}

struct Harness {
    fake: Arc<Fake>,
    metrics: Arc<Metrics>,
    app: Router,
}

fn harness(config: ServerConfig) -> Harness {
    let fake = Arc::new(Fake::default());
    let metrics = Arc::new(Metrics::new());
    let app = router(Arc::clone(&fake), Arc::clone(&metrics), config);
    Harness { fake, metrics, app }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn error(&self) -> ErrorBody {
        self.json()
    }

    /// The SSE body as its `data:` payloads, checking the wire format on the way.
    fn sse_data(&self) -> Vec<String> {
        assert_eq!(self.headers["content-type"], "text/event-stream");
        let text = std::str::from_utf8(&self.body).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.strip_suffix("\n\n")
            .unwrap()
            .split("\n\n")
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .filter(|d| !d.contains('\n'))
                    .unwrap_or_else(|| panic!("not one data line: {event:?}"))
                    .to_owned()
            })
            .collect()
    }
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str, body: impl Into<Body>) -> Reply {
        let req = Request::post(uri)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        self.send(req).await
    }

    async fn post_json(&self, uri: &str, body: serde_json::Value) -> Reply {
        self.post(uri, body.to_string()).await
    }
}

fn completion(prompt: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({ "model": MODEL, "prompt": prompt });
    merge(&mut body, extra);
    body
}

fn chat(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "system", "content": "be brief" },
                     { "role": "user", "content": content }],
    });
    merge(&mut body, extra);
    body
}

fn merge(body: &mut serde_json::Value, extra: serde_json::Value) {
    if let serde_json::Value::Object(extra) = extra {
        body.as_object_mut().unwrap().extend(extra);
    }
}

#[tokio::test]
async fn health_and_models() {
    let h = harness(ServerConfig::default());
    let health = h.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json::<serde_json::Value>()["status"], "ok");
    let models: ModelList = h.get("/v1/models").await.json();
    assert_eq!(models.object, "list");
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, MODEL);
    assert_eq!(models.data[0].object, "model");
    assert_eq!(models.data[0].max_model_len, Some(CONTEXT_TOKENS));
    let unknown = h.get("/v2/nothing").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.error().error.message.contains("/v2/nothing"));
}

#[tokio::test]
async fn completion_aggregates_tokens() {
    let h = harness(ServerConfig::default());
    let body = completion(
        "the quick brown fox",
        serde_json::json!({ "max_tokens": 3 }),
    );
    let reply = h.post_json("/v1/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    let r: CompletionResponse = reply.json();
    assert!(r.id.starts_with("cmpl-"), "{}", r.id);
    assert_eq!(r.object, "text_completion");
    assert_eq!(r.model, MODEL);
    assert_eq!(r.choices[0].text, "the quick brown");
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("length"));
    let usage = r.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (4, 3, 7)
    );

    // No max_tokens: OpenAI's default of 16, so the whole echo and a natural stop.
    let r: CompletionResponse = h
        .post_json("/v1/completions", completion("a b", serde_json::json!({})))
        .await
        .json();
    assert_eq!(r.choices[0].text, "a b");
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(h.fake.last().sampling.max_tokens, 16);
}

#[tokio::test]
async fn chat_completion_aggregates_tokens() {
    let h = harness(ServerConfig::default());
    let reply = h
        .post_json(
            "/v1/chat/completions",
            chat("hello there", serde_json::json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let r: ChatCompletionResponse = reply.json();
    assert!(r.id.starts_with("chatcmpl-"), "{}", r.id);
    assert_eq!(r.object, "chat.completion");
    assert_eq!(r.choices[0].message.role, Role::Assistant);
    assert_eq!(r.choices[0].message.content, "be brief hello there");
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.usage.total_tokens, 8);
    let GenerateInput::Chat(messages) = h.fake.last().input else {
        panic!("a chat request reached the backend as text");
    };
    assert_eq!(
        messages[1],
        ChatMessage {
            role: Role::User,
            content: "hello there".into()
        }
    );
    assert_eq!(
        h.fake.last().sampling.max_tokens,
        ServerConfig::default()
            .chat_default_max_tokens
            .min(CONTEXT_TOKENS)
    );
}

#[tokio::test]
async fn completion_streams_one_chunk_per_token() {
    let h = harness(ServerConfig::default());
    let body = completion(
        "one two three",
        serde_json::json!({ "stream": true, "stream_options": { "include_usage": true } }),
    );
    let reply = h.post_json("/v1/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    let data = reply.sse_data();
    assert_eq!(data.len(), 3 + 1 + 1 + 1, "{data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<CompletionResponse> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let texts: Vec<&str> = chunks[..3]
        .iter()
        .map(|c| c.choices[0].text.as_str())
        .collect();
    assert_eq!(texts, ["one", " two", " three"]);
    assert!(
        chunks[..3]
            .iter()
            .all(|c| c.choices[0].finish_reason.is_none())
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.id == chunks[0].id && c.object == "text_completion")
    );
    assert_eq!(chunks[3].choices[0].finish_reason.as_deref(), Some("stop"));
    assert!(chunks[4].choices.is_empty());
    assert_eq!(chunks[4].usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn chat_streams_role_then_deltas_then_finish() {
    let h = harness(ServerConfig::default());
    let reply = h
        .post_json(
            "/v1/chat/completions",
            chat("hi", serde_json::json!({ "stream": true, "max_tokens": 2 })),
        )
        .await;
    let data = reply.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<ChatCompletionChunk> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 1 + 2 + 1, "{data:?}");
    assert!(
        chunks
            .iter()
            .all(|c| c.object == "chat.completion.chunk" && c.usage.is_none())
    );
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let deltas: Vec<&str> = chunks[1..3]
        .iter()
        .map(|c| c.choices[0].delta.content.as_deref().unwrap())
        .collect();
    assert_eq!(deltas, ["be", " brief"]);
    let last = &chunks[3].choices[0];
    assert_eq!(last.finish_reason.as_deref(), Some("length"));
    assert_eq!(last.delta, Default::default());
}

#[tokio::test]
async fn error_mid_stream_is_an_error_event_then_done() {
    let h = harness(ServerConfig::default());
    *h.fake.fail_after_tokens.lock().unwrap() = Some(1);
    let streamed = h
        .post_json(
            "/v1/completions",
            completion("a b c", serde_json::json!({ "stream": true })),
        )
        .await;
    let data = streamed.sse_data();
    assert_eq!(data.len(), 3, "{data:?}");
    let error: ErrorBody = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(error.error.kind, "server_error");
    assert!(error.error.message.contains("worker died"));
    assert_eq!(data[2], "[DONE]");
    let whole = h
        .post_json(
            "/v1/completions",
            completion("a b c", serde_json::json!({})),
        )
        .await;
    assert_eq!(whole.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn bad_input_maps_to_openai_errors() {
    let h = harness(ServerConfig {
        max_body_bytes: 512,
        ..ServerConfig::default()
    });
    let malformed = h.post("/v1/completions", "{\"model\": \"fake\", ").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let e = malformed.error().error;
    assert_eq!(e.kind, "invalid_request_error");
    assert!(e.message.contains("malformed JSON"), "{}", e.message);

    let wrong_type = h
        .post_json(
            "/v1/chat/completions",
            chat("hi", serde_json::json!({ "top_p": "most" })),
        )
        .await;
    assert_eq!(wrong_type.status, StatusCode::BAD_REQUEST);
    assert_eq!(wrong_type.error().error.param.as_deref(), Some("top_p"));

    let out_of_range = h
        .post_json(
            "/v1/completions",
            completion("hi", serde_json::json!({ "temperature": 3.0 })),
        )
        .await;
    assert_eq!(out_of_range.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        out_of_range.error().error.param.as_deref(),
        Some("temperature")
    );

    let no_messages = h
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({ "model": MODEL, "messages": [] }),
        )
        .await;
    assert_eq!(no_messages.error().error.param.as_deref(), Some("messages"));

    let unknown_model = h
        .post_json(
            "/v1/completions",
            serde_json::json!({ "model": "gpt-9", "prompt": "hi" }),
        )
        .await;
    assert_eq!(unknown_model.status, StatusCode::NOT_FOUND);
    let e = unknown_model.error().error;
    assert_eq!(
        (e.param.as_deref(), e.code.as_deref()),
        (Some("model"), Some("model_not_found"))
    );

    let too_long = h
        .post_json(
            "/v1/completions",
            completion(&"w ".repeat(CONTEXT_TOKENS + 1), serde_json::json!({})),
        )
        .await;
    assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        too_long.error().error.code.as_deref(),
        Some("context_length_exceeded")
    );

    let max_over_context = h
        .post_json(
            "/v1/completions",
            completion("hi", serde_json::json!({ "max_tokens": 1000 })),
        )
        .await;
    assert_eq!(max_over_context.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        max_over_context.error().error.param.as_deref(),
        Some("max_tokens")
    );

    let oversized = h
        .post(
            "/v1/completions",
            completion(&"x".repeat(600), serde_json::json!({})).to_string(),
        )
        .await;
    assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(oversized.error().error.message.contains("512 bytes"));
}

#[tokio::test]
async fn backend_refusals_map_to_statuses() {
    let h = harness(ServerConfig::default());
    let cases = [
        (BackendError::QueueFull, StatusCode::TOO_MANY_REQUESTS),
        (
            BackendError::Unavailable("draining".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            BackendError::Internal("bug".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            BackendError::UnknownModel(MODEL.into()),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (error, status) in cases {
        *h.fake.refuse_with.lock().unwrap() = Some(error.clone());
        for streamed in [false, true] {
            let body = chat("hi", serde_json::json!({ "stream": streamed }));
            let reply = h.post_json("/v1/chat/completions", body).await;
            assert_eq!(reply.status, status, "{error:?}");
            assert_eq!(reply.error().error.message, error.to_string());
        }
    }
}

#[tokio::test]
async fn sampling_fields_and_conversation_id_reach_the_backend() {
    let h = harness(ServerConfig::default());
    let body = completion(
        "a b c",
        serde_json::json!({ "temperature": 0.5, "top_p": 0.9, "seed": 42, "stop": ["c", "zz"],
                            "user": "alice", "logprobs": null, "frequency_penalty": 0.0 }),
    );
    let r: CompletionResponse = h.post_json("/v1/completions", body).await.json();
    assert_eq!(r.choices[0].text, "a b");
    let last = h.fake.last();
    assert_eq!(
        (
            last.sampling.temperature,
            last.sampling.top_p,
            last.sampling.seed
        ),
        (0.5, 0.9, 42)
    );
    assert_eq!(last.sampling.stop_strings, ["c", "zz"]);
    assert_eq!(last.conversation_id.as_deref(), Some("alice"));
    assert_eq!(last.input, GenerateInput::Text("a b c".into()));

    let with_header = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(server::CONVERSATION_HEADER, "conv-7")
        .body(Body::from(
            chat("hi", serde_json::json!({ "user": "alice" })).to_string(),
        ))
        .unwrap();
    assert_eq!(h.send(with_header).await.status, StatusCode::OK);
    assert_eq!(h.fake.last().conversation_id.as_deref(), Some("conv-7"));

    h.post_json("/v1/completions", completion("hi", serde_json::json!({})))
        .await;
    assert_eq!(h.fake.last().conversation_id, None);
}

#[tokio::test]
async fn metrics_parse_and_reflect_requests() {
    let h = harness(ServerConfig::default());
    let body = completion("a b c d", serde_json::json!({ "stream": true }));
    h.post_json("/v1/completions", body).await;
    h.post_json("/v1/chat/completions", chat("x", serde_json::json!({})))
        .await;
    h.post_json(
        "/v1/completions",
        serde_json::json!({ "model": "nope", "prompt": "p" }),
    )
    .await;
    h.metrics
        .record_kv_transfer(4096, std::time::Duration::from_millis(5));
    h.metrics.set_queue_depth("prefill-0", 2);
    let reply = h.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let mut values = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|| panic!("bad line {line}"));
        let labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        values.insert(
            format!("{}{{{}}}", sample.name, labels.join(",")),
            sample.value,
        );
    }
    // 4 tokens streamed + 3 tokens of the chat: 2 first tokens, 5 gaps between tokens.
    assert_eq!(values["disagg_ttft_seconds_count{}"], 2.0);
    assert_eq!(values["disagg_itl_seconds_count{}"], 5.0);
    assert_eq!(values["disagg_tokens_generated_total{}"], 7.0);
    assert_eq!(
        values["disagg_requests_total{route=/v1/completions,status=200}"],
        1.0
    );
    assert_eq!(
        values["disagg_requests_total{route=/v1/completions,status=404}"],
        1.0
    );
    assert_eq!(
        values["disagg_requests_total{route=/v1/chat/completions,status=200}"],
        1.0
    );
    assert_eq!(values["disagg_kv_transfer_bytes_total{}"], 4096.0);
    assert_eq!(values["disagg_queue_depth{worker=prefill-0}"], 2.0);
}

/// A real loopback server, spoken to in plain HTTP/1.1.
#[tokio::test]
async fn serves_on_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_listener(
        listener,
        Arc::new(Fake::default()),
        Arc::new(Metrics::new()),
        ServerConfig::default(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let exchange = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    };
    let health =
        exchange("GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".into()).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = completion("over the wire", serde_json::json!({})).to_string();
    let post = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = exchange(post).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let json = reply.split_once("\r\n\r\n").unwrap().1;
    let r: CompletionResponse = serde_json::from_str(json).unwrap();
    assert_eq!(r.choices[0].text, "over the wire");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn default_address_is_loopback() {
    assert!(DEFAULT_ADDR.ip().is_loopback());
    assert_eq!(ServerConfig::default().max_body_bytes, 1 << 20);
}

fn sample_trace() -> ServeTrace {
    ServeTrace {
        prefill_worker: Some(1),
        decode_worker: Some(3),
        cached_tokens: 2,
        decode_cached_tokens: 1,
        routed_ns: 1_000,
        prefill_start_ns: 2_000,
        prefill_end_ns: 9_000,
        transfer_start_ns: 9_500,
        transfer_end_ns: 12_000,
        transfer_bytes: 65_536,
        import_start_ns: 12_500,
        import_end_ns: 13_000,
        preemptions: 1,
    }
}

/// The keys of a JSON object, sorted.
fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn completion_prompt_forms_reach_the_backend() {
    let h = harness(ServerConfig::default());
    let cases = [
        (serde_json::json!("a b"), GenerateInput::Text("a b".into())),
        (
            serde_json::json!(["a b"]),
            GenerateInput::Text("a b".into()),
        ),
        (
            serde_json::json!([7, 0, 9]),
            GenerateInput::Tokens(vec![7, 0, 9]),
        ),
        (
            serde_json::json!([[7, 9]]),
            GenerateInput::Tokens(vec![7, 9]),
        ),
    ];
    for (prompt, input) in cases {
        let body = serde_json::json!({ "model": MODEL, "prompt": prompt });
        let reply = h.post_json("/v1/completions", body).await;
        assert_eq!(reply.status, StatusCode::OK, "{prompt}");
        assert_eq!(h.fake.last().input, input);
    }
    let r: CompletionResponse = h
        .post_json(
            "/v1/completions",
            serde_json::json!({ "model": MODEL, "prompt": [5, 6], "max_tokens": 1 }),
        )
        .await
        .json();
    assert_eq!(r.choices[0].text, "5");
    for prompt in [
        serde_json::json!([[1], [2]]),
        serde_json::json!(["a", "b"]),
        serde_json::json!([[]]),
        serde_json::json!([1, "a"]),
    ] {
        let body = serde_json::json!({ "model": MODEL, "prompt": prompt });
        let reply = h.post_json("/v1/completions", body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{prompt}");
        let param = reply.error().error.param.unwrap();
        assert!(param.starts_with("prompt"), "{prompt}: {param}");
    }
}

#[tokio::test]
async fn ignore_eos_reaches_the_backend() {
    let h = harness(ServerConfig::default());
    h.post_json("/v1/completions", completion("a", serde_json::json!({})))
        .await;
    assert!(!h.fake.last().sampling.ignore_eos);
    for (uri, body) in [
        (
            "/v1/completions",
            completion("a", serde_json::json!({ "ignore_eos": true })),
        ),
        (
            "/v1/chat/completions",
            chat("a", serde_json::json!({ "ignore_eos": true })),
        ),
    ] {
        assert_eq!(h.post_json(uri, body).await.status, StatusCode::OK);
        assert!(h.fake.last().sampling.ignore_eos, "{uri}");
    }
}

#[tokio::test]
async fn non_streamed_responses_carry_trace_cached_tokens_and_token_ids() {
    let h = harness(ServerConfig::default());
    *h.fake.trace.lock().unwrap() = sample_trace();
    let body = serde_json::json!({ "model": MODEL, "prompt": [4, 8, 15, 16],
                                   "max_tokens": 3, "return_token_ids": true });
    let r: CompletionResponse = h.post_json("/v1/completions", body).await.json();
    assert_eq!(r.choices[0].token_ids, Some(vec![4, 8, 15]));
    assert_eq!(r.disagg, Some(sample_trace()));
    let details = r.usage.unwrap().prompt_tokens_details.unwrap();
    assert_eq!(details.cached_tokens, 2);

    let chat_body = chat("x y", serde_json::json!({ "return_token_ids": true }));
    let r: ChatCompletionResponse = h.post_json("/v1/chat/completions", chat_body).await.json();
    assert_eq!(r.choices[0].token_ids, Some(vec![0, 1, 2, 3]));
    assert_eq!(r.disagg, Some(sample_trace()));
    assert_eq!(r.usage.prompt_tokens_details.unwrap().cached_tokens, 2);
}

#[tokio::test]
async fn streamed_finishing_chunk_carries_trace_and_token_ids() {
    let h = harness(ServerConfig::default());
    *h.fake.trace.lock().unwrap() = sample_trace();
    let body = serde_json::json!({ "model": MODEL, "prompt": [[4, 8, 15]], "stream": true,
                                   "return_token_ids": true,
                                   "stream_options": { "include_usage": true } });
    let data = h.post_json("/v1/completions", body).await.sse_data();
    let chunks: Vec<CompletionResponse> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3 + 1 + 1, "{data:?}");
    for token in &chunks[..3] {
        assert_eq!((&token.disagg, &token.choices[0].token_ids), (&None, &None));
    }
    let finishing = &chunks[3];
    assert_eq!(finishing.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(finishing.choices[0].token_ids, Some(vec![4, 8, 15]));
    assert_eq!(finishing.disagg, Some(sample_trace()));
    let usage = chunks[4].usage.unwrap();
    assert_eq!(usage.prompt_tokens_details.unwrap().cached_tokens, 2);
    assert_eq!(chunks[4].disagg, None);

    let chat_body = chat(
        "x",
        serde_json::json!({ "stream": true, "return_token_ids": true }),
    );
    let data = h
        .post_json("/v1/chat/completions", chat_body)
        .await
        .sse_data();
    let chunks: Vec<ChatCompletionChunk> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(last.choices[0].token_ids, Some(vec![0, 1, 2]));
    assert_eq!(last.disagg, Some(sample_trace()));
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.disagg.is_none())
    );
}

/// Without `return_token_ids` every object keeps OpenAI's keys; only `disagg` (non-streamed
/// and finishing chunk) and `usage.prompt_tokens_details` are added.
#[tokio::test]
async fn official_shapes_are_unchanged_without_the_extensions() {
    let h = harness(ServerConfig::default());
    let top = [
        "choices", "created", "disagg", "id", "model", "object", "usage",
    ];
    let usage = [
        "completion_tokens",
        "prompt_tokens",
        "prompt_tokens_details",
        "total_tokens",
    ];
    let v: serde_json::Value = h
        .post_json("/v1/completions", completion("a b", serde_json::json!({})))
        .await
        .json();
    assert_eq!(keys(&v), top);
    assert_eq!(
        keys(&v["choices"][0]),
        ["finish_reason", "index", "logprobs", "text"]
    );
    assert_eq!(keys(&v["usage"]), usage);
    assert_eq!(
        keys(&v["usage"]["prompt_tokens_details"]),
        ["cached_tokens"]
    );
    assert_eq!(keys(&v["disagg"]).len(), 13);

    let v: serde_json::Value = h
        .post_json("/v1/chat/completions", chat("a", serde_json::json!({})))
        .await
        .json();
    assert_eq!(keys(&v), top);
    assert_eq!(
        keys(&v["choices"][0]),
        ["finish_reason", "index", "logprobs", "message"]
    );
    assert_eq!(keys(&v["usage"]), usage);

    let body = completion(
        "a b",
        serde_json::json!({ "stream": true, "stream_options": { "include_usage": true } }),
    );
    let data = h.post_json("/v1/completions", body).await.sse_data();
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let official = ["choices", "created", "id", "model", "object"];
    for token in &chunks[..2] {
        assert_eq!(keys(token), official);
        assert_eq!(
            keys(&token["choices"][0]),
            ["finish_reason", "index", "logprobs", "text"]
        );
    }
    assert_eq!(keys(&chunks[2]), top[..6], "the finishing chunk");
    assert_eq!(
        keys(&chunks[2]["choices"][0]),
        ["finish_reason", "index", "logprobs", "text"]
    );
    assert_eq!(
        keys(&chunks[3]),
        ["choices", "created", "id", "model", "object", "usage"]
    );
    assert_eq!(keys(&chunks[3]["usage"]), usage);

    let body = chat("a", serde_json::json!({ "stream": true }));
    let data = h.post_json("/v1/chat/completions", body).await.sse_data();
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    for chunk in rest {
        assert_eq!(keys(chunk), official);
        assert_eq!(
            keys(&chunk["choices"][0]),
            ["delta", "finish_reason", "index", "logprobs"]
        );
    }
    assert_eq!(
        keys(last),
        ["choices", "created", "disagg", "id", "model", "object"]
    );
    assert_eq!(
        keys(&last["choices"][0]),
        ["delta", "finish_reason", "index", "logprobs"]
    );
}

#[tokio::test]
async fn finished_requests_record_the_prefix_hit_ratio() {
    let h = harness(ServerConfig::default());
    *h.fake.trace.lock().unwrap() = sample_trace();
    h.post_json(
        "/v1/completions",
        completion("a b c d", serde_json::json!({})),
    )
    .await;
    let body = completion("e f c d", serde_json::json!({ "stream": true }));
    h.post_json("/v1/completions", body).await;
    let text = h.metrics.render();
    let value = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .value
    };
    assert_eq!(value("disagg_prefix_hit_tokens_total"), 4.0);
    assert_eq!(value("disagg_prefix_lookup_tokens_total"), 8.0);
    assert_eq!(value("disagg_prefix_hit_ratio"), 0.5);
}
