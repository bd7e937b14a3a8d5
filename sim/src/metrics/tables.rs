//! The CSV tables of a run: per-request records (written by the simulator and by the real
//! load generator, and read back for reports), summaries in long format and worker stats.
//! Every writer emits its header even with no rows, so an empty run still names its schema.

use std::io::{Read, Write};

use super::record::{OPTIONAL_REQUEST_FIELDS, Outcome, REQUEST_FIELDS, RequestRecord};
use super::summary::{Summary, WorkerStats};

/// Why a requests CSV could not be read. Lines are 1-based, the header being line 1.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("requests CSV: {0}")]
    Io(#[from] std::io::Error),
    #[error("requests CSV: empty input, expected the header row")]
    NoHeader,
    #[error("requests CSV line 1: missing column `{0}`")]
    MissingColumn(&'static str),
    #[error("requests CSV line 1: unknown column `{0}`")]
    UnknownColumn(String),
    #[error("requests CSV line 1: duplicate column `{0}`")]
    DuplicateColumn(String),
    #[error("requests CSV line {line}, field `{field}`: {message}")]
    Field {
        line: u64,
        field: String,
        message: String,
    },
    #[error("requests CSV line {line}: {message}")]
    Row { line: u64, message: String },
}

/// The header of the workers table.
pub const WORKER_FIELDS: [&str; 9] = [
    "setup",
    "worker",
    "role",
    "busy_ns",
    "steps",
    "prefill_tokens",
    "decode_tokens",
    "peak_used_blocks",
    "capacity_blocks",
];

/// One row per record; the header is [`REQUEST_FIELDS`], `None` is an empty cell.
pub fn write_requests_csv<W: Write>(w: W, records: &[RequestRecord]) -> csv::Result<()> {
    let mut out = csv::WriterBuilder::new().has_headers(false).from_writer(w);
    out.write_record(REQUEST_FIELDS)?;
    for record in records {
        out.serialize(record)?;
    }
    out.flush()?;
    Ok(())
}

/// Reads records written by [`write_requests_csv`]. Columns are matched by name, so their
/// order may differ, but every column of the schema must be present (but those of
/// [`OPTIONAL_REQUEST_FIELDS`], which read as 0) and no other.
pub fn read_requests_csv<R: Read>(r: R) -> Result<Vec<RequestRecord>, MetricsError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(r);
    let headers = reader
        .headers()
        .map_err(|e| csv_error(e, &csv::StringRecord::new()))?
        .clone();
    check_header(&headers)?;
    let outcome_column = headers.iter().position(|h| h == "outcome");
    let mut row = csv::StringRecord::new();
    let mut records = Vec::new();
    while reader
        .read_record(&mut row)
        .map_err(|e| csv_error(e, &headers))?
    {
        let record = row.deserialize(Some(&headers)).map_err(|e| {
            // A bad variant name reaches serde as a bare message without a column; the
            // outcome cell is the only one that can produce it.
            match csv_error(e, &headers) {
                MetricsError::Row { line, message }
                    if outcome_column
                        .and_then(|i| row.get(i))
                        .is_some_and(|cell| cell.parse::<Outcome>().is_err()) =>
                {
                    MetricsError::Field {
                        line,
                        field: "outcome".to_owned(),
                        message,
                    }
                }
                other => other,
            }
        })?;
        records.push(record);
    }
    Ok(records)
}

fn check_header(headers: &csv::StringRecord) -> Result<(), MetricsError> {
    if headers.is_empty() {
        return Err(MetricsError::NoHeader);
    }
    for (i, name) in headers.iter().enumerate() {
        if !REQUEST_FIELDS.contains(&name) {
            return Err(MetricsError::UnknownColumn(name.to_owned()));
        }
        if headers.iter().take(i).any(|earlier| earlier == name) {
            return Err(MetricsError::DuplicateColumn(name.to_owned()));
        }
    }
    match REQUEST_FIELDS
        .iter()
        .filter(|field| !OPTIONAL_REQUEST_FIELDS.contains(field))
        .find(|field| !headers.iter().any(|h| h == **field))
    {
        Some(missing) => Err(MetricsError::MissingColumn(missing)),
        None => Ok(()),
    }
}

