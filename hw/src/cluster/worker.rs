//! A worker process: one engine thread and, around it on tokio, the control API (`/generate`,
//! `/prefill`, `/events`, `/health`), the KV listener of a decode worker, the calls a decode
//! worker makes to prefill workers, and the registration with the cluster's registry.

use super::config::Cluster;
use super::protocol::{
    EventsMessage, GenerateCall, PrefillCall, PrefillReply, Registered, StreamEvent, WorkerError,
    WorkerInfo,
};
use crate::engine::{Engine, EngineHooks, EngineReport, PrefillAsk, RemoteKv, RemotePrefill};
use crate::frontend::BackendError;
use crate::transport::tcp::{TcpConfig, TcpKvListener, TcpTransport};
use crate::transport::{Endpoint, KvTransfer, KvTransport, TransportError, model_fingerprint};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use models::runtime::SamplingParams;
use sim::kv::KvEvent;
use sim::routing::Role;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// Lines an `/events` subscriber may fall behind before it is dropped (it reconnects and
/// starts again from a snapshot).
const SUBSCRIBER_BACKLOG: usize = 4096;

/// How long a decode worker waits for KV that a prefill worker said it delivered.
const KV_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the worker's handlers share.
struct Worker {
    engine: Engine,
    role: Role,
    name: String,
    /// The model's transfer identity (decode workers refuse other models' KV).
    fingerprint: u64,
    dtype: models::DType,
    n_layers: u32,
    block_size_tokens: u32,
    transport: TcpTransport,
    /// A prefill worker sends each layer's KV as soon as it is computed.
    stream_layers: bool,
    hub: Mutex<EventHub>,
}

/// The prefix cache as the engine reported it, and the `/events` subscribers.
#[derive(Default)]
struct EventHub {
    cached: BTreeSet<u64>,
    last: Option<EngineReport>,
    subscribers: Vec<mpsc::Sender<EventsMessage>>,
}

impl EventHub {
    fn apply(&mut self, report: EngineReport) {
        let mut message = message_for(&report, false);
        for event in &report.events {
            match *event {
                KvEvent::Stored(h) => {
                    self.cached.insert(h);
                    message.stored.push(h);
                }
                KvEvent::Removed(h) => {
                    self.cached.remove(&h);
                    message.removed.push(h);
                }
            }
        }
        self.subscribers
            .retain(|s| s.try_send(message.clone()).is_ok());
        self.last = Some(report);
    }

    fn subscribe(&mut self) -> mpsc::Receiver<EventsMessage> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BACKLOG);
        let mut snapshot = match &self.last {
            Some(report) => message_for(report, true),
            None => EventsMessage {
                snapshot: true,
                stored: Vec::new(),
                removed: Vec::new(),
                running: 0,
                waiting: 0,
                used_blocks: 0,
                capacity_blocks: 0,
            },
        };
        snapshot.stored = self.cached.iter().copied().collect();
        if tx.try_send(snapshot).is_ok() {
            self.subscribers.push(tx);
        }
        rx
    }
}

fn message_for(report: &EngineReport, snapshot: bool) -> EventsMessage {
    EventsMessage {
        snapshot,
        stored: Vec::new(),
        removed: Vec::new(),
        running: report.running,
        waiting: report.waiting,
        used_blocks: report.used_blocks,
        capacity_blocks: report.capacity_blocks,
    }
}

/// Where a decode worker's KV arrives and the requests waiting for it, by engine key.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<KvTransfer>>>>;

