//! Predicted beside measured: one row per metric with the relative error of the prediction.

use sim::metrics::{Percentiles, Summary};

/// How a row's values read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Ms,
    ReqPerS,
    /// A share in [0, 1], shown as a percentage.
    Share,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::ReqPerS => "req/s",
            Unit::Share => "share",
        }
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Ms => format!("{value:.1} ms"),
            Unit::ReqPerS => format!("{value:.3} req/s"),
            Unit::Share => format!("{:.1}%", value * 100.0),
        }
    }
}

/// One metric on both sides.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub metric: String,
    pub unit: Unit,
    pub predicted: f64,
    pub measured: f64,
}

impl Row {
    /// (predicted - measured) / measured, in percent: positive when the simulator predicts
    /// too much. 0 when both are 0; `None` when only the measurement is 0 (no relative error
    /// exists).
    pub fn error_pct(&self) -> Option<f64> {
        relative_error_pct(self.predicted, self.measured)
    }
}

pub fn relative_error_pct(predicted: f64, measured: f64) -> Option<f64> {
    if measured == 0.0 {
        (predicted == 0.0).then_some(0.0)
    } else {
        Some((predicted - measured) / measured * 100.0)
    }
}

/// The metrics the validation goal is judged on: p50 and p90 of TTFT, ITL and E2E.
pub const GOAL_METRICS: [&str; 6] = [
    "TTFT p50", "ITL p50", "E2E p50", "TTFT p90", "ITL p90", "E2E p90",
];

/// The goal: median |error| over cases of each p50 metric at most this, in percent ...
pub const GOAL_P50_PCT: f64 = 5.0;
/// ... and of each p90 metric at most this.
pub const GOAL_P90_PCT: f64 = 10.0;

/// A case's comparison table.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub rows: Vec<Row>,
}

impl Comparison {
    pub fn new(predicted: &Summary, measured: &Summary) -> Comparison {
        let mut rows = Vec::new();
        let latencies: [(&str, Percentiles, Percentiles); 3] = [
            ("TTFT", predicted.ttft_ms, measured.ttft_ms),
            ("ITL", predicted.itl_ms, measured.itl_ms),
            ("E2E", predicted.e2e_ms, measured.e2e_ms),
        ];
        for (name, p, m) in latencies {
            for (label, pv, mv) in [
                ("p50", p.p50, m.p50),
                ("p90", p.p90, m.p90),
                ("p99", p.p99, m.p99),
            ] {
                rows.push(Row {
                    metric: format!("{name} {label}"),
                    unit: Unit::Ms,
                    predicted: pv,
                    measured: mv,
                });
            }
        }
        rows.push(Row {
            metric: "Throughput".to_string(),
            unit: Unit::ReqPerS,
            predicted: predicted.throughput_req_per_s,
            measured: measured.throughput_req_per_s,
        });
        rows.push(Row {
            metric: "Transfer overhead share".to_string(),
            unit: Unit::Share,
            predicted: predicted.transfer_overhead_share,
            measured: measured.transfer_overhead_share,
        });
        rows.push(Row {
            metric: "Prefix hit rate".to_string(),
            unit: Unit::Share,
            predicted: predicted.prefix_hit_rate,
            measured: measured.prefix_hit_rate,
        });
        Comparison { rows }
    }

    pub fn row(&self, metric: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.metric == metric)
    }

    /// The row with the largest |error| (rows without a relative error are skipped).
    pub fn worst(&self) -> Option<(&Row, f64)> {
        self.rows
            .iter()
            .filter_map(|r| Some((r, r.error_pct()?)))
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
    }

    /// The table, aligned for a terminal.
    pub fn text_table(&self) -> String {
        let cells = self.cells();
        let widths: Vec<usize> = (0..4)
            .map(|i| cells.iter().map(|row| row[i].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, row) in cells.iter().enumerate() {
            out.push_str(&format!(
                "{:<w0$} | {:>w1$} | {:>w2$} | {:>w3$}\n",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
            ));
            if n == 0 {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 9));
                out.push('\n');
            }
        }
        out
    }

    /// The table in Markdown.
    pub fn markdown_table(&self) -> String {
        let cells = self.cells();
        let mut out = String::new();
        for (n, row) in cells.iter().enumerate() {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
            if n == 0 {
                out.push_str("|---|---:|---:|---:|\n");
            }
        }
        out
    }

    fn cells(&self) -> Vec<[String; 4]> {
        let mut cells = vec![[
            "metric".to_string(),
            "predicted".to_string(),
            "measured".to_string(),
            "error %".to_string(),
        ]];
        for r in &self.rows {
            cells.push([
                r.metric.clone(),
                r.unit.format(r.predicted),
                r.unit.format(r.measured),
                format_error(r.error_pct()),
            ]);
        }
        cells
    }

    /// `comparison.csv`: metric, unit, predicted, measured, error_pct (empty when undefined).
    /// Shares are written as fractions, latencies in ms.
    pub fn write_csv<W: std::io::Write>(&self, w: W) -> csv::Result<()> {
        let mut out = csv::Writer::from_writer(w);
        out.write_record(["metric", "unit", "predicted", "measured", "error_pct"])?;
        for r in &self.rows {
            out.write_record([
                r.metric.clone(),
                r.unit.name().to_string(),
                r.predicted.to_string(),
                r.measured.to_string(),
                r.error_pct().map_or(String::new(), |e| format!("{e:.3}")),
            ])?;
        }
        out.flush()?;
        Ok(())
    }
}

