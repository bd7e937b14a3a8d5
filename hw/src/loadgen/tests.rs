//! The load generator against the real HTTP frontend on loopback, over a fake backend that
//! records what it receives and answers with made-up token ids; and against raw sockets that
//! misbehave.

use super::*;
use crate::frontend::{
    Backend, BackendError, FinishReason, GenerateEvent, GenerateInput, GenerateRequest, Metrics,
    ModelInfo, ServeTrace, ServerConfig, TokenUsage, serve_listener,
};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

const MODEL: &str = "fake";
const VOCAB: u32 = 49_152;

/// Four conversations of three turns, close together; smollm2-135m's vocabulary.
const SCENARIO: &str = r#"
name = "loadgen-test"
seed = 11
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "constant", rate_per_s = 400.0 }
sessions = 4
turns = { dist = "constant", value = 3 }
system_prompt_tokens = 8
system_prompts = 2
user_tokens = { dist = "uniform", min = 3, max = 9 }
output_tokens = { dist = "uniform", min = 2, max = 5 }
think_time = { dist = "constant", secs = 0.001 }
[[setup]]
name = "one"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "aggregated"
aggregated_workers = 1
"#;

fn scenario(seed: u64) -> Scenario {
    let mut s = Scenario::parse(SCENARIO, "test.toml", ".".into()).unwrap();
    s.seed = seed;
    s
}

/// The ids the fake generates for a prompt: a function of the prompt, so that a follow-up's
/// expected prefix can be recomputed.
fn generated_ids(prompt: &[u32], n: usize) -> Vec<u32> {
    let seed = prompt.iter().fold(prompt.len() as u32, |h, &t| {
        h.wrapping_mul(31).wrapping_add(t)
    });
    (0..n as u32)
        .map(|i| seed.wrapping_add(i.wrapping_mul(7_919)) % VOCAB)
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Answer,
    /// Refuses the `nth` (0-based) request of conversation `conversation` with QueueFull.
    RefuseTurn {
        conversation: u64,
        nth: usize,
    },
    /// Refuses every request with this error.
    RefuseAll(fn() -> BackendError),
    /// Sends one token, then drops the event stream.
    DropAfterFirstToken,
}

/// Records every request; answers with [`generated_ids`] of exactly `max_tokens`, a trace
/// whose cached tokens are the common prefix with the conversation's previous prompt and
/// answer.
struct Recorder {
    mode: Mode,
    received: Mutex<Vec<GenerateRequest>>,
    /// Per conversation: the last prompt and answer.
    contexts: Mutex<HashMap<String, Vec<u32>>>,
}

const TRACE: ServeTrace = ServeTrace {
    prefill_worker: Some(2),
    decode_worker: Some(5),
    cached_tokens: 0,
    decode_cached_tokens: 0,
    routed_ns: 1_000,
    prefill_start_ns: 2_000,
    prefill_end_ns: 30_000,
    transfer_start_ns: 31_000,
    transfer_end_ns: 45_000,
    transfer_bytes: 4_096,
    import_start_ns: 46_000,
    import_end_ns: 47_000,
    preemptions: 1,
};

impl Recorder {
    fn new(mode: Mode) -> Arc<Recorder> {
        Arc::new(Recorder {
            mode,
            received: Mutex::new(Vec::new()),
            contexts: Mutex::new(HashMap::new()),
        })
    }

    /// (conversation, prompt, max_tokens) of every request, in arrival order.
    fn prompts(&self) -> Vec<(u64, Vec<u32>, usize)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                let GenerateInput::Tokens(ids) = &r.input else {
                    panic!("not a token prompt: {:?}", r.input);
                };
                let conversation = r.conversation_id.as_deref().unwrap().parse().unwrap();
                (conversation, ids.clone(), r.sampling.max_tokens)
            })
            .collect()
    }
}

