//! One request's life, as the simulator and the real load generator record it.

use serde::{Deserialize, Serialize};

/// How a request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Completed,
    Rejected,
}

impl Outcome {
    /// The name the CSV schema uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An outcome name that is not "completed" or "rejected".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown outcome `{0}`, expected `completed` or `rejected`")]
pub struct UnknownOutcome(pub String);

impl std::str::FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "completed" => Ok(Outcome::Completed),
            "rejected" => Ok(Outcome::Rejected),
            _ => Err(UnknownOutcome(s.to_owned())),
        }
    }
}

/// One request's life. Times are absolute ns since the run's start; a stage a request did not
/// go through keeps 0 (transfer times on an aggregated worker; every stage of a rejected
/// request). Workers are ids, `None` when not applicable (an empty CSV cell).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: u64,
    pub conversation_id: u64,
    /// 0-based turn within the conversation.
    pub turn: u32,
    pub outcome: Outcome,
    /// Why a request was rejected ("queue_full", "prompt_too_long", ...). An empty reason reads
    /// back from CSV as `None`.
    pub reject_reason: Option<String>,
    pub prefill_worker: Option<u32>,
    pub decode_worker: Option<u32>,
    /// The whole prompt, history included.
    pub prompt_tokens: u32,
    /// The prompt's prefix carried over from earlier turns; 0 on turn 0.
    pub history_tokens: u32,
    /// Prompt tokens the prefilling worker found in its prefix cache.
    pub cached_tokens: u32,
    pub output_tokens: u32,
    pub arrival_ns: u64,
    pub routed_ns: u64,
    pub prefill_start_ns: u64,
    pub prefill_end_ns: u64,
    pub transfer_start_ns: u64,
    pub transfer_end_ns: u64,
    pub transfer_bytes: u64,
    /// The decode worker's copy of the landed KV into its cache, between two of its steps
    /// (0 where no KV moved, or in a CSV written before these columns).
    #[serde(default)]
    pub import_start_ns: u64,
    #[serde(default)]
    pub import_end_ns: u64,
    pub first_token_ns: u64,
    pub end_ns: u64,
    pub preemptions: u32,
}

/// The CSV header of [`RequestRecord`]: its field names in declaration order.
pub const REQUEST_FIELDS: [&str; 23] = [
    "request_id",
    "conversation_id",
    "turn",
    "outcome",
    "reject_reason",
    "prefill_worker",
    "decode_worker",
    "prompt_tokens",
    "history_tokens",
    "cached_tokens",
    "output_tokens",
    "arrival_ns",
    "routed_ns",
    "prefill_start_ns",
    "prefill_end_ns",
    "transfer_start_ns",
    "transfer_end_ns",
    "transfer_bytes",
    "import_start_ns",
    "import_end_ns",
    "first_token_ns",
    "end_ns",
    "preemptions",
];

/// Columns a requests CSV may lack (written before they existed): they read as 0.
pub const OPTIONAL_REQUEST_FIELDS: [&str; 2] = ["import_start_ns", "import_end_ns"];

// Durations saturate at 0, so a stage left at 0 (a rejected request) never underflows.
impl RequestRecord {
    pub fn is_completed(&self) -> bool {
        self.outcome == Outcome::Completed
    }

    /// Time to first token: arrival to first token.
    pub fn ttft_ns(&self) -> u64 {
        self.first_token_ns.saturating_sub(self.arrival_ns)
    }

