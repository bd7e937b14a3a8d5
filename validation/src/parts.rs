//! Time to first token by part, measured against predicted: where a request's first token
//! spent its time (waiting for an engine, prefilling, moving its KV, reaching the client), so
//! that a miss in TTFT names the part of the model that misses.

use crate::compare::median;
use sim::metrics::RequestRecord;

/// The parts, in the order a request goes through them.
pub const PARTS: [&str; 7] = [
    "wait",
    "prefill",
    "transfer",
    "to import",
    "import",
    "delivery",
    "TTFT",
];

/// One part's median, in ms, over completed requests (`None` where no request has the part).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub part: &'static str,
    pub predicted_ms: Option<f64>,
    pub measured_ms: Option<f64>,
}

/// A request's parts in ns: from arrival to its prefill's first step (wait), through its last
/// prefill step (prefill), the KV's arrival after that where it moved (transfer), the decode
/// worker's start of its import (to import: the prefill's reply and the decode worker's
/// running step), the import, and the first token reaching the client (delivery: the
/// serving path's way back, from the import or, where none was recorded, the prefill).
fn parts_ns(r: &RequestRecord) -> [Option<u64>; PARTS.len()] {
    let moved = r.transfer_bytes > 0;
    let imported = moved && r.import_end_ns > 0;
    let ready = if imported {
        r.import_end_ns
    } else {
        r.prefill_end_ns.max(r.transfer_end_ns)
    };
    [
        Some(r.prefill_start_ns.saturating_sub(r.arrival_ns)),
        Some(r.prefill_end_ns.saturating_sub(r.prefill_start_ns)),
        moved.then(|| r.transfer_end_ns.saturating_sub(r.prefill_end_ns)),
        imported.then(|| r.import_start_ns.saturating_sub(r.transfer_end_ns)),
        imported.then(|| r.import_ns()),
        Some(r.first_token_ns.saturating_sub(ready)),
        Some(r.ttft_ns()),
    ]
}

fn medians_ms(records: &[RequestRecord]) -> [Option<f64>; PARTS.len()] {
    let mut values: [Vec<f64>; PARTS.len()] = Default::default();
    for r in records
        .iter()
        .filter(|r| r.is_completed() && r.prefill_end_ns > 0)
    {
        for (v, part) in values.iter_mut().zip(parts_ns(r)) {
            v.extend(part.map(|ns| ns as f64 / 1e6));
        }
    }
    values.map(|v| median(&v))
}

/// The median of each part, predicted and measured.
pub fn compare(predicted: &[RequestRecord], measured: &[RequestRecord]) -> Vec<Part> {
    let (p, m) = (medians_ms(predicted), medians_ms(measured));
    PARTS
        .iter()
        .zip(p.into_iter().zip(m))
        .filter(|(_, (p, m))| p.is_some() || m.is_some())
        .map(|(&part, (predicted_ms, measured_ms))| Part {
            part,
            predicted_ms,
            measured_ms,
        })
        .collect()
}

/// A markdown table of the parts.
pub fn table(parts: &[Part]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
    let mut out = String::from(
        "| part of TTFT (median) | predicted | measured | difference |\n|---|---:|---:|---:|\n",
    );
    for p in parts {
        let difference = match (p.predicted_ms, p.measured_ms) {
            (Some(a), Some(b)) => format!("{:+.2} ms", a - b),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {difference} |\n",
            p.part,
            ms(p.predicted_ms),
            ms(p.measured_ms)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(arrival: u64, start: u64, end: u64, landed: u64, first: u64) -> RequestRecord {
        RequestRecord {
            arrival_ns: arrival,
            prefill_start_ns: start,
            prefill_end_ns: end,
            transfer_start_ns: if landed > 0 { end } else { 0 },
            transfer_end_ns: landed,
            transfer_bytes: if landed > 0 { 1 } else { 0 },
            first_token_ns: first,
            end_ns: first + 1,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn parts_add_up_to_the_ttft_and_a_missing_part_is_left_out() {
        let measured = vec![
            record(0, 1_000_000, 4_000_000, 6_000_000, 7_000_000),
            record(10, 2_000_010, 5_000_010, 9_000_010, 9_500_010),
            record(20, 3_000_020, 6_000_020, 7_000_020, 10_000_020),
        ];
        let predicted = vec![record(0, 0, 2_000_000, 0, 2_000_000)];
        let parts = compare(&predicted, &measured);
        let get = |name: &str| parts.iter().find(|p| p.part == name).unwrap().clone();
        assert_eq!(get("wait").measured_ms, Some(2.0));
        assert_eq!(get("prefill").measured_ms, Some(3.0));
        assert_eq!(get("transfer").measured_ms, Some(2.0));
        assert_eq!(get("transfer").predicted_ms, None);
        assert_eq!(get("delivery").measured_ms, Some(1.0));
        assert_eq!(get("TTFT").measured_ms, Some(9.5));
        assert_eq!(get("TTFT").predicted_ms, Some(2.0));
        let text = table(&parts);
        assert!(text.contains("| transfer | - | 2.00 ms | - |"), "{text}");
        assert!(
            text.contains("| TTFT | 2.00 ms | 9.50 ms | -7.50 ms |"),
            "{text}"
        );
        // Aggregated on both sides: no transfer row at all.
        let none = compare(&predicted, &predicted);
        assert!(none.iter().all(|p| p.part != "transfer"));
        assert!(none.iter().all(|p| p.part != "import"));
    }

    #[test]
    fn an_import_splits_the_way_from_the_landing_to_the_client() {
        let mut r = record(0, 1_000_000, 4_000_000, 6_000_000, 9_000_000);
        (r.import_start_ns, r.import_end_ns) = (6_500_000, 8_000_000);
        let parts = compare(&[r.clone()], &[r]);
        let got: Vec<_> = parts.iter().map(|p| (p.part, p.measured_ms)).collect();
        assert_eq!(
            got,
            [
                ("wait", Some(1.0)),
                ("prefill", Some(3.0)),
                ("transfer", Some(2.0)),
                ("to import", Some(0.5)),
                ("import", Some(1.5)),
                ("delivery", Some(1.0)),
                ("TTFT", Some(9.0)),
            ]
        );
    }
}
