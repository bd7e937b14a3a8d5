//! Routing policies: which live worker of a role gets the next request.

use std::collections::BTreeMap;

use rand::RngExt;

use super::{BlockIndex, Role, WorkerId};
use crate::kv::BlockHash;
use crate::rng::Rng;

fn one() -> f64 {
    1.0
}

/// How the router picks a worker.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum Policy {
    /// Each eligible worker in turn, in id order.
    RoundRobin,
    /// Fewest active requests, then fewest active blocks.
    LeastLoaded,
    /// A conversation sticks to the worker that served its first turn, so its growing prefix
    /// stays in one cache, without any index.
    SessionAffinity,
    /// Trades prefix reuse against load, as NVIDIA Dynamo's KV router does:
    /// cost = overlap_weight x blocks to prefill + active blocks.
    KvAware {
        /// Blocks of prefill saved per block of load added; higher favours cache hits.
        #[serde(default = "one")]
        overlap_weight: f64,
        /// 0 picks the cheapest worker; above 0 samples, spreading load among near-equals.
        #[serde(default)]
        temperature: f64,
    },
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("{field} must be a finite number >= 0, got {value}")]
    InvalidParameter { field: &'static str, value: f64 },
}

impl Policy {
    /// Whether routing reads the block index (so workers' KV events must be collected).
    pub fn uses_index(&self) -> bool {
        matches!(self, Policy::KvAware { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastLoaded => "least_loaded",
            Policy::SessionAffinity => "session_affinity",
            Policy::KvAware { .. } => "kv_aware",
        }
    }

    /// Rejects parameters that make costs meaningless (negative, NaN or infinite).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Policy::KvAware {
            overlap_weight,
            temperature,
        } = *self
        {
            for (field, value) in [
                ("overlap_weight", overlap_weight),
                ("temperature", temperature),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(PolicyError::InvalidParameter { field, value });
                }
            }
        }
        Ok(())
    }
}

/// What the router knows about one worker when a request arrives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerLoad {
    pub id: WorkerId,
    pub role: Role,
    pub live: bool,
    pub active_requests: u32,
    /// KV blocks held by the worker's running sequences.
    pub active_blocks: u64,
}

/// The request being routed.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    pub conversation: u64,
    /// Hashes of the prompt's full blocks.
    pub block_hashes: &'a [BlockHash],
    /// Blocks of the prompt, including a partial last block.
    pub prompt_blocks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteDecision {
    pub worker: WorkerId,
    /// Leading prompt blocks the index says the worker holds (0 when the index is not read).
    pub overlap_blocks: u32,
}

/// A routing policy with its state: round-robin cursors, conversation affinity, the sampling
/// stream and scratch buffers reused across calls.
#[derive(Clone, Debug)]
pub struct Router {
    policy: Policy,
    rng: Rng,
    /// Per role, the worker round robin picked last.
    cursor: [Option<WorkerId>; 3],
    /// Per conversation and role, the worker it sticks to.
    affinity: BTreeMap<u64, [Option<WorkerId>; 3]>,
    /// Overlap per worker id, filled from the index.
    overlap: Vec<u32>,
    /// Eligible workers (index into the caller's slice) with their cost, then weight.
    candidates: Vec<(usize, f64)>,
}

