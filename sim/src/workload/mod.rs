//! The workload: who sends what, and when. Open-loop arrivals start multi-turn conversations
//! whose later turns follow their answers after a think time (closed loop per conversation),
//! or a CSV trace is replayed row by row. The simulator and the real load generator both drive
//! requests from here, so both see the same requests for the same seed.

mod arrival;
mod content;
mod conversation;
mod dist;
mod trace;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use arrival::{ArrivalProcess, Arrivals};
pub use content::Content;
pub use dist::{DurationDist, LengthDist};
pub use trace::{MAX_TRACE_TOKEN_IDS, MAX_TRACE_TOKENS, read_trace, read_trace_from, write_trace};

use crate::time::{Nanos, secs_to_ns};
use conversation::Conversations;
use dist::FieldError;

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Dense, in creation order.
    pub id: u64,
    pub conversation: u64,
    /// 0-based.
    pub turn: u32,
    pub arrival_ns: Nanos,
    /// The whole prompt: system prompt, history and the new user tokens.
    pub prompt_tokens: u32,
    /// The prefix from earlier turns (their prompts and answers); 0 on turn 0.
    pub history_tokens: u32,
    /// Tokens to generate; end-of-sequence is ignored.
    pub output_tokens: u32,
    pub content: Content,
}

/// The `[workload]` table of a scenario. Either synthetic (arrival, lengths, and sessions or
/// duration_s) or a trace replay (trace, optionally capped by duration_s); the fields of the
/// other kind must be left out, so a scenario never silently ignores what it says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Starts of conversations.
    #[serde(default)]
    pub arrival: Option<ArrivalProcess>,
    /// Conversations to start ...
    #[serde(default)]
    pub sessions: Option<u64>,
    /// ... or start them for this long (whichever ends first when both are given); caps a
    /// trace replay at this arrival time.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Turns per conversation.
    #[serde(default = "one_turn")]
    pub turns: LengthDist,
    #[serde(default)]
    pub system_prompt_tokens: u32,
    /// Distinct shared system prompts; a conversation picks one uniformly.
    #[serde(default = "one")]
    pub system_prompts: u32,
    /// New user tokens per turn.
    #[serde(default)]
    pub user_tokens: Option<LengthDist>,
    #[serde(default)]
    pub output_tokens: Option<LengthDist>,
    /// Between an answer and the next turn.
    #[serde(default)]
    pub think_time: DurationDist,
    /// A conversation ends before a turn's prompt would exceed this; a first prompt is cut to
    /// fit (its user tokens are shortened).
    #[serde(default)]
    pub max_prompt_tokens: Option<u32>,
    /// Replay this CSV (relative to the scenario file's directory) instead.
    #[serde(default)]
    pub trace: Option<PathBuf>,
}

fn one_turn() -> LengthDist {
    LengthDist::Constant { value: 1 }
}

fn one() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A configuration field (or request field) with a bad value.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: field {field}: {message}")]
    TraceField {
        file: String,
        line: u64,
        field: &'static str,
        message: String,
    },
    /// A trace line that is wrong as a whole (header, field count, encoding, length).
    #[error("{file}:{line}: {message}")]
    TraceRow {
        file: String,
        line: u64,
        message: String,
    },
    #[error("writing a trace: {0}")]
    Write(#[from] csv::Error),
}

