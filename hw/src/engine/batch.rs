//! The engine thread: continuous batching over one [`PagedModel`].
//!
//! Each iteration takes new work off the inbox, admits waiting requests FCFS while the block
//! manager has room, and runs one step: every decoding sequence feeds one token, then prefill
//! chunks fill what is left of the token budget. When a decoding sequence needs a block and
//! none is free, the most recently admitted sequence is preempted: its blocks are released and
//! it waits again at the front of the queue with its prompt and generated tokens, to be
//! recomputed (the prefix cache usually keeps most of it).
//!
//! A decode worker's request whose prompt is mostly uncached is admitted (its blocks reserved,
//! its cached prefix pinned) and then waits for a prefill worker's KV of the rest; a prefill
//! worker's job ends once its first token is sampled and its KV exported.

use super::steps::{StepRow, StepTrace};
use super::{
    EngineReport, Inbox, Job, PrefillAsk, PrefillOutput, RemoteKv, Request, Shared, State,
};
use crate::frontend::{BackendError, FinishReason, GenerateEvent, TokenUsage};
use crate::paged::{PagedError, PagedModel, SeqId};
use models::runtime::{RuntimeError, Tokenizer};
use sim::kv::KvEvent;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A request that holds a sequence in the paged model.
struct Running {
    req: Request,
    seq: SeqId,
    /// Tokens at admission: the blocks allocated then cover them.
    admitted_tokens: usize,
    state: State,
}

pub(super) struct Batcher {
    pub paged: PagedModel,
    pub tokenizer: Arc<Tokenizer>,
    pub shared: Arc<Shared>,
    pub block_size: usize,
    pub context_tokens: usize,
    pub max_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// A decode worker prefills locally when at most this many prompt tokens are uncached.
    pub local_prefill_tokens: usize,
    pub waiting: VecDeque<Request>,
    /// In admission order.
    running: Vec<Running>,
    events: Vec<KvEvent>,
    /// What the last report said, so that unchanged load is not reported again.
    last_load: (u32, u32, u32),
    pub trace: Option<StepTrace>,
}

impl Batcher {
    pub fn new(
        paged: PagedModel,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        config: &super::EngineConfig,
        context_tokens: usize,
    ) -> Batcher {
        Batcher {
            paged,
            tokenizer,
            shared,
            block_size: config.block_size_tokens as usize,
            context_tokens,
            max_batched_tokens: config.max_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            local_prefill_tokens: config.local_prefill_tokens,
            waiting: VecDeque::new(),
            running: Vec::new(),
            events: Vec::new(),
            last_load: (u32::MAX, u32::MAX, u32::MAX),
            trace: None,
        }
    }

    pub fn run(&mut self, rx: std::sync::mpsc::Receiver<Inbox>) {
        loop {
            let busy = self.running.iter().any(|r| r.state != State::AwaitingKv)
                || !self.waiting.is_empty();
            if !busy {
                self.report();
                match rx.recv() {
                    Ok(message) => self.receive(message),
                    Err(_) => return,
                }
            }
            while let Ok(message) = rx.try_recv() {
                self.receive(message);
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.report();
        }
    }

    fn receive(&mut self, message: Inbox) {
        match message {
            Inbox::Submit(req) => self.waiting.push_back(*req),
            Inbox::Remote { key, outcome } => self.remote_done(key, outcome),
        }
    }

    /// Sends the prefix cache's events and the load, when either changed.
    fn report(&mut self) {
        let Some(reports) = &self.shared.reports else {
            return;
        };
        self.paged.drain_events(&mut self.events);
        let blocks = self.paged.block_manager();
        let load = (
            self.running.len() as u32,
            self.waiting.len() as u32,
            blocks.used_blocks(),
        );
        if self.events.is_empty() && load == self.last_load {
            return;
        }
        self.last_load = load;
        let _ = reports.send(EngineReport {
            events: std::mem::take(&mut self.events),
            running: load.0,
            waiting: load.1,
            used_blocks: load.2,
            capacity_blocks: blocks.capacity_blocks(),
        });
    }

    /// Forgets requests whose client went away.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.cancelled());
        self.shared
            .waiting
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.cancelled() {
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
            let mut req = self.waiting.pop_front().expect("front exists");
            match result {
                Ok((seq, cached)) => {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    let state = self.start(&mut req, cached);
                    self.running.push(Running {
                        admitted_tokens: req.tokens.len(),
                        req,
                        seq,
                        state,
                    });
                }
                Err(PagedError::Blocks(_)) => {
                    self.waiting.push_front(req);
                    return;
                }
                Err(e) => {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    req.fail(BackendError::Internal(e.to_string()));
                }
            }
        }
    }

