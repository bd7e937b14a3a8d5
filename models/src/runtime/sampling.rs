//! Token sampling (greedy, temperature, nucleus) from a seeded ChaCha8 stream, and the stop
//! conditions that end a generation.

use super::RuntimeError;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How one request samples and when it stops.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]: sample from the smallest set of most likely tokens whose
    /// probability reaches it. 1 keeps every token.
    pub top_p: f32,
    /// Seeds the request's own stream, so that a request replays to the same tokens.
    pub seed: u64,
    /// Generated tokens after which generation stops.
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Generation stops at the first occurrence of any of these in the generated text, which
    /// is cut before it.
    pub stop_strings: Vec<String>,
    /// The tokenizer's end-of-sequence ids are not stop tokens (vLLM's extension), so that a
    /// benchmark's output lengths are exactly `max_tokens`. Explicit `stop_token_ids` still
    /// stop.
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` tokens were generated.
    Length,
    /// The last token is this stop token.
    StopToken(u32),
    /// The text holds `stop_strings[i]`.
    StopString(usize),
}

/// A generation's end: why, and how much of the generated text to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    pub reason: FinishReason,
    /// The returned text is `text[..text_bytes]`.
    pub text_bytes: usize,
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens, no stop conditions.
    pub fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }

    /// Rejects parameters no sampler can honour, naming the field.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(RuntimeError::Invalid(format!(
                "sampling: temperature {} must be finite and >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::Invalid(format!(
                "sampling: top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if let Some(i) = self.stop_strings.iter().position(|s| s.is_empty()) {
            return Err(RuntimeError::Invalid(format!(
                "sampling: stop_strings[{i}] is empty"
            )));
        }
        Ok(())
    }

    /// Whether a generation ends after `token_ids` (every token generated so far), whose
    /// decoded text is `text` (special tokens such as a chat template's end marker left out).
    /// A stop string is found anywhere in the text, so one spread over several tokens counts;
    /// the earliest one wins and the text is cut before it. Then the last token being a stop
    /// token ends it, then reaching `max_tokens`.
    pub fn check_stop(&self, token_ids: &[u32], text: &str) -> Option<Stop> {
        let earliest = self
            .stop_strings
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = earliest {
            return Some(Stop {
                reason: FinishReason::StopString(i),
                text_bytes: at,
            });
        }
        let whole = |reason| {
            Some(Stop {
                reason,
                text_bytes: text.len(),
            })
        };
        match token_ids.last() {
            Some(&last) if self.stop_token_ids.contains(&last) => {
                whole(FinishReason::StopToken(last))
            }
            _ if token_ids.len() >= self.max_tokens => whole(FinishReason::Length),
            _ => None,
        }
    }

    /// Bytes of `text` (which holds no whole stop string) that may be streamed now: all but a
    /// tail that begins some stop string and could complete into it with later tokens.
    pub fn releasable_text_bytes(&self, text: &str) -> usize {
        let held = self
            .stop_strings
            .iter()
            .filter_map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        text.len() - held
    }
}

/// Draws tokens for one request from its own seeded stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Sampler, RuntimeError> {
        params.validate()?;
        Ok(Sampler {
            temperature: params.temperature,
            top_p: params.top_p,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        })
    }

    /// How far the request's stream has been drawn: with [`Sampler::resume`], another
    /// process continues the same stream (a decode worker after a remote prefill).
    pub fn position(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// A sampler for `params` whose stream continues at `position` (from [`Sampler::position`]).
    pub fn resume(params: &SamplingParams, position: u128) -> Result<Sampler, RuntimeError> {
        let mut sampler = Sampler::new(params)?;
        sampler.rng.set_word_pos(position);
        Ok(sampler)
    }

    /// The next token from one row of logits. Greedy takes the lowest id among equal maxima;
    /// otherwise softmax(logits / temperature), cut to the nucleus, is sampled.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, RuntimeError> {
        if logits.is_empty() {
            return Err(RuntimeError::Invalid("sampling: empty logits".into()));
        }
        if let Some(i) = logits.iter().position(|l| l.is_nan()) {
            return Err(RuntimeError::Invalid(format!(
                "sampling: logit of token {i} is NaN"
            )));
        }
        let best = argmax(logits);
        let max = logits[best as usize];
        if max == f32::NEG_INFINITY {
            return Err(RuntimeError::Invalid(
                "sampling: every logit is -infinity".into(),
            ));
        }
        if self.temperature == 0.0 || max == f32::INFINITY {
            return Ok(best);
        }
        let t = self.temperature as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max as f64) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let chosen = if self.top_p < 1.0 {
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            // Most likely first, lower id first among equals; weights hold no NaN.
            order.sort_unstable_by(|&a, &b| {
                weights[b as usize]
                    .total_cmp(&weights[a as usize])
                    .then(a.cmp(&b))
            });
            let target = self.top_p as f64 * total;
            let mut mass = 0.0;
            let mut kept = 0;
            while kept < order.len() && (kept == 0 || mass < target) {
                mass += weights[order[kept] as usize];
                kept += 1;
            }
            self.draw(order[..kept].iter().copied(), &weights, mass)
        } else {
            self.draw(0..logits.len() as u32, &weights, total)
        };
        Ok(chosen.unwrap_or(best))
    }

    /// A token from `candidates` with probability weight / mass; `None` only if rounding left
    /// the draw past every candidate of positive weight, which the caller maps to greedy.
    fn draw(
        &mut self,
        candidates: impl Iterator<Item = u32>,
        weights: &[f64],
        mass: f64,
    ) -> Option<u32> {
        let mut u = self.rng.random::<f64>() * mass;
        let mut last = None;
        for id in candidates {
            let w = weights[id as usize];
            if w > 0.0 {
                last = Some(id);
                if u < w {
                    return last;
                }
                u -= w;
            }
        }
        last
    }
}

/// Index of the largest logit, the lowest among equals (greedy decoding).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::greedy(16)
        }
    }

    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p).unwrap();
        (0..n).map(|_| s.sample(logits).unwrap()).collect()
    }

    const LOGITS: [f32; 6] = [1.0, 2.5, 0.0, 2.0, -1.0, 0.5];

    #[test]
    fn a_resumed_sampler_continues_the_same_stream() {
        let p = params(1.0, 0.9, 11);
        let whole = draws(&p, &LOGITS, 40);
        let mut first = Sampler::new(&p).unwrap();
        let mut head: Vec<u32> = (0..7).map(|_| first.sample(&LOGITS).unwrap()).collect();
        let mut rest = Sampler::resume(&p, first.position()).unwrap();
        head.extend((7..40).map(|_| rest.sample(&LOGITS).unwrap()));
        assert_eq!(head, whole);
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lowest_id() {
        let p = params(0.0, 1.0, 0);
        assert_eq!(draws(&p, &LOGITS, 3), vec![1, 1, 1]);
        assert_eq!(draws(&p, &[0.5, 3.0, -2.0, 3.0, 3.0], 1), vec![1]);
        assert_eq!(draws(&p, &[f32::NEG_INFINITY, -5.0], 1), vec![1]);
    }

    #[test]
    fn low_temperature_and_tiny_top_p_are_greedy() {
        assert!(
            draws(&params(1e-3, 1.0, 7), &LOGITS, 500)
                .iter()
                .all(|&t| t == 1)
        );
        assert!(
            draws(&params(1.0, 1e-6, 7), &LOGITS, 500)
                .iter()
                .all(|&t| t == 1)
        );
        // Ties in the nucleus go to the lowest id as well.
        let tied = [0.0, 4.0, 1.0, 4.0];
        assert!(
            draws(&params(1.0, 1e-6, 3), &tied, 200)
                .iter()
                .all(|&t| t == 1)
        );
        // At temperature 1 the same logits do not always give the argmax.
        assert!(
            draws(&params(1.0, 1.0, 7), &LOGITS, 500)
                .iter()
                .any(|&t| t != 1)
        );
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let a = draws(&params(0.8, 0.95, 42), &LOGITS, 64);
        assert_eq!(a, draws(&params(0.8, 0.95, 42), &LOGITS, 64));
        assert_ne!(a, draws(&params(0.8, 0.95, 43), &LOGITS, 64));
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    }

    /// Every token's frequency within 4.5 standard errors of its probability.
    fn assert_frequencies(samples: &[u32], probs: &[f64]) {
        let n = samples.len() as f64;
        for (id, &p) in probs.iter().enumerate() {
            let freq = samples.iter().filter(|&&t| t as usize == id).count() as f64 / n;
            let se = (p * (1.0 - p) / n).sqrt().max(1e-9);
            assert!(
                (freq - p).abs() <= 4.5 * se,
                "token {id}: frequency {freq:.4}, probability {p:.4}"
            );
        }
    }

    #[test]
    fn samples_follow_the_softmax() {
        let n = 40_000;
        for t in [1.0f32, 0.7] {
            let samples = draws(&params(t, 1.0, 11), &LOGITS, n);
            assert_frequencies(&samples, &softmax(&LOGITS, t as f64));
        }
    }

    #[test]
    fn nucleus_keeps_the_smallest_set_reaching_top_p_renormalised() {
        let probs = softmax(&LOGITS, 1.0);
        // Sorted: token 1 (0.48), 3 (0.29), 0 (0.11), ...; 0.6 needs tokens 1 and 3.
        assert!(probs[1] < 0.6 && probs[1] + probs[3] >= 0.6);
        let samples = draws(&params(1.0, 0.6, 5), &LOGITS, 40_000);
        let kept = probs[1] + probs[3];
        let mut want = vec![0.0; LOGITS.len()];
        want[1] = probs[1] / kept;
        want[3] = probs[3] / kept;
        assert_frequencies(&samples, &want);
    }

    #[test]
    fn bad_params_and_logits_are_errors() {
        for p in [
            params(-1.0, 1.0, 0),
            params(f32::NAN, 1.0, 0),
            params(1.0, 0.0, 0),
            params(1.0, 1.5, 0),
            SamplingParams {
                stop_strings: vec!["".into()],
                ..params(1.0, 1.0, 0)
            },
        ] {
            assert!(
                matches!(Sampler::new(&p), Err(RuntimeError::Invalid(_))),
                "{p:?}"
            );
        }
        let mut s = Sampler::new(&params(1.0, 1.0, 0)).unwrap();
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]).unwrap(), 1);
    }

    #[test]
    fn stop_strings_match_across_tokens_and_cut_the_text() {
        let p = SamplingParams {
            stop_strings: vec!["\n\nUser:".into(), "END".into()],
            stop_token_ids: vec![2],
            ..SamplingParams::greedy(10)
        };
        assert_eq!(p.check_stop(&[5, 6], "Hello\n\nUs"), None);
        assert_eq!(p.releasable_text_bytes("Hello\n\nUs"), 5);
        assert_eq!(p.releasable_text_bytes("Hello EN"), 6);
        assert_eq!(p.releasable_text_bytes("Hello"), 5);
        assert_eq!(
            p.check_stop(&[5, 6, 7], "Hello\n\nUser: hi"),
            Some(Stop {
                reason: FinishReason::StopString(0),
                text_bytes: 5
            })
        );
        // The earliest stop string wins, whichever is listed first.
        assert_eq!(
            p.check_stop(&[5], "aENDb\n\nUser:"),
            Some(Stop {
                reason: FinishReason::StopString(1),
                text_bytes: 1
            })
        );
    }

    #[test]
    fn stop_tokens_then_length() {
        let p = SamplingParams {
            stop_token_ids: vec![2, 9],
            ..SamplingParams::greedy(3)
        };
        assert_eq!(p.check_stop(&[], ""), None);
        assert_eq!(p.check_stop(&[2, 4], "ab"), None);
        assert_eq!(
            p.check_stop(&[4, 9], "ab"),
            Some(Stop {
                reason: FinishReason::StopToken(9),
                text_bytes: 2
            })
        );
        assert_eq!(
            p.check_stop(&[4, 5, 6], "abc"),
            Some(Stop {
                reason: FinishReason::Length,
                text_bytes: 3
            })
        );
        assert_eq!(
            p.check_stop(&[4, 5, 2], "abc").unwrap().reason,
            FinishReason::StopToken(2)
        );
    }

    #[test]
    fn releasable_text_respects_char_boundaries() {
        let p = SamplingParams {
            stop_strings: vec!["é!".into()],
            ..SamplingParams::greedy(3)
        };
        assert_eq!(p.releasable_text_bytes("café"), "caf".len());
        assert_eq!(p.releasable_text_bytes("cafe"), 4);
    }
}
