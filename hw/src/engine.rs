//! A worker's engine: one OS thread owns a [`PagedModel`] and runs continuous batching
//! ([`batch`]); the rest of the process (tokio: HTTP, KV transport) talks to it through
//! channels. The same engine serves the three roles: aggregated (prefill and decode in one
//! batch), prefill (a job ends with its first token and its KV exported) and decode (a request
//! is admitted, its KV comes from a prefill worker, then it decodes). [`EngineBackend`] puts an
//! aggregated engine behind the HTTP frontend in one process.

mod batch;
mod detok;
pub mod steps;

use crate::frontend::{
    Backend, BackendError, GenerateEvent, GenerateInput, GenerateRequest, ModelInfo, Role,
    ServeTrace,
};
use crate::paged::{KvExport, PagedError, PagedModel};
use crate::transport::LayerParts;
use models::runtime::{
    ChatMessage, DEFAULT_BLOCK_SIZE_TOKENS, Device, GgufFile, Model, Sampler, SamplingParams,
    TensorDType, Tokenizer,
};
use sim::kv::KvEvent;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// How the engine batches and how much it queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Blocks in the KV pool.
    pub kv_blocks: u32,
    pub block_size_tokens: u32,
    /// Tokens one step feeds at most (decode tokens plus prefill chunks).
    pub max_batched_tokens: usize,
    /// Sequences admitted at once.
    pub max_num_seqs: usize,
    /// Requests waiting for admission beyond which a submission is refused with QueueFull.
    pub max_waiting: usize,
    pub prefix_caching: bool,
    /// A decode worker prefills a prompt itself when at most this many of its tokens are not
    /// in its prefix cache (conditional disaggregation); above, a prefill worker does.
    pub local_prefill_tokens: usize,
    /// The worker's cluster index, as traces name it.
    pub worker_id: u32,
    /// Where to write the step trace (`steps::StepTrace`), if anywhere.
    pub step_trace: Option<std::path::PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            kv_blocks: 1024,
            block_size_tokens: DEFAULT_BLOCK_SIZE_TOKENS as u32,
            max_batched_tokens: 2048,
            max_num_seqs: 64,
            max_waiting: 256,
            prefix_caching: true,
            local_prefill_tokens: 0,
            worker_id: 0,
            step_trace: None,
        }
    }
}

/// Runs every matmul shape the engine's steps can meet, a batched prefill and a decode step on
/// a throwaway pool, then records into `paged` the CUDA graphs of the steps that `config` and
/// `context_tokens` allow. A GPU loads (JIT-compiles) a kernel module the first time it is
/// used, seconds each (one H100 worker's first step took 21 s), cuBLAS spends milliseconds on
/// each new shape, and a graph takes milliseconds to record; all would otherwise land on the
/// first requests.
fn warm_up(
    paged: &mut PagedModel,
    config: &EngineConfig,
    context_tokens: usize,
) -> Result<(), PagedError> {
    let started = std::time::Instant::now();
    let model = paged.model().clone();
    let matmuls = model.warm_up_matmuls(config.max_batched_tokens, config.max_num_seqs)?;
    let mut pool = PagedModel::new(model, 8, config.block_size_tokens, false)?;
    let prompt: Vec<u32> = (1..=20).collect();
    let (a, _) = pool.admit(&prompt)?;
    let (b, _) = pool.admit(&prompt[..7])?;
    pool.step(&[(a, 20), (b, 7)])?;
    pool.push_token(a, 1)?;
    pool.push_token(b, 1)?;
    pool.step(&[(a, 1), (b, 1)])?
        .to_vec2::<f32>()
        .map_err(models::runtime::RuntimeError::from)?;
    pool.release(a)?;
    pool.release(b)?;
    let graphs = paged.record_graphs(
        config.max_num_seqs,
        config.max_batched_tokens,
        context_tokens,
    )?;
    eprintln!(
        "warm-up: {matmuls} matmul shapes, {graphs} CUDA graphs in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The prefill worker a decode worker's request takes its KV from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePrefill {
    /// The worker's cluster index, for the trace.
    pub worker: u32,
    /// Its control address.
    pub addr: SocketAddr,
}

/// The engine asks its process to get a prompt's KV from a prefill worker.
#[derive(Clone, Debug)]
pub struct PrefillAsk {
    /// Answer with [`Engine::deliver_remote`] under this key.
    pub key: u64,
    pub target: RemotePrefill,
    /// The whole prompt.
    pub tokens: Vec<u32>,
    /// Leading blocks this worker holds (reserved for the request): not to be sent.
    pub skip_blocks: usize,
    pub sampling: SamplingParams,
}

/// A prefill worker's answer to a [`PrefillAsk`], with its KV already received.
#[derive(Clone, Debug)]
pub struct RemoteKv {
    /// The prompt's KV (from `skip_blocks` on) and the first sampled token, last in `tokens`.
    pub kv: KvExport,
    /// Where the request's sampling stream stands after the first token.
    pub sampler_position: u128,
    pub prefill_worker: u32,
    /// Prompt tokens the prefill worker found in its prefix cache.
    pub cached_tokens: u32,
    pub prefill_start: Instant,
    pub prefill_end: Instant,
    pub transfer_start: Instant,
    pub transfer_end: Instant,
    pub transfer_bytes: u64,
}

/// What a prefill job hands back: the KV to send (its blocks empty when they were streamed) and
/// what the decode side needs to go on.
#[derive(Clone, Debug)]
pub struct PrefillOutput {
    pub kv: KvExport,
    pub sampler_position: u128,
    pub cached_tokens: u32,
    pub prefill_start: Instant,
    pub prefill_end: Instant,
}

/// The prefix cache's changes and the load, sent after steps that changed either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineReport {
    pub events: Vec<KvEvent>,
    pub running: u32,
    pub waiting: u32,
    pub used_blocks: u32,
    pub capacity_blocks: u32,
}

