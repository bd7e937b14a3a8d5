//! The verdict over several cases: one line per case with its errors on the goal metrics,
//! then the median and worst |error| of each metric over the cases, against the goal.

use crate::compare::{Comparison, GOAL_METRICS, GOAL_P50_PCT, GOAL_P90_PCT, format_error, median};

/// The errors of every case on the goal metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Overall {
    /// (case, error % per goal metric in `GOAL_METRICS` order).
    pub cases: Vec<(String, Vec<Option<f64>>)>,
}

/// One goal metric over the cases.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricVerdict {
    pub metric: &'static str,
    /// Over the cases that have an error for it; `None` when none has.
    pub median_abs_pct: Option<f64>,
    /// The largest |error| and its case.
    pub worst: Option<(f64, String)>,
    pub goal_pct: f64,
}

impl MetricVerdict {
    pub fn met(&self) -> bool {
        self.median_abs_pct.is_some_and(|m| m <= self.goal_pct)
    }
}

impl Overall {
    pub fn new(runs: &[(String, &Comparison)]) -> Overall {
        Overall {
            cases: runs
                .iter()
                .map(|(name, comparison)| {
                    let errors = GOAL_METRICS
                        .iter()
                        .map(|m| comparison.row(m).and_then(|r| r.error_pct()))
                        .collect();
                    (name.clone(), errors)
                })
                .collect(),
        }
    }

    pub fn verdicts(&self) -> Vec<MetricVerdict> {
        GOAL_METRICS
            .iter()
            .enumerate()
            .map(|(i, &metric)| {
                let errors: Vec<(f64, &str)> = self
                    .cases
                    .iter()
                    .filter_map(|(name, e)| Some((e[i]?.abs(), name.as_str())))
                    .collect();
                let abs: Vec<f64> = errors.iter().map(|(e, _)| *e).collect();
                MetricVerdict {
                    metric,
                    median_abs_pct: median(&abs),
                    worst: errors
                        .iter()
                        .max_by(|a, b| a.0.total_cmp(&b.0))
                        .map(|(e, name)| (*e, name.to_string())),
                    goal_pct: if metric.ends_with("p50") {
                        GOAL_P50_PCT
                    } else {
                        GOAL_P90_PCT
                    },
                }
            })
            .collect()
    }

    pub fn goal_met(&self) -> bool {
        self.verdicts().iter().all(MetricVerdict::met)
    }

    /// The case with the largest |error| on any goal metric, with that metric and error.
    pub fn worst_case(&self) -> Option<(&str, &'static str, f64)> {
        self.cases
            .iter()
            .flat_map(|(name, errors)| {
                errors
                    .iter()
                    .zip(GOAL_METRICS)
                    .filter_map(move |(e, m)| Some((name.as_str(), m, (*e)?)))
            })
            .max_by(|a, b| a.2.abs().total_cmp(&b.2.abs()))
    }

    /// The text printed at the end of a run.
    pub fn text(&self) -> String {
        let verdicts = self.verdicts();
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["case".to_string()];
        header.extend(GOAL_METRICS.iter().map(|m| m.to_string()));
        rows.push(header);
        for (name, errors) in &self.cases {
            let mut row = vec![name.clone()];
            row.extend(errors.iter().map(|e| format_error(*e)));
            rows.push(row);
        }
        let mut median_row = vec!["median |error|".to_string()];
        median_row.extend(verdicts.iter().map(|v| abs_cell(v.median_abs_pct)));
        rows.push(median_row);
        let mut worst_row = vec!["worst |error|".to_string()];
        worst_row.extend(
            verdicts
                .iter()
                .map(|v| abs_cell(v.worst.as_ref().map(|w| w.0))),
        );
        rows.push(worst_row);
        let mut goal_row = vec!["goal (median)".to_string()];
        goal_row.extend(verdicts.iter().map(|v| {
            format!(
                "<= {:.0}% {}",
                v.goal_pct,
                if v.met() { "met" } else { "MISSED" }
            )
        }));
        rows.push(goal_row);

        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, w))| {
                    if i == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            out.push_str(&cells.join(" | "));
            out.push('\n');
            if n == 0 || n == self.cases.len() {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 3 * (widths.len() - 1)));
                out.push('\n');
            }
        }
        match self.worst_case() {
            Some((case, metric, error)) => out.push_str(&format!(
                "worst case: {case} ({metric} {})\n",
                format_error(Some(error))
            )),
            None => out.push_str("worst case: none (no case has an error on the goal metrics)\n"),
        }
        out.push_str(&format!(
            "goal (median |error| <= {GOAL_P50_PCT:.0}% at p50, <= {GOAL_P90_PCT:.0}% at p90): {}\n",
            if self.goal_met() { "met" } else { "missed" }
        ));
        out
    }

    /// `summary.csv`: case, metric, error_pct (empty where undefined).
    pub fn write_csv<W: std::io::Write>(&self, w: W) -> csv::Result<()> {
        let mut out = csv::Writer::from_writer(w);
        out.write_record(["case", "metric", "error_pct"])?;
        for (name, errors) in &self.cases {
            for (metric, error) in GOAL_METRICS.iter().zip(errors) {
                out.write_record([
                    name.as_str(),
                    metric,
                    &error.map_or(String::new(), |e| format!("{e:.3}")),
                ])?;
            }
        }
        out.flush()?;
        Ok(())
    }
}