/// Runs the worker `name` of `cluster` until the process ends; it registers with the registry
/// at `registry` once it serves. `ready` is told the control address then.
pub async fn run(
    cluster: &Cluster,
    name: &str,
    registry: SocketAddr,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), String> {
    let (index, wc) = cluster
        .worker(name)
        .ok_or_else(|| format!("{}: no worker named `{name}`", cluster.file))?;
    let wc = wc.clone();
    let device = cluster
        .open_device(index as usize)
        .map_err(|e| e.to_string())?;
    let (loading, model_device) = (cluster.clone(), device.clone());
    let (model, tokenizer) =
        tokio::task::spawn_blocking(move || super::model::load(&loading, &model_device))
            .await
            .map_err(|e| e.to_string())??;
    let spec = model.spec().clone();
    let model_dtype = crate::spec_dtype(model.dtype());
    let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
    let (asks_tx, mut asks_rx) = mpsc::unbounded_channel();
    let hooks = EngineHooks {
        prefill_asks: (wc.role == Role::Decode).then_some(asks_tx),
        reports: Some(reports_tx),
    };
    // A worker on a GPU that sends or receives KV stages it through pinned host buffers:
    // allocated now, not in the path of the first transfers that overlap (on an H200 the first
    // two overlapping transfers of a run took 12-16 ms against 3-8 ms for later ones).
    #[cfg(feature = "cuda")]
    if wc.role != Role::Aggregated && device.is_cuda() {
        use crate::transport::cuda::{STAGING_PAIRS, warm_staging};
        let staging = device.clone();
        let pairs = tokio::task::spawn_blocking(move || warm_staging(&staging, STAGING_PAIRS))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("worker {name}: KV staging buffers: {e}"))?;
        eprintln!("worker {name}: {pairs} pairs of pinned KV staging buffers ready");
    }
    let mut engine_config = wc.engine(index);
    engine_config.step_trace = wc.step_trace.as_ref().map(|p| cluster.base_dir.join(p));
    let block_size_tokens = engine_config.block_size_tokens;
    let engine = Engine::new(model, tokenizer, engine_config, hooks).map_err(|e| e.to_string())?;
    let worker = Arc::new(Worker {
        engine,
        role: wc.role,
        name: name.to_owned(),
        fingerprint: model_fingerprint(&spec, model_dtype),
        dtype: model_dtype,
        n_layers: spec.n_layers,
        block_size_tokens,
        transport: TcpTransport::new(TcpConfig::default()),
        stream_layers: wc.stream_kv_layers,
        hub: Mutex::new(EventHub::default()),
    });

    let hub_worker = Arc::clone(&worker);
    tokio::spawn(async move {
        while let Some(report) = reports_rx.recv().await {
            hub_worker.hub.lock().expect("hub lock").apply(report);
        }
    });

    // A decode worker receives KV and asks prefill workers for it.
    let mut kv_listener = None;
    if wc.role == Role::Decode {
        let pending: Pending = Arc::default();
        let (deliver_tx, mut deliver_rx) = mpsc::channel::<KvTransfer>(64);
        let listener = TcpKvListener::bind(
            wc.kv_addr,
            worker.fingerprint,
            TcpConfig::default(),
            deliver_tx,
        )
        .await
        .map_err(|e| format!("worker[{name}].kv_addr {}: {e}", wc.kv_addr))?;
        let kv_addr = listener.local_addr();
        let arrivals = Arc::clone(&pending);
        tokio::spawn(async move {
            while let Some(transfer) = deliver_rx.recv().await {
                let waiter = arrivals
                    .lock()
                    .expect("pending lock")
                    .remove(&transfer.request_id);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(transfer);
                    }
                    None => eprintln!(
                        "KV for request {} arrived after it stopped waiting; dropped",
                        transfer.request_id
                    ),
                }
            }
        });
        let http = reqwest::Client::new();
        let asker = Arc::clone(&worker);
        let timeout = Duration::from_millis(wc.prefill_timeout_ms);
        tokio::spawn(async move {
            while let Some(ask) = asks_rx.recv().await {
                let key = ask.key;
                let (tx, rx) = oneshot::channel();
                pending.lock().expect("pending lock").insert(key, tx);
                let (http, asker, pending) =
                    (http.clone(), Arc::clone(&asker), Arc::clone(&pending));
                tokio::spawn(async move {
                    let outcome = remote_prefill(&http, ask, kv_addr, rx, timeout).await;
                    pending.lock().expect("pending lock").remove(&key);
                    asker.engine.deliver_remote(key, outcome);
                });
            }
        });
        kv_listener = Some(listener);
    }

    let listener = TcpListener::bind(wc.addr)
        .await
        .map_err(|e| format!("worker[{name}].addr {}: {e}", wc.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let info = WorkerInfo {
        name: name.to_owned(),
        role: wc.role,
        addr,
        kv_addr: kv_listener.as_ref().map(TcpKvListener::local_addr),
    };
    let app = control_api(Arc::clone(&worker));
    let server = tokio::spawn(async move { axum::serve(crate::no_delay(listener), app).await });
    let id = register(&info, registry).await?;
    eprintln!(
        "worker {name} ({} on {}) is worker {id}: control http://{addr}{}",
        wc.role.name(),
        wc.device,
        info.kv_addr
            .map(|a| format!(", KV tcp://{a}"))
            .unwrap_or_default()
    );
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }
    let served = server.await.map_err(|e| e.to_string())?;
    drop(kv_listener);
    served.map_err(|e| format!("worker {name}: {e}"))
}

