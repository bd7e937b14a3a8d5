//! Lays simulated runs beside real runs of the same workload: a case names a cluster, a model,
//! a transport, a calibration profile and a workload; both sides are derived from it, run,
//! and compared metric by metric with the error of the prediction.

pub mod case;
pub mod compare;
pub mod overall;
pub mod parts;
pub mod repeats;
pub mod reprice;
pub mod run;
pub mod steps;
pub mod svg;

pub use hw;
pub use sim;
