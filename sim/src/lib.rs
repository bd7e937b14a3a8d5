//! The shared domain of disaggregated LLM serving (KV blocks, routing, workload, metrics,
//! configuration) and a deterministic discrete-event simulator built on it.
//!
//! The real backend (`hw`) imports these modules, so a simulated eviction is the eviction that
//! happens and a property test of the router tests the router that serves.

pub mod calibration;
pub mod config;
pub mod cost;
pub mod engine;
pub mod hardware;
pub mod kv;
pub mod metrics;
pub mod network;
pub mod report;
pub mod rng;
pub mod routing;
pub mod sharing;
pub mod time;
pub mod workload;
