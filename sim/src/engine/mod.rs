//! The discrete-event simulator: one thread, one event queue, integer nanoseconds.
//!
//! A request arrives, the router places it (an aggregated worker, or a decode worker and a
//! prefill worker), the workers' iteration schedulers batch it with others, its KV crosses the
//! network as a flow sharing links max-min fairly, and its conversation's next turn arrives
//! after a think time. Every KV block change a worker makes reaches the router's block index
//! after the registry's delay.

mod device;
mod queue;
mod worker;

use crate::config::{Mode, Scenario, Setup};
use crate::cost::CostModel;
use crate::kv::{BlockHash, KvEvent};
use crate::metrics::{self, Outcome, RequestRecord, Summary, TokenGaps, WorkerStats};
use crate::network::{EdgeStats, Network, Topology};
use crate::rng::{self, Stream};
use crate::routing::{BlockIndex, Role, RouteRequest, Router, WorkerId, WorkerLoad};
use crate::time::Nanos;
use crate::workload::{Request, Workload, WorkloadError};
use device::Device;
use queue::{Event, EventQueue};
use rand::RngExt;
use std::collections::VecDeque;
use worker::{Phase, Seq, Worker};

/// What a run records beyond the per-request records.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Keep the time of every output token (large: one entry per token).
    pub token_times: bool,
    /// Keep every request as generated, to write the realised workload as a trace.
    pub keep_requests: bool,
    /// Advanced by one for every request that completes or is rejected.
    pub progress: Option<indicatif::ProgressBar>,
    /// Keep every step the workers ran (one entry per step), as a real worker's step trace
    /// holds them.
    pub steps: bool,
    /// Which draws of the scenario's noise (step and transfer time spreads) the run takes:
    /// runs under several seeds sample the spread of its outcomes over one workload, which
    /// stays as the scenario's seed makes it. 0: the scenario seed's own draws.
    pub noise_seed: u64,
}

/// One step a worker ran: when, and its work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    pub worker: WorkerId,
    pub start_ns: Nanos,
    pub end_ns: Nanos,
    pub work: crate::cost::StepWork,
}

/// One output token's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TokenTime {
    pub request_id: u64,
    pub token_index: u32,
    pub time_ns: Nanos,
}

/// The token-times table, one row per token; the simulator and the real load generator both
/// write it. The header is written even with no rows, so an empty run names its schema.
pub fn write_token_times_csv<W: std::io::Write>(w: W, times: &[TokenTime]) -> csv::Result<()> {
    let mut out = csv::WriterBuilder::new().has_headers(false).from_writer(w);
    out.write_record(["request_id", "token_index", "time_ns"])?;
    for t in times {
        out.serialize(t)?;
    }
    out.flush()?;
    Ok(())
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunOutput {
    pub setup: String,
    /// One record per request, by request id.
    pub records: Vec<RequestRecord>,
    pub gaps: TokenGaps,
    pub workers: Vec<WorkerStats>,
    pub edges: Vec<EdgeStats>,
    pub token_times: Vec<TokenTime>,
    pub requests: Vec<Request>,
    /// Every step, in order of their ends (`RunOptions::steps`).
    pub steps: Vec<StepRecord>,
    pub summary: Summary,
    /// Events processed.
    pub events: u64,
    /// Simulated time of the last event.
    pub end_ns: Nanos,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("workload: {0}")]
    Workload(#[from] WorkloadError),
}

/// Simulates one setup of a scenario.
pub fn run(scenario: &Scenario, setup: &Setup, options: RunOptions) -> Result<RunOutput, SimError> {
    let workload = Workload::new(&scenario.workload, scenario.seed, &scenario.base_dir)?;
    let mut sim = Simulation::new(scenario, setup, workload, options);
    sim.run();
    Ok(sim.finish())
}

struct Simulation<'a> {
    setup: &'a Setup,
    slo: metrics::Slo,
    now: Nanos,
    queue: EventQueue,
    events: u64,
    cost: Box<dyn CostModel>,
    block_size: u32,
    kv_bytes_per_token: u64,
    max_model_len: u32,
    min_capacity_blocks: u32,
    workers: Vec<Worker>,
    devices: Vec<Device>,
    loads: Vec<WorkerLoad>,
    seqs: Slab<Seq>,
    /// Follow-up turns waiting for their arrival time.
    follow_ups: Slab<Request>,
    router: Router,
    prefill_router: Router,
    /// Draws each KV transfer's factor of its link's `time_spread`...
    transfer_rng: rng::Rng,
    /// ...and each step's of the setup's step spread.
    step_rng: rng::Rng,
    index: BlockIndex,
    /// Whether anything reads the block index (KV-aware routing, conditional placement).
    index_enabled: bool,
    /// KV event batches on their way to the index, in delivery order.
    registry: VecDeque<(WorkerId, Vec<KvEvent>)>,
    spare_event_bufs: Vec<Vec<KvEvent>>,
    overlap_scratch: Vec<u32>,
    network: Network,
    network_version: u64,
    flows_done: Vec<u64>,
    workload: Workload,
    pending_arrival: Option<Request>,
    records: Vec<RequestRecord>,
    gaps: TokenGaps,
    token_times: Vec<TokenTime>,
    requests: Vec<Request>,
    steps: Vec<StepRecord>,
    options: RunOptions,
    /// Workers whose scheduler must run once the current event is handled.
    wake: Vec<WorkerId>,
    prefilled_scratch: Vec<u32>,
    finished_scratch: Vec<u32>,
}

