//! Workers and the iteration scheduler: continuous batching with a token budget per step,
//! chunked prefill, a cap on sequences, and preemption by recomputation when the KV cache
//! is full (as vLLM schedules).

use super::device::StepProgress;
use super::{Event, Simulation, StepRecord, TokenTime};
use crate::cost::StepWork;
use crate::kv::{BlockHash, BlockId, BlockManager, KvEvent};
use crate::metrics::{RequestRecord, WorkerStats};
use crate::routing::{Role, WorkerId};
use crate::time::Nanos;
use crate::workload::Request;
use rand::RngExt;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting at its decode (or aggregated) worker for KV blocks.
    Queued,
    /// Blocks reserved on the decode worker; waiting at the prefill worker.
    AwaitPrefill,
    /// Prefill chunks running on the prefilling worker.
    Prefilling,
    /// KV on its way from the prefill worker to the decode worker.
    Transferring,
    /// Generating one token per step.
    Decoding,
    /// Last token out; about to be recorded.
    Done,
}

/// A request in flight.
pub struct Seq {
    pub req: Request,
    pub rec: RequestRecord,
    /// Hashes of the full blocks known so far (the prompt's, then generated ones).
    pub hashes: Vec<BlockHash>,
    pub prompt_blocks: u64,
    pub decode_worker: WorkerId,
    pub prefill_worker: WorkerId,
    /// Prefilled on another worker than the one that decodes it.
    pub remote_prefill: bool,
    pub phase: Phase,
    /// Tokens whose KV must exist before decoding (re)starts: the prompt, or after a
    /// preemption the prompt and the tokens generated so far.
    pub prefill_target: u32,
    /// Tokens of the target whose KV the prefilling worker holds.
    pub computed: u32,
    /// Blocks on the decoding worker.
    pub blocks: Vec<BlockId>,
    /// Blocks on the prefill worker (remote prefill only).
    pub prefill_blocks: Vec<BlockId>,
    /// Prompt tokens the decode worker already held, which no transfer carries.
    pub decode_cached_tokens: u32,
    /// Tokens whose KV is in the decoding worker's cache: prompt + generated - 1 while
    /// decoding.
    pub kv_len: u32,
    pub generated: u32,
    pub last_token_ns: Nanos,
    pub transfer_latency_ns: Nanos,
    /// The bytes its KV transfer puts on the wire: its KV's, scaled by the link's spread.
    pub transfer_wire_bytes: u64,
    /// The decode worker's import of the transferred KV, once it landed.
    pub import_ns: Nanos,
    /// The serving path's way back this request takes (idle or not as the cluster was when it
    /// came).
    pub serving_path_ns: Nanos,
    started: bool,
}

impl Seq {
    pub fn new(req: Request, hashes: Vec<BlockHash>, prompt_blocks: u64, now: Nanos) -> Seq {
        let rec = RequestRecord {
            request_id: req.id,
            conversation_id: req.conversation,
            turn: req.turn,
            prompt_tokens: req.prompt_tokens,
            history_tokens: req.history_tokens,
            output_tokens: req.output_tokens,
            arrival_ns: now,
            ..RequestRecord::default()
        };
        Seq {
            prefill_target: req.prompt_tokens,
            req,
            rec,
            hashes,
            prompt_blocks,
            decode_worker: 0,
            prefill_worker: 0,
            remote_prefill: false,
            phase: Phase::Queued,
            computed: 0,
            blocks: Vec::new(),
            prefill_blocks: Vec::new(),
            decode_cached_tokens: 0,
            kv_len: 0,
            generated: 0,
            last_token_ns: now,
            transfer_latency_ns: 0,
            transfer_wire_bytes: 0,
            import_ns: 0,
            serving_path_ns: 0,
            started: false,
        }
    }
}

pub struct Worker {
    pub id: WorkerId,
    pub role: Role,
    pub kv: BlockManager,
    /// Requests waiting for blocks here, first come first served.
    pub waiting: VecDeque<u32>,
    /// Requests prefilling or decoding here, in admission order.
    pub running: Vec<u32>,
    /// The step in flight: (slot, prefill chunk tokens; 0 for a decode token).
    pub batch: Vec<(u32, u32)>,
    /// Transfers that landed while a step was running: the engine takes them in between
    /// steps, as a real one handles the KV it received before its next iteration.
    pub landed: Vec<u32>,
    /// Landed transfers whose KV the worker is importing instead of stepping.
    pub importing: Vec<u32>,
    pub busy: bool,
    pub(super) step: StepProgress,
    /// The work of the step in flight, for the step records.
    step_work: StepWork,
    busy_ns: Nanos,
    steps: u64,
    prefill_tokens: u64,
    decode_tokens: u64,
    peak_used_blocks: u32,
}

