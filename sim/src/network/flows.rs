//! Flows sharing the topology's directed edges at max-min fair rates (progressive filling).
//!
//! Rates change only when the set of flows does, so between changes every flow drains at a
//! constant rate and its finish time is known; the caller's event loop sleeps until the earliest.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::topology::{EdgeId, EndpointId, PathInfo, Topology};
use crate::time::{NS_PER_S, Nanos};

/// Marks a flow whose rate the filling has not fixed yet.
const UNFROZEN: f64 = -1.0;

/// A share as a key that orders like the share: the bits of a non-negative float order as the
/// float does. Rounding may leave a share a hair below zero: it counts as zero.
fn share_key(share_bytes_per_s: f64) -> u64 {
    if share_bytes_per_s > 0.0 {
        share_bytes_per_s.to_bits()
    } else {
        0
    }
}

/// What one directed edge has carried, for utilisation reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeStats {
    pub from: String,
    pub to: String,
    pub link: String,
    /// Bytes carried so far: all of finished flows, the part sent of flows under way.
    pub bytes: u64,
    /// Time during which at least one flow crossed the edge.
    pub busy_ns: Nanos,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("a flow must carry at least one byte")]
    ZeroBytes,
    #[error("endpoint {endpoint} does not exist: the topology has {endpoints} endpoints")]
    UnknownEndpoint {
        endpoint: EndpointId,
        endpoints: u32,
    },
    #[error("a flow needs two distinct endpoints, got {0} for both")]
    SameEndpoint(EndpointId),
    #[error("no route from endpoint {src} to endpoint {dst}")]
    NoRoute { src: EndpointId, dst: EndpointId },
    #[error("link {link}: {reason}")]
    InvalidLink { link: String, reason: String },
    #[error("flow starts at {now_ns} ns, before the network's clock at {network_ns} ns")]
    TimeWentBack { now_ns: Nanos, network_ns: Nanos },
    #[error("flow starts at {now_ns} ns, past a completion at {completion_ns} ns: advance first")]
    NotAdvanced { now_ns: Nanos, completion_ns: Nanos },
}

#[derive(Debug)]
struct Flow {
    tag: u64,
    bytes: u64,
    remaining_bytes: f64,
    rate_bytes_per_s: f64,
    finish_ns: Nanos,
    path: PathInfo,
}

/// A topology and the flows crossing it.
#[derive(Debug)]
pub struct Network {
    topology: Topology,
    now_ns: Nanos,
    next_ns: Option<Nanos>,
    flows: Vec<Flow>,
    /// Per edge: usable rate, 0 where the link fails validation.
    capacity_bytes_per_s: Vec<f64>,
    flows_on_edge: Vec<u32>,
    busy_since_ns: Vec<Nanos>,
    busy_ns: Vec<Nanos>,
    carried_bytes: Vec<u64>,
    /// Progressive-filling scratch, kept between recomputations to avoid allocating.
    spare_bytes_per_s: Vec<f64>,
    unfrozen: Vec<u32>,
    /// Min-heap of (share, edge); entries whose share has since grown are stale.
    tightest: BinaryHeap<Reverse<(u64, EdgeId)>>,
    /// The flows crossing each active edge: `members[members_start[e]..][..flows_on_edge[e]]`.
    members_start: Vec<usize>,
    members: Vec<u32>,
}

impl Network {
    /// An idle network at time 0. An edge whose link fails validation carries nothing: a flow
    /// routed over it is refused with [`NetworkError::InvalidLink`].
    pub fn new(topology: Topology) -> Self {
        let edges = topology.edge_count();
        let capacity_bytes_per_s = (0..edges as EdgeId)
            .map(|e| {
                let link = &topology.edge(e).link;
                if link.validate().is_ok() {
                    link.bytes_per_s()
                } else {
                    0.0
                }
            })
            .collect();
        Network {
            topology,
            now_ns: 0,
            next_ns: None,
            flows: Vec::new(),
            capacity_bytes_per_s,
            flows_on_edge: vec![0; edges],
            busy_since_ns: vec![0; edges],
            busy_ns: vec![0; edges],
            carried_bytes: vec![0; edges],
            spare_bytes_per_s: vec![0.0; edges],
            unfrozen: vec![0; edges],
            tightest: BinaryHeap::new(),
            members_start: vec![0; edges],
            members: Vec::new(),
        }
    }

    /// The topology, for routes (mutable because it caches them).
    pub fn topology(&mut self) -> &mut Topology {
        &mut self.topology
    }

