//! The step trace: one CSV row per engine step with its work (in the simulator's terms,
//! `sim::cost::StepWork`) and its times, so that a real run's step times can be laid beside
//! what a cost model predicts for the same work.

use serde::{Deserialize, Serialize};
use sim::cost::StepWork;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

/// One step. Times are ns since the UNIX epoch on the host's clock, so that the traces of a
/// host's workers, and what a client there did meanwhile, line up; `end_ns` is when the step's
/// tokens were handed on (sampling, detokenization and KV hand-off included).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    pub start_ns: u64,
    pub forward_ns: u64,
    pub end_ns: u64,
    pub decode_seqs: u32,
    pub decode_context_tokens: u64,
    pub prefill_seqs: u32,
    pub prefill_tokens: u64,
    pub prefill_attention_pairs: f64,
    pub prefill_kv_read_tokens: u64,
}

impl StepRow {
    pub fn work(&self) -> StepWork {
        StepWork {
            prefill_seqs: self.prefill_seqs,
            prefill_tokens: self.prefill_tokens,
            prefill_attention_pairs: self.prefill_attention_pairs,
            prefill_kv_read_tokens: self.prefill_kv_read_tokens,
            decode_seqs: self.decode_seqs,
            decode_context_tokens: self.decode_context_tokens,
        }
    }
}

/// Writes rows as steps end; each row is flushed, since a worker is usually stopped by a
/// signal.
pub struct StepTrace {
    out: csv::Writer<BufWriter<File>>,
    /// The same moment on the monotonic clock and as ns since the UNIX epoch: steps are timed
    /// on the former and written on the latter.
    origin: Instant,
    origin_epoch_ns: u64,
}

impl StepTrace {
    pub fn create(path: &Path) -> std::io::Result<StepTrace> {
        let file = File::create(path)?;
        Ok(StepTrace {
            out: csv::Writer::from_writer(BufWriter::new(file)),
            origin: Instant::now(),
            origin_epoch_ns: epoch_ns(),
        })
    }

    /// `at` as ns since the UNIX epoch.
    pub fn epoch_ns(&self, at: Instant) -> u64 {
        self.origin_epoch_ns + at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Records a step; a failed write ends the trace rather than the worker.
    pub fn record(&mut self, row: &StepRow) -> bool {
        self.out.serialize(row).is_ok() && self.out.flush().is_ok()
    }
}

/// Now, as ns since the UNIX epoch (0 on a clock set before it).
pub fn epoch_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Reads a step trace.
pub fn read(path: &Path) -> Result<Vec<StepRow>, String> {
    let mut reader =
        csv::Reader::from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    reader
        .deserialize()
        .enumerate()
        .map(|(i, row)| row.map_err(|e| format!("{}: row {}: {e}", path.display(), i + 1)))
        .collect()
}
