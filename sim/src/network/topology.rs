//! The cluster as a directed graph of GPUs and switches, and its cached shortest routes.

use std::collections::HashMap;
use std::fmt;
use std::ops::Add;
use std::sync::Arc;

use petgraph::Direction;
use petgraph::algo::dijkstra;
use petgraph::graph::{DiGraph, EdgeIndex, NodeIndex};
use petgraph::visit::EdgeRef;

use super::link::LinkSpec;
use crate::time::Nanos;

/// One GPU (a worker's device), dense `0..endpoints`.
pub type EndpointId = u32;

/// One directed edge of a topology, dense `0..edge_count`.
pub type EdgeId = u32;

/// A vertex of the graph: GPUs come first, so a GPU's node index is its endpoint id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Node {
    Gpu(EndpointId),
    HostSwitch(u32),
    Spine,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Gpu(id) => write!(f, "gpu{id}"),
            Node::HostSwitch(host) => write!(f, "host{host}"),
            Node::Spine => f.write_str("spine"),
        }
    }
}

/// One direction of a full-duplex cable.
#[derive(Clone, Debug)]
pub(super) struct Edge {
    pub(super) link: Arc<LinkSpec>,
    pub(super) latency_ns: Nanos,
}

/// A route between two endpoints. Cloning shares it (one reference count), so flows can hold it.
#[derive(Clone, Debug)]
pub struct PathInfo(Arc<Route>);

#[derive(Debug)]
struct Route {
    edges: Box<[EdgeId]>,
    latency_ns: Nanos,
    link: Arc<LinkSpec>,
}

impl PathInfo {
    /// The directed edges crossed, in order.
    pub fn edges(&self) -> &[EdgeId] {
        &self.0.edges
    }

    /// Sum of the edges' latencies: the fixed one-way delay of the route.
    pub fn latency_ns(&self) -> Nanos {
        self.0.latency_ns
    }

    /// The first hop's link, whose endpoint costs (setup, staging, serialization) a transfer pays.
    pub fn link(&self) -> &LinkSpec {
        &self.0.link
    }
}

/// Route cost: latency first, then hop count, so equal-latency routes prefer fewer switches.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
struct Cost {
    latency_ns: Nanos,
    hops: u32,
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost {
            latency_ns: self.latency_ns.saturating_add(other.latency_ns),
            hops: self.hops.saturating_add(other.hops),
        }
    }
}

/// GPUs, switches and the cables between them, each cable two directed edges of full rate.
#[derive(Clone, Debug)]
pub struct Topology {
    graph: DiGraph<Node, Edge>,
    endpoints: u32,
    paths: HashMap<(EndpointId, EndpointId), Option<PathInfo>>,
}

impl Topology {
    /// `hosts` hosts of `gpus_per_host` GPUs each. Every GPU has its own NIC on `fabric` to one
    /// spine switch (as DGX H100/H200: one NIC per GPU; a DGX Spark has one GPU per host);
    /// GPUs of one host also join a host switch over `intra` (NVLink) when given and the host
    /// has more than one GPU. Endpoint ids: host h, gpu g -> h * gpus_per_host + g.
    pub fn cluster(
        hosts: u32,
        gpus_per_host: u32,
        fabric: &LinkSpec,
        intra: Option<&LinkSpec>,
    ) -> Self {
        let endpoints = hosts.saturating_mul(gpus_per_host);
        let mut graph = DiGraph::new();
        for id in 0..endpoints {
            graph.add_node(Node::Gpu(id));
        }
        let spine = graph.add_node(Node::Spine);
        let fabric = Arc::new(fabric.clone());
        for id in 0..endpoints {
            Self::cable(&mut graph, NodeIndex::new(id as usize), spine, &fabric);
        }
        if let Some(intra) = intra.filter(|_| gpus_per_host > 1) {
            let intra = Arc::new(intra.clone());
            for host in 0..hosts {
                let switch = graph.add_node(Node::HostSwitch(host));
                for gpu in 0..gpus_per_host {
                    let id = host * gpus_per_host + gpu;
                    Self::cable(&mut graph, NodeIndex::new(id as usize), switch, &intra);
                }
            }
        }
        Topology {
            graph,
            endpoints,
            paths: HashMap::new(),
        }
    }

