//! The load generator behind `disagg-hw bench`: it drives a running frontend with the
//! simulator's workload and records the run in the simulator's schema, so a measured run and a
//! simulated one of the same scenario and seed read the same way.
//!
//! Arrivals are open loop in real time: each is sent at its offset from the run's start,
//! whatever earlier requests are doing. A conversation's next turn follows the real completion
//! of its previous one after the think time, and its prompt is the previous prompt, the tokens
//! the server actually generated and new tokens from the workload's content: the growing
//! prefix of a real chat, whose KV the server may have cached. A rejected turn abandons its
//! conversation, as in the simulator.

mod client;
pub mod probe;
mod sse;
#[cfg(test)]
mod tests;

use client::{Answer, Reason};

use crate::frontend::api::{CompletionRequest, ModelList, Prompt, StreamOptions};
use sim::config::Scenario;
use sim::engine::TokenTime;
use sim::metrics::{Outcome, RequestRecord, Summary, TokenGaps};
use sim::workload::{Request, Workload, WorkloadError};
use std::collections::{BTreeMap, HashMap};
use std::io::BufWriter;
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The column and file-name suffix of a measured run (`requests-measured.csv`).
pub const SETUP_NAME: &str = "measured";

/// Generous: a cap that only a runaway server (or a mistaken scenario) reaches.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// Long enough for a long prompt on a CPU; short enough that a silent server ends the run.
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 300.0;

/// How long before a send the driver stops sleeping and spins: tokio's timers fire on a
/// millisecond wheel, up to a millisecond or more late, which moved sends by 0.35-1.5 ms and
/// sent two requests planned 0.6 ms apart together (on a GPU, within one decode step).
const SEND_SPIN: Duration = Duration::from_millis(2);

#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    /// The frontend's base URL, `http://HOST:PORT`.
    pub target: String,
    /// The model named in requests; the server's first model when `None`.
    pub model: Option<String>,
    /// Requests on the wire at once, at most; a due request waits for a slot.
    pub max_in_flight: usize,
    /// One request, from sending to `[DONE]`.
    pub request_timeout: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl BenchOptions {
    pub fn new(target: impl Into<String>) -> BenchOptions {
        BenchOptions {
            target: target.into(),
            model: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT_S),
            progress: false,
        }
    }
}

/// A measured run.
#[derive(Clone, Debug)]
pub struct BenchOutput {
    /// The model the requests named.
    pub model: String,
    /// One per request, by request id.
    pub records: Vec<RequestRecord>,
    /// Every streamed token of the completed requests, by request then token.
    pub token_times: Vec<TokenTime>,
    /// Worker utilisation is left out: a client cannot see it.
    pub summary: Summary,
    /// Sends that `max_in_flight` held back past their arrival time; the run was not open
    /// loop if this is not 0.
    pub delayed_sends: u64,
}

