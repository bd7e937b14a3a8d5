//! An aggregated worker: one OS thread owns a [`PagedModel`] and runs continuous batching
//! (prefill and decode in the same step), and [`EngineBackend`] puts it behind the HTTP
//! frontend.
//!
//! Each iteration takes new requests off a channel, admits waiting ones FCFS while the block
//! manager has room, and runs one step: every decoding sequence feeds one token, then prefill
//! chunks fill what is left of the token budget. When a decoding sequence needs a block and
//! none is free, the most recently admitted sequence is preempted: its blocks are released and
//! it waits again at the front of the queue with its prompt and generated tokens, to be
//! recomputed (the prefix cache usually keeps most of it).

use crate::frontend::{
    Backend, BackendError, FinishReason, GenerateEvent, GenerateInput, GenerateRequest, ModelInfo,
    Role, ServeTrace, TokenUsage,
};
use crate::paged::{PagedError, PagedModel, SeqId};
use models::runtime::{
    ChatMessage, DEFAULT_BLOCK_SIZE_TOKENS, Device, GgufFile, Model, RuntimeError, Sampler,
    SamplingParams, TensorDType, Tokenizer,
};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use tokio::sync::mpsc;

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
        }
    }
}

/// A request as it travels from `submit` to the engine thread.
struct Request {
    /// Prompt then generated tokens: what a preempted request is recomputed from.
    tokens: Vec<u32>,
    prompt_tokens: usize,
    sampling: SamplingParams,
    sampler: Sampler,
    events: mpsc::Sender<GenerateEvent>,
    /// Bytes of the generated text already streamed.
    sent_bytes: usize,
}

/// A request that holds a sequence in the paged model.
struct Running {
    req: Request,
    seq: SeqId,
    /// Tokens at admission: the blocks allocated then cover them.
    admitted_tokens: usize,
    /// Whether the prefill is done, so each step feeds the last sampled token.
    decoding: bool,
}

/// The continuous-batching worker. Dropping it stops the thread once the queue is drained.
pub struct Engine {
    submissions: Option<std::sync::mpsc::Sender<Request>>,
    waiting: Arc<AtomicUsize>,
    preemptions: Arc<AtomicU64>,
    tokenizer: Arc<Tokenizer>,
    context_tokens: usize,
    max_waiting: usize,
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
    ) -> Result<Engine, PagedError> {
        if config.max_batched_tokens == 0 || config.max_num_seqs == 0 {
            return Err(PagedError::Invalid(
                "max_batched_tokens and max_num_seqs must be positive".into(),
            ));
        }
        let context_tokens = (model.spec().max_position_embeddings as usize)
            .min(config.kv_blocks as usize * config.block_size_tokens as usize);
        let paged = PagedModel::new(
            model,
            config.kv_blocks,
            config.block_size_tokens,
            config.prefix_caching,
        )?;
        let tokenizer = Arc::new(tokenizer);
        let waiting = Arc::new(AtomicUsize::new(0));
        let preemptions = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut worker = Worker {
            paged,
            tokenizer: Arc::clone(&tokenizer),
            waiting_count: Arc::clone(&waiting),
            preemptions: Arc::clone(&preemptions),
            block_size: config.block_size_tokens as usize,
            context_tokens,
            max_batched_tokens: config.max_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| PagedError::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            submissions: Some(tx),
            waiting,
            preemptions,
            tokenizer,
            context_tokens,
            max_waiting: config.max_waiting,
            thread: Some(thread),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Sequences put back in the queue for lack of blocks, since the start.
    pub fn preemptions(&self) -> u64 {
        self.preemptions.load(Ordering::Relaxed)
    }

    /// Prompt plus generated tokens of one request, at most.
    pub fn context_tokens(&self) -> usize {
        self.context_tokens
    }

    /// Queues a prompt and returns its event stream; the tokenizer's end-of-generation tokens
    /// are added to the stop tokens unless `ignore_eos` is set. A prompt must leave room for
    /// one generated token.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        mut sampling: SamplingParams,
    ) -> Result<mpsc::Receiver<GenerateEvent>, BackendError> {
        if prompt.len() >= self.context_tokens {
            return Err(BackendError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.context_tokens,
            });
        }
        if prompt.is_empty() {
            return Err(BackendError::Internal("the prompt has no tokens".into()));
        }
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
        let sampler = Sampler::new(&sampling).map_err(|e| BackendError::Internal(e.to_string()))?;
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::QueueFull);
        }
        // One event per generated token, a last piece of held-back text, then Done: the
        // channel never fills, so the engine never waits on a slow client.
        let capacity = sampling.max_tokens.min(self.context_tokens) + 2;
        let (tx, rx) = mpsc::channel(capacity);
        let req = Request {
            prompt_tokens: prompt.len(),
            tokens: prompt,
            sampling,
            sampler,
            events: tx,
            sent_bytes: 0,
        };
        let sent = self
            .submissions
            .as_ref()
            .is_some_and(|s| s.send(req).is_ok());
        if !sent {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Unavailable("the engine has stopped".into()));
        }
        Ok(rx)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.submissions = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The engine thread's state.
