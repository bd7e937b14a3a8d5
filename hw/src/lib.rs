//! The real backend. It imports the simulator's domain (KV block manager, routing, workload,
//! metrics) so that the served system and the simulated one run the same bookkeeping.

pub mod bench_model;
pub mod engine;
pub mod fetch;
pub mod frontend;
pub mod loadgen;
pub mod paged;
pub mod transport;

pub use models;
pub use sim;