impl BenchOutput {
    /// The summary table, in the simulator's layout with one column.
    pub fn table(&self) -> String {
        sim::report::table(&[(SETUP_NAME, &self.summary)])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The target could not tell which model it serves.
    #[error("{url}: {message}")]
    Target { url: String, message: String },
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{path}: {message}")]
    Write { path: String, message: String },
}

/// The KV block size of the scenario's (first) setup, which the load generator drives.
pub fn block_size_tokens(scenario: &Scenario) -> u32 {
    scenario
        .setups
        .first()
        .map_or(sim::kv::DEFAULT_BLOCK_SIZE_TOKENS, |s| {
            s.engine.block_size_tokens
        })
}

/// Runs the scenario's workload (with its seed) against `options.target` until every
/// conversation has ended and every request has completed or been rejected.
pub async fn run(scenario: &Scenario, options: &BenchOptions) -> Result<BenchOutput, LoadgenError> {
    let (target, http) = connect(options)?;
    let vocab_size = vocab_size(scenario)?;
    let model = model(&http, target, options).await?;
    let workload = Workload::new(&scenario.workload, scenario.seed, &scenario.base_dir)?;
    let block_size_tokens = block_size_tokens(scenario);
    let driver = Driver {
        workload,
        http,
        url: format!("{target}/v1/completions"),
        model,
        vocab_size,
        options: options.clone(),
        start: Instant::now(),
        next_open: None,
        open_done: false,
        follow_ups: BTreeMap::new(),
        in_flight: HashMap::new(),
        tasks: JoinSet::new(),
        task_requests: HashMap::new(),
        records: Vec::new(),
        token_times: Vec::new(),
        gaps: TokenGaps::default(),
        delayed_sends: 0,
        progress: options.progress.then(progress_bar),
    };
    let gathered = driver.run().await;
    let summary = sim::metrics::summarize(
        &gathered.records,
        &gathered.gaps,
        &[],
        &scenario.slo,
        block_size_tokens,
    );
    Ok(BenchOutput {
        model: gathered.model,
        records: gathered.records,
        token_times: gathered.token_times,
        summary,
        delayed_sends: gathered.delayed_sends,
    })
}

/// The target's base URL, checked, and an HTTP client for it.
fn connect(options: &BenchOptions) -> Result<(&str, reqwest::Client), LoadgenError> {
    let invalid = |field, message: String| LoadgenError::Invalid { field, message };
    let target = options.target.trim_end_matches('/');
    if !target.starts_with("http://") || target.len() == "http://".len() {
        return Err(invalid(
            "target",
            format!(
                "expected http://HOST:PORT (TLS is not served), got `{}`",
                options.target
            ),
        ));
    }
    if options.max_in_flight == 0 {
        return Err(invalid("max_in_flight", "must be at least 1".into()));
    }
    if options.request_timeout.is_zero() {
        return Err(invalid("request_timeout_s", "must be positive".into()));
    }
    let http = reqwest::Client::builder()
        .connect_timeout(options.request_timeout)
        .build()
        .map_err(|e| LoadgenError::Target {
            url: target.to_owned(),
            message: format!("cannot build an HTTP client: {e}"),
        })?;
    Ok((target, http))
}

/// The vocabulary prompt tokens are drawn from.
fn vocab_size(scenario: &Scenario) -> Result<u32, LoadgenError> {
    match scenario.model.vocab_size {
        0 => Err(LoadgenError::Invalid {
            field: "model.vocab_size",
            message: "must be positive to draw prompt tokens".into(),
        }),
        n => Ok(n),
    }
}

/// The model to name: the options', else the target's first.
async fn model(
    http: &reqwest::Client,
    target: &str,
    options: &BenchOptions,
) -> Result<String, LoadgenError> {
    match &options.model {
        Some(model) => Ok(model.clone()),
        None => first_model(http, target, options.request_timeout).await,
    }
}

/// A streamed, greedy completion of exactly `max_tokens` tokens (end-of-sequence ignored),
/// with the usage at its end.
fn streamed_completion(model: &str, prompt: Vec<u32>, max_tokens: u32) -> CompletionRequest {
    CompletionRequest {
        model: model.to_owned(),
        prompt: Prompt::Tokens(prompt),
        max_tokens: Some(u64::from(max_tokens)),
        temperature: Some(0.0),
        top_p: None,
        stop: None,
        seed: None,
        n: None,
        stream: Some(true),
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        user: None,
        ignore_eos: Some(true),
        return_token_ids: None,
    }
}

/// The first model of `GET /v1/models`.
async fn first_model(
    http: &reqwest::Client,
    target: &str,
    timeout: Duration,
) -> Result<String, LoadgenError> {
    let url = format!("{target}/v1/models");
    let error = |message: String| LoadgenError::Target {
        url: url.clone(),
        message,
    };
    let response = http
        .get(&url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| error(format!("cannot list the models (give --model?): {e}")))?;
    if !response.status().is_success() {
        return Err(error(format!(
            "listing the models answered HTTP {}",
            response.status()
        )));
    }
    let models: ModelList = response
        .json()
        .await
        .map_err(|e| error(format!("not a model list: {e}")))?;
    models
        .data
        .into_iter()
        .next()
        .map(|m| m.id)
        .ok_or_else(|| error("the server lists no model".into()))
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {human_pos} requests done, {msg} [{elapsed}]",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A request and the prompt ids it sends.
struct Planned {
    req: Request,
    prompt: Vec<u32>,
}

/// A request on the wire.
struct InFlight {
    planned: Planned,
    sent_ns: u64,
}

/// What the driver gathers; the summary is computed from it.
struct Gathered {
    model: String,
    records: Vec<RequestRecord>,
    token_times: Vec<TokenTime>,
    gaps: TokenGaps,
    delayed_sends: u64,
}

/// What a request's task hands back: its request id and how it ended.
type TaskOutput = (u64, Result<Answer, Reason>);

struct Driver {
    workload: Workload,
    http: reqwest::Client,
    url: String,
    model: String,
    vocab_size: u32,
    options: BenchOptions,
    start: Instant,
    /// The next open-loop arrival, pulled from the workload one at a time.
    next_open: Option<Request>,
    open_done: bool,
    /// Follow-up turns waiting for their arrival, by (arrival, request id).
    follow_ups: BTreeMap<(u64, u64), Planned>,
    in_flight: HashMap<u64, InFlight>,
    tasks: JoinSet<TaskOutput>,
    /// The request of each task, so a task that panics still ends its request.
    task_requests: HashMap<tokio::task::Id, u64>,
    records: Vec<RequestRecord>,
    token_times: Vec<TokenTime>,
    gaps: TokenGaps,
    delayed_sends: u64,
    progress: Option<indicatif::ProgressBar>,
}

impl Driver {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    async fn run(mut self) -> Gathered {
        // Whether the request due now has waited for a slot.
        let mut waited_for_slot = false;
        loop {
            if self.next_open.is_none() && !self.open_done {
                self.next_open = self.workload.next_arrival();
                self.open_done = self.next_open.is_none();
            }
            let open_due = self.next_open.as_ref().map(|r| (r.arrival_ns, r.id));
            let follow_up_due = self.follow_ups.first_key_value().map(|(&key, _)| key);
            let due = match (open_due, follow_up_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(due) = due else {
                if self.in_flight.is_empty() {
                    break;
                }
                self.await_completion().await;
                continue;
            };
            if due.0 > self.now_ns() {
                let wake = self.start + Duration::from_nanos(due.0);
                let coarse = wake.checked_sub(SEND_SPIN).unwrap_or(wake);
                if Instant::now() < coarse {
                    tokio::select! {
                        () = tokio::time::sleep_until(coarse) => {}
                        joined = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                            self.joined(joined);
                        }
                    }
                } else {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if self.in_flight.len() >= self.options.max_in_flight {
                waited_for_slot = true;
                self.await_completion().await;
                continue;
            }
            let planned = if open_due == Some(due) {
                self.next_open.take().map(|req| Planned {
                    prompt: (0..req.prompt_tokens)
                        .map(|pos| req.content.token_at(pos, self.vocab_size))
                        .collect(),
                    req,
                })
            } else {
                self.follow_ups.remove(&due)
            };
            let Some(planned) = planned else {
                continue;
            };
            self.delayed_sends += u64::from(waited_for_slot);
            waited_for_slot = false;
            self.send(planned);
        }
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        self.records.sort_by_key(|r| r.request_id);
        self.token_times
            .sort_by_key(|t| (t.request_id, t.token_index));
        Gathered {
            model: self.model,
            records: self.records,
            token_times: self.token_times,
            gaps: self.gaps,
            delayed_sends: self.delayed_sends,
        }
    }

    async fn await_completion(&mut self) {
        let joined = self.tasks.join_next_with_id().await;
        self.joined(joined);
    }

    fn joined(
        &mut self,
        joined: Option<Result<(tokio::task::Id, TaskOutput), tokio::task::JoinError>>,
    ) {
        match joined {
            Some(Ok((task, (id, result)))) => {
                self.task_requests.remove(&task);
                self.finish(id, result);
            }
            Some(Err(e)) => {
                if let Some(id) = self.task_requests.remove(&e.id()) {
                    self.finish(id, Err("client_failed".into()));
                }
            }
            None => {}
        }
    }

    fn send(&mut self, planned: Planned) {
        let sent_ns = self.now_ns();
        let id = planned.req.id;
        let body = CompletionRequest {
            user: Some(planned.req.conversation.to_string()),
            return_token_ids: Some(true),
            // A completion has at least one token.
            ..streamed_completion(
                &self.model,
                planned.prompt.clone(),
                planned.req.output_tokens.max(1),
            )
        };
        let http = self.http.clone();
        let url = self.url.clone();
        let start = self.start;
        let timeout = self.options.request_timeout;
        let task = self.tasks.spawn(async move {
            let result = client::complete(&http, &url, &body, start, timeout).await;
            (id, result)
        });
        self.task_requests.insert(task.id(), id);
        self.in_flight.insert(id, InFlight { planned, sent_ns });
    }

    /// Records a request's end and plans its conversation's next turn.
    fn finish(&mut self, id: u64, result: Result<Answer, Reason>) {
        let Some(InFlight { planned, sent_ns }) = self.in_flight.remove(&id) else {
            return;
        };
        let Planned { req, prompt } = planned;
        let mut record = RequestRecord {
            request_id: req.id,
            conversation_id: req.conversation,
            turn: req.turn,
            prompt_tokens: prompt.len().try_into().unwrap_or(u32::MAX),
            history_tokens: req.history_tokens,
            output_tokens: req.output_tokens,
            arrival_ns: sent_ns,
            ..RequestRecord::default()
        };
        match result {
            Ok(answer) => {
                self.complete_record(&mut record, &answer);
                for (i, &time_ns) in answer.token_times_ns.iter().enumerate() {
                    self.token_times.push(TokenTime {
                        request_id: req.id,
                        token_index: i.try_into().unwrap_or(u32::MAX),
                        time_ns,
                    });
                }
                for pair in answer.token_times_ns.windows(2) {
                    self.gaps.add(pair[1].saturating_sub(pair[0]), 1);
                }
                if let Some(next) = self.workload.follow_up(&req, answer.end_ns) {
                    let generated = if answer.token_ids.is_empty() {
                        // A server that does not return ids: the answer the simulator assumes.
                        let from = prompt.len() as u32;
                        (from..from + record.output_tokens)
                            .map(|pos| req.content.token_at(pos, self.vocab_size))
                            .collect()
                    } else {
                        answer.token_ids
                    };
                    let prompt = follow_up_prompt(prompt, &generated, &next, self.vocab_size);
                    self.follow_ups
                        .insert((next.arrival_ns, next.id), Planned { req: next, prompt });
                }
            }
            Err(reason) => {
                record.outcome = Outcome::Rejected;
                record.reject_reason = Some(reason);
                self.workload.abandon(req.conversation);
            }
        }
        self.records.push(record);
        if let Some(bar) = &self.progress {
            bar.inc(1);
            bar.set_message(format!("{} in flight", self.in_flight.len()));
        }
    }

    /// Fills a completed record from the answer; the trace's stage offsets are relative to
    /// the server's acceptance, which the send time stands for.
    fn complete_record(&self, record: &mut RequestRecord, answer: &Answer) {
        let trace = answer.trace.clone().unwrap_or_default();
        let at = |offset_ns: u64| {
            if offset_ns == 0 {
                0
            } else {
                record.arrival_ns.saturating_add(offset_ns)
            }
        };
        *record = RequestRecord {
            outcome: Outcome::Completed,
            prefill_worker: trace.prefill_worker,
            decode_worker: trace.decode_worker,
            cached_tokens: answer
                .trace
                .as_ref()
                .map(|t| t.cached_tokens)
                .or(answer.cached_tokens)
                .unwrap_or(0),
            output_tokens: answer.output_tokens(),
            routed_ns: at(trace.routed_ns),
            prefill_start_ns: at(trace.prefill_start_ns),
            prefill_end_ns: at(trace.prefill_end_ns),
            transfer_start_ns: at(trace.transfer_start_ns),
            transfer_end_ns: at(trace.transfer_end_ns),
            transfer_bytes: trace.transfer_bytes,
            import_start_ns: at(trace.import_start_ns),
            import_end_ns: at(trace.import_end_ns),
            first_token_ns: answer.first_token_ns.unwrap_or(answer.end_ns),
            end_ns: answer.end_ns,
            preemptions: trace.preemptions,
            ..record.clone()
        };
    }
}

/// The prompt of `next`: the previous prompt, the generated answer, then the workload's
/// content up to `next.prompt_tokens` (cut there if the answer ran longer than planned).
fn follow_up_prompt(
    mut prompt: Vec<u32>,
    generated: &[u32],
    next: &Request,
    vocab_size: u32,
) -> Vec<u32> {
    prompt.extend_from_slice(generated);
    prompt.truncate(next.prompt_tokens as usize);
    let from = prompt.len() as u32;
    prompt.extend((from..next.prompt_tokens).map(|pos| next.content.token_at(pos, vocab_size)));
    prompt
}

/// Writes what `disagg-sim run --out` writes for a setup, for the one measured column:
/// `summary.txt` (`table`), `summary.csv`, `requests-measured.csv` and `tokens-measured.csv`.
/// The workers table is left out: a client cannot see the workers.
pub fn write_outputs(dir: &Path, output: &BenchOutput, table: &str) -> Result<(), LoadgenError> {
    let error = |path: &Path, message: String| LoadgenError::Write {
        path: path.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| error(dir, e.to_string()))?;
    let create = |name: &str| {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .map(|f| (BufWriter::new(f), path.clone()))
            .map_err(|e| error(&path, e.to_string()))
    };
    let txt = dir.join("summary.txt");
    std::fs::write(&txt, table).map_err(|e| error(&txt, e.to_string()))?;
    let (w, path) = create("summary.csv")?;
    sim::metrics::write_summary_csv(w, &[(SETUP_NAME.to_owned(), output.summary.clone())])
        .map_err(|e| error(&path, e.to_string()))?;
    let (w, path) = create(&format!("requests-{SETUP_NAME}.csv"))?;
    sim::metrics::write_requests_csv(w, &output.records)
        .map_err(|e| error(&path, e.to_string()))?;
    let (w, path) = create(&format!("tokens-{SETUP_NAME}.csv"))?;
    sim::engine::write_token_times_csv(w, &output.token_times)
        .map_err(|e| error(&path, e.to_string()))?;
    Ok(())
}