    /// Start moving `bytes` (> 0) from src to dst at `now`; `tag` identifies it to the caller.
    /// Returns the path's latency and endpoint link (the caller adds latency and endpoint
    /// time as fixed delays; the flow models only the shared-bandwidth part). `now` must not
    /// pass a pending completion: advance to `now` first.
    pub fn start_flow(
        &mut self,
        now: Nanos,
        src: EndpointId,
        dst: EndpointId,
        bytes: u64,
        tag: u64,
    ) -> Result<PathInfo, NetworkError> {
        if bytes == 0 {
            return Err(NetworkError::ZeroBytes);
        }
        if now < self.now_ns {
            return Err(NetworkError::TimeWentBack {
                now_ns: now,
                network_ns: self.now_ns,
            });
        }
        if let Some(completion_ns) = self.next_ns
            && completion_ns <= now
        {
            return Err(NetworkError::NotAdvanced {
                now_ns: now,
                completion_ns,
            });
        }
        let endpoints = self.topology.endpoints();
        if let Some(&endpoint) = [src, dst].iter().find(|&&id| id >= endpoints) {
            return Err(NetworkError::UnknownEndpoint {
                endpoint,
                endpoints,
            });
        }
        if src == dst {
            return Err(NetworkError::SameEndpoint(src));
        }
        let path = self
            .topology
            .path(src, dst)
            .ok_or(NetworkError::NoRoute { src, dst })?;
        if let Some(&bad) = path
            .edges()
            .iter()
            .find(|&&e| self.capacity_bytes_per_s[e as usize] <= 0.0)
        {
            let link = &self.topology.edge(bad).link;
            return Err(NetworkError::InvalidLink {
                link: link.name.clone(),
                reason: link.validate().err().unwrap_or_default(),
            });
        }

        self.move_to(now);
        for &e in path.edges() {
            let e = e as usize;
            if self.flows_on_edge[e] == 0 {
                self.busy_since_ns[e] = now;
            }
            self.flows_on_edge[e] += 1;
        }
        self.flows.push(Flow {
            tag,
            bytes,
            remaining_bytes: bytes as f64,
            rate_bytes_per_s: 0.0,
            finish_ns: Nanos::MAX,
            path: path.clone(),
        });
        self.recompute();
        Ok(path)
    }

    /// When the next flow will finish at current rates (None when idle).
    pub fn next_completion_ns(&self) -> Option<Nanos> {
        self.next_ns
    }

    /// Move every flow forward to `now`, push the tags of flows that have finished (by finish
    /// time, then tag) onto `done`, and recompute rates. Completions before `now` are taken in
    /// turn, each re-sharing the bandwidth it frees, so a late call loses nothing.
    pub fn advance(&mut self, now: Nanos, done: &mut Vec<u64>) {
        while let Some(at) = self.next_ns
            && at <= now
        {
            self.move_to(at);
            self.finish_due(done);
            self.recompute();
        }
        self.move_to(now);
    }

    pub fn active_flows(&self) -> usize {
        self.flows.len()
    }

    /// Bytes carried so far and busy time per directed edge, in edge order.
    pub fn edge_stats(&self) -> Vec<EdgeStats> {
        let mut bytes = self.carried_bytes.clone();
        for flow in &self.flows {
            let sent = (flow.bytes as f64 - flow.remaining_bytes).clamp(0.0, flow.bytes as f64);
            for &e in flow.path.edges() {
                bytes[e as usize] += sent as u64;
            }
        }
        bytes
            .into_iter()
            .enumerate()
            .map(|(e, bytes)| {
                let (from, to) = self.topology.edge_nodes(e as EdgeId);
                let ongoing_ns = if self.flows_on_edge[e] > 0 {
                    self.now_ns - self.busy_since_ns[e]
                } else {
                    0
                };
                EdgeStats {
                    from: from.to_string(),
                    to: to.to_string(),
                    link: self.topology.edge(e as EdgeId).link.name.clone(),
                    bytes,
                    busy_ns: self.busy_ns[e] + ongoing_ns,
                }
            })
            .collect()
    }

    /// Drain every flow at its current rate up to `at`.
    fn move_to(&mut self, at: Nanos) {
        if at <= self.now_ns {
            return;
        }
        let elapsed_s = (at - self.now_ns) as f64 / NS_PER_S as f64;
        for flow in &mut self.flows {
            flow.remaining_bytes -= flow.rate_bytes_per_s * elapsed_s;
        }
        self.now_ns = at;
    }