/// Names the line and, where the parser knows it, the column of a CSV error.
fn csv_error(e: csv::Error, headers: &csv::StringRecord) -> MetricsError {
    let line = e.position().map_or(0, csv::Position::line);
    let text = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(io) => MetricsError::Io(io),
        csv::ErrorKind::Deserialize { err, .. } => {
            let column = err.field().and_then(|i| headers.get(i as usize));
            match column {
                Some(field) => MetricsError::Field {
                    line,
                    field: field.to_owned(),
                    message: err.kind().to_string(),
                },
                None => MetricsError::Row {
                    line,
                    message: err.kind().to_string(),
                },
            }
        }
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => MetricsError::Row {
            line,
            message: format!("{len} fields where the header has {expected_len}"),
        },
        _ => MetricsError::Row {
            line,
            message: text,
        },
    }
}

/// Long format `setup,metric,value`: per setup in the given order, one row per scalar in
/// [`Summary::scalars`] order; undefined values are empty cells.
pub fn write_summary_csv<W: Write>(w: W, rows: &[(String, Summary)]) -> csv::Result<()> {
    let mut out = csv::Writer::from_writer(w);
    out.write_record(["setup", "metric", "value"])?;
    for (setup, summary) in rows {
        for (metric, scalar) in summary.scalars() {
            out.write_record([setup.as_str(), metric.as_str(), &scalar.to_string()])?;
        }
    }
    out.flush()?;
    Ok(())
}