struct Worker {
    paged: PagedModel,
    tokenizer: Arc<Tokenizer>,
    waiting_count: Arc<AtomicUsize>,
    preemptions: Arc<AtomicU64>,
    block_size: usize,
    context_tokens: usize,
    max_batched_tokens: usize,
    max_num_seqs: usize,
    waiting: VecDeque<Request>,
    /// In admission order.
    running: Vec<Running>,
}

impl Worker {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Request>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match rx.recv() {
                    Ok(req) => self.waiting.push_back(req),
                    Err(_) => return,
                }
            }
            while let Ok(req) = rx.try_recv() {
                self.waiting.push_back(req);
            }
            self.drop_cancelled();
            self.admit();
            self.step();
        }
    }

    /// Forgets requests whose client dropped the receiver.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        self.waiting_count
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.events.is_closed() {
                let r = self.running.remove(i);
                let _ = self.paged.release(r.seq);
            } else {
                i += 1;
            }
        }
    }

    /// Admits waiting requests FCFS while their blocks fit, keeping one block per running
    /// sequence free so that the next decode step rarely has to preempt.
    fn admit(&mut self) {
        while self.running.len() < self.max_num_seqs {
            let Some(front) = self.waiting.front() else {
                return;
            };
            let hashes = sim::kv::token_block_hashes(&front.tokens, self.block_size as u32);
            let new_blocks = front.tokens.len().div_ceil(self.block_size)
                - self.paged.cached_prefix_blocks(&hashes);
            let available = self.paged.block_manager().available_blocks() as usize;
            if !self.running.is_empty() && available < new_blocks + self.running.len() {
                return;
            }
            let result = self.paged.admit(&front.tokens);
            match result {
                Ok((seq, _)) => {
                    let req = self.waiting.pop_front().expect("front exists");
                    self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                    self.running.push(Running {
                        admitted_tokens: req.tokens.len(),
                        req,
                        seq,
                        decoding: false,
                    });
                }
                Err(PagedError::Blocks(_)) => return,
                Err(e) => {
                    let req = self.waiting.pop_front().expect("front exists");
                    self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                    fail(&req, &e.to_string());
                }
            }
        }
    }

    /// Blocks the sequence holds: those allocated at admission, grown as its KV passed them.
    fn held_blocks(&self, r: &Running, kv_len: usize) -> usize {
        r.admitted_tokens.max(kv_len).div_ceil(self.block_size)
    }

    /// Puts the most recently admitted sequence back at the front of the queue.
    fn preempt_last(&mut self) {
        if let Some(r) = self.running.pop() {
            let _ = self.paged.release(r.seq);
            self.preemptions.fetch_add(1, Ordering::Relaxed);
            self.waiting_count.fetch_add(1, Ordering::SeqCst);
            self.waiting.push_front(r.req);
        }
    }

    /// Plans and runs one forward step, then samples every sequence whose prefill is done.
    fn step(&mut self) {
        let mut work: Vec<(SeqId, usize)> = Vec::new();
        let mut budget = self.max_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (decoding, seq, needed) = {
                let r = &self.running[i];
                let kv_len = r.req.tokens.len() - 1;
                let needed = (kv_len + 1).div_ceil(self.block_size) - self.held_blocks(r, kv_len);
                (r.decoding, r.seq, needed)
            };
            if !decoding {
                i += 1;
                continue;
            }
            if needed > self.paged.block_manager().available_blocks() as usize {
                let last = self.running.len() - 1;
                self.preempt_last();
                if last == i {
                    break;
                }
                continue;
            }
            work.push((seq, 1));
            budget -= 1;
            i += 1;
        }
        for r in &self.running {
            if budget == 0 {
                break;
            }
            if !r.decoding {
                let pending = self.paged.pending_tokens(r.seq).unwrap_or(0);
                let chunk = pending.min(budget);
                if chunk > 0 {
                    work.push((r.seq, chunk));
                    budget -= chunk;
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let rows = self
            .paged
            .step(&work)
            .and_then(|logits| Ok(logits.to_vec2::<f32>().map_err(RuntimeError::from)?));
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let message = format!("step failed: {e}");
                for (seq, _) in work {
                    if let Some(at) = self.running.iter().position(|r| r.seq == seq) {
                        let r = self.running.remove(at);
                        let _ = self.paged.release(r.seq);
                        fail(&r.req, &message);
                    }
                }
                return;
            }
        };
        for ((seq, _), row) in work.into_iter().zip(rows) {
            if self.paged.pending_tokens(seq).unwrap_or(1) == 0 {
                self.sample(seq, &row);
            }
        }
    }

    /// Samples the sequence's next token, streams its text and ends it if a stop condition
    /// holds.
    fn sample(&mut self, seq: SeqId, logits: &[f32]) {
        let Some(at) = self.running.iter().position(|r| r.seq == seq) else {
            return;
        };
        let r = &mut self.running[at];
        let outcome = match r.req.sampler.sample(logits) {
            Ok(token) => {
                r.req.tokens.push(token);
                r.decoding = true;
                advance(&mut r.req, &self.tokenizer, self.context_tokens)
            }
            Err(e) => Err(e.to_string()),
        };
        let ended = match outcome {
            Ok(Some(finish_reason)) => {
                let usage = TokenUsage {
                    prompt_tokens: r.req.prompt_tokens,
                    completion_tokens: r.req.tokens.len() - r.req.prompt_tokens,
                };
                let _ = r.req.events.try_send(GenerateEvent::Done {
                    finish_reason,
                    usage,
                    trace: ServeTrace {
                        prefill_worker: Some(0),
                        decode_worker: Some(0),
                        ..ServeTrace::default()
                    },
                    token_ids: r.req.tokens[r.req.prompt_tokens..].to_vec(),
                });
                true
            }
            Ok(None) => {
                let token = *r.req.tokens.last().expect("just pushed");
                match self.paged.push_token(seq, token) {
                    Ok(()) => false,
                    Err(e) => {
                        fail(&r.req, &e.to_string());
                        true
                    }
                }
            }
            Err(message) => {
                fail(&r.req, &message);
                true
            }
        };
        if ended {
            let r = self.running.remove(at);
            let _ = self.paged.release(r.seq);
        }
    }
}