    /// Remove the flows due by now: their finish time has come, or less than a byte is left.
    fn finish_due(&mut self, done: &mut Vec<u64>) {
        let now = self.now_ns;
        let first = done.len();
        let mut i = 0;
        while i < self.flows.len() {
            let flow = &self.flows[i];
            if flow.finish_ns > now && flow.remaining_bytes >= 1.0 {
                i += 1;
                continue;
            }
            let flow = self.flows.swap_remove(i);
            done.push(flow.tag);
            for &e in flow.path.edges() {
                let e = e as usize;
                self.carried_bytes[e] += flow.bytes;
                self.flows_on_edge[e] -= 1;
                if self.flows_on_edge[e] == 0 {
                    self.busy_ns[e] += now - self.busy_since_ns[e];
                }
            }
        }
        // All finish at `now` (none was due earlier), so finish-then-tag order is tag order.
        done[first..].sort_unstable();
    }

    /// Max-min fair rates by progressive filling, then each flow's finish time. Each round
    /// freezes the flows of the edge with the least spare capacity per unfrozen flow at that
    /// share. A round never lowers another edge's share, so a min-heap with stale entries
    /// skipped finds the tightest edge; an edge-to-flows index finds its flows. Cost:
    /// O(edges on paths x log) for the heap plus O(flows x hops) for freezing.
    fn recompute(&mut self) {
        let Network {
            flows,
            flows_on_edge,
            capacity_bytes_per_s,
            spare_bytes_per_s: spare,
            unfrozen,
            tightest,
            members_start,
            members,
            ..
        } = self;
        tightest.clear();
        members.clear();
        for (index, flow) in flows.iter_mut().enumerate() {
            flow.rate_bytes_per_s = UNFROZEN;
            for &e in flow.path.edges() {
                let i = e as usize;
                if unfrozen[i] == 0 {
                    spare[i] = capacity_bytes_per_s[i];
                    members_start[i] = members.len();
                    members.resize(members.len() + flows_on_edge[i] as usize, 0);
                    let share = capacity_bytes_per_s[i] / flows_on_edge[i] as f64;
                    tightest.push(Reverse((share_key(share), e)));
                }
                members[members_start[i] + unfrozen[i] as usize] = index as u32;
                unfrozen[i] += 1;
            }
        }
        // Every unfrozen flow keeps an entry of each of its edges queued, so all are frozen
        // once the heap is empty.
        while let Some(Reverse((key, bottleneck))) = tightest.pop() {
            let b = bottleneck as usize;
            if unfrozen[b] == 0 || share_key(spare[b] / unfrozen[b] as f64) != key {
                continue;
            }
            let share = f64::from_bits(key);
            let start = members_start[b];
            for &index in &members[start..start + flows_on_edge[b] as usize] {
                let flow = &mut flows[index as usize];
                if flow.rate_bytes_per_s != UNFROZEN {
                    continue;
                }
                flow.rate_bytes_per_s = share;
                for &e in flow.path.edges() {
                    let i = e as usize;
                    spare[i] -= share;
                    unfrozen[i] -= 1;
                    if unfrozen[i] > 0 && i != b {
                        let share = share_key(spare[i] / unfrozen[i] as f64);
                        tightest.push(Reverse((share, e)));
                    }
                }
            }
        }

        let now = self.now_ns;
        let mut next = None::<Nanos>;
        for flow in &mut self.flows {
            let secs = flow.remaining_bytes / flow.rate_bytes_per_s;
            // At least 1 ns ahead, so the clock always moves; saturates for a stalled flow.
            let ns = (secs * NS_PER_S as f64).ceil().max(1.0) as Nanos;
            flow.finish_ns = now.saturating_add(ns);
            next = Some(next.map_or(flow.finish_ns, |n| n.min(flow.finish_ns)));
        }
        self.next_ns = next;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::network::link::{LinkKind, LinkSpec};

    /// A bare link of `bytes_per_s` with no endpoint costs.
    fn link(name: &str, bytes_per_s: f64) -> LinkSpec {
        LinkSpec {
            name: name.into(),
            kind: LinkKind::Rdma,
            bandwidth_gbit_per_s: bytes_per_s * 8.0 / 1e9,
            efficiency: 1.0,
            latency_ns: 2_000,
            per_transfer_overhead_ns: 0,
            host_copy_bytes_per_s: None,
            serialize_bytes_per_s: None,
            import_bytes_per_s: None,
            time_spread: Vec::new(),
        }
    }

    /// `hosts` single-GPU hosts on a 1 GB/s fabric.
    fn star(hosts: u32) -> Network {
        Network::new(Topology::cluster(hosts, 1, &link("fabric", 1e9), None))
    }

    fn rate(network: &Network, tag: u64) -> f64 {
        network
            .flows
            .iter()
            .find(|f| f.tag == tag)
            .map(|f| f.rate_bytes_per_s)
            .unwrap()
    }

    /// Advance completion by completion until idle: (time, tag) of every finish.
    fn drain(network: &mut Network) -> Vec<(Nanos, u64)> {
        let mut finished = Vec::new();
        let mut done = Vec::new();
        while let Some(at) = network.next_completion_ns() {
            network.advance(at, &mut done);
            finished.extend(done.drain(..).map(|tag| (at, tag)));
        }
        finished
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= expected.abs() * 1e-12,
            "{actual} != {expected}"
        );
    }