/// Where the engine's outputs to its process go; both optional (an engine alone needs none).
#[derive(Default)]
pub struct EngineHooks {
    pub prefill_asks: Option<mpsc::UnboundedSender<PrefillAsk>>,
    pub reports: Option<mpsc::UnboundedSender<EngineReport>>,
}

/// State the engine thread shares with its handle.
struct Shared {
    waiting: AtomicUsize,
    preemptions: AtomicU64,
    prefill_asks: Option<mpsc::UnboundedSender<PrefillAsk>>,
    reports: Option<mpsc::UnboundedSender<EngineReport>>,
}

enum Inbox {
    Submit(Box<Request>),
    Remote {
        key: u64,
        outcome: Result<RemoteKv, String>,
    },
}

/// What a request wants from the engine.
enum Job {
    /// Generate tokens and stream them (aggregated and decode workers).
    Generate {
        events: mpsc::Sender<GenerateEvent>,
        /// Bytes of the generated text already streamed.
        sent_bytes: usize,
        detok: detok::Detokenizer,
        /// A decode worker's source of prompt KV.
        remote: Option<RemotePrefill>,
    },
    /// Prefill, sample the first token and export the KV from `skip_blocks` on (prefill
    /// workers).
    Prefill {
        skip_blocks: usize,
        reply: Option<oneshot::Sender<Result<PrefillOutput, BackendError>>>,
        /// Where each layer's KV goes during the step that completes the prompt; taken then.
        stream: Option<mpsc::UnboundedSender<LayerParts>>,
        /// The layers were streamed: the output carries the header only.
        streamed: bool,
    },
}

/// A request as it travels from submission through the engine thread.
struct Request {
    key: u64,
    /// Prompt then generated tokens: what a preempted request is recomputed from.
    tokens: Vec<u32>,
    prompt_tokens: usize,
    sampling: SamplingParams,
    sampler: Sampler,
    job: Job,
    accepted: Instant,
    prefill_start: Option<Instant>,
    prefill_end: Option<Instant>,
    /// Prompt tokens this worker found cached at first admission.
    local_cached_tokens: u32,
    trace: ServeTrace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Prefilling,
    /// Admitted, waiting for a prefill worker's KV.
    AwaitingKv,
    Decoding,
}

