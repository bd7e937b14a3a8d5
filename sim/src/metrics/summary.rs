//! The run summary: latency distributions, throughput, goodput under an SLO, KV transfer
//! overhead, prefix reuse and per-role utilisation. Every ratio with an empty denominator is 0
//! (or `None` where the spec says so), so no NaN reaches an output.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::percentile::{Percentiles, TokenGaps};
use super::record::RequestRecord;
use crate::time::{ns_to_ms, ns_to_secs};

/// A latency target; goodput counts completed requests that meet both bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tpot_ms: f64,
}

impl Slo {
    /// Both bounds must be positive and finite; an error is (field path, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [("slo.ttft_ms", self.ttft_ms), ("slo.tpot_ms", self.tpot_ms)] {
            if !(value.is_finite() && value > 0.0) {
                return Err((field, format!("must be a positive number, got {value}")));
            }
        }
        Ok(())
    }

    /// Whether a completed request met the SLO. A request with fewer than two output tokens
    /// has no TPOT and is judged on TTFT alone.
    pub fn is_met_by(&self, record: &RequestRecord) -> bool {
        ns_to_ms(record.ttft_ns()) <= self.ttft_ms
            && record
                .tpot_ns()
                .is_none_or(|tpot| ns_to_ms(tpot) <= self.tpot_ms)
    }
}

/// Time a worker spent computing, for utilisation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerStats {
    pub worker: u32,
    /// "prefill", "decode" or "aggregated".
    pub role: String,
    pub busy_ns: u64,
    pub steps: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub peak_used_blocks: u32,
    pub capacity_blocks: u32,
}

/// What a run came to. Latency distributions and the ratios below are over completed
/// requests unless a field says otherwise.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub completed: u64,
    pub rejected: u64,
    /// First arrival (of any request) to last completion; 0 when nothing completed.
    pub duration_s: f64,
    pub throughput_req_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    /// Inter-token latency, over every gap between consecutive tokens of a request.
    pub itl_ms: Percentiles,
    /// Per-request mean time per output token (requests with at least two output tokens).
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub goodput_req_per_s: f64,
    /// Share of completed requests meeting the SLO.
    pub slo_attainment: f64,
    /// Sum of transfer time over sum of end-to-end latency.
    pub transfer_overhead_share: f64,
    /// Mean transfer time of the requests that had a KV transfer (0 when none did).
    pub mean_transfer_ms: f64,
    /// Transfer bytes over completed requests.
    pub transfer_bytes_per_request: f64,
    /// Sum of cached tokens over sum of prompt tokens (token-weighted).
    pub prefix_hit_rate: f64,
    /// Share of follow-up turns (turn > 0) that reused their history from a prefix cache.
    pub history_hit_rate: f64,
    /// Share of all completed requests that reused their history (turn 0 never does).
    pub request_hit_rate: f64,
    /// Mean end-to-end latency of follow-up turns that did not reuse their history (`None` if
    /// none). First turns have no history to find, so they count in neither this nor the next.
    pub latency_miss_ms: Option<f64>,
    /// Mean end-to-end latency of follow-up turns that did (`None` if none).
    pub latency_hit_ms: Option<f64>,
    pub mean_latency_ms: f64,
    /// Per role, sorted by role name: mean over its workers of busy time over `duration_s`.
    pub utilisation: Vec<(String, f64)>,
    /// Preemptions over all requests.
    pub preemptions: u64,
}

/// `num / den`, or 0 when `den` is 0.
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 { 0.0 } else { num / den }
}

/// Sum and count of end-to-end latencies, for a mean.
#[derive(Default)]
struct Mean {
    sum_ns: u128,
    n: u64,
}

impl Mean {
    fn add(&mut self, ns: u64) {
        self.sum_ns += u128::from(ns);
        self.n += 1;
    }

    fn ms(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum_ns as f64 / self.n as f64 / 1e6)
    }
}