    #[test]
    fn two_flows_on_one_bottleneck_share_it_evenly() {
        let mut network = star(2);
        network.start_flow(0, 0, 1, 500_000_000, 7).unwrap();
        network.start_flow(0, 0, 1, 1_000_000_000, 3).unwrap();
        assert_close(rate(&network, 7), 0.5e9);
        assert_close(rate(&network, 3), 0.5e9);
        // The small one ends at 1 s; the other then has 0.5 GB left at the full 1 GB/s.
        assert_eq!(drain(&mut network), [(NS_PER_S, 7), (1_500_000_000, 3)]);
        assert_eq!(network.active_flows(), 0);
    }

    #[test]
    fn a_flow_crossing_two_bottlenecks_gets_the_smaller_share() {
        let mut network = star(4);
        // gpu0's uplink carries three flows, gpu1's downlink two.
        network.start_flow(0, 0, 1, 1 << 30, 0).unwrap();
        network.start_flow(0, 0, 2, 1 << 30, 1).unwrap();
        network.start_flow(0, 0, 3, 1 << 30, 2).unwrap();
        network.start_flow(0, 2, 1, 1 << 30, 3).unwrap();
        for tag in 0..3 {
            assert_close(rate(&network, tag), 1e9 / 3.0);
        }
        // The downlink's leftover goes to the flow that is not held back elsewhere.
        assert_close(rate(&network, 3), 2e9 / 3.0);
    }

    #[test]
    fn three_flows_on_two_links_get_the_classic_max_min_rates() {
        // Link A (1 GB/s) then link B (2 GB/s); flow 0 crosses both, 1 only A, 2 only B.
        let mut network = Network::new(Topology::chain(&[link("a", 1e9), link("b", 2e9)]));
        network.start_flow(0, 0, 2, 500_000_000, 0).unwrap();
        network.start_flow(0, 0, 1, 500_000_000, 1).unwrap();
        network.start_flow(0, 1, 2, 1_500_000_000, 2).unwrap();
        assert_close(rate(&network, 0), 0.5e9);
        assert_close(rate(&network, 1), 0.5e9);
        assert_close(rate(&network, 2), 1.5e9);
        // Sized to end together at 1 s.
        assert_eq!(
            drain(&mut network),
            [(NS_PER_S, 0), (NS_PER_S, 1), (NS_PER_S, 2)]
        );
    }

    #[test]
    fn a_flow_starting_midway_slows_the_first() {
        let mut network = star(2);
        let mut done = Vec::new();
        network.start_flow(0, 0, 1, 1_000_000_000, 1).unwrap();
        assert_eq!(network.next_completion_ns(), Some(NS_PER_S));
        network.advance(NS_PER_S / 2, &mut done);
        assert!(done.is_empty());
        network
            .start_flow(NS_PER_S / 2, 0, 1, 250_000_000, 2)
            .unwrap();
        assert_close(rate(&network, 1), 0.5e9);
        // The newcomer ends at 1 s; the first has 0.25 GB left at full rate: 1.25 s.
        assert_eq!(drain(&mut network), [(NS_PER_S, 2), (1_250_000_000, 1)]);
    }

    #[test]
    fn a_late_advance_takes_each_completion_in_turn() {
        let mut stepped = star(2);
        let mut late = star(2);
        for network in [&mut stepped, &mut late] {
            network.start_flow(0, 0, 1, 500_000_000, 1).unwrap();
            network.start_flow(0, 0, 1, 1_000_000_000, 2).unwrap();
        }
        let stepped_order: Vec<u64> = drain(&mut stepped).into_iter().map(|(_, t)| t).collect();
        let mut done = Vec::new();
        late.advance(10 * NS_PER_S, &mut done);
        assert_eq!(done, stepped_order);
        assert_eq!(late.next_completion_ns(), None);
    }

