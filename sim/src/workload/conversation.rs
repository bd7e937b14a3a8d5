//! Synthetic multi-turn conversations.
//!
//! A conversation's plan (turn count, system prompt, per-turn user and output lengths, think
//! times) comes from its own random stream, `substream(seed, Conversations, id)`, drawn in a
//! fixed order: turn count, system prompt, then per turn user tokens, output tokens and (from
//! the second turn) think time. A turn is drawn when the turn before it is issued, so a live
//! conversation holds its stream and one planned turn rather than a list of turns, and the
//! plan is exactly what drawing it whole at the start would give, whatever the simulated
//! cluster does with the conversation.

use std::collections::HashMap;

use rand::RngExt;

use super::{Arrivals, Content, DurationDist, LengthDist, Request, WorkloadConfig, WorkloadError};
use crate::rng::{self, Rng, Stream, mix64};
use crate::time::{Nanos, secs_to_ns};

const CONVERSATION_SALT: u64 = 0xC0_4E55_0000_0001;
const SYSTEM_SALT: u64 = 0x5157_E400_0000_0002;

/// The token stream of conversation `conversation` under `seed`.
fn conversation_stream(seed: u64, conversation: u64) -> u64 {
    mix64(mix64(seed ^ CONVERSATION_SALT) ^ conversation)
}

/// The token stream of shared system prompt `index` under `seed`; never 0, which means "no
/// system prompt".
fn system_stream(seed: u64, index: u32) -> u64 {
    mix64(mix64(seed ^ SYSTEM_SALT) ^ index as u64).max(1)
}

#[derive(Clone, Copy, Debug)]
struct TurnPlan {
    user_tokens: u32,
    output_tokens: u32,
    think_ns: Nanos,
}

/// A conversation that has another turn to send.
struct Live {
    rng: Rng,
    content: Content,
    /// The turn `next` describes.
    next_turn: u32,
    turns: u32,
    next: TurnPlan,
    /// Prompt plus answer of the turn issued last: the next turn's history.
    context_tokens: u64,
}

pub(super) struct Conversations {
    seed: u64,
    arrivals: Arrivals,
    sessions: Option<u64>,
    end_ns: Option<Nanos>,
    turns: LengthDist,
    system_prompt_tokens: u32,
    system_prompts: u32,
    user_tokens: LengthDist,
    output_tokens: LengthDist,
    think_time: DurationDist,
    max_prompt_tokens: u64,
    started: u64,
    exhausted: bool,
    live: HashMap<u64, Live>,
}

impl Conversations {
    /// `cfg` must be a validated synthetic configuration.
    pub(super) fn new(cfg: &WorkloadConfig, seed: u64) -> Result<Self, WorkloadError> {
        let required = |field: &str| WorkloadError::Invalid {
            field: field.into(),
            message: "is required unless workload.trace is set".into(),
        };
        let arrival = cfg
            .arrival
            .as_ref()
            .ok_or_else(|| required("workload.arrival"))?;
        Ok(Conversations {
            seed,
            arrivals: Arrivals::new(arrival, rng::stream(seed, Stream::Arrivals))?,
            sessions: cfg.sessions,
            end_ns: cfg.duration_s.map(secs_to_ns),
            turns: cfg.turns.clone(),
            system_prompt_tokens: cfg.system_prompt_tokens,
            system_prompts: cfg.system_prompts.max(1),
            user_tokens: cfg
                .user_tokens
                .clone()
                .ok_or_else(|| required("workload.user_tokens"))?,
            output_tokens: cfg
                .output_tokens
                .clone()
                .ok_or_else(|| required("workload.output_tokens"))?,
            think_time: cfg.think_time.clone(),
            max_prompt_tokens: cfg.max_prompt_tokens.unwrap_or(u32::MAX) as u64,
            started: 0,
            exhausted: false,
            live: HashMap::new(),
        })
    }