    /// What an admitted request does first: prefill here, or (a decode worker's request with
    /// enough uncached prompt) ask its prefill worker for the KV of what is not cached here.
    fn start(&mut self, req: &mut Request, cached_tokens: usize) -> State {
        let uncached = req.tokens.len() - cached_tokens;
        if req.generated() == 0 {
            req.trace.cached_tokens = cached_tokens as u32;
            req.trace.decode_cached_tokens = cached_tokens as u32;
            req.local_cached_tokens = cached_tokens as u32;
        }
        let Job::Generate {
            remote: Some(target),
            ..
        } = &req.job
        else {
            return State::Prefilling;
        };
        // A preempted request recomputes here: its KV would have to be remade remotely too.
        if req.generated() > 0 || uncached <= self.local_prefill_tokens {
            return State::Prefilling;
        }
        let Some(asks) = &self.shared.prefill_asks else {
            return State::Prefilling;
        };
        let ask = PrefillAsk {
            key: req.key,
            target: target.clone(),
            tokens: req.tokens.clone(),
            skip_blocks: cached_tokens / self.block_size,
            sampling: req.sampling.clone(),
        };
        if asks.send(ask).is_err() {
            return State::Prefilling;
        }
        State::AwaitingKv
    }

    /// A remote prefill finished: import its KV and continue from its first token, or, when
    /// it failed, prefill here.
    fn remote_done(&mut self, key: u64, outcome: Result<RemoteKv, String>) {
        let Some(at) = self
            .running
            .iter()
            .position(|r| r.req.key == key && r.state == State::AwaitingKv)
        else {
            // Cancelled or preempted meanwhile; a preempted request asks again.
            return;
        };
        let seq = self.running[at].seq;
        let remote = match outcome {
            Ok(remote) => remote,
            Err(message) => {
                self.prefill_here(at, &message);
                return;
            }
        };
        let import_start = Instant::now();
        let resumed = self
            .paged
            .import_into(seq, &remote.kv)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                models::runtime::Sampler::resume(
                    &self.running[at].req.sampling,
                    remote.sampler_position,
                )
                .map_err(|e| e.to_string())
            });
        let sampler = match resumed {
            Ok(sampler) => sampler,
            Err(message) => {
                self.prefill_here(at, &message);
                return;
            }
        };
        let r = &mut self.running[at];
        let accepted = r.req.accepted;
        let since = |t: Instant| t.saturating_duration_since(accepted).as_nanos() as u64;
        let trace = &mut r.req.trace;
        trace.cached_tokens = remote.cached_tokens;
        trace.prefill_start_ns = since(remote.prefill_start);
        trace.prefill_end_ns = since(remote.prefill_end);
        trace.transfer_start_ns = since(remote.transfer_start);
        trace.transfer_end_ns = since(remote.transfer_end);
        trace.transfer_bytes = remote.transfer_bytes;
        trace.import_start_ns = since(import_start);
        trace.import_end_ns = since(Instant::now());
        r.req.sampler = sampler;
        r.req.trace.prefill_worker = Some(remote.prefill_worker);
        let first = *remote
            .kv
            .tokens
            .last()
            .expect("a transfer carries the first token");
        r.req.tokens.push(first);
        r.state = State::Decoding;
        self.after_sample(at);
    }

    /// A remote prefill failed: the request's KV is computed here instead, from what this
    /// worker holds.
    fn prefill_here(&mut self, at: usize, why: &str) {
        eprintln!("remote prefill failed, prefilling locally: {why}");
        self.running[at].state = State::Prefilling;
    }

    /// Blocks the sequence holds: those allocated at admission, grown as its KV passed them.
    fn held_blocks(&self, r: &Running, kv_len: usize) -> usize {
        r.admitted_tokens.max(kv_len).div_ceil(self.block_size)
    }

    /// Puts the most recently admitted sequence back at the front of the queue.
    fn preempt_last(&mut self) {
        if let Some(mut r) = self.running.pop() {
            let _ = self.paged.release(r.seq);
            r.req.trace.preemptions += 1;
            self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
            self.shared.waiting.fetch_add(1, Ordering::SeqCst);
            self.waiting.push_front(r.req);
        }
    }

    /// Plans and runs one forward step, then samples every sequence whose prefill is done.
    fn step(&mut self) {
        let mut work: Vec<(SeqId, usize)> = Vec::new();
        let mut budget = self.max_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (state, seq, needed) = {
                let r = &self.running[i];
                let kv_len = r.req.tokens.len() - 1;
                let needed = (kv_len + 1).div_ceil(self.block_size) - self.held_blocks(r, kv_len);
                (r.state, r.seq, needed)
            };
            if state != State::Decoding {
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
        let now = Instant::now();
        for r in &mut self.running {
            if budget == 0 {
                break;
            }
            if r.state == State::Prefilling {
                let pending = self.paged.pending_tokens(r.seq).unwrap_or(0);
                let chunk = pending.min(budget);
                if chunk > 0 {
                    work.push((r.seq, chunk));
                    budget -= chunk;
                    if r.req.prefill_start.is_none() {
                        r.req.prefill_start = Some(now);
                    }
                }
            }
        }
        if work.is_empty() {
            return;
        }
        // Prefill jobs whose prompt this step completes stream their layers as it computes.
        let mut stream = Vec::new();
        let mut senders = Vec::new();
        for r in &mut self.running {
            if let Job::Prefill {
                skip_blocks,
                stream: sender @ Some(_),
                streamed,
                ..
            } = &mut r.req.job
                && work.iter().any(|&(seq, n)| {
                    seq == r.seq && self.paged.pending_tokens(seq).unwrap_or(0) == n
                })
            {
                stream.push((r.seq, *skip_blocks));
                senders.push(sender.take().expect("matched Some"));
                *streamed = true;
            }
        }
        let mut row = self.trace.as_ref().map(|trace| {
            let mut step = sim::cost::StepWork::default();
            for &(seq, n) in &work {
                let tokens = self.paged.tokens(seq).map_or(0, |t| t.len());
                let pending = self.paged.pending_tokens(seq).unwrap_or(0);
                let context = (tokens - pending) as u64;
                let decoding = self
                    .running
                    .iter()
                    .any(|r| r.seq == seq && r.state == State::Decoding);
                if decoding {
                    step.add_decode(context);
                } else {
                    step.add_prefill(n as u64, context);
                }
            }
            StepRow {
                start_ns: trace.epoch_ns(Instant::now()),
                forward_ns: 0,
                end_ns: 0,
                decode_seqs: step.decode_seqs,
                decode_context_tokens: step.decode_context_tokens,
                prefill_seqs: step.prefill_seqs,
                prefill_tokens: step.prefill_tokens,
                prefill_attention_pairs: step.prefill_attention_pairs,
                prefill_kv_read_tokens: step.prefill_kv_read_tokens,
            }
        });
        let forward_start = Instant::now();
        let rows = self
            .paged
            .step_streaming(&work, &stream, &mut |i, layer, parts| {
                let _ = senders[i].send((layer as u32, parts));
            })
            .and_then(|logits| {
                logits
                    .to_vec2::<f32>()
                    .map_err(|e| RuntimeError::from(e).during("logits to the host").into())
            });
        // Closing the channels tells the senders that every layer is out.
        drop(senders);
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let message = format!("step failed: {e}");
                for (seq, _) in work {
                    if let Some(at) = self.running.iter().position(|r| r.seq == seq) {
                        let mut r = self.running.remove(at);
                        let _ = self.paged.release(r.seq);
                        r.req.fail(BackendError::Internal(message.clone()));
                    }
                }
                return;
            }
        };
        let forward_ns = forward_start.elapsed().as_nanos() as u64;
        for ((seq, _), row) in work.into_iter().zip(rows) {
            if self.paged.pending_tokens(seq).unwrap_or(1) == 0 {
                self.sample(seq, &row);
            }
        }
        if let (Some(trace), Some(row)) = (&mut self.trace, &mut row) {
            row.forward_ns = forward_ns;
            row.end_ns = trace.epoch_ns(Instant::now());
            if !trace.record(row) {
                self.trace = None;
            }
        }
    }

    /// Samples the sequence's next token and moves it on.
    fn sample(&mut self, seq: SeqId, logits: &[f32]) {
        let Some(at) = self.running.iter().position(|r| r.seq == seq) else {
            return;
        };
        let r = &mut self.running[at];
        match r.req.sampler.sample(logits) {
            Ok(token) => {
                r.req.tokens.push(token);
                if r.state == State::Prefilling {
                    r.req.prefill_end = Some(Instant::now());
                }
                r.state = State::Decoding;
            }
            Err(e) => {
                let mut r = self.running.remove(at);
                let _ = self.paged.release(r.seq);
                r.req.fail(BackendError::Internal(e.to_string()));
                return;
            }
        }
        self.after_sample(at);
    }

    /// A token was appended to `running[at]`: hand a prefill job's KV over, or stream the
    /// token and end the request if a stop condition holds.
    fn after_sample(&mut self, at: usize) {
        let r = &mut self.running[at];
        let ended = match &mut r.req.job {
            Job::Prefill {
                skip_blocks,
                reply,
                streamed,
                ..
            } => {
                let seq = r.seq;
                let token = *r.req.tokens.last().expect("just pushed");
                let output = self
                    .paged
                    .push_token(seq, token)
                    .and_then(|()| {
                        if *streamed {
                            self.paged.export_header(seq, *skip_blocks)
                        } else {
                            self.paged.export_for_transfer(seq, *skip_blocks)
                        }
                    })
                    .map(|kv| PrefillOutput {
                        kv,
                        sampler_position: r.req.sampler.position(),
                        cached_tokens: r.req.local_cached_tokens,
                        prefill_start: r.req.prefill_start.unwrap_or(r.req.accepted),
                        prefill_end: r.req.prefill_end.unwrap_or_else(Instant::now),
                    })
                    .map_err(|e| BackendError::Internal(e.to_string()));
                if let Some(reply) = reply.take() {
                    let _ = reply.send(output);
                }
                true
            }
            Job::Generate { .. } => match advance(&mut r.req, &self.tokenizer, self.context_tokens)
            {
                Ok(Some(finish_reason)) => {
                    r.req.finish(finish_reason);
                    true
                }
                Ok(None) => {
                    let token = *r.req.tokens.last().expect("just pushed");
                    match self.paged.push_token(r.seq, token) {
                        Ok(()) => false,
                        Err(e) => {
                            r.req.fail(BackendError::Internal(e.to_string()));
                            true
                        }
                    }
                }
                Err(message) => {
                    r.req.fail(BackendError::Internal(message));
                    true
                }
            },
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
    let Job::Generate {
        events,
        sent_bytes,
        detok,
        ..
    } = &mut req.job
    else {
        return Ok(None);
    };
    let generated = &req.tokens[req.prompt_tokens..];
    let token_id = *generated.last().expect("a token was generated");
    detok.update(tokenizer, generated)?;
    let (end_bytes, finish) = match req.sampling.check_stop(generated, detok.text()) {
        Some(stop) => {
            let end = match stop.reason {
                models::runtime::FinishReason::StopString(_) => stop.text_bytes,
                _ => {
                    detok.flush(tokenizer, generated)?;
                    detok.text().len()
                }
            };
            (end, Some(stop.reason.into()))
        }
        None if req.tokens.len() >= context_tokens => {
            detok.flush(tokenizer, generated)?;
            (detok.text().len(), Some(FinishReason::Length))
        }
        None => (req.sampling.releasable_text_bytes(detok.text()), None),
    };
    // Every token goes out as it is sampled, its text empty while the detokenizer holds
    // bytes back (part of a character, or of a stop string): a client sees the first token
    // when it exists, not when it first makes text.
    let text = detok.text();
    let mut piece = String::new();
    if end_bytes > *sent_bytes && text.is_char_boundary(*sent_bytes) {
        piece = text[*sent_bytes..end_bytes].to_owned();
        *sent_bytes = end_bytes;
    }
    let _ = events.try_send(GenerateEvent::Token {
        text: piece,
        token_id,
    });
    Ok(finish)
}

impl Request {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }

    fn cancelled(&self) -> bool {
        match &self.job {
            Job::Generate { events, .. } => events.is_closed(),
            Job::Prefill { reply, .. } => reply.as_ref().is_none_or(|r| r.is_closed()),
        }
    }

    fn fail(&mut self, error: BackendError) {
        match &mut self.job {
            Job::Generate { events, .. } => {
                let _ = events.try_send(GenerateEvent::Error(error));
            }
            Job::Prefill { reply, .. } => {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    fn finish(&mut self, finish_reason: FinishReason) {
        let since = |t: Option<Instant>| {
            t.map_or(0, |t| {
                t.saturating_duration_since(self.accepted).as_nanos() as u64
            })
        };
        if self.trace.prefill_end_ns == 0 {
            self.trace.prefill_start_ns = since(self.prefill_start);
            self.trace.prefill_end_ns = since(self.prefill_end);
        }
        let usage = TokenUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated(),
        };
        let Job::Generate { events, .. } = &self.job else {
            return;
        };
        let _ = events.try_send(GenerateEvent::Done {
            finish_reason,
            usage,
            trace: self.trace.clone(),
            token_ids: self.tokens[self.prompt_tokens..].to_vec(),
        });
    }
}
