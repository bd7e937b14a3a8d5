//! The frontend's side of the cluster: a [`Backend`] that tokenizes, routes each request with
//! the simulator's policies over the simulator's block index (fed by the workers' KV events),
//! calls the chosen worker and relays its stream. A worker that fails before the first token
//! is left out and the request goes to another; one that fails later ends the request with a
//! clear error.

use super::protocol::{
    EventsMessage, GenerateCall, StreamEvent, WireSampling, WorkerError, WorkerInfo,
};
use super::registry::Registry;
use crate::frontend::{
    Backend, BackendError, GenerateEvent, GenerateRequest, Metrics, ModelInfo, ServeTrace,
};
use futures_util::StreamExt;
use models::runtime::Tokenizer;
use sim::kv::{KvEvent, token_block_hashes};
use sim::routing::{BlockIndex, Policy, Role, RouteRequest, Router, WorkerLoad};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a worker may take to answer a `/generate` call's headers (its queue admission).
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Failed attempts at a worker's event stream before it is given up.
const RESUBSCRIBE_ATTEMPTS: u32 = 3;
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);

pub struct ClusterOptions {
    pub model_id: String,
    pub tokenizer: Tokenizer,
    /// Prompt plus generated tokens of one request, at most.
    pub context_tokens: usize,
    pub block_size_tokens: u32,
    pub policy: Policy,
    pub seed: u64,
    pub max_attempts: u32,
}

/// A worker as the router tracks it.
struct Tracked {
    info: WorkerInfo,
    /// Its `/events` stream delivered a snapshot: the index knows its cache.
    live: bool,
    /// Requests the frontend has sent it that have not ended.
    in_flight: u32,
    /// Prompt blocks of those requests: the load the router weighs, counted as the simulator
    /// counts it (a worker's own report lags its last step, so a follow-up turn sent as soon
    /// as the previous one ended would see the finished request still held).
    active_blocks: u64,
    subscription: JoinHandle<()>,
}

struct RouterState {
    router: Router,
    index: BlockIndex,
    workers: BTreeMap<u32, Tracked>,
}

struct Inner {
    options: ClusterOptions,
    http: reqwest::Client,
    registry: Arc<dyn Registry>,
    metrics: Arc<Metrics>,
    state: Mutex<RouterState>,
}

/// The cluster behind the HTTP frontend.
pub struct ClusterBackend {
    inner: Arc<Inner>,
    membership: JoinHandle<()>,
}

impl Drop for ClusterBackend {
    fn drop(&mut self) {
        self.membership.abort();
        for tracked in self
            .inner
            .state
            .lock()
            .expect("router lock")
            .workers
            .values()
        {
            tracked.subscription.abort();
        }
    }
}

/// Where one attempt of a request went.
#[derive(Clone, Copy, Debug)]
struct Pick {
    worker: u32,
    addr: SocketAddr,
    prefill: Option<(u32, SocketAddr)>,
    /// The prompt blocks counted in both workers' loads.
    blocks: u64,
}

/// A stable 64-bit id of a conversation name (FNV-1a), for affinity.
fn conversation_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ClusterBackend {
    /// Follows `registry`'s membership: each registered worker's KV events feed the index.
    /// Must be called inside a tokio runtime.
    pub fn new(
        options: ClusterOptions,
        registry: Arc<dyn Registry>,
        metrics: Arc<Metrics>,
    ) -> ClusterBackend {
        let router = Router::new(
            options.policy.clone(),
            sim::rng::stream(options.seed, sim::rng::Stream::Routing),
        );
        let inner = Arc::new(Inner {
            options,
            http: reqwest::Client::new(),
            registry,
            metrics,
            state: Mutex::new(RouterState {
                router,
                index: BlockIndex::new(),
                workers: BTreeMap::new(),
            }),
        });
        let membership = tokio::spawn(follow_membership(Arc::clone(&inner)));
        ClusterBackend { inner, membership }
    }

    /// Workers whose KV events the router receives, by role.
    pub fn live_workers(&self) -> BTreeMap<String, Role> {
        let state = self.inner.state.lock().expect("router lock");
        state
            .workers
            .values()
            .filter(|t| t.live)
            .map(|t| (t.info.name.clone(), t.info.role))
            .collect()
    }
}