/// Streams the text the new last token releases and says whether the request is finished.
fn advance(
    req: &mut Request,
    tokenizer: &Tokenizer,
    context_tokens: usize,
) -> Result<Option<FinishReason>, String> {
    let generated = &req.tokens[req.prompt_tokens..];
    let token_id = *generated.last().expect("a token was generated");
    let text = tokenizer
        .decode(generated, true)
        .map_err(|e| e.to_string())?;
    let (end_bytes, finish) = match req.sampling.check_stop(generated, &text) {
        Some(stop) => (stop.text_bytes, Some(stop.reason.into())),
        None if req.tokens.len() >= context_tokens => (text.len(), Some(FinishReason::Length)),
        None => {
            // A trailing U+FFFD is a character whose bytes are still arriving.
            let complete = text.trim_end_matches('\u{FFFD}').len();
            (
                req.sampling.releasable_text_bytes(&text).min(complete),
                None,
            )
        }
    };
    if end_bytes > req.sent_bytes && text.is_char_boundary(req.sent_bytes) {
        let piece = text[req.sent_bytes..end_bytes].to_owned();
        req.sent_bytes = end_bytes;
        let _ = req.events.try_send(GenerateEvent::Token {
            text: piece,
            token_id,
        });
    }
    Ok(finish)
}

fn fail(req: &Request, message: &str) {
    let _ = req
        .events
        .try_send(GenerateEvent::Error(BackendError::Internal(
            message.to_owned(),
        )));
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
        let engine = Engine::new(model, gguf.tokenizer()?, config)?;
        Ok(EngineBackend::new(engine, model_id))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The prompt tokens of a request: raw text with the tokenizer's specials, the chat
    /// template rendered (which carries its own), or token ids as they are.
    fn prompt(&self, input: &GenerateInput) -> Result<Vec<u32>, BackendError> {
        let tokenizer = self.engine.tokenizer();
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
        let mut tokens = encoded.map_err(|e| BackendError::Internal(e.to_string()))?;
        // An empty completion prompt continues from a document boundary.
        if tokens.is_empty()
            && let Some(&eos) = tokenizer.eos_token_ids().first()
        {
            tokens.push(eos);
        }
        Ok(tokens)
    }
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
        let prompt = self.prompt(&req.input)?;
        self.engine.submit(prompt, req.sampling)
    }
}

#[cfg(test)]
mod tests;