impl Backend for Recorder {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            owned_by: "test".into(),
        }]
    }

    fn context_tokens(&self, _model: &str) -> Option<usize> {
        Some(4096)
    }

    async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        let conversation = req.conversation_id.clone().unwrap_or_default();
        let nth = {
            let mut received = self.received.lock().unwrap();
            received.push(req.clone());
            received
                .iter()
                .filter(|r| r.conversation_id.as_deref() == Some(&conversation))
                .count()
                - 1
        };
        match self.mode {
            Mode::RefuseTurn {
                conversation: c,
                nth: n,
            } if conversation == c.to_string() && nth == n => {
                return Err(BackendError::QueueFull);
            }
            Mode::RefuseAll(error) => return Err(error()),
            _ => {}
        }
        let GenerateInput::Tokens(prompt) = req.input else {
            return Err(BackendError::InvalidPrompt("want token ids".into()));
        };
        let ids = generated_ids(&prompt, req.sampling.max_tokens);
        let cached_tokens = {
            let mut contexts = self.contexts.lock().unwrap();
            let previous = contexts.get(&conversation).cloned().unwrap_or_default();
            let common = previous
                .iter()
                .zip(&prompt)
                .take_while(|(a, b)| a == b)
                .count();
            contexts.insert(conversation, [prompt.clone(), ids.clone()].concat());
            common as u32
        };
        let drop_early = matches!(self.mode, Mode::DropAfterFirstToken);
        let (tx, rx) = mpsc::channel(ids.len() + 1);
        for &id in &ids {
            let _ = tx.try_send(GenerateEvent::Token {
                text: format!(" t{id}"),
                token_id: id,
            });
            if drop_early {
                return Ok(rx);
            }
        }
        let _ = tx.try_send(GenerateEvent::Done {
            finish_reason: FinishReason::Length,
            usage: TokenUsage {
                prompt_tokens: prompt.len(),
                completion_tokens: ids.len(),
            },
            trace: ServeTrace {
                cached_tokens,
                ..TRACE
            },
            token_ids: ids,
        });
        Ok(rx)
    }
}

/// A frontend over `backend` on 127.0.0.1:0; dropping the handle stops it.
struct Server {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn serve<B: Backend>(backend: Arc<B>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_listener(
        listener,
        backend,
        Arc::new(Metrics::new()),
        ServerConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    Server { url, _stop: stop }
}

async fn bench(scenario: &Scenario, url: &str) -> BenchOutput {
    run(scenario, &BenchOptions::new(url)).await.unwrap()
}

/// The requests the workload plans, by (conversation, turn), however fast they complete.
fn planned(scenario: &Scenario) -> BTreeMap<(u64, u32), Request> {
    let mut workload =
        Workload::new(&scenario.workload, scenario.seed, &scenario.base_dir).unwrap();
    let mut all = BTreeMap::new();
    while let Some(mut req) = workload.next_arrival() {
        loop {
            all.insert((req.conversation, req.turn), req.clone());
            match workload.follow_up(&req, 0) {
                Some(next) => req = next,
                None => break,
            }
        }
    }
    all
}

#[tokio::test]
async fn every_request_gets_one_record_and_follow_ups_extend_the_conversation() {
    let scenario = scenario(11);
    let recorder = Recorder::new(Mode::Answer);
    let server = serve(Arc::clone(&recorder)).await;
    let out = bench(&scenario, &server.url).await;
    assert_eq!(out.model, MODEL);
    assert_eq!(out.delayed_sends, 0);

    let plan = planned(&scenario);
    assert_eq!(plan.len(), 12);
    assert_eq!(out.records.len(), plan.len());
    let ids: Vec<u64> = out.records.iter().map(|r| r.request_id).collect();
    assert_eq!(
        ids,
        (0..12).collect::<Vec<_>>(),
        "one record per request, by id"
    );
    for r in &out.records {
        let p = &plan[&(r.conversation_id, r.turn)];
        assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
        assert_eq!(r.output_tokens, p.output_tokens, "{r:?}");
        assert_eq!(r.prompt_tokens, p.prompt_tokens, "{r:?}");
        assert_eq!(r.history_tokens, p.history_tokens, "{r:?}");
        assert_eq!((r.prefill_worker, r.decode_worker), (Some(2), Some(5)));
        assert_eq!((r.transfer_bytes, r.preemptions), (4_096, 1));
        assert_eq!(r.routed_ns, r.arrival_ns + 1_000);
        assert_eq!(r.prefill_end_ns, r.arrival_ns + 30_000);
        assert_eq!(r.transfer_end_ns, r.arrival_ns + 45_000);
        assert_eq!(r.import_ns(), 1_000);
        assert!(r.arrival_ns <= r.first_token_ns && r.first_token_ns <= r.end_ns);
        // The whole previous prompt and answer is the fake's cache hit.
        assert_eq!(r.cached_tokens, r.history_tokens, "{r:?}");
        let times: Vec<&TokenTime> = out
            .token_times
            .iter()
            .filter(|t| t.request_id == r.request_id)
            .collect();
        assert_eq!(times.len() as u32, r.output_tokens);
        assert_eq!(times[0].time_ns, r.first_token_ns);
    }
    assert_eq!(out.summary.completed, 12);

    let received = recorder.prompts();
    assert_eq!(received.len(), 12);
    let mut by_conversation: BTreeMap<u64, Vec<(Vec<u32>, usize)>> = BTreeMap::new();
    for (conversation, prompt, max_tokens) in received {
        by_conversation
            .entry(conversation)
            .or_default()
            .push((prompt, max_tokens));
    }
    for (conversation, turns) in &by_conversation {
        assert_eq!(turns.len(), 3);
        for (turn, (prompt, max_tokens)) in turns.iter().enumerate() {
            let p = &plan[&(*conversation, turn as u32)];
            assert_eq!(*max_tokens, p.output_tokens as usize);
            let content: Vec<u32> = (0..p.prompt_tokens)
                .map(|pos| p.content.token_at(pos, VOCAB))
                .collect();
            if turn == 0 {
                assert_eq!(*prompt, content);
                continue;
            }
            let (previous, previous_max) = &turns[turn - 1];
            let answer = generated_ids(previous, *previous_max);
            let prefix = [previous.clone(), answer].concat();
            assert!(
                prompt.starts_with(&prefix),
                "conversation {conversation} turn {turn}"
            );
            assert_eq!(prompt[prefix.len()..], content[prefix.len()..]);
        }
    }
    let sampling = &recorder.received.lock().unwrap()[0].sampling;
    assert!(sampling.ignore_eos);
    assert_eq!(sampling.temperature, 0.0);
}

#[tokio::test]
async fn outputs_read_back_in_the_simulators_schema() {
    let scenario = scenario(3);
    let server = serve(Recorder::new(Mode::Answer)).await;
    let out = bench(&scenario, &server.url).await;
    let dir = tempfile::tempdir().unwrap();
    let table = out.table();
    write_outputs(dir.path(), &out, &table).unwrap();
    let file = std::fs::File::open(dir.path().join("requests-measured.csv")).unwrap();
    assert_eq!(sim::metrics::read_requests_csv(file).unwrap(), out.records);
    let tokens = std::fs::read_to_string(dir.path().join("tokens-measured.csv")).unwrap();
    let mut lines = tokens.lines();
    assert_eq!(lines.next(), Some("request_id,token_index,time_ns"));
    assert_eq!(lines.count(), out.token_times.len());
    let summary = std::fs::read_to_string(dir.path().join("summary.csv")).unwrap();
    assert!(
        summary.starts_with("setup,metric,value\nmeasured,requests,12\n"),
        "{summary}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("summary.txt")).unwrap(),
        table
    );
    assert!(
        table.contains("measured") && table.contains("TTFT p50"),
        "{table}"
    );
}

#[tokio::test]
async fn same_seed_sends_the_same_prompts() {
    let mut runs = Vec::new();
    for seed in [5, 5, 6] {
        let recorder = Recorder::new(Mode::Answer);
        let server = serve(Arc::clone(&recorder)).await;
        bench(&scenario(seed), &server.url).await;
        let mut prompts = recorder.prompts();
        prompts.sort();
        runs.push(prompts);
    }
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0], runs[2]);
}

