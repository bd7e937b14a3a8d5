//! The engine behind the HTTP router, on the real SmolLM2-135M-Instruct GGUF.

use super::*;
use crate::frontend::{Metrics, ServerConfig, router};
use axum::Router;
use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m";

/// An app over a fresh engine with a 64-block (1024-token) pool.
fn app() -> Router {
    let config = EngineConfig {
        kv_blocks: 64,
        ..EngineConfig::default()
    };
    let path = models::runtime::test_gguf_path().unwrap();
    let backend =
        EngineBackend::from_gguf(&path, MODEL, TensorDType::F32, &Device::Cpu, config).unwrap();
    assert_eq!(backend.engine().context_tokens(), 1024);
    router(
        Arc::new(backend),
        Arc::new(Metrics::new()),
        ServerConfig::default(),
    )
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, String) {
    let req = HttpRequest::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The answer's text and its `usage.completion_tokens`.
async fn answer(app: &Router, body: Value) -> (String, u64) {
    let (status, text) = post(app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// The concatenated content deltas of a streamed chat completion.
async fn streamed(app: &Router, body: Value) -> String {
    let (status, text) = post(app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut out = String::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            return out;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "{data}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            out.push_str(piece);
        }
    }
    panic!("the stream did not end with [DONE]: {text}");
}

const FRANCE: &str = "What is the capital of France?";

#[tokio::test]
async fn greedy_chat_answers_paris_and_streaming_gives_the_same_text() {
    let app = app();
    let (text, _) = answer(&app, chat(FRANCE, json!({}))).await;
    assert!(text.contains("Paris"), "{text}");
    let stream = streamed(&app, chat(FRANCE, json!({"stream": true}))).await;
    assert_eq!(stream, text);
}

#[tokio::test]
async fn concurrent_requests_get_the_text_they_get_alone() {
    let app = app();
    let prompts = [
        FRANCE,
        "Name three colours.",
        "Write one sentence about the sea and the wind in the evening.",
        "What is 2 + 2?",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(answer(&app, chat(p, json!({"max_tokens": 16}))).await);
    }
    let together = futures_util::future::join_all(
        prompts
            .iter()
            .map(|p| answer(&app, chat(p, json!({"max_tokens": 16})))),
    )
    .await;
    assert_eq!(together, alone);
}

#[tokio::test]
async fn a_stop_string_truncates_and_max_tokens_is_respected() {
    let app = app();
    let (full, _) = answer(&app, chat(FRANCE, json!({}))).await;
    let at = full.find("Paris").expect("the answer names Paris");
    let (cut, _) = answer(&app, chat(FRANCE, json!({"stop": ["Paris"]}))).await;
    assert_eq!(cut, full[..at]);

    let (text, completion_tokens) = answer(
        &app,
        chat(
            "Tell me a long story about a dragon.",
            json!({"max_tokens": 5}),
        ),
    )
    .await;
    assert_eq!(completion_tokens, 5, "{text}");
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_a_400() {
    let app = app();
    let long = "word ".repeat(1100);
    let (status, body) = post(&app, "/v1/chat/completions", chat(&long, json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("context_length_exceeded"), "{body}");
    // The engine still serves afterwards.
    let (text, _) = answer(&app, chat(FRANCE, json!({}))).await;
    assert!(text.contains("Paris"), "{text}");
}

/// Greedy text of a chat prompt straight from the engine.
async fn generate(engine: &Engine, content: &str, max_tokens: usize) -> String {
    let prompt = engine
        .tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", content)], true);
    let tokens = engine.tokenizer().encode(&prompt, false).unwrap();
    let mut events = engine
        .submit(tokens, SamplingParams::greedy(max_tokens), None)
        .unwrap();
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerateEvent::Token { text: piece, .. } => text.push_str(&piece),
            GenerateEvent::Done { .. } => return text,
            GenerateEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("the stream ended without Done");
}

#[tokio::test]
async fn a_pool_too_small_for_every_sequence_preempts_and_recomputes_the_same_text() {
    let gguf = GgufFile::open(&models::runtime::test_gguf_path().unwrap()).unwrap();
    let model = || Model::new(gguf.weights(TensorDType::F32, &Device::Cpu).unwrap()).unwrap();
    let prompts = [
        "Name three colours.",
        "Name three animals and describe them.",
        "Write a short poem about the sea.",
    ];
    let roomy = Engine::new(
        model(),
        gguf.tokenizer().unwrap(),
        EngineConfig::default(),
        EngineHooks::default(),
    )
    .unwrap();
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(generate(&roomy, p, 40).await);
    }
    // 7 blocks of 16 tokens: two prompts fit, but not their 40 tokens of growth as well.
    let tight = EngineConfig {
        kv_blocks: 7,
        prefix_caching: false,
        ..EngineConfig::default()
    };
    let small = Engine::new(
        model(),
        gguf.tokenizer().unwrap(),
        tight,
        EngineHooks::default(),
    )
    .unwrap();
    let together =
        futures_util::future::join_all(prompts.iter().map(|p| generate(&small, p, 40))).await;
    assert_eq!(together, alone);
    assert!(small.preemptions() > 0, "{alone:?}");
}

#[test]
fn incremental_detokenization_streams_exactly_the_whole_decode() {
    let gguf = GgufFile::open(&models::runtime::test_gguf_path().unwrap()).unwrap();
    let tokenizer = gguf.tokenizer().unwrap();
    let text = "Héllo wörld! 🌍 日本語のテキスト, naïve café — “quotes” and  double  spaces.\nNew line 12345.";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut detok = detok::Detokenizer::default();
    let mut seen = Vec::new();
    for n in 1..=ids.len() {
        detok.update(&tokenizer, &ids[..n]).unwrap();
        let so_far = detok.text().to_owned();
        assert!(!so_far.contains('\u{FFFD}'), "{so_far}");
        assert!(so_far.starts_with(seen.last().map_or("", |s: &String| s.as_str())));
        seen.push(so_far);
    }
    detok.flush(&tokenizer, &ids).unwrap();
    assert_eq!(detok.text(), tokenizer.decode(&ids, true).unwrap());
    assert_eq!(detok.text(), text);
}

#[tokio::test]
async fn the_step_trace_records_each_step_in_the_simulators_terms() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("steps.csv");
    let config = EngineConfig {
        kv_blocks: 64,
        step_trace: Some(trace.clone()),
        ..EngineConfig::default()
    };
    let path = models::runtime::test_gguf_path().unwrap();
    let backend =
        EngineBackend::from_gguf(&path, MODEL, TensorDType::F32, &Device::Cpu, config).unwrap();
    let app = router(
        Arc::new(backend),
        Arc::new(Metrics::new()),
        ServerConfig::default(),
    );
    let prompt: Vec<u32> = (100..140).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
                      "ignore_eos": true});
    let sent = steps::epoch_ns();
    let (status, text) = post(&app, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // The last step's row is written once its token is handed on, just after the answer.
    let mut rows = steps::read(&trace).unwrap();
    for _ in 0..500 {
        if rows.len() >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        rows = steps::read(&trace).unwrap();
    }
    // One prefill step of the 40-token prompt, then a decode step per further token.
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!((rows[0].prefill_seqs, rows[0].prefill_tokens), (1, 40));
    assert_eq!(rows[0].decode_seqs, 0);
    for (i, row) in rows[1..].iter().enumerate() {
        assert_eq!((row.decode_seqs, row.prefill_seqs), (1, 0));
        assert_eq!(row.decode_context_tokens, 40 + i as u64);
    }
    // On the host's clock: the steps ran after the request was sent.
    assert!(rows[0].start_ns >= sent && rows[4].end_ns <= steps::epoch_ns());
    for pair in rows.windows(2) {
        assert!(pair[0].start_ns <= pair[0].end_ns && pair[0].end_ns <= pair[1].start_ns);
        assert!(pair[0].forward_ns <= pair[0].end_ns - pair[0].start_ns);
    }
    let bad = EngineConfig {
        step_trace: Some(dir.path().join("absent/steps.csv")),
        ..EngineConfig::default()
    };
    let e = EngineBackend::from_gguf(&path, MODEL, TensorDType::F32, &Device::Cpu, bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("step_trace:"), "{e}");
}

/// A model without a vocabulary reads token ids, as ids or as their text; other text is the
/// request's error, and its answers stream as ids.
#[test]
fn a_token_id_tokenizer_takes_ids_and_refuses_words() {
    use crate::frontend::GenerateInput;
    let tokenizer = models::runtime::Tokenizer::token_ids(100);
    let ids = prompt_tokens(&tokenizer, &GenerateInput::Tokens(vec![3, 99])).unwrap();
    assert_eq!(ids, vec![3, 99]);
    let text = prompt_tokens(&tokenizer, &GenerateInput::Text("<3> <99>".into())).unwrap();
    assert_eq!(text, ids);
    for bad in [
        GenerateInput::Text("hello".into()),
        GenerateInput::Chat(Vec::new()),
    ] {
        let e = prompt_tokens(&tokenizer, &bad).unwrap_err();
        assert!(
            matches!(&e, BackendError::InvalidPrompt(m) if m.contains("no vocabulary")),
            "{e:?}"
        );
    }
    let e = prompt_tokens(&tokenizer, &GenerateInput::Tokens(vec![100])).unwrap_err();
    assert!(matches!(e, BackendError::InvalidPrompt(_)), "{e:?}");
    let mut detok = detok::Detokenizer::default();
    let answer = [7, 42, 0];
    for n in 1..=answer.len() {
        detok.update(&tokenizer, &answer[..n]).unwrap();
    }
    assert_eq!(detok.text(), "<7> <42> <0>");
}

#[test]
fn the_warm_up_leaves_the_model_as_it_was() {
    let path = models::runtime::test_gguf_path().unwrap();
    let gguf = models::runtime::GgufFile::open(&path).unwrap();
    let model = Model::new(gguf.weights(TensorDType::F32, &Device::Cpu).unwrap()).unwrap();
    let config = EngineConfig {
        block_size_tokens: 16,
        ..EngineConfig::default()
    };
    let mut paged = PagedModel::new(model, 8, 16, true).unwrap();
    warm_up(&mut paged, &config, 64).unwrap();
    // The throwaway pool is gone; the engine's serves as usual.
    let (id, cached) = paged.admit(&[1, 2, 3]).unwrap();
    assert_eq!(cached, 0);
    assert_eq!(paged.step(&[(id, 3)]).unwrap().dims(), &[1, 49152]);
}