impl Worker {
    pub fn new(
        id: WorkerId,
        role: Role,
        capacity_blocks: u32,
        prefix_caching: bool,
        events: bool,
    ) -> Worker {
        let mut kv = BlockManager::new(capacity_blocks, prefix_caching);
        kv.set_events_enabled(events);
        Worker {
            id,
            role,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            batch: Vec::new(),
            landed: Vec::new(),
            importing: Vec::new(),
            busy: false,
            step: StepProgress::default(),
            step_work: StepWork::default(),
            busy_ns: 0,
            steps: 0,
            prefill_tokens: 0,
            decode_tokens: 0,
            peak_used_blocks: 0,
        }
    }

    pub fn stats(&self, end_ns: Nanos) -> WorkerStats {
        WorkerStats {
            worker: self.id,
            role: self.role.name().to_string(),
            busy_ns: self.busy_ns.min(end_ns),
            steps: self.steps,
            prefill_tokens: self.prefill_tokens,
            decode_tokens: self.decode_tokens,
            peak_used_blocks: self.peak_used_blocks,
            capacity_blocks: self.kv.capacity_blocks(),
        }
    }
}

/// Frees a running sequence's blocks and puts it back at the head of the queue, to be
/// recomputed from whatever of it is still in the prefix cache.
fn preempt(worker: &mut Worker, seq: &mut Seq, slot: u32, block_size: u32) {
    worker.kv.free(&seq.blocks);
    seq.blocks.clear();
    if seq.phase == Phase::Decoding {
        seq.prefill_target = seq.kv_len;
    }
    seq.req
        .content
        .extend_block_hashes(&mut seq.hashes, seq.prefill_target, block_size);
    seq.computed = 0;
    seq.phase = Phase::Queued;
    seq.remote_prefill = false;
    seq.rec.preemptions += 1;
    worker.waiting.push_front(slot);
}

