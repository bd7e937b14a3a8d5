//! The discrete-event simulator: one thread, one event queue, integer nanoseconds.
//!
//! A request arrives, the router places it (an aggregated worker, or a decode worker and a
//! prefill worker), the workers' iteration schedulers batch it with others, its KV crosses the
//! network as a flow sharing links max-min fairly, and its conversation's next turn arrives
//! after a think time. Every KV block change a worker makes reaches the router's block index
//! after the registry's delay.

mod queue;
mod worker;

use crate::config::{Mode, Scenario, Setup};
use crate::cost::{CostModel, Roofline};
use crate::kv::{BlockHash, KvEvent};
use crate::metrics::{self, Outcome, RequestRecord, Summary, TokenGaps, WorkerStats};
use crate::network::{EdgeStats, Network, Topology};
use crate::rng::{self, Stream};
use crate::routing::{BlockIndex, Role, RouteRequest, Router, WorkerId, WorkerLoad};
use crate::time::Nanos;
use crate::workload::{Request, Workload, WorkloadError};
use queue::{Event, EventQueue};
use std::collections::VecDeque;
use worker::{Phase, Seq, Worker};

pub use queue::EventQueue as Queue;

/// What a run records beyond the per-request records.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Keep the time of every output token (large: one entry per token).
    pub token_times: bool,
    /// Keep every request as generated, to write the realised workload as a trace.
    pub keep_requests: bool,
    /// Advanced by one for every request that completes or is rejected.
    pub progress: Option<indicatif::ProgressBar>,
}

/// One output token's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TokenTime {
    pub request_id: u64,
    pub token_index: u32,
    pub time_ns: Nanos,
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
    #[error("network: {0}")]
    Network(String),
}

/// Simulates one setup of a scenario.
pub fn run(scenario: &Scenario, setup: &Setup, options: RunOptions) -> Result<RunOutput, SimError> {
    let workload = Workload::new(&scenario.workload, scenario.seed, &scenario.base_dir)?;
    let mut sim = Simulation::new(scenario, setup, workload, options);
    sim.run()?;
    Ok(sim.finish())
}

struct Simulation<'a> {
    setup: &'a Setup,
    slo: metrics::Slo,
    now: Nanos,
    queue: EventQueue,
    events: u64,
    cost: Roofline,
    block_size: u32,
    kv_bytes_per_token: u64,
    max_model_len: u32,
    min_capacity_blocks: u32,
    workers: Vec<Worker>,
    loads: Vec<WorkerLoad>,
    seqs: Slab<Seq>,
    router: Router,
    prefill_router: Router,
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
    options: RunOptions,
    admissions: u64,
    /// Workers whose scheduler must run once the current event is handled.
    wake: Vec<WorkerId>,
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
        let kv_budget = setup.hardware.memory_bytes() * engine.gpu_memory_utilization
            - scenario.model.weight_bytes(scenario.dtype) as f64;
        let capacity_blocks =
            (kv_budget / (kv_bytes_per_token * block_size as u64) as f64).floor() as u32;
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
        Simulation {
            setup,
            slo: scenario.slo.clone(),
            now: 0,
            queue: EventQueue::default(),
            events: 0,
            cost: Roofline::new(
                &setup.hardware,
                &scenario.model,
                scenario.dtype,
                scenario.kv_dtype,
            ),
            block_size,
            kv_bytes_per_token,
            max_model_len,
            min_capacity_blocks: capacity_blocks,
            overlap_scratch: vec![0; workers.len()],
            workers,
            loads,
            seqs: Slab::default(),
            router: Router::new(
                setup.router.clone(),
                rng::substream(scenario.seed, Stream::Routing, 0),
            ),
            prefill_router: Router::new(
                setup.prefill_router.clone(),
                rng::substream(scenario.seed, Stream::Routing, 1),
            ),
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
            options,
            admissions: 0,
            wake: Vec::new(),
        }
    }

    fn run(&mut self) -> Result<(), SimError> {
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
                    let req = self.seqs.remove(slot).req;
                    self.arrive(req);
                }
                Event::StepDone(w) => self.step_done(w),
                Event::TransferSent(slot) => self.transfer_sent(slot)?,
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
                    for &event in &batch {
                        self.index.apply(worker, event);
                    }
                    batch.clear();
                    self.spare_event_bufs.push(batch);
                }
            }
            while let Some(w) = self.wake.pop() {
                self.schedule(w);
            }
        }
        Ok(())
    }

    fn pull_arrival(&mut self) {
        if let Some(req) = self.workload.next_arrival() {
            self.queue.push(req.arrival_ns.max(self.now), Event::NextArrival);
            self.pending_arrival = Some(req);
        }
    }

    fn finish(mut self) -> RunOutput {
        self.records.sort_by_key(|r| r.request_id);
        self.requests.sort_by_key(|r| r.id);
        let end_ns = self.now;
        let workers: Vec<WorkerStats> = self
            .workers
            .iter()
            .map(|w| w.stats(end_ns))
            .collect();
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
            summary,
            events: self.events,
            end_ns,
        }
    }

}