/// The continuous-batching worker. Dropping it stops the thread once the queue is drained.
pub struct Engine {
    inbox: Option<std::sync::mpsc::Sender<Inbox>>,
    shared: Arc<Shared>,
    next_key: AtomicU64,
    tokenizer: Arc<Tokenizer>,
    context_tokens: usize,
    max_waiting: usize,
    worker_id: u32,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Builds the KV pool for `model` and starts the worker thread. The context is the model's
    /// position limit or the whole pool, whichever is smaller, so that any admitted request
    /// can run to its end alone.
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        config: EngineConfig,
        hooks: EngineHooks,
    ) -> Result<Engine, PagedError> {
        if config.max_batched_tokens == 0 || config.max_num_seqs == 0 {
            return Err(PagedError::Invalid(
                "max_batched_tokens and max_num_seqs must be positive".into(),
            ));
        }
        let context_tokens = (model.spec().max_position_embeddings as usize)
            .min(config.kv_blocks as usize * config.block_size_tokens as usize);
        let mut paged = PagedModel::new(
            model,
            config.kv_blocks,
            config.block_size_tokens,
            config.prefix_caching,
        )?;
        if !paged.model().device().is_cpu() {
            warm_up(&mut paged, &config, context_tokens)?;
        }
        let tokenizer = Arc::new(tokenizer);
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            prefill_asks: hooks.prefill_asks,
            reports: hooks.reports,
        });
        let trace = match &config.step_trace {
            Some(path) => Some(steps::StepTrace::create(path).map_err(|e| {
                PagedError::Invalid(format!("step_trace: {}: {e}", path.display()))
            })?),
            None => None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let mut batcher = batch::Batcher::new(
            paged,
            Arc::clone(&tokenizer),
            Arc::clone(&shared),
            &config,
            context_tokens,
        );
        batcher.trace = trace;
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || batcher.run(rx))
            .map_err(|e| PagedError::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            inbox: Some(tx),
            shared,
            next_key: AtomicU64::new(0),
            tokenizer,
            context_tokens,
            max_waiting: config.max_waiting,
            worker_id: config.worker_id,
            thread: Some(thread),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Sequences put back in the queue for lack of blocks, since the start.
    pub fn preemptions(&self) -> u64 {
        self.shared.preemptions.load(Ordering::Relaxed)
    }

    /// Requests waiting for admission now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// Prompt plus generated tokens of one request, at most.
    pub fn context_tokens(&self) -> usize {
        self.context_tokens
    }

    /// Queues a prompt to generate from and returns its event stream; the tokenizer's
    /// end-of-generation tokens are added to the stop tokens unless `ignore_eos` is set. A
    /// prompt must leave room for one generated token. With `remote`, the prompt's KV comes
    /// from that prefill worker (unless nearly all of it is cached here).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        mut sampling: SamplingParams,
        remote: Option<RemotePrefill>,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        let eos_ids = if sampling.ignore_eos {
            &[][..]
        } else {
            self.tokenizer.eos_token_ids()
        };
        for &id in eos_ids {
            if !sampling.stop_token_ids.contains(&id) {
                sampling.stop_token_ids.push(id);
            }
        }
        // One event per generated token, a last piece of held-back text, then Done: the
        // channel never fills, so the engine never waits on a slow client.
        let capacity = sampling.max_tokens.min(self.context_tokens) + 2;
        let (tx, rx) = mpsc::channel(capacity);
        let job = Job::Generate {
            events: tx,
            sent_bytes: 0,
            detok: detok::Detokenizer::default(),
            remote,
        };
        self.enqueue(prompt, sampling, job)?;
        Ok(rx)
    }

    /// Queues a prefill job: the prompt's KV from block `skip_blocks` on and the first token,
    /// sampled with `sampling`. With `stream`, each layer's KV goes there as the step that
    /// completes the prompt computes it, and the output's blocks are left empty.
    pub fn submit_prefill(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        skip_blocks: usize,
        stream: Option<mpsc::UnboundedSender<LayerParts>>,
    ) -> Result<oneshot::Receiver<Result<PrefillOutput, BackendError>>, BackendError> {
        let (tx, rx) = oneshot::channel();
        let job = Job::Prefill {
            skip_blocks,
            reply: Some(tx),
            stream,
            streamed: false,
        };
        self.enqueue(prompt, sampling, job)?;
        Ok(rx)
    }

    /// Answers a [`PrefillAsk`] of this engine.
    pub fn deliver_remote(&self, key: u64, outcome: Result<RemoteKv, String>) {
        if let Some(inbox) = &self.inbox {
            let _ = inbox.send(Inbox::Remote { key, outcome });
        }
    }

    fn enqueue(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        job: Job,
    ) -> Result<(), BackendError> {
        if prompt.len() >= self.context_tokens {
            return Err(BackendError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.context_tokens,
            });
        }
        if prompt.is_empty() {
            return Err(BackendError::Internal("the prompt has no tokens".into()));
        }
        let sampler = Sampler::new(&sampling).map_err(|e| BackendError::Internal(e.to_string()))?;
        if self.shared.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::QueueFull);
        }
        let req = Request {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            prompt_tokens: prompt.len(),
            tokens: prompt,
            sampling,
            sampler,
            job,
            accepted: Instant::now(),
            prefill_start: None,
            prefill_end: None,
            local_cached_tokens: 0,
            trace: ServeTrace {
                prefill_worker: Some(self.worker_id),
                decode_worker: Some(self.worker_id),
                ..ServeTrace::default()
            },
        };
        let sent = self
            .inbox
            .as_ref()
            .is_some_and(|s| s.send(Inbox::Submit(Box::new(req))).is_ok());
        if !sent {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Unavailable("the engine has stopped".into()));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inbox = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The frontend's backend over one engine serving one model.