impl Simulation<'_> {
    /// Starts the worker's next step if it is idle and has work, then publishes its KV events.
    pub(super) fn schedule(&mut self, w: WorkerId) {
        if !self.workers[w as usize].busy {
            self.start_step(w);
        }
        self.flush_kv(w);
    }

    fn start_step(&mut self, w: WorkerId) {
        let wi = w as usize;
        let bs = self.block_size;
        let max_seqs = self.setup.engine.max_num_seqs;
        let chunked = self.setup.engine.chunked_prefill;
        let mut budget = self.setup.engine.max_batched_tokens;
        let mut seqs = 0u32;
        let mut work = StepWork::default();
        let mut batch = std::mem::take(&mut self.workers[wi].batch);
        batch.clear();

        // Decoding sequences first, one token each; a sequence that needs a block and finds
        // none preempts the youngest running sequence (possibly itself).
        let mut i = 0;
        while i < self.workers[wi].running.len() && seqs < max_seqs && budget > 0 {
            let slot = self.workers[wi].running[i];
            if self.seqs.get(slot).phase != Phase::Decoding {
                i += 1;
                continue;
            }
            let mut preempted_self = false;
            loop {
                let worker = &mut self.workers[wi];
                let seq = self.seqs.get_mut(slot);
                if seq.blocks.len() >= (seq.kv_len + 1).div_ceil(bs) as usize {
                    break;
                }
                if worker.kv.append(&mut seq.blocks).is_ok() {
                    continue;
                }
                let victim = worker
                    .running
                    .pop()
                    .expect("the sequence itself is running");
                preempt(worker, self.seqs.get_mut(victim), victim, bs);
                if victim == slot {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            work.add_decode(self.seqs.get(slot).kv_len as u64);
            batch.push((slot, 0));
            budget -= 1;
            seqs += 1;
            i += 1;
        }

        // Prefills under way continue with the next chunk.
        for &slot in &self.workers[wi].running {
            if seqs >= max_seqs || budget == 0 {
                break;
            }
            let seq = self.seqs.get(slot);
            if seq.phase != Phase::Prefilling {
                continue;
            }
            let chunk = (seq.prefill_target - seq.computed).min(budget);
            work.add_prefill(chunk as u64, seq.computed as u64);
            batch.push((slot, chunk));
            budget -= chunk;
            seqs += 1;
        }

        // Admissions, first come first served; the first that does not fit blocks the rest.
        while let Some(&slot) = self.workers[wi].waiting.front() {
            let worker = &mut self.workers[wi];
            let seq = self.seqs.get_mut(slot);
            let reservation = seq.phase == Phase::Queued && seq.remote_prefill;
            if !reservation && (seqs >= max_seqs || budget == 0) {
                break;
            }
            let target = if reservation {
                seq.req.prompt_tokens
            } else {
                seq.prefill_target
            };
            let full = &seq.hashes[..(target / bs) as usize];
            let num_blocks = target.div_ceil(bs) as usize;
            if !reservation && !chunked {
                let cached = (worker.kv.cached_prefix(full) as u32 * bs).min(target - 1);
                if target - cached > budget && !batch.is_empty() {
                    break;
                }
            }
            let Ok(allocation) = worker.kv.allocate(full, num_blocks) else {
                break;
            };
            worker.waiting.pop_front();
            // A full hit still recomputes the last token, whose logits give the next one.
            let cached = (allocation.cached_blocks as u32 * bs).min(target - 1);
            if reservation {
                seq.blocks = allocation.blocks;
                seq.decode_cached_tokens = cached;
                seq.phase = Phase::AwaitPrefill;
                let p = seq.prefill_worker;
                self.workers[p as usize].waiting.push_back(slot);
                self.wake.push(p);
                continue;
            }
            if seq.phase == Phase::AwaitPrefill {
                seq.prefill_blocks = allocation.blocks;
            } else {
                seq.blocks = allocation.blocks;
            }
            seq.computed = cached;
            if !seq.started {
                seq.started = true;
                seq.rec.cached_tokens = cached;
                seq.rec.prefill_start_ns = self.now;
            }
            seq.phase = Phase::Prefilling;
            worker.running.push(slot);
            let remaining = target - cached;
            let chunk = if chunked {
                remaining.min(budget)
            } else {
                remaining
            };
            work.add_prefill(chunk as u64, cached as u64);
            batch.push((slot, chunk));
            budget = budget.saturating_sub(chunk);
            seqs += 1;
        }

        if batch.is_empty() {
            self.workers[wi].batch = batch;
            return;
        }
        let prefills = work.prefill_seqs > 0;
        let spread = &self.setup.step_spread[usize::from(prefills)];
        let step_ns = match spread.len() {
            0 => self.cost.step_ns(&work),
            n => {
                let factor = spread[self.step_rng.random_range(0..n)];
                (self.cost.step_ns(&work) as f64 * factor).round() as Nanos
            }
        };
        let worker = &mut self.workers[wi];
        worker.busy = true;
        worker.batch = batch;
        worker.steps += 1;
        worker.prefill_tokens += work.prefill_tokens;
        worker.decode_tokens += work.decode_seqs as u64;
        worker.peak_used_blocks = worker.peak_used_blocks.max(worker.kv.used_blocks());
        worker.step_work = work;
        self.begin_step(w, step_ns, prefills);
    }

    /// A step ends: decode tokens come out, prefill chunks land, finished prefills move on.
    pub(super) fn step_done(&mut self, w: WorkerId) {
        let wi = w as usize;
        let bs = self.block_size;
        let now = self.now;
        self.end_step(w);
        let batch = std::mem::take(&mut self.workers[wi].batch);
        let worker = &mut self.workers[wi];
        worker.busy = false;
        worker.busy_ns += now - worker.step.started_ns;
        if self.options.steps {
            let record = StepRecord {
                worker: w,
                start_ns: worker.step.started_ns,
                end_ns: now,
                work: worker.step_work,
            };
            self.steps.push(record);
        }
        let mut prefilled = std::mem::take(&mut self.prefilled_scratch);
        let mut finished = std::mem::take(&mut self.finished_scratch);
        // Tokens of one step mostly share a gap: count runs of equal gaps.
        let (mut gap, mut count) = (0, 0);
        for &(slot, chunk) in &batch {
            let kv = &mut self.workers[wi].kv;
            let seq = self.seqs.get_mut(slot);
            if chunk == 0 {
                seq.generated += 1;
                seq.kv_len += 1;
                let g = now - seq.last_token_ns;
                seq.last_token_ns = now;
                if g == gap {
                    count += 1;
                } else {
                    if count > 0 {
                        self.gaps.add(gap, count);
                    }
                    (gap, count) = (g, 1);
                }
                if self.options.token_times {
                    self.token_times.push(TokenTime {
                        request_id: seq.req.id,
                        token_index: seq.generated - 1,
                        time_ns: now + seq.serving_path_ns,
                    });
                }
                if seq.kv_len.is_multiple_of(bs) {
                    let block = (seq.kv_len / bs - 1) as usize;
                    if seq.hashes.len() <= block {
                        seq.req
                            .content
                            .extend_block_hashes(&mut seq.hashes, seq.kv_len, bs);
                    }
                    kv.commit(seq.blocks[block], seq.hashes[block]);
                }
                if seq.generated >= seq.req.output_tokens {
                    seq.phase = Phase::Done;
                    finished.push(slot);
                }
            } else {
                let blocks = if seq.remote_prefill {
                    &seq.prefill_blocks
                } else {
                    &seq.blocks
                };
                let before = (seq.computed / bs) as usize;
                seq.computed += chunk;
                let after = (seq.computed / bs) as usize;
                kv.commit_all(&blocks[before..after], &seq.hashes[before..after]);
                if seq.computed == seq.prefill_target {
                    prefilled.push(slot);
                }
            }
        }
        if count > 0 {
            self.gaps.add(gap, count);
        }
        self.workers[wi].batch = batch;

        for &slot in &prefilled {
            let seq = self.seqs.get_mut(slot);
            if seq.remote_prefill {
                seq.rec.prefill_end_ns = now;
                self.start_transfer(slot);
            } else if seq.generated == 0 {
                seq.rec.prefill_end_ns = now;
                self.first_token(slot);
                let seq = self.seqs.get_mut(slot);
                if seq.req.output_tokens <= 1 {
                    seq.phase = Phase::Done;
                    finished.push(slot);
                }
            } else {
                seq.phase = Phase::Decoding;
            }
        }
        let seqs = &self.seqs;
        self.workers[wi]
            .running
            .retain(|&slot| matches!(seqs.get(slot).phase, Phase::Prefilling | Phase::Decoding));
        for &slot in &finished {
            self.complete(slot);
        }
        prefilled.clear();
        finished.clear();
        self.prefilled_scratch = prefilled;
        self.finished_scratch = finished;
        self.take_in(w);
        self.wake.push(w);
    }

    /// The worker, between two steps, takes in the transfers handed to it meanwhile: it
    /// imports their KV (the link's import cost, holding up its next step), after which they
    /// generate; without an import cost they generate at once.
    pub(super) fn take_in(&mut self, w: WorkerId) {
        let wi = w as usize;
        let import_ns: Nanos = self.workers[wi]
            .landed
            .iter()
            .map(|&slot| self.seqs.get(slot).import_ns)
            .sum();
        for &slot in &self.workers[wi].landed {
            self.seqs.get_mut(slot).rec.import_start_ns = self.now;
        }
        if import_ns == 0 {
            let mut landed = std::mem::take(&mut self.workers[wi].landed);
            for &slot in &landed {
                self.take_landed(slot);
            }
            landed.clear();
            self.workers[wi].landed = landed;
            return;
        }
        let worker = &mut self.workers[wi];
        std::mem::swap(&mut worker.importing, &mut worker.landed);
        // The import holds the worker, not its device: host copies and a copy engine's
        // upload, no share of the device's compute (measured imports took as long beside
        // another process's steps as alone).
        worker.busy = true;
        worker.step.started_ns = self.now;
        self.queue.push(self.now + import_ns, Event::Imported(w));
    }

    /// An import is over: its requests generate, and what landed meanwhile is taken in.
    pub(super) fn imported(&mut self, w: WorkerId) {
        let wi = w as usize;
        let now = self.now;
        let worker = &mut self.workers[wi];
        worker.busy = false;
        worker.busy_ns += now - worker.step.started_ns;
        let mut importing = std::mem::take(&mut worker.importing);
        for &slot in &importing {
            self.take_landed(slot);
        }
        importing.clear();
        self.workers[wi].importing = importing;
        self.take_in(w);
        self.wake.push(w);
    }

    /// Sends the worker's KV events toward the block index, through the registry's delay.
    fn flush_kv(&mut self, w: WorkerId) {
        if !self.index_enabled {
            return;
        }
        let mut buf: Vec<KvEvent> = self.spare_event_bufs.pop().unwrap_or_default();
        self.workers[w as usize].kv.drain_events(&mut buf);
        if buf.is_empty() {
            self.spare_event_bufs.push(buf);
        } else if self.setup.registry_delay_ns == 0 {
            self.index.apply_all(w, &buf);
            buf.clear();
            self.spare_event_bufs.push(buf);
        } else {
            self.registry.push_back((w, buf));
            // A fixed delay after a clock that never goes back: deliveries come in time order.
            self.queue
                .push_in_order(self.now + self.setup.registry_delay_ns, Event::Registry);
        }
    }
}