    /// A full-duplex cable from a GPU to a switch. The two directions split the link's latency
    /// so that GPU -> switch -> GPU costs exactly `latency_ns`.
    fn cable(
        graph: &mut DiGraph<Node, Edge>,
        gpu: NodeIndex,
        switch: NodeIndex,
        link: &Arc<LinkSpec>,
    ) {
        let up_ns = link.latency_ns / 2;
        let down_ns = link.latency_ns - up_ns;
        let edge = |latency_ns| Edge {
            link: Arc::clone(link),
            latency_ns,
        };
        graph.add_edge(gpu, switch, edge(up_ns));
        graph.add_edge(switch, gpu, edge(down_ns));
    }

    pub fn endpoints(&self) -> u32 {
        self.endpoints
    }

    pub(super) fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    pub(super) fn edge(&self, id: EdgeId) -> &Edge {
        &self.graph[EdgeIndex::new(id as usize)]
    }

    /// The two vertices of an edge, in its direction.
    pub(super) fn edge_nodes(&self, id: EdgeId) -> (Node, Node) {
        let edge = &self.graph.raw_edges()[id as usize];
        (self.graph[edge.source()], self.graph[edge.target()])
    }

    /// The route between two distinct endpoints: the directed edges it crosses, its total
    /// latency and the link whose endpoint costs the transfer pays (the first hop's spec).
    /// Lowest latency, then fewest hops, ties broken by the lowest edge id at each step back
    /// from the destination; cached after first use. None for unknown or equal endpoints.
    pub fn path(&mut self, src: EndpointId, dst: EndpointId) -> Option<PathInfo> {
        if src == dst || src >= self.endpoints || dst >= self.endpoints {
            return None;
        }
        if let Some(cached) = self.paths.get(&(src, dst)) {
            return cached.clone();
        }
        let route = self.route(src, dst);
        self.paths.insert((src, dst), route.clone());
        route
    }

    fn route(&self, src: EndpointId, dst: EndpointId) -> Option<PathInfo> {
        let cost = |e: &Edge| Cost {
            latency_ns: e.latency_ns,
            hops: 1,
        };
        let start = NodeIndex::new(src as usize);
        let goal = NodeIndex::new(dst as usize);
        // Every node on a best route to the goal costs strictly less than the goal (hops > 0),
        // so it is settled before the search stops and its score is exact.
        let scores = dijkstra(&self.graph, start, Some(goal), |e| cost(e.weight()));
        let mut node = goal;
        let mut edges = Vec::new();
        while node != start {
            let here = *scores.get(&node)?;
            let step = self
                .graph
                .edges_directed(node, Direction::Incoming)
                .filter(|e| {
                    scores
                        .get(&e.source())
                        .is_some_and(|&s| s + cost(e.weight()) == here)
                })
                .min_by_key(|e| e.id())?;
            edges.push(step.id().index() as EdgeId);
            node = step.source();
        }
        edges.reverse();
        let latency_ns = edges
            .iter()
            .map(|&e| self.edge(e).latency_ns)
            .fold(0, Nanos::saturating_add);
        let link = Arc::clone(&self.edge(*edges.first()?).link);
        Some(PathInfo(Arc::new(Route {
            edges: edges.into_boxed_slice(),
            latency_ns,
            link,
        })))
    }
}

