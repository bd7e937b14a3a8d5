//! The network: link specifications, the cluster topology and the flows that share it.
//!
//! A transfer costs fixed delays (endpoint work, route latency) plus its share of the wire; the
//! flows here model only that share, max-min fair across every directed edge they cross.

pub mod flows;
pub mod link;
pub mod topology;

pub use flows::{EdgeStats, Network, NetworkError};
pub use link::{LinkKind, LinkSpec};
pub use topology::{EdgeId, EndpointId, PathInfo, Topology};