    #[test]
    fn completion_order_is_deterministic_by_time_then_tag() {
        let run = || {
            let mut network = star(3);
            for (i, tag) in [9_u64, 4, 6, 1, 8].into_iter().enumerate() {
                let bytes = if i % 2 == 0 { 300_000_000 } else { 600_000_000 };
                network.start_flow(0, i as u32 % 2, 2, bytes, tag).unwrap();
            }
            drain(&mut network)
        };
        let first = run();
        assert_eq!(first, run());
        let tags: Vec<u64> = first.iter().map(|&(_, tag)| tag).collect();
        // Equal shares on gpu2's downlink: the three small flows end together, then the two big.
        assert_eq!(tags, [6, 8, 9, 1, 4]);
        assert!(first.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn completions_never_stall_or_go_back() {
        let mut network = star(2);
        // Rates that do not divide the sizes: every finish is rounded up, never repeated.
        network.start_flow(0, 0, 1, 1, 1).unwrap();
        network.start_flow(0, 0, 1, 333_333_333, 2).unwrap();
        network.start_flow(0, 0, 1, 777_777_777, 3).unwrap();
        let finished = drain(&mut network);
        assert_eq!(finished.len(), 3);
        assert!(finished[0].0 >= 1);
        assert!(finished.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn edge_stats_count_bytes_and_busy_time() {
        let mut network = star(2);
        network.start_flow(0, 0, 1, 1_000_000_000, 1).unwrap();
        network.advance(NS_PER_S / 4, &mut Vec::new());
        let under_way = network.edge_stats();
        let up = under_way.iter().find(|s| s.from == "gpu0").unwrap();
        assert_eq!((up.bytes, up.busy_ns), (250_000_000, NS_PER_S / 4));
        drain(&mut network);
        let stats = network.edge_stats();
        assert_eq!(stats.len(), 4);
        let up = stats.iter().find(|s| s.from == "gpu0").unwrap();
        assert_eq!((up.to.as_str(), up.link.as_str()), ("spine", "fabric"));
        assert_eq!((up.bytes, up.busy_ns), (1_000_000_000, NS_PER_S));
        let idle = stats.iter().find(|s| s.from == "gpu1").unwrap();
        assert_eq!((idle.bytes, idle.busy_ns), (0, 0));
    }

    #[test]
    fn start_flow_returns_the_route_and_rejects_bad_requests() {
        let mut network = star(2);
        let path = network.start_flow(0, 0, 1, 10, 1).unwrap();
        assert_eq!(path.latency_ns(), 2_000);
        assert_eq!(path.link().name, "fabric");
        assert_eq!(
            network.start_flow(0, 0, 1, 0, 2).unwrap_err(),
            NetworkError::ZeroBytes
        );
        assert_eq!(
            network.start_flow(0, 0, 5, 1, 2).unwrap_err(),
            NetworkError::UnknownEndpoint {
                endpoint: 5,
                endpoints: 2
            }
        );
        assert_eq!(
            network.start_flow(0, 1, 1, 1, 2).unwrap_err(),
            NetworkError::SameEndpoint(1)
        );
        let completion_ns = network.next_completion_ns().unwrap();
        assert_eq!(
            network.start_flow(completion_ns, 0, 1, 1, 2).unwrap_err(),
            NetworkError::NotAdvanced {
                now_ns: completion_ns,
                completion_ns
            }
        );
        network.advance(completion_ns, &mut Vec::new());
        assert_eq!(
            network.start_flow(0, 0, 1, 1, 2).unwrap_err(),
            NetworkError::TimeWentBack {
                now_ns: 0,
                network_ns: completion_ns
            }
        );
        let broken = Topology::cluster(2, 1, &link("broken", 0.0), None);
        let err = Network::new(broken).start_flow(0, 0, 1, 1, 1).unwrap_err();
        assert!(
            matches!(&err, NetworkError::InvalidLink { link, reason }
                if link == "broken" && reason.starts_with("bandwidth_gbit_per_s")),
            "{err}"
        );
    }

    /// Checks the rates are feasible and max-min fair: every flow crosses a saturated edge on
    /// which no flow is faster.
    fn assert_max_min_fair(network: &Network) {
        let edges = network.capacity_bytes_per_s.len();
        let mut load = vec![0.0; edges];
        let mut fastest = vec![0.0_f64; edges];
        for flow in &network.flows {
            assert!(flow.rate_bytes_per_s > 0.0);
            for &e in flow.path.edges() {
                load[e as usize] += flow.rate_bytes_per_s;
                fastest[e as usize] = fastest[e as usize].max(flow.rate_bytes_per_s);
            }
        }
        for (e, &capacity) in network.capacity_bytes_per_s.iter().enumerate() {
            assert!(load[e] <= capacity * (1.0 + 1e-9), "edge {e} over capacity");
        }
        for flow in &network.flows {
            let bottlenecked = flow.path.edges().iter().any(|&e| {
                let e = e as usize;
                load[e] >= network.capacity_bytes_per_s[e] * (1.0 - 1e-9)
                    && flow.rate_bytes_per_s >= fastest[e] * (1.0 - 1e-9)
            });
            assert!(bottlenecked, "flow {} has no bottleneck", flow.tag);
        }
    }

    fn link_strategy(name: &'static str) -> impl Strategy<Value = LinkSpec> {
        (1.0..1000.0_f64, 0.05..=1.0_f64, 0..10_000_u64).prop_map(move |(gbit, eff, lat)| {
            LinkSpec {
                bandwidth_gbit_per_s: gbit,
                efficiency: eff,
                latency_ns: lat,
                ..link(name, 1.0)
            }
        })
    }

    /// (start time, source seed, hop seed, bytes) of one random flow.
    type Start = (Nanos, u32, u32, u64);

    fn starts_strategy() -> impl Strategy<Value = Vec<Start>> {
        proptest::collection::vec(
            (
                0..1_000_000_000_u64,
                any::<u32>(),
                any::<u32>(),
                1..2_000_000_000_u64,
            ),
            1..40,
        )
    }

    /// Runs the flows to the end as an event loop would, checking fairness after every change,
    /// strictly later completions, and that every flow finishes with its bytes on its edges.
    fn replay(mut network: Network, mut starts: Vec<Start>) -> Result<(), TestCaseError> {
        let endpoints = network.topology().endpoints();
        starts.sort_by_key(|s| s.0);
        let mut expected_edge_bytes = vec![0_u64; network.capacity_bytes_per_s.len()];
        let mut done = Vec::new();
        let mut last_completion = 0;
        let mut complete = |network: &mut Network, at: Nanos| -> Result<(), TestCaseError> {
            prop_assert!(at > last_completion);
            last_completion = at;
            let first = done.len();
            network.advance(at, &mut done);
            prop_assert!(done.len() > first);
            prop_assert!(done[first..].is_sorted());
            assert_max_min_fair(network);
            Ok(())
        };
        for (tag, &(at, src, hop, bytes)) in starts.iter().enumerate() {
            let src = src % endpoints;
            let dst = (src + 1 + hop % (endpoints - 1)) % endpoints;
            while let Some(next) = network.next_completion_ns().filter(|&n| n <= at) {
                complete(&mut network, next)?;
            }
            network.advance(at, &mut Vec::new());
            let path = network.start_flow(at, src, dst, bytes, tag as u64).unwrap();
            for &e in path.edges() {
                expected_edge_bytes[e as usize] += bytes;
            }
            assert_max_min_fair(&network);
        }
        while let Some(next) = network.next_completion_ns() {
            complete(&mut network, next)?;
        }
        done.sort_unstable();
        let all: Vec<u64> = (0..starts.len() as u64).collect();
        prop_assert_eq!(done, all);
        let carried: Vec<u64> = network.edge_stats().iter().map(|s| s.bytes).collect();
        prop_assert_eq!(carried, expected_edge_bytes);
        Ok(())
    }

    proptest! {
        #[test]
        fn random_flows_on_random_clusters_share_fairly_and_all_finish(
            hosts in 1..4_u32,
            gpus_per_host in 1..5_u32,
            fabric in link_strategy("fabric"),
            intra in proptest::option::of(link_strategy("intra")),
            starts in starts_strategy(),
        ) {
            prop_assume!(hosts * gpus_per_host >= 2);
            let topology = Topology::cluster(hosts, gpus_per_host, &fabric, intra.as_ref());
            replay(Network::new(topology), starts)?;
        }

        #[test]
        fn random_flows_on_chains_of_mixed_links_share_fairly_and_all_finish(
            links in proptest::collection::vec(link_strategy("hop"), 1..5),
            starts in starts_strategy(),
        ) {
            replay(Network::new(Topology::chain(&links)), starts)?;
        }
    }
}