#[tokio::test]
async fn a_refused_turn_is_rejected_and_abandons_its_conversation() {
    let recorder = Recorder::new(Mode::RefuseTurn {
        conversation: 1,
        nth: 1,
    });
    let server = serve(Arc::clone(&recorder)).await;
    let out = bench(&scenario(11), &server.url).await;
    assert_eq!(out.records.len(), 11);
    let conversation_1: Vec<&RequestRecord> = out
        .records
        .iter()
        .filter(|r| r.conversation_id == 1)
        .collect();
    assert_eq!(conversation_1.len(), 2, "turn 2 is never sent");
    let refused = conversation_1.iter().find(|r| r.turn == 1).unwrap();
    assert_eq!(refused.outcome, Outcome::Rejected);
    assert_eq!(refused.reject_reason.as_deref(), Some("queue_full"));
    assert_eq!((refused.first_token_ns, refused.end_ns), (0, 0));
    assert!(refused.arrival_ns > 0);
    assert_eq!(out.summary.rejected, 1);
    assert_eq!(recorder.prompts().len(), 11);

    let recorder = Recorder::new(Mode::RefuseAll(|| BackendError::QueueFull));
    let server = serve(Arc::clone(&recorder)).await;
    let out = bench(&scenario(11), &server.url).await;
    assert_eq!(
        out.records.len(),
        4,
        "every conversation ends at its first turn"
    );
    assert!(out.records.iter().all(|r| r.turn == 0
        && r.outcome == Outcome::Rejected
        && r.reject_reason.as_deref() == Some("queue_full")));

    let bad = Recorder::new(Mode::RefuseAll(|| {
        BackendError::InvalidPrompt("token id out of range".into())
    }));
    let server = serve(bad).await;
    let out = bench(&scenario(11), &server.url).await;
    assert!(
        out.records
            .iter()
            .all(|r| r.reject_reason.as_deref() == Some("http_400"))
    );
}