/// Summarises one run. `gaps` holds the inter-token gaps the decode steps recorded;
/// `block_size_tokens` decides what counts as a history hit ([`RequestRecord::history_hit`]).
pub fn summarize(
    records: &[RequestRecord],
    gaps: &TokenGaps,
    workers: &[WorkerStats],
    slo: &Slo,
    block_size_tokens: u32,
) -> Summary {
    let mut completed = 0u64;
    let mut last_end_ns = None;
    let mut output_tokens = 0u64;
    let mut good = 0u64;
    let mut transfer_sum_ns = 0u128;
    let mut transfers = 0u64;
    let mut transfer_bytes = 0u128;
    let mut cached_tokens = 0u64;
    let mut prompt_tokens = 0u64;
    let mut follow_ups = 0u64;
    let mut follow_up_hits = 0u64;
    let (mut hit, mut miss, mut all) = (Mean::default(), Mean::default(), Mean::default());
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut e2e = Vec::new();

    for r in records.iter().filter(|r| r.is_completed()) {
        completed += 1;
        last_end_ns = last_end_ns.max(Some(r.end_ns));
        output_tokens += u64::from(r.output_tokens);
        good += u64::from(slo.is_met_by(r));
        if r.transfer_end_ns > 0 {
            transfers += 1;
            transfer_sum_ns += u128::from(r.transfer_ns());
        }
        transfer_bytes += u128::from(r.transfer_bytes);
        cached_tokens += u64::from(r.cached_tokens);
        prompt_tokens += u64::from(r.prompt_tokens);
        let is_hit = r.history_hit(block_size_tokens);
        let e2e_ns = r.e2e_ns();
        if r.turn > 0 {
            follow_ups += 1;
            follow_up_hits += u64::from(is_hit);
            if is_hit { &mut hit } else { &mut miss }.add(e2e_ns);
        }
        all.add(e2e_ns);
        ttft.push(r.ttft_ns());
        tpot.extend(r.tpot_ns());
        e2e.push(e2e_ns);
    }
    ttft.sort_unstable();
    tpot.sort_unstable();
    e2e.sort_unstable();

    let first_arrival_ns = records.iter().map(|r| r.arrival_ns).min();
    let duration_ns = match (first_arrival_ns, last_end_ns) {
        (Some(start), Some(end)) => end.saturating_sub(start),
        _ => 0,
    };
    let duration_s = ns_to_secs(duration_ns);

    Summary {
        requests: records.len() as u64,
        completed,
        rejected: records.len() as u64 - completed,
        duration_s,
        throughput_req_per_s: ratio(completed as f64, duration_s),
        output_tokens_per_s: ratio(output_tokens as f64, duration_s),
        ttft_ms: Percentiles::of_sorted_ns(&ttft),
        itl_ms: gaps.percentiles(),
        tpot_ms: Percentiles::of_sorted_ns(&tpot),
        e2e_ms: Percentiles::of_sorted_ns(&e2e),
        goodput_req_per_s: ratio(good as f64, duration_s),
        slo_attainment: ratio(good as f64, completed as f64),
        transfer_overhead_share: ratio(transfer_sum_ns as f64, all.sum_ns as f64),
        mean_transfer_ms: ratio(transfer_sum_ns as f64, transfers as f64) / 1e6,
        transfer_bytes_per_request: ratio(transfer_bytes as f64, completed as f64),
        prefix_hit_rate: ratio(cached_tokens as f64, prompt_tokens as f64),
        history_hit_rate: ratio(follow_up_hits as f64, follow_ups as f64),
        request_hit_rate: ratio(hit.n as f64, completed as f64),
        latency_miss_ms: miss.ms(),
        latency_hit_ms: hit.ms(),
        mean_latency_ms: all.ms().unwrap_or(0.0),
        utilisation: utilisation(workers, duration_ns),
        preemptions: records.iter().map(|r| u64::from(r.preemptions)).sum(),
    }
}

/// Mean busy share per role, sorted by role name (a BTreeMap, so no hash order leaks).
fn utilisation(workers: &[WorkerStats], duration_ns: u64) -> Vec<(String, f64)> {
    let mut by_role: BTreeMap<&str, (u128, u64)> = BTreeMap::new();
    for w in workers {
        let (busy_ns, n) = by_role.entry(w.role.as_str()).or_default();
        *busy_ns += u128::from(w.busy_ns);
        *n += 1;
    }
    by_role
        .into_iter()
        .map(|(role, (busy_ns, n))| {
            let share = ratio(busy_ns as f64, n as f64 * duration_ns as f64);
            (role.to_owned(), share)
        })
        .collect()
}