pub struct EngineBackend {
    engine: Engine,
    model_id: String,
}

impl EngineBackend {
    pub fn new(engine: Engine, model_id: impl Into<String>) -> EngineBackend {
        EngineBackend {
            engine,
            model_id: model_id.into(),
        }
    }

    /// Loads a GGUF file's weights and tokenizer and starts an engine on them.
    pub fn from_gguf(
        path: &Path,
        model_id: impl Into<String>,
        dtype: TensorDType,
        device: &Device,
        config: EngineConfig,
    ) -> Result<EngineBackend, PagedError> {
        let gguf = GgufFile::open(path)?;
        let model = Model::new(gguf.weights(dtype, device)?)?;
        let engine = Engine::new(model, gguf.tokenizer()?, config, EngineHooks::default())?;
        Ok(EngineBackend::new(engine, model_id))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// The prompt tokens of a request: raw text with the tokenizer's specials, the chat template
/// rendered (which carries its own), or token ids as they are.
pub fn prompt_tokens(
    tokenizer: &Tokenizer,
    input: &GenerateInput,
) -> Result<Vec<u32>, BackendError> {
    let encoded = match input {
        GenerateInput::Text(text) => tokenizer.encode(text, true),
        GenerateInput::Chat(messages) => {
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| {
                    let role = match m.role {
                        // OpenAI's developer messages are the system prompt.
                        Role::System | Role::Developer => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    ChatMessage::new(role, m.content.clone())
                })
                .collect();
            tokenizer.encode(&tokenizer.apply_chat_template(&messages, true), false)
        }
        GenerateInput::Tokens(ids) => {
            let vocab_size = tokenizer.vocab_size();
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(BackendError::InvalidPrompt(format!(
                    "prompt: token id {id} is outside the {vocab_size}-token vocabulary"
                )));
            }
            Ok(ids.clone())
        }
    };
    // Text the tokenizer refuses is the request's fault (a model without a vocabulary reads
    // only token ids).
    let mut tokens = encoded.map_err(|e| match e {
        models::runtime::RuntimeError::Invalid(message) => BackendError::InvalidPrompt(message),
        other => BackendError::Internal(other.to_string()),
    })?;
    // An empty completion prompt continues from a document boundary.
    if tokens.is_empty()
        && let Some(&eos) = tokenizer.eos_token_ids().first()
    {
        tokens.push(eos);
    }
    Ok(tokens)
}

impl Backend for EngineBackend {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: self.model_id.clone(),
            owned_by: "disagg".into(),
        }]
    }

    fn context_tokens(&self, model: &str) -> Option<usize> {
        (model == self.model_id).then(|| self.engine.context_tokens())
    }

    async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        if req.model != self.model_id {
            return Err(BackendError::UnknownModel(req.model));
        }
        let prompt = prompt_tokens(self.engine.tokenizer(), &req.input)?;
        self.engine.submit(prompt, req.sampling, None)
    }
}

#[cfg(test)]
mod tests;
