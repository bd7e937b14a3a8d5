//! Run metrics shared by the simulator and the real system: per-request records, percentiles,
//! the run summary (latency, goodput, transfer overhead, prefix reuse, utilisation) and the CSV
//! schema both halves write, so simulated and measured runs read the same way.

pub mod percentile;
pub mod record;
pub mod summary;
pub mod tables;

pub use percentile::{Percentiles, TokenGaps, percentile, weighted_percentile};
pub use record::{OPTIONAL_REQUEST_FIELDS, Outcome, REQUEST_FIELDS, RequestRecord, UnknownOutcome};
pub use summary::{Scalar, Slo, Summary, WorkerStats, summarize};
pub use tables::{
    MetricsError, WORKER_FIELDS, read_requests_csv, write_requests_csv, write_summary_csv,
    write_workers_csv,
};