impl<'a> Simulation<'a> {
    fn new(
        scenario: &Scenario,
        setup: &'a Setup,
        workload: Workload,
        options: RunOptions,
    ) -> Simulation<'a> {
        let engine = &setup.engine;
        let block_size = engine.block_size_tokens;
        let kv_bytes_per_token = scenario.model.kv_bytes_per_token(scenario.kv_dtype);
        let capacity_blocks = setup.kv_blocks;
        let index_enabled = setup.router.uses_index()
            || setup.prefill_router.uses_index()
            || setup.mode == Mode::Conditional;
        let workers: Vec<Worker> = setup
            .workers
            .iter()
            .enumerate()
            .map(|(id, &role)| {
                Worker::new(
                    id as WorkerId,
                    role,
                    capacity_blocks,
                    engine.prefix_caching,
                    index_enabled,
                )
            })
            .collect();
        let loads = workers
            .iter()
            .map(|w| WorkerLoad {
                id: w.id,
                role: w.role,
                live: true,
                active_requests: 0,
                active_blocks: 0,
            })
            .collect();
        let topology = Topology::cluster(
            setup.hosts(),
            setup.gpus_per_host,
            &setup.link,
            setup.intra_link.as_ref(),
        );
        let max_model_len = engine
            .max_model_len
            .unwrap_or(scenario.model.max_position_embeddings);
        let noise = |concern: Stream| match options.noise_seed {
            0 => rng::stream(scenario.seed, concern),
            n => rng::substream(scenario.seed, concern, n),
        };
        Simulation {
            setup,
            slo: scenario.slo.clone(),
            now: 0,
            queue: EventQueue::default(),
            events: 0,
            cost: setup.cost_model(scenario),
            block_size,
            kv_bytes_per_token,
            max_model_len,
            min_capacity_blocks: capacity_blocks,
            overlap_scratch: vec![0; workers.len()],
            devices: (0..workers.len().div_ceil(setup.workers_per_device as usize))
                .map(|_| Device::default())
                .collect(),
            workers,
            loads,
            seqs: Slab::default(),
            follow_ups: Slab::default(),
            router: Router::new(
                setup.router.clone(),
                rng::substream(scenario.seed, Stream::Routing, 0),
            ),
            prefill_router: Router::new(
                setup.prefill_router.clone(),
                rng::substream(scenario.seed, Stream::Routing, 1),
            ),
            transfer_rng: noise(Stream::Transfers),
            step_rng: noise(Stream::Steps),
            index: BlockIndex::new(),
            index_enabled,
            registry: VecDeque::new(),
            spare_event_bufs: Vec::new(),
            network: Network::new(topology),
            network_version: 0,
            flows_done: Vec::new(),
            workload,
            pending_arrival: None,
            records: Vec::new(),
            gaps: TokenGaps::default(),
            token_times: Vec::new(),
            requests: Vec::new(),
            steps: Vec::new(),
            options,
            wake: Vec::new(),
            prefilled_scratch: Vec::new(),
            finished_scratch: Vec::new(),
        }
    }

    fn run(&mut self) {
        self.pull_arrival();
        while let Some((at, event)) = self.queue.pop() {
            debug_assert!(at >= self.now, "time never goes backwards");
            self.now = at;
            self.events += 1;
            match event {
                Event::NextArrival => {
                    if let Some(req) = self.pending_arrival.take() {
                        self.arrive(req);
                    }
                    self.pull_arrival();
                }
                Event::Arrive(slot) => {
                    let req = self.follow_ups.remove(slot);
                    self.arrive(req);
                }
                Event::Reach(slot) => self.reach(slot),
                Event::HandedOff(slot) => self.handed_off(slot),
                Event::Imported(w) => self.imported(w),
                Event::StepDone(w, generation) => {
                    if self.workers[w as usize].step.generation == generation {
                        self.step_done(w);
                    }
                }
                Event::TransferSent(slot) => self.transfer_sent(slot),
                Event::TransferLanded(slot) => self.transfer_landed(slot),
                Event::NetworkWake(version) => {
                    if version == self.network_version {
                        self.sync_network();
                    }
                }
                Event::Registry => {
                    let (worker, mut batch) = self
                        .registry
                        .pop_front()
                        .expect("a registry event has a batch");
                    self.index.apply_all(worker, &batch);
                    batch.clear();
                    self.spare_event_bufs.push(batch);
                }
            }
            while let Some(w) = self.wake.pop() {
                self.schedule(w);
            }
        }
    }

    fn pull_arrival(&mut self) {
        if let Some(req) = self.workload.next_arrival() {
            self.queue
                .push(req.arrival_ns.max(self.now), Event::NextArrival);
            self.pending_arrival = Some(req);
        }
    }

    fn finish(mut self) -> RunOutput {
        self.records.sort_by_key(|r| r.request_id);
        self.requests.sort_by_key(|r| r.id);
        let end_ns = self.now;
        let workers: Vec<WorkerStats> = self.workers.iter().map(|w| w.stats(end_ns)).collect();
        let summary = metrics::summarize(
            &self.records,
            &self.gaps,
            &workers,
            &self.slo,
            self.block_size,
        );
        RunOutput {
            setup: self.setup.name.clone(),
            records: self.records,
            gaps: self.gaps,
            workers,
            edges: self.network.edge_stats(),
            token_times: self.token_times,
            requests: self.requests,
            steps: self.steps,
            summary,
            events: self.events,
            end_ns,
        }
    }
}