/// One row per worker per setup; the header is [`WORKER_FIELDS`].
pub fn write_workers_csv<W: Write>(w: W, rows: &[(String, Vec<WorkerStats>)]) -> csv::Result<()> {
    let mut out = csv::Writer::from_writer(w);
    out.write_record(WORKER_FIELDS)?;
    for (setup, workers) in rows {
        for s in workers {
            out.write_record([
                setup.clone(),
                s.worker.to_string(),
                s.role.clone(),
                s.busy_ns.to_string(),
                s.steps.to_string(),
                s.prefill_tokens.to_string(),
                s.decode_tokens.to_string(),
                s.peak_used_blocks.to_string(),
                s.capacity_blocks.to_string(),
            ])?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TokenGaps;
    use crate::metrics::summary::{Slo, summarize};

    fn records() -> Vec<RequestRecord> {
        vec![
            RequestRecord {
                request_id: 1,
                conversation_id: 7,
                turn: 2,
                prefill_worker: Some(0),
                decode_worker: Some(3),
                prompt_tokens: 300,
                history_tokens: 200,
                cached_tokens: 192,
                output_tokens: 40,
                arrival_ns: 1_000,
                routed_ns: 2_000,
                prefill_start_ns: 3_000,
                prefill_end_ns: 9_000,
                transfer_start_ns: 9_000,
                transfer_end_ns: 9_500,
                transfer_bytes: 1 << 40,
                import_start_ns: 9_600,
                import_end_ns: 9_900,
                first_token_ns: 10_000,
                end_ns: u64::MAX,
                preemptions: 1,
                ..RequestRecord::default()
            },
            RequestRecord {
                request_id: 2,
                outcome: Outcome::Rejected,
                reject_reason: Some("prompt_too_long, by far".into()),
                prompt_tokens: 1_000_000,
                arrival_ns: 5_000,
                ..RequestRecord::default()
            },
        ]
    }

    fn to_string(write: impl FnOnce(&mut Vec<u8>) -> csv::Result<()>) -> String {
        let mut buf = Vec::new();
        write(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let written = to_string(|b| write_requests_csv(b, &records()));
        assert_eq!(read_requests_csv(written.as_bytes()).unwrap(), records());
        let mut lines = written.lines();
        assert_eq!(lines.next().unwrap(), REQUEST_FIELDS.join(","));
        assert_eq!(
            lines.nth(1).unwrap(),
            "2,0,0,rejected,\"prompt_too_long, by far\",,,1000000,0,0,0,5000,0,0,0,0,0,0,0,0,0,0,0"
        );
    }

    #[test]
    fn header_matches_serde_field_order() {
        let mut out = csv::Writer::from_writer(Vec::new());
        out.serialize(RequestRecord::default()).unwrap();
        let text = String::from_utf8(out.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), REQUEST_FIELDS.join(","));
    }

    #[test]
    fn empty_tables_keep_their_header() {
        let written = to_string(|b| write_requests_csv(b, &[]));
        assert_eq!(written.trim_end(), REQUEST_FIELDS.join(","));
        assert_eq!(read_requests_csv(written.as_bytes()).unwrap(), vec![]);
        assert_eq!(
            to_string(|b| write_summary_csv(b, &[])),
            "setup,metric,value\n"
        );
        assert_eq!(
            to_string(|b| write_workers_csv(b, &[])).trim_end(),
            WORKER_FIELDS.join(",")
        );
        assert!(matches!(
            read_requests_csv(&b""[..]),
            Err(MetricsError::NoHeader)
        ));
    }

    #[test]
    fn columns_match_by_name() {
        let mut fields: Vec<&str> = REQUEST_FIELDS.to_vec();
        fields.reverse();
        let values: Vec<&str> = fields
            .iter()
            .map(|f| match *f {
                "outcome" => "completed",
                "request_id" => "42",
                "reject_reason" | "prefill_worker" | "decode_worker" => "",
                _ => "0",
            })
            .collect();
        let text = format!("{}\n{}\n", fields.join(","), values.join(","));
        let read = read_requests_csv(text.as_bytes()).unwrap();
        assert_eq!(
            read,
            vec![RequestRecord {
                request_id: 42,
                ..RequestRecord::default()
            }]
        );
    }

    #[test]
    fn columns_added_later_may_be_missing() {
        let written = to_string(|b| write_requests_csv(b, &records()));
        let old: Vec<String> = written
            .lines()
            .map(|line| {
                let cells: Vec<&str> = line.split(',').collect();
                // Counted from the end: the rejected row's quoted reason holds a comma.
                let at = REQUEST_FIELDS.iter().position(|f| *f == "import_start_ns");
                let keep = cells.len() - (REQUEST_FIELDS.len() - at.unwrap());
                [&cells[..keep], &cells[keep + 2..]].concat().join(",")
            })
            .collect();
        let read = read_requests_csv(old.join("\n").as_bytes()).unwrap();
        let mut expected = records();
        for r in &mut expected {
            (r.import_start_ns, r.import_end_ns) = (0, 0);
        }
        assert_eq!(read, expected);
    }

    fn read_err(text: &str) -> String {
        read_requests_csv(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_line_and_field() {
        let good = to_string(|b| write_requests_csv(b, &records()));
        let bad = good.replacen("rejected", "refused", 1);
        let msg = read_err(&bad);
        assert!(
            msg.starts_with("requests CSV line 3, field `outcome`"),
            "{msg}"
        );
        assert!(msg.contains("refused"), "{msg}");

        let bad = good.replacen(",300,", ",3x0,", 1);
        let msg = read_err(&bad);
        assert!(
            msg.starts_with("requests CSV line 2, field `prompt_tokens`"),
            "{msg}"
        );

        let bad = good.replacen(",3,", ",-1,", 1);
        let msg = read_err(&bad);
        assert!(
            msg.starts_with("requests CSV line 2, field `decode_worker`"),
            "{msg}"
        );

        let short = format!("{}\n1,2,3\n", REQUEST_FIELDS.join(","));
        assert!(read_err(&short).starts_with("requests CSV line 2: 3 fields"));
    }

    #[test]
    fn header_errors_name_the_column() {
        let without = REQUEST_FIELDS[..22].join(",");
        assert_eq!(
            read_err(&without),
            "requests CSV line 1: missing column `preemptions`"
        );
        let extra = format!("{},gpu", REQUEST_FIELDS.join(","));
        assert_eq!(
            read_err(&extra),
            "requests CSV line 1: unknown column `gpu`"
        );
        let twice = format!("{},turn", REQUEST_FIELDS.join(","));
        assert_eq!(
            read_err(&twice),
            "requests CSV line 1: duplicate column `turn`"
        );
    }

    #[test]
    fn summary_long_format() {
        let slo = Slo {
            ttft_ms: 1.0,
            tpot_ms: 1.0,
        };
        let workers = vec![WorkerStats {
            worker: 3,
            role: "decode".into(),
            busy_ns: 4_000,
            steps: 2,
            prefill_tokens: 0,
            decode_tokens: 80,
            peak_used_blocks: 10,
            capacity_blocks: 64,
        }];
        let s = summarize(&records()[1..], &TokenGaps::default(), &workers, &slo, 16);
        let text = to_string(|b| {
            write_summary_csv(b, &[("a".into(), s.clone()), ("b".into(), s.clone())])
        });
        let lines: Vec<&str> = text.lines().collect();
        let per_setup = s.scalars().len();
        assert_eq!(lines.len(), 1 + 2 * per_setup);
        assert_eq!(lines[1], "a,requests,1");
        assert_eq!(lines[3], "a,rejected,1");
        assert!(lines.contains(&"a,ttft_ms_p50,0"));
        assert!(lines.contains(&"a,latency_hit_ms,"));
        assert!(lines.contains(&"b,utilisation_decode,0"));
        assert_eq!(lines[per_setup + 1], "b,requests,1");

        let text = to_string(|b| write_workers_csv(b, &[("a".into(), workers.clone())]));
        assert_eq!(text.lines().nth(1), Some("a,3,decode,4000,2,0,80,10,64"));
    }
}
