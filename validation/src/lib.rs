//! Lays simulated runs beside real runs of the same workload.

pub use hw;
pub use sim;
