//! The summary table printed after a run: one column per setup, the seed document's rows
//! first, then latency percentiles, throughput and utilisation.

use crate::metrics::{Percentiles, Summary};

/// One row: a label and a cell per setup.
struct Row {
    label: String,
    cells: Vec<String>,
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn percentile_rows(
    rows: &mut Vec<Row>,
    name: &str,
    runs: &[(&str, &Summary)],
    get: fn(&Summary) -> Percentiles,
) {
    for (label, pick) in [
        ("p50", (|p: &Percentiles| p.p50) as fn(&Percentiles) -> f64),
        ("p90", |p: &Percentiles| p.p90),
        ("p99", |p: &Percentiles| p.p99),
    ] {
        rows.push(Row {
            label: format!("{name} {label}"),
            cells: runs.iter().map(|(_, s)| ms(pick(&get(s)))).collect(),
        });
    }
}

/// Renders the table for `runs` (setup name, summary), setups as columns.
pub fn table(runs: &[(&str, &Summary)]) -> String {
    let mut rows: Vec<Row> = Vec::new();
    let row = |label: &str, cell: &dyn Fn(&Summary) -> String| Row {
        label: label.to_string(),
        cells: runs.iter().map(|(_, s)| cell(s)).collect(),
    };
    let mut seed = vec![
        row("Latency (cache miss)", &|s| {
            s.latency_miss_ms.map_or("-".to_string(), ms)
        }),
        row("Latency (cache hit)", &|s| {
            s.latency_hit_ms.map_or("-".to_string(), ms)
        }),
        row("Transfer overhead", &|s| pct(s.transfer_overhead_share)),
        row("Cache hit rate", &|s| pct(s.request_hit_rate)),
        row("Avg latency (workload)", &|s| ms(s.mean_latency_ms)),
    ];
    let mut detail = vec![
        row("Prefix hit rate (tokens)", &|s| pct(s.prefix_hit_rate)),
        row("Mean KV transfer", &|s| ms(s.mean_transfer_ms)),
        row("KV bytes per request", &|s| {
            format!("{:.2} MB", s.transfer_bytes_per_request / 1e6)
        }),
    ];
    rows.append(&mut seed);
    rows.push(Row {
        label: String::new(),
        cells: vec![String::new(); runs.len()],
    });
    rows.append(&mut detail);
    percentile_rows(&mut rows, "TTFT", runs, |s| s.ttft_ms);
    percentile_rows(&mut rows, "ITL", runs, |s| s.itl_ms);
    percentile_rows(&mut rows, "TPOT", runs, |s| s.tpot_ms);
    percentile_rows(&mut rows, "E2E", runs, |s| s.e2e_ms);
    let row = |label: &str, cell: &dyn Fn(&Summary) -> String| Row {
        label: label.to_string(),
        cells: runs.iter().map(|(_, s)| cell(s)).collect(),
    };
    let mut tail = vec![
        row("Throughput", &|s| {
            format!("{:.2} req/s", s.throughput_req_per_s)
        }),
        row("Output tokens", &|s| {
            format!("{:.0} tok/s", s.output_tokens_per_s)
        }),
        row("Goodput (SLO)", &|s| {
            format!(
                "{:.2} req/s ({})",
                s.goodput_req_per_s,
                pct(s.slo_attainment)
            )
        }),
        row("Completed / rejected", &|s| {
            format!("{} / {}", s.completed, s.rejected)
        }),
        row("Preemptions", &|s| s.preemptions.to_string()),
    ];
    rows.append(&mut tail);
    let mut roles: Vec<&str> = runs
        .iter()
        .flat_map(|(_, s)| s.utilisation.iter().map(|(role, _)| role.as_str()))
        .collect();
    roles.sort_unstable();
    roles.dedup();
    for role in roles {
        rows.push(Row {
            label: format!("Utilisation ({role})"),
            cells: runs
                .iter()
                .map(|(_, s)| {
                    s.utilisation
                        .iter()
                        .find(|(r, _)| r == role)
                        .map_or("-".to_string(), |(_, u)| pct(*u))
                })
                .collect(),
        });
    }
    render(runs, &rows)
}

fn render(runs: &[(&str, &Summary)], rows: &[Row]) -> String {
    let label_width = rows.iter().map(|r| r.label.len()).max().unwrap_or(0).max(6);
    let widths: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            rows.iter()
                .map(|r| r.cells[i].len())
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, label: &str, cells: &mut dyn Iterator<Item = &str>| {
        out.push_str(&format!("{label:<label_width$}"));
        for (cell, width) in cells.zip(&widths) {
            out.push_str(&format!(" | {cell:>width$}"));
        }
        out.push('\n');
    };
    line(&mut out, "Metric", &mut runs.iter().map(|(name, _)| *name));
    let rule: usize = label_width + widths.iter().map(|w| w + 3).sum::<usize>();
    out.push_str(&"-".repeat(rule));
    out.push('\n');
    for row in rows {
        line(
            &mut out,
            &row.label,
            &mut row.cells.iter().map(String::as_str),
        );
    }
    out
}