#[cfg(test)]
impl Topology {
    /// GPUs in a line, cable i joining gpu i and gpu i + 1 over `links[i]`: routes that cross
    /// links of different rates, which a cluster never has.
    pub(super) fn chain(links: &[LinkSpec]) -> Self {
        let mut graph = DiGraph::new();
        for id in 0..=links.len() as EndpointId {
            graph.add_node(Node::Gpu(id));
        }
        for (i, link) in links.iter().enumerate() {
            let link = Arc::new(link.clone());
            Self::cable(&mut graph, NodeIndex::new(i), NodeIndex::new(i + 1), &link);
        }
        Topology {
            graph,
            endpoints: links.len() as u32 + 1,
            paths: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(topology: &Topology, path: &PathInfo) -> Vec<String> {
        let mut names = vec![topology.edge_nodes(path.edges()[0]).0.to_string()];
        for &e in path.edges() {
            names.push(topology.edge_nodes(e).1.to_string());
        }
        names
    }

    #[test]
    fn two_hosts_of_four_gpus_route_inside_over_nvlink_and_across_over_the_fabric() {
        let fabric = LinkSpec::preset("rdma-200g").unwrap();
        let nvlink = LinkSpec::preset("nvlink").unwrap();
        let mut topology = Topology::cluster(2, 4, &fabric, Some(&nvlink));
        assert_eq!(topology.endpoints(), 8);
        // 8 fabric cables and 8 NVLink cables, two directions each.
        assert_eq!(topology.edge_count(), 32);

        let inside = topology.path(1, 3).unwrap();
        assert_eq!(nodes(&topology, &inside), ["gpu1", "host0", "gpu3"]);
        assert_eq!(inside.latency_ns(), nvlink.latency_ns);
        assert_eq!(inside.link().name, "nvlink");

        let across = topology.path(2, 5).unwrap();
        assert_eq!(nodes(&topology, &across), ["gpu2", "spine", "gpu5"]);
        assert_eq!(across.latency_ns(), fabric.latency_ns);
        assert_eq!(across.link().name, "rdma-200g");

        // The reverse route crosses the other direction of each cable.
        let back = topology.path(5, 2).unwrap();
        assert_eq!(nodes(&topology, &back), ["gpu5", "spine", "gpu2"]);
        assert!(back.edges().iter().all(|e| !across.edges().contains(e)));
    }

    #[test]
    fn odd_latencies_sum_exactly_and_slow_intra_links_are_bypassed() {
        let mut fabric = LinkSpec::preset("tcp-10g").unwrap();
        fabric.latency_ns = 1_001;
        let mut slow = LinkSpec::preset("nvlink").unwrap();
        slow.latency_ns = 5_000;
        let mut topology = Topology::cluster(1, 2, &fabric, Some(&slow));
        let path = topology.path(0, 1).unwrap();
        assert_eq!(nodes(&topology, &path), ["gpu0", "spine", "gpu1"]);
        assert_eq!(path.latency_ns(), 1_001);
    }

    #[test]
    fn equal_latency_routes_take_the_lowest_edge_ids() {
        let fabric = LinkSpec::preset("rdma-100g").unwrap();
        let same = LinkSpec {
            name: "same".into(),
            ..fabric.clone()
        };
        let mut topology = Topology::cluster(1, 2, &fabric, Some(&same));
        let path = topology.path(0, 1).unwrap();
        // Fabric cables were added first, so the spine wins the tie.
        assert_eq!(nodes(&topology, &path), ["gpu0", "spine", "gpu1"]);
        assert_eq!(topology.path(0, 1).unwrap().edges(), path.edges());
    }

    #[test]
    fn bad_endpoints_have_no_route() {
        let fabric = LinkSpec::preset("tcp-100g").unwrap();
        let mut topology = Topology::cluster(2, 1, &fabric, None);
        assert!(topology.path(0, 0).is_none());
        assert!(topology.path(0, 2).is_none());
        assert_eq!(topology.path(0, 1).unwrap().edges().len(), 2);
        let mut empty = Topology::cluster(0, 8, &fabric, None);
        assert_eq!(empty.endpoints(), 0);
        assert!(empty.path(0, 1).is_none());
    }
}