    /// End-to-end latency: arrival to last token.
    pub fn e2e_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.arrival_ns)
    }

    /// Mean time per output token after the first; `None` below two output tokens, where no
    /// gap exists.
    pub fn tpot_ns(&self) -> Option<u64> {
        let gaps = self.output_tokens.checked_sub(1).filter(|&g| g > 0)?;
        Some(self.end_ns.saturating_sub(self.first_token_ns) / u64::from(gaps))
    }

    /// The decode worker's import of the transferred KV.
    pub fn import_ns(&self) -> u64 {
        self.import_end_ns.saturating_sub(self.import_start_ns)
    }

    /// Time the KV cache spent in flight between prefill and decode workers.
    pub fn transfer_ns(&self) -> u64 {
        self.transfer_end_ns.saturating_sub(self.transfer_start_ns)
    }

    /// Arrival to prefill start: routing plus queueing.
    pub fn queue_ns(&self) -> u64 {
        self.prefill_start_ns.saturating_sub(self.arrival_ns)
    }

    /// The turn reused its conversation's history from a prefix cache: `cached_tokens` covers
    /// every full block of the history's KV. The history's last token (the previous answer's
    /// last) never had its KV computed, so the blocks that count are those of the first
    /// `history_tokens - 1` tokens, and there must be at least one. A block size of 0 is read
    /// as token granularity.
    pub fn history_hit(&self, block_size_tokens: u32) -> bool {
        let with_kv = self.history_tokens.saturating_sub(1);
        let full_tokens = match with_kv.checked_div(block_size_tokens) {
            Some(blocks) => blocks * block_size_tokens,
            None => with_kv,
        };
        full_tokens > 0 && self.cached_tokens >= full_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RequestRecord {
        RequestRecord {
            output_tokens: 11,
            arrival_ns: 1_000,
            routed_ns: 1_500,
            prefill_start_ns: 3_000,
            prefill_end_ns: 10_000,
            transfer_start_ns: 10_000,
            transfer_end_ns: 12_500,
            first_token_ns: 13_000,
            end_ns: 23_000,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn outcome_names_match_serde() {
        for outcome in [Outcome::Completed, Outcome::Rejected] {
            let mut out = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(Vec::new());
            out.serialize(outcome).unwrap();
            let text = String::from_utf8(out.into_inner().unwrap()).unwrap();
            assert_eq!(text.trim_end(), outcome.to_string());
            assert_eq!(outcome.as_str().parse::<Outcome>(), Ok(outcome));
        }
        assert_eq!(
            "done".parse::<Outcome>(),
            Err(UnknownOutcome("done".into()))
        );
    }

    #[test]
    fn durations() {
        let r = record();
        assert_eq!(r.ttft_ns(), 12_000);
        assert_eq!(r.e2e_ns(), 22_000);
        assert_eq!(r.tpot_ns(), Some(1_000));
        assert_eq!(r.transfer_ns(), 2_500);
        assert_eq!(r.queue_ns(), 2_000);
    }

    #[test]
    fn tpot_needs_two_tokens() {
        let mut r = record();
        r.output_tokens = 1;
        assert_eq!(r.tpot_ns(), None);
        r.output_tokens = 0;
        assert_eq!(r.tpot_ns(), None);
        r.output_tokens = 2;
        assert_eq!(r.tpot_ns(), Some(10_000));
    }

    #[test]
    fn rejected_stages_at_zero_do_not_underflow() {
        let r = RequestRecord {
            outcome: Outcome::Rejected,
            arrival_ns: 5_000,
            output_tokens: 100,
            ..RequestRecord::default()
        };
        assert!(!r.is_completed());
        assert_eq!(r.ttft_ns(), 0);
        assert_eq!(r.e2e_ns(), 0);
        assert_eq!(r.queue_ns(), 0);
        assert_eq!(r.tpot_ns(), Some(0));
    }

    #[test]
    fn history_hit_covers_full_blocks() {
        let mut r = RequestRecord {
            turn: 1,
            prompt_tokens: 120,
            history_tokens: 100,
            cached_tokens: 96,
            ..RequestRecord::default()
        };
        assert!(r.history_hit(16), "96 covers the six full blocks of 100");
        r.cached_tokens = 95;
        assert!(!r.history_hit(16));
        r.cached_tokens = 112;
        assert!(r.history_hit(16));
        r.cached_tokens = 98;
        assert!(!r.history_hit(0), "token granularity needs the 99 with KV");
        r.cached_tokens = 99;
        assert!(r.history_hit(0));
        r.history_tokens = 97;
        r.cached_tokens = 96;
        assert!(r.history_hit(16), "the 97th token's KV does not exist yet");
        r.history_tokens = 17;
        r.cached_tokens = 0;
        assert!(!r.history_hit(16));
        r.history_tokens = 10;
        assert!(!r.history_hit(16), "no full block: nothing to reuse");
        r.history_tokens = 0;
        assert!(!r.history_hit(16));
        assert!(!r.history_hit(0));
    }
}
