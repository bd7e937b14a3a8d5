//! Request traces as CSV: `arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids`.
//!
//! `token_ids` (optional column, or an empty cell) holds space-separated ids; with ids,
//! `prompt_tokens` must equal their count or be empty. Rows are replayed open loop in arrival
//! order. Sizes are bounded before anything is allocated for them, so a hostile or corrupt
//! file gives an error naming its file, line and field rather than exhausting memory.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use super::{Content, Request, WorkloadError};
use crate::rng::mix64;
use crate::time::Nanos;

/// Most token ids one row may carry.
pub const MAX_TRACE_TOKEN_IDS: usize = 1_000_000;
/// Largest prompt or output length a row may ask for.
pub const MAX_TRACE_TOKENS: u32 = 10_000_000;
/// Longest line the reader buffers: room for [`MAX_TRACE_TOKEN_IDS`] ids of ten digits.
const MAX_LINE_BYTES: u64 = 12 * MAX_TRACE_TOKEN_IDS as u64 + 4096;

const COLUMNS: [&str; 5] = [
    "arrival_ns",
    "conversation_id",
    "prompt_tokens",
    "output_tokens",
    "token_ids",
];
const TRACE_STREAM_SALT: u64 = 0x7ACE_57EA_0000_0001;

/// The synthetic stream of a trace conversation without token ids: every row of the
/// conversation continues it, so consecutive rows share their common prefix.
fn trace_stream(conversation_id: u64) -> u64 {
    mix64(conversation_id ^ TRACE_STREAM_SALT)
}

/// Reads a trace file; see [`read_trace_from`].
pub fn read_trace(path: impl AsRef<Path>) -> Result<Vec<Request>, WorkloadError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| WorkloadError::Io {
        path: name.clone(),
        source,
    })?;
    read_trace_from(BufReader::new(file), &name)
}

/// Reads a trace from any reader; `name` stands for the file in error messages. Rows are
/// sorted stably by arrival and numbered densely in that order; `turn` counts a
/// conversation's rows, and `history_tokens` is the previous row's prompt plus output when
/// this prompt is at least that long (else 0).
pub fn read_trace_from<R: Read>(reader: R, name: &str) -> Result<Vec<Request>, WorkloadError> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(LineLimit::new(reader));
    let headers = match rdr.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(csv_error(e, rdr.get_ref(), name, 1)),
    };
    let cols = Columns::from_headers(&headers, name)?;
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut line = 1;
    loop {
        match rdr.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(e, rdr.get_ref(), name, line + 1)),
        }
        line = record.position().map_or(line + 1, |p| p.line());
        if record.len() > headers.len() {
            return Err(WorkloadError::TraceRow {
                file: name.into(),
                line,
                message: format!(
                    "{} fields, but the header has {}",
                    record.len(),
                    headers.len()
                ),
            });
        }
        rows.push(cols.parse_row(&record, name, line)?);
    }
    rows.sort_by_key(|r: &Row| r.arrival_ns);
    Ok(assemble(rows))
}

/// Writes requests as a trace, token ids only for [`Content::Tokens`]. Reading it back gives
/// the same arrivals, conversations and lengths; synthetic content comes back as one stream
/// per conversation (shared system prompts are not part of the format).
pub fn write_trace<'a, W: io::Write>(
    w: W,
    requests: impl IntoIterator<Item = &'a Request>,
) -> Result<(), WorkloadError> {
    let mut wtr = csv::Writer::from_writer(w);
    wtr.write_record(COLUMNS)?;
    let mut ids = String::new();
    for r in requests {
        ids.clear();
        if let Content::Tokens(tokens) = &r.content {
            if tokens.len() != r.prompt_tokens as usize {
                return Err(WorkloadError::Invalid {
                    field: format!("request {}.prompt_tokens", r.id),
                    message: format!(
                        "{} does not match its {} token ids",
                        r.prompt_tokens,
                        tokens.len()
                    ),
                });
            }
            for (i, t) in tokens.iter().enumerate() {
                let sep = if i == 0 { "" } else { " " };
                // Writing into a String cannot fail.
                let _ = write!(ids, "{sep}{t}");
            }
        }
        wtr.write_record([
            r.arrival_ns.to_string().as_str(),
            r.conversation.to_string().as_str(),
            r.prompt_tokens.to_string().as_str(),
            r.output_tokens.to_string().as_str(),
            ids.as_str(),
        ])?;
    }
    wtr.flush().map_err(csv::Error::from)?;
    Ok(())
}