impl Router {
    pub fn new(policy: Policy, rng: Rng) -> Self {
        Router {
            policy,
            rng,
            cursor: [None; 3],
            affinity: BTreeMap::new(),
            overlap: Vec::new(),
            candidates: Vec::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Pick a live worker of `role` among `workers` (any order of ids; ids may be sparse and
    /// the slice may hold dead workers and other roles, which are never picked). None when no
    /// live worker of that role exists. `index` is consulted only by KvAware (for the
    /// reported overlap_blocks of others, use 0 when the index is not consulted).
    pub fn route(
        &mut self,
        role: Role,
        req: &RouteRequest,
        workers: &[WorkerLoad],
        index: &BlockIndex,
    ) -> Option<RouteDecision> {
        let worker = match self.policy {
            Policy::RoundRobin => self.round_robin(role, workers),
            Policy::LeastLoaded => least_loaded(role, workers),
            Policy::SessionAffinity => self.session_affinity(role, req.conversation, workers),
            Policy::KvAware {
                overlap_weight,
                temperature,
            } => return self.kv_aware(role, req, workers, index, overlap_weight, temperature),
        }?;
        Some(RouteDecision {
            worker,
            overlap_blocks: 0,
        })
    }

    /// Drop per-conversation state (affinity) when a conversation ends.
    pub fn forget(&mut self, conversation: u64) {
        self.affinity.remove(&conversation);
    }

    /// The next eligible id after the last one picked for this role, wrapping to the lowest.
    /// Keyed by id rather than position, so workers joining or dying do not skip anyone.
    fn round_robin(&mut self, role: Role, workers: &[WorkerLoad]) -> Option<WorkerId> {
        let last = self.cursor[role.slot()];
        let mut lowest: Option<WorkerId> = None;
        let mut next: Option<WorkerId> = None;
        for w in eligible(role, workers) {
            lowest = Some(lowest.map_or(w.id, |l| l.min(w.id)));
            if last.is_none_or(|l| w.id > l) {
                next = Some(next.map_or(w.id, |n| n.min(w.id)));
            }
        }
        let pick = next.or(lowest)?;
        self.cursor[role.slot()] = Some(pick);
        Some(pick)
    }

    fn session_affinity(
        &mut self,
        role: Role,
        conversation: u64,
        workers: &[WorkerLoad],
    ) -> Option<WorkerId> {
        let remembered = self
            .affinity
            .get(&conversation)
            .and_then(|per_role| per_role[role.slot()]);
        if let Some(id) = remembered
            && eligible(role, workers).any(|w| w.id == id)
        {
            return Some(id);
        }
        let pick = least_loaded(role, workers)?;
        self.affinity.entry(conversation).or_default()[role.slot()] = Some(pick);
        Some(pick)
    }

    fn kv_aware(
        &mut self,
        role: Role,
        req: &RouteRequest,
        workers: &[WorkerLoad],
        index: &BlockIndex,
        overlap_weight: f64,
        temperature: f64,
    ) -> Option<RouteDecision> {
        let max_id = eligible(role, workers).map(|w| w.id).max()?;
        self.overlap.clear();
        self.overlap.resize(max_id as usize + 1, 0);
        index.overlaps(req.block_hashes, &mut self.overlap);
        let overlap = &self.overlap;
        let cost = |w: &WorkerLoad| {
            let to_prefill = req
                .prompt_blocks
                .saturating_sub(overlap[w.id as usize].into());
            overlap_weight * to_prefill as f64 + w.active_blocks as f64
        };

        let pick = if temperature > 0.0 {
            self.candidates.clear();
            self.candidates.extend(
                workers
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| is_eligible(role, w))
                    .map(|(i, w)| (i, cost(w))),
            );
            let i = sample(&mut self.rng, &mut self.candidates, temperature);
            &workers[i]
        } else {
            eligible(role, workers).min_by(|a, b| {
                cost(a)
                    .total_cmp(&cost(b))
                    .then(overlap[b.id as usize].cmp(&overlap[a.id as usize]))
                    .then(a.active_requests.cmp(&b.active_requests))
                    .then(a.id.cmp(&b.id))
            })?
        };
        Some(RouteDecision {
            worker: pick.id,
            overlap_blocks: overlap[pick.id as usize],
        })
    }
}

fn is_eligible(role: Role, w: &WorkerLoad) -> bool {
    w.live && w.role == role
}

fn eligible(role: Role, workers: &[WorkerLoad]) -> impl Iterator<Item = &WorkerLoad> {
    workers.iter().filter(move |w| is_eligible(role, w))
}

/// Fewest active requests, then fewest active blocks, then lowest id.
fn least_loaded(role: Role, workers: &[WorkerLoad]) -> Option<WorkerId> {
    eligible(role, workers)
        .min_by_key(|w| (w.active_requests, w.active_blocks, w.id))
        .map(|w| w.id)
}

/// Draws one of the non-empty `candidates` (index, cost) with probability proportional to
/// exp(-c'/temperature), c' the cost scaled to [0, 1] over the candidates (so the temperature
/// means the same whatever the magnitude of costs); all costs equal gives a uniform draw.
/// Returns the drawn candidate's index.
fn sample(rng: &mut Rng, candidates: &mut [(usize, f64)], temperature: f64) -> usize {
    let (min, max) = candidates
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, c)| {
            (lo.min(c), hi.max(c))
        });
    let span = max - min;
    if !(span > 0.0 && span.is_finite()) {
        return candidates[rng.random_range(0..candidates.len())].0;
    }
    let mut total = 0.0;
    for (_, c) in candidates.iter_mut() {
        *c = (-(*c - min) / span / temperature).exp();
        total += *c;
    }
    let mut u = rng.random::<f64>() * total;
    for &(i, weight) in candidates.iter() {
        u -= weight;
        if u < 0.0 {
            return i;
        }
    }
    candidates[candidates.len() - 1].0
}

#[cfg(test)]
mod tests;