fn abs_cell(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.1}%"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Row;

    /// A comparison whose goal metrics have the given errors (measured 100 each).
    fn comparison(errors: [f64; 6]) -> Comparison {
        Comparison {
            rows: GOAL_METRICS
                .iter()
                .zip(errors)
                .map(|(m, e)| Row {
                    metric: m.to_string(),
                    unit: crate::compare::Unit::Ms,
                    predicted: 100.0 + e,
                    measured: 100.0,
                })
                .collect(),
        }
    }

    #[test]
    fn medians_and_the_worst_case_over_cases() {
        let a = comparison([1.0, -2.0, 3.0, 5.0, 5.0, 5.0]);
        let b = comparison([-4.0, 2.0, 9.0, -12.0, 1.0, 5.0]);
        let c = comparison([2.0, 2.0, 2.0, 8.0, 30.0, 5.0]);
        let overall = Overall::new(&[("a".into(), &a), ("b".into(), &b), ("c".into(), &c)]);
        let v = overall.verdicts();
        let close = |x: Option<f64>, y: f64| (x.unwrap() - y).abs() < 1e-9;
        assert!(close(v[0].median_abs_pct, 2.0));
        assert!(close(v[1].median_abs_pct, 2.0));
        assert!(close(v[2].median_abs_pct, 3.0));
        assert!(close(v[3].median_abs_pct, 8.0));
        assert!(close(v[4].median_abs_pct, 5.0));
        assert_eq!(v[0].goal_pct, 5.0);
        assert_eq!(v[3].goal_pct, 10.0);
        let (worst, case) = v[3].worst.clone().unwrap();
        assert!((worst - 12.0).abs() < 1e-9);
        assert_eq!(case, "b");
        assert!(overall.goal_met());
        let (case, metric, error) = overall.worst_case().unwrap();
        assert_eq!((case, metric), ("c", "ITL p90"));
        assert!((error - 30.0).abs() < 1e-9);
        let text = overall.text();
        assert!(text.contains("worst case: c (ITL p90 +30.0%)"), "{text}");
        assert!(text.ends_with("p90): met\n"), "{text}");

        let missed = Overall::new(&[("d".into(), &comparison([6.0, 0.0, 0.0, 0.0, 0.0, 0.0]))]);
        assert!(!missed.goal_met());
        assert!(missed.text().contains("MISSED"));
    }

    #[test]
    fn no_case_meets_no_goal() {
        let overall = Overall::new(&[]);
        assert!(!overall.goal_met());
        assert_eq!(overall.worst_case(), None);
    }

    #[test]
    fn the_csv_has_a_row_per_case_and_metric() {
        let a = comparison([1.0, -2.0, 3.0, 5.0, 5.0, 5.0]);
        let overall = Overall::new(&[("a".into(), &a)]);
        let mut bytes = Vec::new();
        overall.write_csv(&mut bytes).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "case,metric,error_pct");
        assert_eq!(lines[1], "a,TTFT p50,1.000");
        assert_eq!(lines.len(), 7);
    }
}