/// One parsed row before sorting.
struct Row {
    arrival_ns: Nanos,
    conversation: u64,
    prompt_tokens: u32,
    output_tokens: u32,
    ids: Option<Arc<[u32]>>,
}

/// Where each column sits in the header.
struct Columns {
    arrival_ns: usize,
    conversation_id: usize,
    prompt_tokens: usize,
    output_tokens: usize,
    token_ids: Option<usize>,
}

impl Columns {
    fn from_headers(headers: &csv::StringRecord, name: &str) -> Result<Self, WorkloadError> {
        let header_error = |message: String| WorkloadError::TraceRow {
            file: name.into(),
            line: 1,
            message,
        };
        let mut at = [None; COLUMNS.len()];
        for (i, h) in headers.iter().enumerate() {
            let Some(c) = COLUMNS.iter().position(|&c| c == h) else {
                return Err(header_error(format!(
                    "unknown column {h:?} (expected {})",
                    COLUMNS.join(",")
                )));
            };
            if at[c].replace(i).is_some() {
                return Err(header_error(format!("column {h} appears twice")));
            }
        }
        let required =
            |c: usize| at[c].ok_or_else(|| header_error(format!("missing column {}", COLUMNS[c])));
        Ok(Columns {
            arrival_ns: required(0)?,
            conversation_id: required(1)?,
            prompt_tokens: required(2)?,
            output_tokens: required(3)?,
            token_ids: at[4],
        })
    }

    fn parse_row(
        &self,
        record: &csv::StringRecord,
        name: &str,
        line: u64,
    ) -> Result<Row, WorkloadError> {
        let cell = |i: usize| record.get(i).unwrap_or("");
        let field_error = |field: &'static str, message: String| WorkloadError::TraceField {
            file: name.into(),
            line,
            field,
            message,
        };
        let arrival_ns: Nanos = cell(self.arrival_ns)
            .parse()
            .map_err(|e| field_error("arrival_ns", format!("{e}")))?;
        let conversation: u64 = cell(self.conversation_id)
            .parse()
            .map_err(|e| field_error("conversation_id", format!("{e}")))?;
        let output_tokens =
            parse_tokens(cell(self.output_tokens)).map_err(|m| field_error("output_tokens", m))?;
        let ids = match self.token_ids.map(cell) {
            Some(text) if !text.is_empty() => {
                Some(parse_ids(text).map_err(|m| field_error("token_ids", m))?)
            }
            _ => None,
        };
        let prompt_cell = cell(self.prompt_tokens);
        let prompt_tokens = match &ids {
            Some(ids) if prompt_cell.is_empty() => ids.len() as u32,
            Some(ids) => {
                let n = parse_tokens(prompt_cell).map_err(|m| field_error("prompt_tokens", m))?;
                if n as usize != ids.len() {
                    return Err(field_error(
                        "prompt_tokens",
                        format!("{n} does not match the {} token_ids", ids.len()),
                    ));
                }
                n
            }
            None => parse_tokens(prompt_cell).map_err(|m| field_error("prompt_tokens", m))?,
        };
        Ok(Row {
            arrival_ns,
            conversation,
            prompt_tokens,
            output_tokens,
            ids,
        })
    }
}

fn parse_tokens(text: &str) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > MAX_TRACE_TOKENS {
        return Err(format!("{n} exceeds the limit of {MAX_TRACE_TOKENS}"));
    }
    Ok(n)
}

fn parse_ids(text: &str) -> Result<Arc<[u32]>, String> {
    let mut ids = Vec::new();
    for (i, word) in text.split_ascii_whitespace().enumerate() {
        if i == MAX_TRACE_TOKEN_IDS {
            return Err(format!("more than {MAX_TRACE_TOKEN_IDS} ids"));
        }
        ids.push(
            word.parse::<u32>()
                .map_err(|e| format!("id {} ({word:?}): {e}", i + 1))?,
        );
    }
    Ok(ids.into())
}

