//! Serving metrics in Prometheus' text exposition format (version 0.0.4), written by hand: a
//! few histograms, counters and gauges do not need a metrics crate.
//!
//! The frontend records TTFT, ITL, requests by status and (from each finished request's serve
//! trace) prefix-cache lookups itself; the cluster records KV transfers and queue depths
//! through the same shared [`Metrics`] handle.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token buckets.
pub const TTFT_BUCKETS_S: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the inter-token-latency buckets.
pub const ITL_BUCKETS_S: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
];

/// A cumulative histogram over fixed upper bounds.
#[derive(Clone, Debug)]
struct Histogram {
    bounds_s: &'static [f64],
    /// `counts[i]` observations fell in `(bounds_s[i-1], bounds_s[i]]`; the last slot is +Inf.
    counts: Vec<u64>,
    sum_s: f64,
}

impl Histogram {
    fn new(bounds_s: &'static [f64]) -> Histogram {
        Histogram {
            bounds_s,
            counts: vec![0; bounds_s.len() + 1],
            sum_s: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        let slot = self
            .bounds_s
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds_s.len());
        self.counts[slot] += 1;
        self.sum_s += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds_s.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total: u64 = self.counts.iter().sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_s);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[derive(Debug)]
struct State {
    ttft: Histogram,
    itl: Histogram,
    /// (route, status) -> count; a BTreeMap so the exposition order is stable.
    requests: BTreeMap<(String, u16), u64>,
    tokens_generated: u64,
    kv_transfers: u64,
    kv_transfer_bytes: u64,
    kv_transfer_s: f64,
    prefix_hit_tokens: u64,
    decode_prefix_hit_tokens: u64,
    prefix_lookup_tokens: u64,
    queue_depth: BTreeMap<String, u64>,
}

/// The shared metrics handle (`Arc<Metrics>` between the frontend and the cluster).
#[derive(Debug)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            state: Mutex::new(State {
                ttft: Histogram::new(&TTFT_BUCKETS_S),
                itl: Histogram::new(&ITL_BUCKETS_S),
                requests: BTreeMap::new(),
                tokens_generated: 0,
                kv_transfers: 0,
                kv_transfer_bytes: 0,
                kv_transfer_s: 0.0,
                prefix_hit_tokens: 0,
                decode_prefix_hit_tokens: 0,
                prefix_lookup_tokens: 0,
                queue_depth: BTreeMap::new(),
            }),
        }
    }

    /// A poisoned lock only means a panic elsewhere mid-update of plain counters; keep serving.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time from a request's arrival to its first generated token.
    pub fn observe_ttft(&self, ttft: Duration) {
        self.state().ttft.observe(ttft.as_secs_f64());
    }

    /// Time between two consecutive tokens of one request.
    pub fn observe_itl(&self, itl: Duration) {
        self.state().itl.observe(itl.as_secs_f64());
    }

    /// Counts generated tokens (the first of each request is not an ITL sample).
    pub fn add_tokens_generated(&self, tokens: u64) {
        self.state().tokens_generated += tokens;
    }

    /// One answered HTTP request; `route` is a fixed label such as `/v1/completions`.
    pub fn record_request(&self, route: &str, status: u16) {
        *self
            .state()
            .requests
            .entry((route.to_owned(), status))
            .or_default() += 1;
    }

    /// One KV transfer between workers: its payload and how long it took.
    pub fn record_kv_transfer(&self, payload_bytes: u64, elapsed: Duration) {
        let mut s = self.state();
        s.kv_transfers += 1;
        s.kv_transfer_bytes += payload_bytes;
        s.kv_transfer_s += elapsed.as_secs_f64();
    }

    /// One request's prefix-cache lookups: how many of the prompt's tokens were already cached
    /// on the worker that prefilled it, and on the worker that decoded it (whose KV therefore
    /// did not cross the link). The frontend records it for every finished request from the
    /// serve trace, so a backend must not record it too. The hit ratio gauges are cumulative
    /// hits over lookups.
    pub fn record_prefix_lookup(
        &self,
        hit_tokens: u64,
        decode_hit_tokens: u64,
        prompt_tokens: u64,
    ) {
        let mut s = self.state();
        s.prefix_hit_tokens += hit_tokens.min(prompt_tokens);
        s.decode_prefix_hit_tokens += decode_hit_tokens.min(prompt_tokens);
        s.prefix_lookup_tokens += prompt_tokens;
    }

    /// The number of requests waiting at `worker` now.
    pub fn set_queue_depth(&self, worker: &str, depth: u64) {
        self.state().queue_depth.insert(worker.to_owned(), depth);
    }

    /// The exposition text served at `GET /metrics`.
    pub fn render(&self) -> String {
        let s = self.state();
        let mut out = String::new();
        s.ttft.write(
            &mut out,
            "disagg_ttft_seconds",
            "Time from request arrival to the first generated token.",
        );
        s.itl.write(
            &mut out,
            "disagg_itl_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        header(
            &mut out,
            "disagg_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
        );
        for ((route, status), count) in &s.requests {
            let _ = writeln!(
                out,
                "disagg_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                escape_label(route)
            );
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, value: String| {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        scalar(
            &mut out,
            "disagg_tokens_generated_total",
            "counter",
            "Tokens generated.",
            s.tokens_generated.to_string(),
        );
        scalar(
            &mut out,
            "disagg_kv_transfers_total",
            "counter",
            "KV transfers between workers.",
            s.kv_transfers.to_string(),
        );
        scalar(
            &mut out,
            "disagg_kv_transfer_bytes_total",
            "counter",
            "KV payload bytes transferred between workers.",
            s.kv_transfer_bytes.to_string(),
        );
        scalar(
            &mut out,
            "disagg_kv_transfer_seconds_total",
            "counter",
            "Seconds spent transferring KV between workers.",
            s.kv_transfer_s.to_string(),
        );
        scalar(
            &mut out,
            "disagg_prefix_hit_tokens_total",
            "counter",
            "Prompt tokens found in a worker's prefix cache.",
            s.prefix_hit_tokens.to_string(),
        );
        scalar(
            &mut out,
            "disagg_prefix_lookup_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix caches.",
            s.prefix_lookup_tokens.to_string(),
        );
        let ratio = |hits: u64| {
            if s.prefix_lookup_tokens == 0 {
                0.0
            } else {
                hits as f64 / s.prefix_lookup_tokens as f64
            }
        };
        scalar(
            &mut out,
            "disagg_prefix_hit_ratio",
            "gauge",
            "Cached prompt tokens over looked-up prompt tokens, since start.",
            ratio(s.prefix_hit_tokens).to_string(),
        );
        scalar(
            &mut out,
            "disagg_decode_prefix_hit_tokens_total",
            "counter",
            "Prompt tokens the decode worker already held, so their KV was not transferred.",
            s.decode_prefix_hit_tokens.to_string(),
        );
        scalar(
            &mut out,
            "disagg_decode_prefix_hit_ratio",
            "gauge",
            "Prompt tokens held by the decode worker over looked-up prompt tokens, since start.",
            ratio(s.decode_prefix_hit_tokens).to_string(),
        );
        header(
            &mut out,
            "disagg_queue_depth",
            "gauge",
            "Requests waiting at each worker.",
        );
        for (worker, depth) in &s.queue_depth {
            let _ = writeln!(
                out,
                "disagg_queue_depth{{worker=\"{}\"}} {depth}",
                escape_label(worker)
            );
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample line of the exposition format, parsed back.
#[cfg(test)]
pub(crate) struct Sample {
    pub name: String,
    /// In the order written.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses one sample line, or `None` when it breaks the line format.
#[cfg(test)]
pub(crate) fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            let mut chars = body.chars().peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                if chars.next()? != '"' {
                    return None;
                }
                let mut val = String::new();
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            'n' => val.push('\n'),
                            c => val.push(c),
                        },
                        c => val.push(c),
                    }
                }
                labels.push((key, val));
                if chars.peek() == Some(&',') {
                    chars.next();
                }
            }
            (name, labels)
        }
    };
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    valid_name.then(|| Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("bad sample line: {l}")))
            .collect()
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        samples(text)
            .into_iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|((k, v), (k2, v2))| k == k2 && v == v2)
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .value
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.observe_ttft(Duration::from_millis(3));
        m.observe_ttft(Duration::from_millis(70));
        m.observe_ttft(Duration::from_secs(60));
        let text = m.render();
        assert_eq!(
            value(&text, "disagg_ttft_seconds_bucket", &[("le", "0.005")]),
            1.0
        );
        assert_eq!(
            value(&text, "disagg_ttft_seconds_bucket", &[("le", "0.05")]),
            1.0
        );
        assert_eq!(
            value(&text, "disagg_ttft_seconds_bucket", &[("le", "0.1")]),
            2.0
        );
        assert_eq!(
            value(&text, "disagg_ttft_seconds_bucket", &[("le", "30")]),
            2.0
        );
        assert_eq!(
            value(&text, "disagg_ttft_seconds_bucket", &[("le", "+Inf")]),
            3.0
        );
        assert_eq!(value(&text, "disagg_ttft_seconds_count", &[]), 3.0);
        assert!((value(&text, "disagg_ttft_seconds_sum", &[]) - 60.073).abs() < 1e-9);
        assert_eq!(value(&text, "disagg_itl_seconds_count", &[]), 0.0);
    }

    #[test]
    fn cluster_side_metrics_render() {
        let m = Metrics::new();
        m.record_kv_transfer(1000, Duration::from_millis(2));
        m.record_kv_transfer(500, Duration::from_millis(1));
        m.record_prefix_lookup(30, 10, 40);
        m.record_prefix_lookup(0, 20, 60);
        m.set_queue_depth("decode-0", 3);
        m.set_queue_depth("w\"1", 0);
        m.set_queue_depth("decode-0", 5);
        m.record_request("/v1/completions", 200);
        m.record_request("/v1/completions", 200);
        m.record_request("/v1/completions", 429);
        let text = m.render();
        assert_eq!(value(&text, "disagg_kv_transfers_total", &[]), 2.0);
        assert_eq!(value(&text, "disagg_kv_transfer_bytes_total", &[]), 1500.0);
        assert!((value(&text, "disagg_kv_transfer_seconds_total", &[]) - 0.003).abs() < 1e-12);
        assert!((value(&text, "disagg_prefix_hit_ratio", &[]) - 0.3).abs() < 1e-12);
        assert!((value(&text, "disagg_decode_prefix_hit_ratio", &[]) - 0.3).abs() < 1e-12);
        assert_eq!(
            value(&text, "disagg_queue_depth", &[("worker", "decode-0")]),
            5.0
        );
        assert_eq!(
            value(&text, "disagg_queue_depth", &[("worker", "w\"1")]),
            0.0
        );
        let route = ("route", "/v1/completions");
        assert_eq!(
            value(&text, "disagg_requests_total", &[route, ("status", "200")]),
            2.0
        );
        assert_eq!(
            value(&text, "disagg_requests_total", &[route, ("status", "429")]),
            1.0
        );
        // Every family is declared once, before its samples.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.dedup();
        assert_eq!(types, unique);
    }
}