/// Starts and stops `/events` subscriptions as workers come and go.
async fn follow_membership(inner: Arc<Inner>) {
    let mut changes = inner.registry.watch();
    loop {
        let registered = inner.registry.workers();
        {
            let mut state = inner.state.lock().expect("router lock");
            let gone: Vec<u32> = state
                .workers
                .iter()
                .filter(|(id, t)| registered.get(id) != Some(&t.info))
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                if let Some(t) = state.workers.remove(&id) {
                    t.subscription.abort();
                }
                state.index.remove_worker(id);
            }
            for (id, info) in registered {
                if let std::collections::btree_map::Entry::Vacant(slot) = state.workers.entry(id) {
                    let subscription =
                        tokio::spawn(subscribe(Arc::clone(&inner), id, info.clone()));
                    slot.insert(Tracked {
                        info,
                        live: false,
                        in_flight: 0,
                        active_blocks: 0,
                        subscription,
                    });
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Reads a worker's `/events` stream into the index. When it breaks, the worker is asked for a
/// fresh one (a subscriber that fell behind is cut off by the worker); a worker that cannot
/// give one is dead or unreachable, and leaves the cluster.
async fn subscribe(inner: Arc<Inner>, id: u32, info: WorkerInfo) {
    let mut failures = 0;
    let why = loop {
        let (delivered, why) = read_events(&inner, id, &info).await;
        // A stream that delivered before breaking resets the count: the worker is alive.
        failures = if delivered { 1 } else { failures + 1 };
        if failures >= RESUBSCRIBE_ATTEMPTS {
            break why;
        }
        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
    };
    eprintln!("worker {} left the cluster: {why}", info.name);
    {
        let mut state = inner.state.lock().expect("router lock");
        if let Some(t) = state.workers.get_mut(&id) {
            t.live = false;
        }
        state.index.remove_worker(id);
    }
    inner.registry.deregister(id, info.addr);
}

/// Applies one `/events` stream until it ends; says whether it delivered anything, and why it
/// ended.
async fn read_events(inner: &Inner, id: u32, info: &WorkerInfo) -> (bool, String) {
    let response = match inner
        .http
        .get(format!("http://{}/events", info.addr))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return (false, format!("/events answered {}", r.status())),
        Err(e) => return (false, e.to_string()),
    };
    let mut lines = NdjsonLines::new(response);
    let mut events = Vec::new();
    let mut delivered = false;
    loop {
        let line = match lines.next().await {
            Ok(Some(line)) => line,
            Ok(None) => return (delivered, "its event stream ended".into()),
            Err(e) => return (delivered, e),
        };
        let message: EventsMessage = match serde_json::from_slice(&line) {
            Ok(message) => message,
            Err(e) => return (false, format!("bad event line: {e}")),
        };
        delivered = true;
        events.clear();
        events.extend(message.stored.iter().map(|&h| KvEvent::Stored(h)));
        events.extend(message.removed.iter().map(|&h| KvEvent::Removed(h)));
        let mut state = inner.state.lock().expect("router lock");
        if message.snapshot {
            state.index.remove_worker(id);
        }
        state.index.apply_all(id, &events);
        if let Some(t) = state.workers.get_mut(&id) {
            t.live = true;
        }
        drop(state);
        inner
            .metrics
            .set_queue_depth(&info.name, u64::from(message.waiting));
    }
}

/// Splits a streamed body into lines.
struct NdjsonLines {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: Vec<u8>,
}

impl NdjsonLines {
    fn new(response: reqwest::Response) -> NdjsonLines {
        NdjsonLines {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next non-empty line; None at a clean end (no partial line left).
    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(at) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=at).take(at).collect();
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(e.to_string()),
                None if self.buffer.is_empty() => return Ok(None),
                None => return Err("the stream ended inside a line".into()),
            }
        }
    }
}

impl Inner {
    /// Picks the generating worker (decode if any is live, else aggregated) and, for a decode
    /// worker, the prefill worker; counts the request in their loads.
    fn pick(
        &self,
        hashes: &[u64],
        prompt_blocks: u64,
        conversation: u64,
        exclude: &BTreeSet<u32>,
    ) -> Option<Pick> {
        let mut state = self.state.lock().expect("router lock");
        let loads: Vec<WorkerLoad> = state
            .workers
            .iter()
            .map(|(&id, t)| WorkerLoad {
                id,
                role: t.info.role,
                live: t.live && !exclude.contains(&id),
                active_requests: t.in_flight,
                active_blocks: t.active_blocks,
            })
            .collect();
        let role = if loads.iter().any(|w| w.live && w.role == Role::Decode) {
            Role::Decode
        } else {
            Role::Aggregated
        };
        let request = RouteRequest {
            conversation,
            block_hashes: hashes,
            prompt_blocks,
        };
        let RouterState {
            router,
            index,
            workers,
        } = &mut *state;
        let chosen = router.route(role, &request, &loads, index)?.worker;
        let prefill = if role == Role::Decode {
            router
                .route(Role::Prefill, &request, &loads, index)
                .map(|d| (d.worker, workers[&d.worker].info.addr))
        } else {
            None
        };
        for id in std::iter::once(chosen).chain(prefill.map(|p| p.0)) {
            let t = workers.get_mut(&id).expect("routed to a tracked worker");
            t.in_flight += 1;
            t.active_blocks += prompt_blocks;
        }
        Some(Pick {
            worker: chosen,
            addr: workers[&chosen].info.addr,
            prefill,
            blocks: prompt_blocks,
        })
    }

    /// Takes a request out of a worker's load.
    fn release(&self, worker: u32, blocks: u64) {
        let mut state = self.state.lock().expect("router lock");
        if let Some(t) = state.workers.get_mut(&worker) {
            t.in_flight = t.in_flight.saturating_sub(1);
            t.active_blocks = t.active_blocks.saturating_sub(blocks);
        }
    }

    fn worker_name(&self, id: u32) -> String {
        let state = self.state.lock().expect("router lock");
        state
            .workers
            .get(&id)
            .map_or_else(|| format!("worker {id}"), |t| t.info.name.clone())
    }
}

/// One request on its way through the cluster.
struct Job {
    tokens: Vec<u32>,
    sampling: WireSampling,
    hashes: Vec<u64>,
    conversation: u64,
    accepted: Instant,
    /// Workers that failed or refused this request.
    exclude: BTreeSet<u32>,
    attempts: u32,
}

/// A worker accepted the request and is streaming its events.
struct Dispatched {
    pick: Pick,
    response: reqwest::Response,
    routed: Instant,
    sent: Instant,
}

impl Inner {
    /// Sends the job to a worker, trying others while workers refuse it or cannot be reached.
    async fn dispatch(&self, job: &mut Job) -> Result<Dispatched, BackendError> {
        let prompt_blocks = job
            .tokens
            .len()
            .div_ceil(self.options.block_size_tokens as usize);
        let mut last_error = None;
        while job.attempts < self.options.max_attempts {
            let Some(pick) = self.pick(
                &job.hashes,
                prompt_blocks as u64,
                job.conversation,
                &job.exclude,
            ) else {
                break;
            };
            job.attempts += 1;
            let routed = Instant::now();
            let call = GenerateCall {
                tokens: job.tokens.clone(),
                sampling: job.sampling.clone(),
                prefill: pick.prefill,
            };
            let sent = Instant::now();
            let outcome = self
                .http
                .post(format!("http://{}/generate", pick.addr))
                .json(&call)
                .timeout(DISPATCH_TIMEOUT)
                .send()
                .await;
            let response = match outcome {
                Ok(response) if response.status().is_success() => {
                    return Ok(Dispatched {
                        pick,
                        response,
                        routed,
                        sent,
                    });
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.bytes().await.unwrap_or_default();
                    serde_json::from_slice::<WorkerError>(&body).map_or_else(
                        |_| {
                            BackendError::Internal(format!(
                                "{} answered {status}",
                                self.worker_name(pick.worker)
                            ))
                        },
                        WorkerError::into_backend,
                    )
                }
                Err(e) => {
                    BackendError::Unavailable(format!("{}: {e}", self.worker_name(pick.worker)))
                }
            };
            self.release_pick(&pick);
            match response {
                BackendError::QueueFull | BackendError::Unavailable(_) => {
                    job.exclude.insert(pick.worker);
                    last_error = Some(response);
                }
                other => return Err(other),
            }
        }
        Err(last_error
            .unwrap_or_else(|| BackendError::Unavailable("no live worker can serve it".into())))
    }

    fn release_pick(&self, pick: &Pick) {
        self.release(pick.worker, pick.blocks);
        if let Some((prefill, _)) = pick.prefill {
            self.release(prefill, pick.blocks);
        }
    }
}

/// Relays a worker's stream to the client; redispatches a request whose worker failed before
/// its first token.
async fn relay(
    inner: Arc<Inner>,
    mut job: Job,
    mut dispatched: Dispatched,
    tx: mpsc::Sender<GenerateEvent>,
) {
    loop {
        let Dispatched {
            pick,
            response,
            routed,
            sent,
        } = dispatched;
        let mut lines = NdjsonLines::new(response);
        let mut prefill_held = pick.prefill.is_some();
        let mut tokens = 0usize;
        let failure = loop {
            let line = match lines.next().await {
                Ok(Some(line)) => line,
                Ok(None) => break "its stream ended early".to_string(),
                Err(e) => break e,
            };
            let event = match serde_json::from_slice::<StreamEvent>(&line) {
                Ok(event) => event.into_event(),
                Err(e) => break format!("bad stream line: {e}"),
            };
            if prefill_held && let Some((prefill, _)) = pick.prefill {
                // The prefill worker's part ends with the first event.
                inner.release(prefill, pick.blocks);
                prefill_held = false;
            }
            let event = match event {
                GenerateEvent::Token { .. } => {
                    tokens += 1;
                    event
                }
                GenerateEvent::Done {
                    finish_reason,
                    usage,
                    trace,
                    token_ids,
                } => {
                    let trace = frontend_trace(trace, &pick, job.accepted, routed, sent);
                    if trace.transfer_bytes > 0 {
                        inner.metrics.record_kv_transfer(
                            trace.transfer_bytes,
                            Duration::from_nanos(trace.transfer_end_ns - trace.transfer_start_ns),
                        );
                    }
                    GenerateEvent::Done {
                        finish_reason,
                        usage,
                        trace,
                        token_ids,
                    }
                }
                GenerateEvent::Error(_) => event,
            };
            let last = !matches!(event, GenerateEvent::Token { .. });
            if last {
                // Out of the load before the client can send its next turn.
                inner.release(pick.worker, pick.blocks);
                let _ = tx.send(event).await;
                return;
            }
            if tx.send(event).await.is_err() {
                // The client went away (dropping the stream cancels the request at the worker).
                inner.release(pick.worker, pick.blocks);
                return;
            }
        };
        if prefill_held && let Some((prefill, _)) = pick.prefill {
            inner.release(prefill, pick.blocks);
        }
        inner.release(pick.worker, pick.blocks);
        let name = inner.worker_name(pick.worker);
        job.exclude.insert(pick.worker);
        if tokens == 0 {
            eprintln!("{name} failed before the first token ({failure}); trying another worker");
            match inner.dispatch(&mut job).await {
                Ok(next) => {
                    dispatched = next;
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(GenerateEvent::Error(e)).await;
                    return;
                }
            }
        }
        let _ = tx
            .send(GenerateEvent::Error(BackendError::Unavailable(format!(
                "{name} failed after {tokens} tokens: {failure}"
            ))))
            .await;
        return;
    }
}

/// A worker's trace, its times moved from the worker's receipt of the call to the frontend's
/// receipt of the request, with the workers named by cluster index.
fn frontend_trace(
    mut trace: ServeTrace,
    pick: &Pick,
    accepted: Instant,
    routed: Instant,
    sent: Instant,
) -> ServeTrace {
    let offset = sent.saturating_duration_since(accepted).as_nanos() as u64;
    for t in [
        &mut trace.prefill_start_ns,
        &mut trace.prefill_end_ns,
        &mut trace.transfer_start_ns,
        &mut trace.transfer_end_ns,
        &mut trace.import_start_ns,
        &mut trace.import_end_ns,
    ] {
        if *t > 0 {
            *t += offset;
        }
    }
    trace.routed_ns = routed.saturating_duration_since(accepted).as_nanos() as u64;
    // The registry's index is authoritative (a worker names itself by its place in its file).
    if trace.prefill_worker == trace.decode_worker {
        trace.prefill_worker = Some(pick.worker);
    }
    trace.decode_worker = Some(pick.worker);
    trace
}

impl Backend for ClusterBackend {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: self.inner.options.model_id.clone(),
            owned_by: "disagg".into(),
        }]
    }

    fn context_tokens(&self, model: &str) -> Option<usize> {
        (model == self.inner.options.model_id).then_some(self.inner.options.context_tokens)
    }

    async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        let accepted = Instant::now();
        let options = &self.inner.options;
        if req.model != options.model_id {
            return Err(BackendError::UnknownModel(req.model));
        }
        let tokens = crate::engine::prompt_tokens(&options.tokenizer, &req.input)?;
        if tokens.len() >= options.context_tokens {
            return Err(BackendError::PromptTooLong {
                tokens: tokens.len(),
                limit: options.context_tokens,
            });
        }
        let sampling = req.sampling;
        let conversation = match &req.conversation_id {
            Some(name) => conversation_key(name),
            None => conversation_key(&req.request_id),
        };
        let mut job = Job {
            hashes: token_block_hashes(&tokens, options.block_size_tokens),
            tokens,
            sampling: (&sampling).into(),
            conversation,
            accepted,
            exclude: BTreeSet::new(),
            attempts: 0,
        };
        let dispatched = self.inner.dispatch(&mut job).await?;
        let capacity = sampling.max_tokens.min(options.context_tokens) + 2;
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(relay(Arc::clone(&self.inner), job, dispatched, tx));
        Ok(rx)
    }
}