/// One scalar of a summary, as the long-format CSV writes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Count(u64),
    Real(f64),
    /// An undefined value (an empty cell).
    Missing,
}

/// Counts print as integers, reals with Rust's shortest round-trip `{}` (deterministic),
/// missing values as nothing.
impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Count(n) => write!(f, "{n}"),
            Scalar::Real(x) => write!(f, "{x}"),
            Scalar::Missing => Ok(()),
        }
    }
}

impl Summary {
    /// Every scalar of the summary, named, in a fixed order: percentiles as `ttft_ms_p50` and
    /// so on, utilisation as `utilisation_<role>` in role order.
    pub fn scalars(&self) -> Vec<(String, Scalar)> {
        use Scalar::{Count, Real};
        let opt = |x: Option<f64>| x.map_or(Scalar::Missing, Real);
        let mut out: Vec<(String, Scalar)> = vec![
            ("requests".into(), Count(self.requests)),
            ("completed".into(), Count(self.completed)),
            ("rejected".into(), Count(self.rejected)),
            ("duration_s".into(), Real(self.duration_s)),
            (
                "throughput_req_per_s".into(),
                Real(self.throughput_req_per_s),
            ),
            ("output_tokens_per_s".into(), Real(self.output_tokens_per_s)),
        ];
        for (name, p) in [
            ("ttft_ms", &self.ttft_ms),
            ("itl_ms", &self.itl_ms),
            ("tpot_ms", &self.tpot_ms),
            ("e2e_ms", &self.e2e_ms),
        ] {
            for (stat, value) in [
                ("mean", p.mean),
                ("p50", p.p50),
                ("p90", p.p90),
                ("p99", p.p99),
                ("max", p.max),
            ] {
                out.push((format!("{name}_{stat}"), Real(value)));
            }
        }
        out.extend([
            ("goodput_req_per_s".into(), Real(self.goodput_req_per_s)),
            ("slo_attainment".into(), Real(self.slo_attainment)),
            (
                "transfer_overhead_share".into(),
                Real(self.transfer_overhead_share),
            ),
            ("mean_transfer_ms".into(), Real(self.mean_transfer_ms)),
            (
                "transfer_bytes_per_request".into(),
                Real(self.transfer_bytes_per_request),
            ),
            ("prefix_hit_rate".into(), Real(self.prefix_hit_rate)),
            ("history_hit_rate".into(), Real(self.history_hit_rate)),
            ("request_hit_rate".into(), Real(self.request_hit_rate)),
            ("latency_miss_ms".into(), opt(self.latency_miss_ms)),
            ("latency_hit_ms".into(), opt(self.latency_hit_ms)),
            ("mean_latency_ms".into(), Real(self.mean_latency_ms)),
        ]);
        out.extend(
            self.utilisation
                .iter()
                .map(|(role, share)| (format!("utilisation_{role}"), Real(*share))),
        );
        out.push(("preemptions".into(), Count(self.preemptions)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::record::Outcome;

    const MS: u64 = 1_000_000;

    fn slo() -> Slo {
        Slo {
            ttft_ms: 100.0,
            tpot_ms: 10.0,
        }
    }

    /// A completed request arriving at `arrival_ms` with the given TTFT, output length and
    /// TPOT (all in ms), transferring for `transfer_ms` just before its first token.
    fn completed(arrival_ms: u64, ttft_ms: u64, output_tokens: u32, tpot_ms: u64) -> RequestRecord {
        let arrival_ns = arrival_ms * MS;
        let first_token_ns = arrival_ns + ttft_ms * MS;
        RequestRecord {
            output_tokens,
            prompt_tokens: 100,
            arrival_ns,
            routed_ns: arrival_ns,
            prefill_start_ns: arrival_ns,
            prefill_end_ns: first_token_ns,
            first_token_ns,
            end_ns: first_token_ns + u64::from(output_tokens.saturating_sub(1)) * tpot_ms * MS,
            ..RequestRecord::default()
        }
    }

    fn with_transfer(mut r: RequestRecord, transfer_ms: u64, bytes: u64) -> RequestRecord {
        r.transfer_end_ns = r.first_token_ns;
        r.transfer_start_ns = r.first_token_ns - transfer_ms * MS;
        r.transfer_bytes = bytes;
        r
    }

    fn rejected(arrival_ms: u64) -> RequestRecord {
        RequestRecord {
            outcome: Outcome::Rejected,
            reject_reason: Some("queue_full".into()),
            prompt_tokens: 5_000,
            output_tokens: 50,
            arrival_ns: arrival_ms * MS,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn latency_throughput_and_goodput() {
        let mut first = completed(0, 50, 11, 5); // ends 100 ms; meets the SLO
        first.cached_tokens = 50;
        let records = vec![
            first,
            completed(100, 150, 11, 5), // TTFT misses
            completed(200, 80, 21, 20), // TPOT misses; ends 680 ms
            completed(300, 90, 1, 0),   // no TPOT; meets on TTFT
            rejected(400),
        ];
        let mut gaps = TokenGaps::default();
        gaps.add(5 * MS, 20);
        gaps.add(20 * MS, 20);
        let s = summarize(&records, &gaps, &[], &slo(), 16);

        assert_eq!((s.requests, s.completed, s.rejected), (5, 4, 1));
        assert_eq!(s.duration_s, 0.68);
        assert_eq!(s.throughput_req_per_s, 4.0 / 0.68);
        assert_eq!(s.output_tokens_per_s, 44.0 / 0.68);
        assert_eq!(s.ttft_ms.p50, 80.0);
        assert_eq!(s.ttft_ms.max, 150.0);
        assert_eq!(s.ttft_ms.mean, 92.5);
        assert_eq!(s.tpot_ms.p50, 5.0);
        assert_eq!(s.tpot_ms.max, 20.0);
        assert_eq!(s.tpot_ms.mean, 10.0);
        assert_eq!(s.itl_ms.p50, 5.0);
        assert_eq!(s.itl_ms.p90, 20.0);
        assert_eq!(s.itl_ms.mean, 12.5);
        assert_eq!(s.e2e_ms.max, 480.0);
        assert_eq!(s.mean_latency_ms, (100.0 + 200.0 + 480.0 + 90.0) / 4.0);
        assert_eq!(s.slo_attainment, 0.5);
        assert_eq!(s.goodput_req_per_s, 2.0 / 0.68);
        assert_eq!(
            s.prefix_hit_rate,
            50.0 / 400.0,
            "rejected prompts do not count"
        );
    }

    #[test]
    fn slo_bounds_are_inclusive_and_nan_meets_nothing() {
        let r = completed(0, 100, 11, 10);
        assert!(slo().is_met_by(&r));
        let strict = Slo {
            ttft_ms: f64::NAN,
            tpot_ms: 10.0,
        };
        assert!(!strict.is_met_by(&r));
    }

    #[test]
    fn transfer_share_mean_and_bytes() {
        let records = vec![
            with_transfer(completed(0, 50, 11, 5), 10, 1_000), // e2e 100
            with_transfer(completed(0, 50, 11, 5), 30, 3_000), // e2e 100
            completed(0, 100, 1, 0),                           // aggregated, e2e 100
            rejected(0),
        ];
        let s = summarize(&records, &TokenGaps::default(), &[], &slo(), 16);
        assert_eq!(s.transfer_overhead_share, 40.0 / 300.0);
        assert_eq!(s.mean_transfer_ms, 20.0, "over requests that transferred");
        assert_eq!(s.transfer_bytes_per_request, 4_000.0 / 3.0);
    }

    #[test]
    fn prefix_and_history_hits() {
        let turn = |turn: u32, history: u32, cached: u32, e2e_ms: u64| {
            let mut r = completed(0, e2e_ms, 1, 0);
            r.turn = turn;
            r.prompt_tokens = history + 50;
            r.history_tokens = history;
            r.cached_tokens = cached;
            r
        };
        let records = vec![
            turn(0, 0, 0, 100),    // first turn: never a hit
            turn(0, 0, 32, 90),    // shared system prompt cached, still no history
            turn(1, 100, 96, 40),  // hit: six full blocks cached
            turn(2, 200, 192, 60), // hit: twelve full blocks cached
            turn(1, 100, 64, 110), // miss: partial reuse
        ];
        let s = summarize(&records, &TokenGaps::default(), &[], &slo(), 16);
        assert_eq!(s.prefix_hit_rate, (32.0 + 96.0 + 192.0 + 64.0) / 650.0);
        assert_eq!(s.history_hit_rate, 2.0 / 3.0);
        assert_eq!(s.request_hit_rate, 2.0 / 5.0);
        assert_eq!(s.latency_hit_ms, Some(50.0));
        assert_eq!(s.latency_miss_ms, Some(110.0), "follow-up turns only");
        assert_eq!(s.mean_latency_ms, 80.0);
    }

    #[test]
    fn utilisation_per_role_sorted() {
        let worker = |worker: u32, role: &str, busy_ms: u64| WorkerStats {
            worker,
            role: role.into(),
            busy_ns: busy_ms * MS,
            steps: 1,
            prefill_tokens: 0,
            decode_tokens: 0,
            peak_used_blocks: 0,
            capacity_blocks: 100,
        };
        let records = vec![completed(0, 100, 101, 9)]; // ends at 1,000 ms
        let workers = vec![
            worker(0, "prefill", 500),
            worker(1, "decode", 900),
            worker(2, "prefill", 300),
            worker(3, "decode", 700),
        ];
        let s = summarize(&records, &TokenGaps::default(), &workers, &slo(), 16);
        assert_eq!(s.duration_s, 1.0);
        assert_eq!(
            s.utilisation,
            vec![("decode".to_string(), 0.8), ("prefill".to_string(), 0.4)]
        );
        assert_eq!(s.preemptions, 0);
    }

    #[test]
    fn empty_run_is_all_zero_without_nan() {
        let workers = vec![WorkerStats {
            worker: 0,
            role: "aggregated".into(),
            busy_ns: 0,
            steps: 0,
            prefill_tokens: 0,
            decode_tokens: 0,
            peak_used_blocks: 0,
            capacity_blocks: 0,
        }];
        for records in [vec![], vec![rejected(5), rejected(9)]] {
            let s = summarize(&records, &TokenGaps::default(), &workers, &slo(), 16);
            assert_eq!(s.completed, 0);
            assert_eq!(s.rejected, records.len() as u64);
            assert_eq!(s.duration_s, 0.0);
            assert_eq!(s.ttft_ms, Percentiles::default());
            assert_eq!(s.latency_hit_ms, None);
            assert_eq!(s.latency_miss_ms, None);
            assert_eq!(s.utilisation, vec![("aggregated".to_string(), 0.0)]);
            for (name, value) in s.scalars() {
                if let Scalar::Real(x) = value {
                    assert!(x.is_finite() && x == 0.0, "{name} = {x}");
                }
            }
        }
    }

    #[test]
    fn preemptions_sum_and_scalar_names() {
        let mut a = completed(0, 10, 2, 1);
        a.preemptions = 2;
        let mut b = completed(0, 10, 2, 1);
        b.preemptions = 3;
        let s = summarize(&[a, b], &TokenGaps::default(), &[], &slo(), 16);
        assert_eq!(s.preemptions, 5);
        let scalars = s.scalars();
        let names: Vec<&str> = scalars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["requests", "completed", "rejected"]);
        assert!(names.contains(&"ttft_ms_p50") && names.contains(&"e2e_ms_max"));
        assert_eq!(names.last(), Some(&"preemptions"));
        assert_eq!(Scalar::Count(5).to_string(), "5");
        assert_eq!(Scalar::Real(0.5).to_string(), "0.5");
        assert_eq!(Scalar::Real(2.0).to_string(), "2");
        assert_eq!(Scalar::Missing.to_string(), "");
    }
}