/// Requests and conversations: arrival, placement, completion.
impl Simulation<'_> {
    fn arrive(&mut self, req: Request) {
        if self.options.keep_requests {
            self.requests.push(req.clone());
        }
        let bs = self.block_size;
        let mut hashes: Vec<BlockHash> = Vec::with_capacity((req.prompt_tokens / bs) as usize + 8);
        req.content
            .extend_block_hashes(&mut hashes, req.prompt_tokens, bs);
        let prompt_blocks = req.prompt_tokens.div_ceil(bs) as u64;
        let mut seq = Seq::new(req, hashes, prompt_blocks, self.now);
        // The way in is over when the request reaches its worker; the rest is the way back.
        let s = self.setup;
        let (path_ns, front_ns) = if self.seqs.is_empty() {
            (s.serving_path_idle_ns, s.serving_path_idle_front_ns)
        } else {
            (s.serving_path_ns, s.serving_path_front_ns)
        };
        seq.serving_path_ns = path_ns - front_ns;
        let total_tokens = seq.req.prompt_tokens as u64 + seq.req.output_tokens as u64;
        if total_tokens > self.max_model_len as u64 {
            return self.reject(seq, "prompt_too_long");
        }
        if total_tokens.div_ceil(bs as u64) > self.min_capacity_blocks as u64 {
            return self.reject(seq, "exceeds_kv_capacity");
        }
        let Some((decode, prefill)) = self.place(&seq) else {
            return self.reject(seq, "no_worker");
        };
        let max_queue = self.setup.engine.max_queue as usize;
        if self.workers[decode as usize].waiting.len() >= max_queue
            || self.workers[prefill as usize].waiting.len() >= max_queue
        {
            return self.reject(seq, "queue_full");
        }
        seq.decode_worker = decode;
        seq.prefill_worker = prefill;
        seq.remote_prefill = prefill != decode;
        seq.rec.routed_ns = self.now;
        seq.rec.decode_worker = Some(decode);
        seq.rec.prefill_worker = Some(prefill);
        for w in [decode, prefill] {
            let load = &mut self.loads[w as usize];
            load.active_requests += 1;
            load.active_blocks += prompt_blocks;
            if prefill == decode {
                break;
            }
        }
        let slot = self.seqs.insert(seq);
        match front_ns {
            0 => self.reach(slot),
            front => self.queue.push(self.now + front, Event::Reach(slot)),
        }
    }

    /// The request reaches the worker it was routed to, at the end of the way in.
    fn reach(&mut self, slot: u32) {
        let decode = self.seqs.get(slot).decode_worker;
        self.workers[decode as usize].waiting.push_back(slot);
        self.wake.push(decode);
    }

    /// The (decode or aggregated worker, prefilling worker) of a request; they are the same
    /// worker when it prefills locally.
    fn place(&mut self, seq: &Seq) -> Option<(WorkerId, WorkerId)> {
        let query = RouteRequest {
            conversation: seq.req.conversation,
            block_hashes: &seq.hashes,
            prompt_blocks: seq.prompt_blocks,
        };
        let first_role = match self.setup.mode {
            Mode::Aggregated => Role::Aggregated,
            Mode::Disaggregated | Mode::Conditional => Role::Decode,
        };
        let decode = self
            .router
            .route(first_role, &query, &self.loads, &self.index)?
            .worker;
        match self.setup.mode {
            Mode::Aggregated => return Some((decode, decode)),
            Mode::Disaggregated => {}
            Mode::Conditional => {
                // What the decode worker holds, as far as the registry knows.
                self.index.overlaps(&seq.hashes, &mut self.overlap_scratch);
                let held = self.overlap_scratch[decode as usize] * self.block_size;
                let uncached = seq.req.prompt_tokens.saturating_sub(held);
                if uncached <= self.setup.conditional_threshold_tokens {
                    return Some((decode, decode));
                }
            }
        }
        let prefill = self
            .prefill_router
            .route(Role::Prefill, &query, &self.loads, &self.index)?
            .worker;
        Some((decode, prefill))
    }

    fn reject(&mut self, mut seq: Seq, reason: &str) {
        seq.rec.outcome = Outcome::Rejected;
        seq.rec.reject_reason = Some(reason.to_string());
        self.workload.abandon(seq.req.conversation);
        self.router.forget(seq.req.conversation);
        self.prefill_router.forget(seq.req.conversation);
        self.records.push(seq.rec);
        if let Some(bar) = &self.options.progress {
            bar.inc(1);
        }
    }

    fn release_load(&mut self, worker: WorkerId, blocks: u64) {
        let load = &mut self.loads[worker as usize];
        load.active_requests -= 1;
        load.active_blocks -= blocks;
    }

    /// The request's last token is out: free its blocks, record it, start its next turn.
    fn complete(&mut self, slot: u32) {
        let mut seq = self.seqs.remove(slot);
        let w = seq.decode_worker;
        seq.rec.end_ns = self.now + seq.serving_path_ns;
        self.workers[w as usize].kv.free(&seq.blocks);
        self.release_load(w, seq.prompt_blocks);
        self.wake.push(w);
        match self.workload.follow_up(&seq.req, seq.rec.end_ns) {
            Some(next) => {
                let at = next.arrival_ns.max(self.now);
                let slot = self.follow_ups.insert(next);
                self.queue.push(at, Event::Arrive(slot));
            }
            None => {
                self.router.forget(seq.req.conversation);
                self.prefill_router.forget(seq.req.conversation);
            }
        }
        self.records.push(seq.rec);
        if let Some(bar) = &self.options.progress {
            bar.inc(1);
        }
    }

    /// The first token is out (locally after prefill, or with the KV on a decode worker).
    fn first_token(&mut self, slot: u32) {
        let seq = self.seqs.get_mut(slot);
        let client_ns = self.now + seq.serving_path_ns;
        seq.generated = 1;
        seq.kv_len = seq.req.prompt_tokens;
        seq.rec.first_token_ns = client_ns;
        seq.last_token_ns = self.now;
        seq.phase = Phase::Decoding;
        if self.options.token_times {
            self.token_times.push(TokenTime {
                request_id: seq.req.id,
                token_index: 0,
                time_ns: client_ns,
            });
        }
    }
}