#[tokio::test]
async fn a_dropped_stream_is_rejected_not_awaited() {
    let server = serve(Recorder::new(Mode::DropAfterFirstToken)).await;
    let out = bench(&scenario(11), &server.url).await;
    assert_eq!(out.records.len(), 4);
    for r in &out.records {
        assert_eq!(r.outcome, Outcome::Rejected);
        assert_eq!(r.reject_reason.as_deref(), Some("stream_error"));
    }
    assert!(out.token_times.is_empty());
}

/// A one-conversation, one-turn scenario against a socket that `answer` serves.
async fn against_socket(answer: &'static [u8], hang: bool) -> RequestRecord {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 65_536];
                let _ = socket.read(&mut buf).await;
                if hang {
                    std::future::pending::<()>().await;
                }
                let _ = socket.write_all(answer).await;
                // Close our side, then drain the client's, so the close is no reset.
                let _ = socket.shutdown().await;
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let mut scenario = scenario(1);
    scenario.workload.sessions = Some(1);
    scenario.workload.turns = sim::workload::LengthDist::Constant { value: 1 };
    let mut options = BenchOptions::new(url);
    options.model = Some(MODEL.into());
    options.request_timeout = Duration::from_millis(300);
    let out = run(&scenario, &options).await.unwrap();
    assert_eq!(out.records.len(), 1);
    out.records[0].clone()
}

#[tokio::test]
async fn a_broken_or_silent_connection_is_rejected() {
    let broken: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        connection: close\r\n\r\n\
        data: {\"id\":\"x\",\"object\":\"text_completion\",\"created\":0,\"model\":\"fake\",\
        \"choices\":[{\"index\":0,\"text\":\" a\",\"logprobs\":null,\"finish_reason\":null}]}\n\n";
    let r = against_socket(broken, false).await;
    assert_eq!(r.reject_reason.as_deref(), Some("stream_broken"));
    let garbage: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        connection: close\r\n\r\ndata: {not json\n\ndata: [DONE]\n\n";
    let r = against_socket(garbage, false).await;
    assert_eq!(r.reject_reason.as_deref(), Some("bad_chunk"));
    let r = against_socket(b"", true).await;
    assert_eq!(r.outcome, Outcome::Rejected);
    assert_eq!(r.reject_reason.as_deref(), Some("timeout"));
}

#[tokio::test]
async fn bad_options_and_targets_are_one_line_errors() {
    let scenario = scenario(1);
    let e = run(&scenario, &BenchOptions::new("https://example.com"))
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("target: expected http://"), "{e}");
    let mut options = BenchOptions::new("http://127.0.0.1:1");
    options.max_in_flight = 0;
    let e = run(&scenario, &options).await.unwrap_err();
    assert!(e.to_string().starts_with("max_in_flight: "), "{e}");

    // A port nobody listens on: the model list cannot be had.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let e = run(&scenario, &BenchOptions::new(url.clone()))
        .await
        .unwrap_err();
    let message = e.to_string();
    assert!(
        message.starts_with(&format!("{url}/v1/models: cannot list")),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test]
async fn the_in_flight_cap_delays_sends_and_says_so() {
    let recorder = Recorder::new(Mode::Answer);
    let server = serve(Arc::clone(&recorder)).await;
    let mut scenario = scenario(11);
    // Every conversation starts at once, so a cap of one must hold three of them back.
    scenario.workload.arrival = Some(sim::workload::ArrivalProcess::Constant { rate_per_s: 1e9 });
    let mut options = BenchOptions::new(server.url.clone());
    options.max_in_flight = 1;
    let out = run(&scenario, &options).await.unwrap();
    assert_eq!(out.records.len(), 12);
    assert!(out.delayed_sends >= 3, "{}", out.delayed_sends);
    assert!(out.records.iter().all(|r| r.is_completed()));
}

#[test]
fn a_follow_up_prompt_is_cut_or_filled_to_its_planned_length() {
    let mut scenario = scenario(1);
    scenario.workload.sessions = Some(1);
    let plan = planned(&scenario);
    let next = &plan[&(0, 1)];
    let previous: Vec<u32> = (0..next.history_tokens - 2).collect();
    let short = follow_up_prompt(previous.clone(), &[7], next, VOCAB);
    assert_eq!(short.len(), next.prompt_tokens as usize);
    assert_eq!(
        short[..previous.len() + 1],
        [previous.clone(), vec![7]].concat()
    );
    let long_answer = vec![9; next.prompt_tokens as usize];
    let cut = follow_up_prompt(previous.clone(), &long_answer, next, VOCAB);
    assert_eq!(cut.len(), next.prompt_tokens as usize);
}