fn control_api(worker: Arc<Worker>) -> Router {
    Router::new()
        .route("/generate", post(generate))
        .route("/prefill", post(prefill))
        .route("/events", get(events))
        .route("/health", get(health))
        .with_state(worker)
}

/// Registers with the registry, retrying while it is not up yet (it may start after us).
async fn register(info: &WorkerInfo, registry: SocketAddr) -> Result<u32, String> {
    let http = reqwest::Client::new();
    let url = format!("http://{registry}/register");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let outcome = async {
            let response = http
                .post(&url)
                .json(info)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                return Err(format!("{status}: {body}"));
            }
            response
                .json::<Registered>()
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match outcome {
            Ok(registered) => return Ok(registered.worker),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("registering with {url} failed: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn error_response(e: &BackendError) -> Response {
    let status = match e {
        BackendError::PromptTooLong { .. }
        | BackendError::InvalidPrompt(_)
        | BackendError::UnknownModel(_) => StatusCode::BAD_REQUEST,
        BackendError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        BackendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        BackendError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(WorkerError::from_backend(e))).into_response()
}

fn bad_body(e: serde_json::Error) -> Response {
    error_response(&BackendError::Internal(format!("bad request body: {e}")))
}

fn ndjson(line: &impl serde::Serialize) -> Bytes {
    let mut bytes = serde_json::to_vec(line).expect("protocol types serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Streams a generation as NDJSON [`StreamEvent`]s; a client going away cancels it.
async fn generate(State(worker): State<Arc<Worker>>, body: Bytes) -> Response {
    if worker.role == Role::Prefill {
        return error_response(&BackendError::Internal(format!(
            "{} is a prefill worker; it does not generate",
            worker.name
        )));
    }
    let call: GenerateCall = match serde_json::from_slice(&body) {
        Ok(call) => call,
        Err(e) => return bad_body(e),
    };
    let remote = match (worker.role, call.prefill) {
        (Role::Decode, Some((worker, addr))) => Some(RemotePrefill { worker, addr }),
        _ => None,
    };
    let sampling: SamplingParams = call.sampling.into();
    let events = match worker.engine.submit(call.tokens, sampling, remote) {
        Ok(events) => events,
        Err(e) => return error_response(&e),
    };
    let lines = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(ndjson(&StreamEvent::from_event(event))),
            events,
        ))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("static headers")
}

/// Prefills, sends the KV to the caller's KV address and answers with the stage times.
async fn prefill(State(worker): State<Arc<Worker>>, body: Bytes) -> Response {
    let received = Instant::now();
    if worker.role != Role::Prefill {
        return error_response(&BackendError::Internal(format!(
            "{} is not a prefill worker",
            worker.name
        )));
    }
    let call: PrefillCall = match serde_json::from_slice(&body) {
        Ok(call) => call,
        Err(e) => return bad_body(e),
    };
    let sampling: SamplingParams = call.sampling.into();
    let to = Endpoint::Tcp(call.kv_addr);
    let header = |kv| KvTransfer {
        request_id: call.request_id,
        model_fingerprint: worker.fingerprint,
        dtype: worker.dtype,
        n_layers: worker.n_layers,
        block_size_tokens: worker.block_size_tokens,
        kv,
    };
    // Streaming: the layers leave while the prefill computes the next ones; the transfer
    // frame closes them once the first token is sampled.
    let (layers, streaming) = if worker.stream_layers {
        let (layers_tx, layers_rx) = mpsc::unbounded_channel();
        let (last_tx, last_rx) = oneshot::channel();
        let (transport, to, request_id) = (worker.transport.clone(), to.clone(), call.request_id);
        let sending = tokio::spawn(async move {
            transport
                .send_streamed(&to, request_id, layers_rx, last_rx)
                .await
        });
        (Some(layers_tx), Some((last_tx, sending)))
    } else {
        (None, None)
    };
    let output = match worker
        .engine
        .submit_prefill(call.tokens, sampling, call.skip_blocks, layers)
    {
        Ok(rx) => match rx.await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return error_response(&e),
            Err(_) => {
                return error_response(&BackendError::Unavailable("the engine stopped".into()));
            }
        },
        Err(e) => return error_response(&e),
    };
    let since = |t: Instant| t.saturating_duration_since(received).as_nanos() as u64;
    let sent = match streaming {
        Some((last_tx, sending)) => {
            let _ = last_tx.send(header(output.kv));
            sending.await.unwrap_or_else(|e| {
                Err(TransportError::Refused {
                    endpoint: to.clone(),
                    request_id: call.request_id,
                    reason: if e.is_panic() {
                        "the sender panicked"
                    } else {
                        "the sender was cancelled"
                    },
                })
            })
        }
        None => worker.transport.send(&to, header(output.kv)).await,
    };
    let receipt = match sent {
        Ok(receipt) => receipt,
        Err(e) => {
            return error_response(&BackendError::Unavailable(format!("KV transfer: {e}")));
        }
    };
    let transfer_end = Instant::now();
    axum::Json(PrefillReply {
        sampler_position: output.sampler_position.to_string(),
        cached_tokens: output.cached_tokens,
        prefill_start_ns: since(output.prefill_start),
        prefill_end_ns: since(output.prefill_end),
        transfer_start_ns: since(receipt.started),
        transfer_end_ns: since(transfer_end),
        transfer_bytes: receipt.payload_bytes,
    })
    .into_response()
}

/// The prefix cache's snapshot, then its changes, as NDJSON [`EventsMessage`]s.
async fn events(State(worker): State<Arc<Worker>>) -> Response {
    let rx = worker.hub.lock().expect("hub lock").subscribe();
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let message = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(ndjson(&message)), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("static headers")
}

async fn health(State(worker): State<Arc<Worker>>) -> Response {
    axum::Json(serde_json::json!({
        "name": worker.name,
        "role": worker.role.name(),
        "waiting": worker.engine.waiting(),
    }))
    .into_response()
}

/// A decode worker's call to a prefill worker: ask, wait for the reply, then for the KV the
/// reply says was delivered.
async fn remote_prefill(
    http: &reqwest::Client,
    ask: PrefillAsk,
    kv_addr: SocketAddr,
    arrival: oneshot::Receiver<KvTransfer>,
    timeout: Duration,
) -> Result<RemoteKv, String> {
    let target = ask.target.addr;
    let call = PrefillCall {
        request_id: ask.key,
        sampling: (&ask.sampling).into(),
        tokens: ask.tokens,
        skip_blocks: ask.skip_blocks,
        kv_addr,
    };
    let asked = Instant::now();
    let response = http
        .post(format!("http://{target}/prefill"))
        .json(&call)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("prefill worker {target}: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("prefill worker {target}: {status}: {body}"));
    }
    let reply: PrefillReply = response
        .json()
        .await
        .map_err(|e| format!("prefill worker {target}: bad reply: {e}"))?;
    let transfer = tokio::time::timeout(KV_ARRIVAL_TIMEOUT, arrival)
        .await
        .map_err(|_| format!("prefill worker {target} reported KV that never arrived"))?
        .map_err(|_| "the KV listener stopped".to_string())?;
    let sampler_position = reply
        .sampler_position
        .parse()
        .map_err(|_| format!("prefill worker {target}: bad sampler_position"))?;
    let at = |ns: u64| asked + Duration::from_nanos(ns);
    Ok(RemoteKv {
        kv: transfer.kv,
        sampler_position,
        prefill_worker: ask.target.worker,
        cached_tokens: reply.cached_tokens,
        prefill_start: at(reply.prefill_start_ns),
        prefill_end: at(reply.prefill_end_ns),
        transfer_start: at(reply.transfer_start_ns),
        transfer_end: at(reply.transfer_end_ns),
        transfer_bytes: reply.transfer_bytes,
    })
}