    /// Starts the next conversation and returns its first turn as request `id`.
    pub(super) fn start(&mut self, id: u64) -> Option<Request> {
        if self.exhausted || self.sessions.is_some_and(|s| self.started >= s) {
            self.exhausted = true;
            return None;
        }
        let arrival_ns = self.arrivals.next_ns();
        if self.end_ns.is_some_and(|end| arrival_ns >= end) {
            self.exhausted = true;
            return None;
        }
        let conversation = self.started;
        self.started += 1;

        let mut rng = rng::substream(self.seed, Stream::Conversations, conversation);
        let turns = self.turns.sample(&mut rng);
        let system_index = if self.system_prompts > 1 {
            rng.random_range(0..self.system_prompts)
        } else {
            0
        };
        let content = Content::Synthetic {
            system: if self.system_prompt_tokens > 0 {
                system_stream(self.seed, system_index)
            } else {
                0
            },
            system_tokens: self.system_prompt_tokens,
            stream: conversation_stream(self.seed, conversation),
        };
        let first = self.draw_turn(&mut rng, 0);
        let fits = self
            .max_prompt_tokens
            .saturating_sub(self.system_prompt_tokens as u64);
        let prompt_tokens = self.system_prompt_tokens as u64 + (first.user_tokens as u64).min(fits);
        let request = Request {
            id,
            conversation,
            turn: 0,
            arrival_ns,
            prompt_tokens: prompt_tokens as u32,
            history_tokens: 0,
            output_tokens: first.output_tokens,
            content,
        };
        let live = Live {
            rng,
            content: request.content.clone(),
            next_turn: 0,
            turns,
            next: first,
            context_tokens: prompt_tokens + first.output_tokens as u64,
        };
        self.plan_next(conversation, live);
        Some(request)
    }

    /// The turn after `done`, as request `id`, or None when its conversation is over.
    pub(super) fn follow_up(
        &mut self,
        done: &Request,
        completed_ns: Nanos,
        id: u64,
    ) -> Option<Request> {
        // Only the turn just issued may ask for its successor, once.
        if self.live.get(&done.conversation)?.next_turn != done.turn + 1 {
            return None;
        }
        let live = self.live.remove(&done.conversation)?;
        let prompt_tokens = live.context_tokens + live.next.user_tokens as u64;
        let request = Request {
            id,
            conversation: done.conversation,
            turn: live.next_turn,
            arrival_ns: completed_ns.saturating_add(live.next.think_ns),
            prompt_tokens: prompt_tokens as u32,
            history_tokens: live.context_tokens as u32,
            output_tokens: live.next.output_tokens,
            content: live.content.clone(),
        };
        let live = Live {
            context_tokens: prompt_tokens + live.next.output_tokens as u64,
            ..live
        };
        self.plan_next(done.conversation, live);
        Some(request)
    }

    pub(super) fn abandon(&mut self, conversation: u64) {
        self.live.remove(&conversation);
    }

    pub(super) fn live(&self) -> usize {
        self.live.len()
    }

    /// Draws the turn after the one `live` describes and keeps the conversation only if that
    /// turn exists and its prompt fits.
    fn plan_next(&mut self, conversation: u64, mut live: Live) {
        let turn = live.next_turn + 1;
        if turn >= live.turns {
            return;
        }
        let next = self.draw_turn(&mut live.rng, turn);
        if live.context_tokens + next.user_tokens as u64 > self.max_prompt_tokens {
            return;
        }
        live.next_turn = turn;
        live.next = next;
        self.live.insert(conversation, live);
    }

    fn draw_turn(&self, rng: &mut Rng, turn: u32) -> TurnPlan {
        let user_tokens = self.user_tokens.sample(rng);
        let output_tokens = self.output_tokens.sample(rng);
        let think_ns = if turn > 0 {
            self.think_time.sample_ns(rng)
        } else {
            0
        };
        TurnPlan {
            user_tokens,
            output_tokens,
            think_ns,
        }
    }
}