/// Numbers rows in arrival order and links each to its conversation's previous row.
fn assemble(rows: Vec<Row>) -> Vec<Request> {
    // Per conversation: rows so far, and the last row's prompt plus output.
    let mut seen: HashMap<u64, (u32, u64)> = HashMap::new();
    rows.into_iter()
        .enumerate()
        .map(|(id, row)| {
            let (turn, context) = seen.entry(row.conversation).or_insert((0, 0));
            let this_turn = *turn;
            let history_tokens = if this_turn > 0 && row.prompt_tokens as u64 >= *context {
                *context as u32
            } else {
                0
            };
            *turn = turn.saturating_add(1);
            *context = row.prompt_tokens as u64 + row.output_tokens as u64;
            Request {
                id: id as u64,
                conversation: row.conversation,
                turn: this_turn,
                arrival_ns: row.arrival_ns,
                prompt_tokens: row.prompt_tokens,
                history_tokens,
                output_tokens: row.output_tokens,
                content: match row.ids {
                    Some(ids) => Content::Tokens(ids),
                    None => Content::Synthetic {
                        system: 0,
                        system_tokens: 0,
                        stream: trace_stream(row.conversation),
                    },
                },
            }
        })
        .collect()
}

fn csv_error<R>(e: csv::Error, src: &LineLimit<R>, name: &str, line: u64) -> WorkloadError {
    if let Some(long_line) = src.overlong_line {
        return WorkloadError::TraceRow {
            file: name.into(),
            line: long_line,
            message: format!("line longer than {MAX_LINE_BYTES} bytes"),
        };
    }
    let line = e.position().map_or(line, |p| p.line());
    let message = match e.into_kind() {
        csv::ErrorKind::Io(source) => {
            return WorkloadError::Io {
                path: name.into(),
                source,
            };
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        other => format!("unreadable CSV: {other:?}"),
    };
    WorkloadError::TraceRow {
        file: name.into(),
        line,
        message,
    }
}

/// Fails a read once a line grows past [`MAX_LINE_BYTES`], so the CSV reader never buffers an
/// unbounded field; remembers which line that was.
struct LineLimit<R> {
    inner: R,
    line: u64,
    line_bytes: u64,
    overlong_line: Option<u64>,
}

impl<R> LineLimit<R> {
    fn new(inner: R) -> Self {
        LineLimit {
            inner,
            line: 1,
            line_bytes: 0,
            overlong_line: None,
        }
    }
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.line += 1;
                self.line_bytes = 0;
            } else {
                self.line_bytes += 1;
                if self.line_bytes > MAX_LINE_BYTES {
                    self.overlong_line = Some(self.line);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("line {} is longer than {MAX_LINE_BYTES} bytes", self.line),
                    ));
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<Request>, WorkloadError> {
        read_trace_from(text.as_bytes(), "trace.csv")
    }

    fn err(text: &str) -> String {
        read(text).unwrap_err().to_string()
    }

    #[test]
    fn rows_are_sorted_and_linked_by_conversation() {
        let reqs = read(
            "arrival_ns,conversation_id,prompt_tokens,output_tokens\n\
             300,7,150,20\n\
             100,7,100,30\n\
             200,8,50,5\n\
             300,8,10,5\n",
        )
        .unwrap();
        let got: Vec<_> = reqs
            .iter()
            .map(|r| (r.id, r.arrival_ns, r.conversation, r.turn, r.history_tokens))
            .collect();
        assert_eq!(
            got,
            [
                (0, 100, 7, 0, 0),
                (1, 200, 8, 0, 0),
                (2, 300, 7, 1, 130),
                (3, 300, 8, 1, 0)
            ],
            "stable by arrival; a shorter prompt has no history"
        );
        assert_eq!(reqs[0].content, reqs[2].content);
        assert_ne!(reqs[0].content, reqs[1].content);
    }

    #[test]
    fn token_ids_set_the_prompt() {
        let reqs = read(
            "arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids\n\
             5,1,,4,10 11 12\n\
             6,2,3,4,1 2 3\n\
             7,3,9,4,\n",
        )
        .unwrap();
        assert_eq!(reqs[0].prompt_tokens, 3);
        assert_eq!(reqs[0].content, Content::Tokens(vec![10, 11, 12].into()));
        assert_eq!(reqs[1].prompt_tokens, 3);
        assert!(matches!(reqs[2].content, Content::Synthetic { .. }));
        assert_eq!(reqs[2].prompt_tokens, 9);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let head = "arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids\n";
        assert_eq!(
            err(&format!("{head}1,1,5,5,\n2,1,5,x5,\n")),
            "trace.csv:3: field output_tokens: invalid digit found in string"
        );
        assert_eq!(
            err(&format!("{head}-1,1,5,5,\n")),
            "trace.csv:2: field arrival_ns: invalid digit found in string"
        );
        assert_eq!(
            err(&format!("{head}1,1,4,5,1 2 3\n")),
            "trace.csv:2: field prompt_tokens: 4 does not match the 3 token_ids"
        );
        assert_eq!(
            err(&format!("{head}1,1,,5,\n")),
            "trace.csv:2: field prompt_tokens: cannot parse integer from empty string"
        );
        assert_eq!(
            err(&format!("{head}1,1,5,0,\n")),
            "trace.csv:2: field output_tokens: must be at least 1"
        );
        assert_eq!(
            err(&format!("{head}1,1,20000000,5,\n")),
            "trace.csv:2: field prompt_tokens: 20000000 exceeds the limit of 10000000"
        );
        assert_eq!(
            err(&format!("{head}1,1,,5,1 two\n")),
            "trace.csv:2: field token_ids: id 2 (\"two\"): invalid digit found in string"
        );
        assert_eq!(
            err(&format!("{head}1,1,5,5,,9\n")),
            "trace.csv:2: 6 fields, but the header has 5"
        );
        assert_eq!(
            err("arrival_ns,conversation_id,prompt_tokens\n"),
            "trace.csv:1: missing column output_tokens"
        );
        assert!(
            err("arrival_ns,conv,prompt_tokens,output_tokens\n")
                .starts_with("trace.csv:1: unknown column \"conv\"")
        );
        assert!(
            read_trace("/nonexistent/trace.csv")
                .unwrap_err()
                .to_string()
                .starts_with("/nonexistent/trace.csv: ")
        );
    }

    #[test]
    fn oversized_rows_are_refused() {
        let head = "arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids\n";
        let many = vec!["1"; MAX_TRACE_TOKEN_IDS + 1].join(" ");
        assert_eq!(
            err(&format!("{head}1,1,,5,{many}\n")),
            "trace.csv:2: field token_ids: more than 1000000 ids"
        );
        let long = "9".repeat(MAX_LINE_BYTES as usize + 10);
        assert_eq!(
            err(&format!("{head}1,1,5,5,\n1,1,5,5,{long}\n")),
            format!("trace.csv:3: line longer than {MAX_LINE_BYTES} bytes")
        );
    }

    #[test]
    fn write_then_read_round_trips() {
        let reqs = read(
            "arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids\n\
             100,7,100,30,\n\
             200,8,,5,4 5 6\n\
             300,7,150,20,\n",
        )
        .unwrap();
        let mut out = Vec::new();
        write_trace(&mut out, &reqs).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("arrival_ns,conversation_id,prompt_tokens,output_tokens,token_ids\n")
        );
        assert_eq!(read(&text).unwrap(), reqs);
    }

    #[test]
    fn writing_refuses_ids_that_disagree_with_the_prompt() {
        let r = Request {
            id: 4,
            conversation: 1,
            turn: 0,
            arrival_ns: 0,
            prompt_tokens: 5,
            history_tokens: 0,
            output_tokens: 1,
            content: Content::Tokens(vec![1, 2].into()),
        };
        let e = write_trace(Vec::new(), [&r]).unwrap_err().to_string();
        assert!(e.starts_with("request 4.prompt_tokens: "), "{e}");
    }
}