impl WorkloadError {
    /// A distribution's or process's field error, placed under `prefix`.
    pub(crate) fn invalid(prefix: &str, (field, message): FieldError) -> Self {
        WorkloadError::Invalid {
            field: format!("{prefix}.{field}"),
            message,
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        WorkloadError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl WorkloadConfig {
    pub fn validate(&self) -> Result<(), WorkloadError> {
        if let Some(d) = self.duration_s
            && !(d.is_finite() && d > 0.0)
        {
            return Err(WorkloadError::field(
                "workload.duration_s",
                format!("must be finite and > 0, got {d}"),
            ));
        }
        if self.trace.is_some() {
            return self.validate_trace_replay();
        }
        let required =
            |field: &str| WorkloadError::field(field, "is required unless workload.trace is set");
        let arrival = self
            .arrival
            .as_ref()
            .ok_or_else(|| required("workload.arrival"))?;
        arrival
            .check()
            .map_err(|e| WorkloadError::invalid("workload.arrival", e))?;
        match self.sessions {
            None if self.duration_s.is_none() => {
                return Err(WorkloadError::field(
                    "workload.sessions",
                    "workload.sessions or workload.duration_s is required unless workload.trace is set",
                ));
            }
            Some(0) => {
                return Err(WorkloadError::field(
                    "workload.sessions",
                    "must be at least 1",
                ));
            }
            _ => {}
        }
        let lengths = [
            ("workload.user_tokens", self.user_tokens.as_ref()),
            ("workload.output_tokens", self.output_tokens.as_ref()),
            ("workload.turns", Some(&self.turns)),
        ];
        for (field, dist) in lengths {
            dist.ok_or_else(|| required(field))?
                .check()
                .map_err(|e| WorkloadError::invalid(field, e))?;
        }
        self.think_time
            .check()
            .map_err(|e| WorkloadError::invalid("workload.think_time", e))?;
        if self.system_prompts == 0 {
            return Err(WorkloadError::field(
                "workload.system_prompts",
                "must be at least 1",
            ));
        }
        if let Some(max) = self.max_prompt_tokens
            && max <= self.system_prompt_tokens
        {
            return Err(WorkloadError::field(
                "workload.max_prompt_tokens",
                format!(
                    "must exceed workload.system_prompt_tokens ({}), got {max}",
                    self.system_prompt_tokens
                ),
            ));
        }
        Ok(())
    }

    /// A replay takes every request from the trace: a synthetic field would be ignored.
    fn validate_trace_replay(&self) -> Result<(), WorkloadError> {
        let synthetic_fields = [
            ("workload.arrival", self.arrival.is_some()),
            ("workload.sessions", self.sessions.is_some()),
            ("workload.turns", self.turns != one_turn()),
            (
                "workload.system_prompt_tokens",
                self.system_prompt_tokens != 0,
            ),
            ("workload.system_prompts", self.system_prompts != 1),
            ("workload.user_tokens", self.user_tokens.is_some()),
            ("workload.output_tokens", self.output_tokens.is_some()),
            (
                "workload.think_time",
                self.think_time != DurationDist::default(),
            ),
            (
                "workload.max_prompt_tokens",
                self.max_prompt_tokens.is_some(),
            ),
        ];
        match synthetic_fields.into_iter().find(|&(_, set)| set) {
            Some((field, _)) => Err(WorkloadError::field(
                field,
                "does not apply when workload.trace is set (the trace gives every request)",
            )),
            None => Ok(()),
        }
    }
}

/// The source of requests for one run.
pub struct Workload {
    source: Source,
    requests_created: u64,
    sessions_started: u64,
}

enum Source {
    Synthetic(Box<Conversations>),
    Trace {
        rows: std::vec::IntoIter<Request>,
        end_ns: Option<Nanos>,
    },
}

impl Workload {
    /// `base_dir` resolves a relative trace path (the scenario file's directory).
    pub fn new(cfg: &WorkloadConfig, seed: u64, base_dir: &Path) -> Result<Self, WorkloadError> {
        cfg.validate()?;
        let end_ns = cfg.duration_s.map(secs_to_ns);
        let source = match &cfg.trace {
            Some(path) => Source::Trace {
                rows: read_trace(base_dir.join(path))?.into_iter(),
                end_ns,
            },
            None => Source::Synthetic(Box::new(Conversations::new(cfg, seed)?)),
        };
        Ok(Workload {
            source,
            requests_created: 0,
            sessions_started: 0,
        })
    }

    /// The next open-loop arrival (a conversation's first turn, or a trace row), in
    /// nondecreasing arrival time; None when the workload has no more.
    pub fn next_arrival(&mut self) -> Option<Request> {
        let request = match &mut self.source {
            Source::Synthetic(convs) => convs.start(self.requests_created)?,
            Source::Trace { rows, end_ns } => {
                let row = rows.next()?;
                if end_ns.is_some_and(|end| row.arrival_ns >= end) {
                    // Rows are sorted: every later one is past the end too.
                    *rows = Vec::new().into_iter();
                    return None;
                }
                row
            }
        };
        if request.turn == 0 {
            self.sessions_started += 1;
        }
        self.requests_created += 1;
        Some(request)
    }

    /// The turn after `done` (which completed at `completed_ns`), arriving after the think
    /// time; None when its conversation is over. Trace replay: always None (rows are open
    /// loop).
    pub fn follow_up(&mut self, done: &Request, completed_ns: Nanos) -> Option<Request> {
        let Source::Synthetic(convs) = &mut self.source else {
            return None;
        };
        let request = convs.follow_up(done, completed_ns, self.requests_created)?;
        self.requests_created += 1;
        Some(request)
    }

    /// Forget a conversation (its turn was rejected; no further turns).
    pub fn abandon(&mut self, conversation: u64) {
        if let Source::Synthetic(convs) = &mut self.source {
            convs.abandon(conversation);
        }
    }

    /// Conversations started so far.
    pub fn sessions_started(&self) -> u64 {
        self.sessions_started
    }

    /// Requests created so far.
    pub fn requests_created(&self) -> u64 {
        self.requests_created
    }

    /// Conversations that may still send a turn.
    pub fn live_conversations(&self) -> usize {
        match &self.source {
            Source::Synthetic(convs) => convs.live(),
            Source::Trace { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests;