/// KV transfers between a prefill and a decode worker.
impl Simulation<'_> {
    fn start_transfer(&mut self, slot: u32) {
        let seq = self.seqs.get_mut(slot);
        let tokens = seq.req.prompt_tokens - seq.decode_cached_tokens;
        let bytes = tokens as u64 * self.kv_bytes_per_token;
        let path = self
            .network
            .topology()
            .path(seq.prefill_worker, seq.decode_worker)
            .expect("a cluster topology connects every pair of GPUs");
        seq.rec.transfer_start_ns = self.now;
        seq.rec.transfer_bytes = bytes;
        seq.phase = Phase::Transferring;
        let link = path.link();
        let factor = if link.time_spread.is_empty() {
            1.0
        } else {
            link.time_spread[self.transfer_rng.random_range(0..link.time_spread.len())]
        };
        let scaled = |v: u64| (v as f64 * factor).round() as u64;
        let sender_done = self.now + scaled(link.endpoint_ns(bytes));
        seq.transfer_wire_bytes = scaled(bytes).max(1);
        seq.transfer_latency_ns = path.latency_ns();
        seq.import_ns = link.import_ns(bytes);
        self.queue.push(sender_done, Event::TransferSent(slot));
    }

    fn transfer_sent(&mut self, slot: u32) {
        self.sync_network();
        let seq = self.seqs.get(slot);
        let (src, dst, bytes) = (
            seq.prefill_worker,
            seq.decode_worker,
            seq.transfer_wire_bytes,
        );
        self.network
            .start_flow(self.now, src, dst, bytes, slot as u64)
            .expect("a transfer moves at least one token between two GPUs");
        self.schedule_network();
    }

    /// Moves the network to now, hands finished flows on to their last hop's latency, and
    /// schedules the next completion.
    fn sync_network(&mut self) {
        self.network.advance(self.now, &mut self.flows_done);
        for i in 0..self.flows_done.len() {
            let slot = self.flows_done[i] as u32;
            let latency = self.seqs.get(slot).transfer_latency_ns;
            self.queue
                .push(self.now + latency, Event::TransferLanded(slot));
        }
        self.flows_done.clear();
        self.schedule_network();
    }

    fn schedule_network(&mut self) {
        self.network_version += 1;
        if let Some(at) = self.network.next_completion_ns() {
            self.queue
                .push(at.max(self.now), Event::NetworkWake(self.network_version));
        }
    }

    /// The KV is on the decode worker: the prefill worker lets go of its copy (still cached);
    /// after the hand-off, the decode worker takes it in.
    fn transfer_landed(&mut self, slot: u32) {
        let seq = self.seqs.get_mut(slot);
        seq.rec.transfer_end_ns = self.now;
        let p = seq.prefill_worker;
        let prefill_blocks = std::mem::take(&mut seq.prefill_blocks);
        let prompt_blocks = seq.prompt_blocks;
        self.workers[p as usize].kv.free(&prefill_blocks);
        self.release_load(p, prompt_blocks);
        self.wake.push(p);
        match self.setup.kv_handoff_ns {
            0 => self.handed_off(slot),
            handoff => self.queue.push(self.now + handoff, Event::HandedOff(slot)),
        }
    }

    /// The decode worker has the landed KV in hand: it takes it in (imports it, then emits the
    /// first token) once its running step is over.
    fn handed_off(&mut self, slot: u32) {
        let d = self.seqs.get(slot).decode_worker;
        self.workers[d as usize].landed.push(slot);
        if !self.workers[d as usize].busy {
            self.take_in(d);
        }
    }

    /// The decode worker takes a landed transfer: its full blocks join the prefix cache and
    /// the request starts generating.
    fn take_landed(&mut self, slot: u32) {
        let seq = self.seqs.get_mut(slot);
        seq.rec.import_end_ns = self.now;
        let d = seq.decode_worker;
        let full = (seq.req.prompt_tokens / self.block_size) as usize;
        let first = (seq.decode_cached_tokens / self.block_size) as usize;
        self.workers[d as usize]
            .kv
            .commit_all(&seq.blocks[first..full], &seq.hashes[first..full]);
        self.first_token(slot);
        if self.seqs.get(slot).req.output_tokens <= 1 {
            self.complete(slot);
        } else {
            self.workers[d as usize].running.push(slot);
            self.wake.push(d);
        }
    }
}

/// A slab of in-flight requests addressed by slot.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, item: T) -> u32 {
        match self.free.pop() {
            Some(slot) => {
                self.items[slot as usize] = Some(item);
                slot
            }
            None => {
                self.items.push(Some(item));
                (self.items.len() - 1) as u32
            }
        }
    }

    fn remove(&mut self, slot: u32) -> T {
        let item = self.items[slot as usize].take().expect("live slot");
        self.free.push(slot);
        item
    }

    fn get(&self, slot: u32) -> &T {
        self.items[slot as usize].as_ref().expect("live slot")
    }

    fn get_mut(&mut self, slot: u32) -> &mut T {
        self.items[slot as usize].as_mut().expect("live slot")
    }

    /// No slot is live.
    fn is_empty(&self) -> bool {
        self.free.len() == self.items.len()
    }
}