/// `+3.2%`, or `-` where no relative error exists.
pub fn format_error(error_pct: Option<f64>) -> String {
    error_pct.map_or("-".to_string(), |e| format!("{e:+.1}%"))
}

/// The middle value of `values` (the mean of the two middle ones for an even count); `None`
/// when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::metrics::{Slo, TokenGaps, summarize};

    fn summary(ttft_ms: f64, e2e_ms: f64, throughput: f64, transfer: f64) -> Summary {
        let mut s = summarize(
            &[],
            &TokenGaps::default(),
            &[],
            &Slo {
                ttft_ms: 1.0,
                tpot_ms: 1.0,
            },
            16,
        );
        s.ttft_ms = Percentiles {
            mean: ttft_ms,
            p50: ttft_ms,
            p90: 2.0 * ttft_ms,
            p99: 3.0 * ttft_ms,
            max: 3.0 * ttft_ms,
        };
        s.itl_ms.p50 = 10.0;
        s.e2e_ms.p50 = e2e_ms;
        s.throughput_req_per_s = throughput;
        s.transfer_overhead_share = transfer;
        s
    }

    #[test]
    fn the_error_is_relative_to_the_measurement() {
        assert_eq!(relative_error_pct(110.0, 100.0), Some(10.0));
        assert_eq!(relative_error_pct(90.0, 100.0), Some(-10.0));
        assert_eq!(relative_error_pct(0.0, 0.0), Some(0.0));
        assert_eq!(relative_error_pct(1.0, 0.0), None);
        assert_eq!(relative_error_pct(0.0, 4.0), Some(-100.0));
    }

    #[test]
    fn the_table_has_every_metric_with_its_error() {
        let predicted = summary(120.0, 500.0, 2.0, 0.1);
        let measured = summary(100.0, 400.0, 2.5, 0.0);
        let c = Comparison::new(&predicted, &measured);
        let metrics: Vec<&str> = c.rows.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(
            metrics,
            [
                "TTFT p50",
                "TTFT p90",
                "TTFT p99",
                "ITL p50",
                "ITL p90",
                "ITL p99",
                "E2E p50",
                "E2E p90",
                "E2E p99",
                "Throughput",
                "Transfer overhead share",
                "Prefix hit rate"
            ]
        );
        let err = |m: &str| c.row(m).unwrap().error_pct();
        assert!((err("TTFT p50").unwrap() - 20.0).abs() < 1e-9);
        assert!((err("TTFT p99").unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(err("ITL p50"), Some(0.0));
        assert!((err("E2E p50").unwrap() - 25.0).abs() < 1e-9);
        assert!((err("Throughput").unwrap() + 20.0).abs() < 1e-9);
        assert_eq!(err("Transfer overhead share"), None);
        let (worst, error) = c.worst().unwrap();
        assert_eq!(worst.metric, "E2E p50");
        assert!((error - 25.0).abs() < 1e-9);

        let text = c.text_table();
        assert!(text.starts_with("metric"), "{text}");
        let ttft = text.lines().find(|l| l.starts_with("TTFT p50")).unwrap();
        assert!(
            ttft.contains("120.0 ms") && ttft.contains("100.0 ms"),
            "{ttft}"
        );
        assert!(ttft.ends_with("+20.0%"), "{ttft}");
        let transfer = text.lines().find(|l| l.starts_with("Transfer")).unwrap();
        assert!(
            transfer.contains("10.0%") && transfer.ends_with(" -"),
            "{transfer}"
        );
        assert!(
            c.markdown_table()
                .contains("| Throughput | 2.000 req/s | 2.500 req/s | -20.0% |")
        );
    }

    #[test]
    fn the_csv_reads_back() {
        let c = Comparison::new(
            &summary(120.0, 500.0, 2.0, 0.1),
            &summary(100.0, 400.0, 2.5, 0.0),
        );
        let mut bytes = Vec::new();
        c.write_csv(&mut bytes).unwrap();
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        assert_eq!(
            reader.headers().unwrap(),
            vec!["metric", "unit", "predicted", "measured", "error_pct"]
        );
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), c.rows.len());
        assert_eq!(&rows[0][0], "TTFT p50");
        assert_eq!(&rows[0][1], "ms");
        assert_eq!(rows[0][2].parse::<f64>().unwrap(), 120.0);
        assert_eq!(rows[0][3].parse::<f64>().unwrap(), 100.0);
        assert_eq!(&rows[0][4], "20.000");
        assert_eq!(&rows[10][4], "", "no relative error for a zero measurement");
    }

    #[test]
    fn medians_take_the_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
