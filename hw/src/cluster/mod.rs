//! The disaggregated cluster: worker processes (prefill, decode, aggregated), the registry
//! they join, and the frontend's backend that routes requests to them. `serve` starts a whole
//! cluster on one machine from a cluster file.

pub mod backend;
pub mod config;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod serve;
pub mod worker;

pub use backend::{ClusterBackend, ClusterOptions};
pub use config::{Cluster, ClusterConfig, WorkerConfig};
pub use registry::{EmbeddedRegistry, Registry};
