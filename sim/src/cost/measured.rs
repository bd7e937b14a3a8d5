//! Step times interpolated from a calibration profile's tables.

use super::{CostModel, StepWork};
use crate::calibration::{GraphShapes, Profile, ProfileError};
use crate::time::Nanos;

/// A table over two grid axes, read piecewise linearly in each (bilinear within a cell) and
/// extended linearly past either end by the outermost segment.
#[derive(Clone, Debug)]
struct Grid {
    xs: Vec<f64>,
    ys: Vec<f64>,
    /// Row-major: `values[i * ys.len() + j]` at `(xs[i], ys[j])`.
    values: Vec<f64>,
}

/// The segment of `axis` that `x` falls in (the first or last one outside the axis) and the
/// position along it: `x = axis[i] + u (axis[i + 1] - axis[i])`. A single-point axis is flat.
fn segment(axis: &[f64], x: f64) -> (usize, f64) {
    if axis.len() < 2 {
        return (0, 0.0);
    }
    let i = axis[1..axis.len() - 1]
        .iter()
        .take_while(|&&a| a <= x)
        .count();
    (i, (x - axis[i]) / (axis[i + 1] - axis[i]))
}

impl Grid {
    fn new(xs: &[u32], ys: &[u32], rows: impl IntoIterator<Item = Vec<f64>>) -> Grid {
        Grid {
            xs: xs.iter().map(|&x| x as f64).collect(),
            ys: ys.iter().map(|&y| y as f64).collect(),
            values: rows.into_iter().flatten().collect(),
        }
    }

    fn at(&self, x: f64, y: f64) -> f64 {
        let (i, u) = segment(&self.xs, x);
        let (j, v) = segment(&self.ys, y);
        let n = self.ys.len();
        let i1 = (i + 1).min(self.xs.len() - 1);
        let j1 = (j + 1).min(n - 1);
        let f = |i: usize, j: usize| self.values[i * n + j];
        (1.0 - u) * (1.0 - v) * f(i, j)
            + u * (1.0 - v) * f(i1, j)
            + (1.0 - u) * v * f(i, j1)
            + u * v * f(i1, j1)
    }
}

/// Step times of a measured device. A step of `b` prefill chunks of `t` tokens after `c`
/// cached tokens on average costs `prefill(b, t) + b (context(t, c) - context(t, 0))`, `t`
/// padded as the engine pads a lone chunk (the profile's `graphs`); one of
/// `b` decodes after `c` cached tokens on average costs `decode(b, c)`; a step with both pays
/// the sum less what it pays once (`shared_ns`, at most the smaller part). Every table is read
/// piecewise linearly, so the model returns each measured grid point exactly and is monotone
/// wherever its table is.
#[derive(Clone, Debug)]
pub struct Measured {
    prefill: Grid,
    /// One sequence's chunk by (chunk tokens, context tokens), context 0 taken from `prefill`.
    context: Option<Grid>,
    decode: Grid,
    shared_ns: f64,
    graphs: Option<GraphShapes>,
}

impl Measured {
    pub fn new(profile: &Profile) -> Result<Measured, ProfileError> {
        profile.validate()?;
        let as_f64 = |row: &Vec<u64>| row.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let p = &profile.prefill;
        let context = profile.prefill_context.as_ref().map(|c| {
            let mut axis = vec![0];
            axis.extend_from_slice(&c.context_tokens);
            let rows = c.tokens.iter().zip(&c.time_ns).map(|(t, row)| {
                let j = p.tokens.iter().position(|x| x == t).expect("validated");
                let mut full = vec![p.time_ns[0][j] as f64];
                full.extend(as_f64(row));
                full
            });
            Grid::new(&c.tokens, &axis, rows)
        });
        let d = &profile.decode;
        Ok(Measured {
            prefill: Grid::new(&p.seqs, &p.tokens, p.time_ns.iter().map(as_f64)),
            context,
            decode: Grid::new(&d.seqs, &d.context_tokens, d.time_ns.iter().map(as_f64)),
            shared_ns: profile.mixed.shared_ns as f64,
            graphs: profile.graphs,
        })
    }

    /// The prefill part of a step (0 without prefill chunks).
    pub fn prefill_ns(&self, w: &StepWork) -> f64 {
        if w.prefill_seqs == 0 {
            return 0.0;
        }
        let b = w.prefill_seqs as f64;
        let mut t = w.prefill_tokens as f64 / b;
        // A step of one prefill chunk alone replays the graph of its padded length.
        if let (Some(g), 1, 0) = (self.graphs, w.prefill_seqs, w.decode_seqs) {
            t = g.prefill_tokens(w.prefill_tokens) as f64;
        }
        let c = w.prefill_kv_read_tokens.saturating_sub(w.prefill_tokens) as f64 / b;
        let extra = self
            .context
            .as_ref()
            .map_or(0.0, |g| b * (g.at(t, c) - g.at(t, 0.0)));
        self.prefill.at(b, t) + extra
    }

    /// The decode part of a step (0 without decodes).
    pub fn decode_ns(&self, w: &StepWork) -> f64 {
        if w.decode_seqs == 0 {
            return 0.0;
        }
        let b = w.decode_seqs as f64;
        self.decode.at(b, w.decode_context_tokens as f64 / b)
    }

    /// How a step with both parts combines them.
    pub fn combine(&self, decode_ns: f64, prefill_ns: f64) -> f64 {
        if decode_ns == 0.0 || prefill_ns == 0.0 {
            return decode_ns + prefill_ns;
        }
        decode_ns + prefill_ns - self.shared_ns.min(decode_ns).min(prefill_ns)
    }
}

impl CostModel for Measured {
    fn step_ns(&self, w: &StepWork) -> Nanos {
        if w.is_empty() {
            return 0;
        }
        let ns = self.combine(self.decode_ns(w), self.prefill_ns(w));
        // Extrapolating below a table's first point could reach zero: a step takes time.
        ns.round().max(1.0) as Nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::tests::sample;

    fn prefill(m: &Measured, seqs: u64, tokens: u64, context: u64) -> Nanos {
        let mut w = StepWork::default();
        for _ in 0..seqs {
            w.add_prefill(tokens, context);
        }
        m.step_ns(&w)
    }

    fn decode(m: &Measured, seqs: u64, context: u64) -> Nanos {
        let mut w = StepWork::default();
        for _ in 0..seqs {
            w.add_decode(context);
        }
        m.step_ns(&w)
    }

    #[test]
    fn every_measured_grid_point_is_reproduced_exactly() {
        let profile = sample();
        let m = Measured::new(&profile).unwrap();
        let p = &profile.prefill;
        for (i, &b) in p.seqs.iter().enumerate() {
            for (j, &t) in p.tokens.iter().enumerate() {
                assert_eq!(prefill(&m, b as u64, t as u64, 0), p.time_ns[i][j]);
            }
        }
        let c = profile.prefill_context.as_ref().unwrap();
        for (i, &t) in c.tokens.iter().enumerate() {
            for (j, &ctx) in c.context_tokens.iter().enumerate() {
                assert_eq!(prefill(&m, 1, t as u64, ctx as u64), c.time_ns[i][j]);
            }
        }
        let d = &profile.decode;
        for (i, &b) in d.seqs.iter().enumerate() {
            for (j, &ctx) in d.context_tokens.iter().enumerate() {
                assert_eq!(decode(&m, b as u64, ctx as u64), d.time_ns[i][j]);
            }
        }
    }

    #[test]
    fn between_points_it_is_linear_and_past_the_last_it_extends_the_last_segment() {
        let profile = sample();
        let m = Measured::new(&profile).unwrap();
        let d = &profile.decode.time_ns;
        // Halfway between 4 and 16 sequences at 256 tokens of context.
        assert_eq!(decode(&m, 10, 256), (d[1][1] + d[2][1]) / 2);
        // 28 sequences: the 4 -> 16 segment carried on as far again.
        assert_eq!(decode(&m, 28, 256), d[2][1] + (d[2][1] - d[1][1]));
        // Halfway in both axes: the mean of the cell's corners.
        let corners = d[1][1] + d[1][2] + d[2][1] + d[2][2];
        assert_eq!(decode(&m, 10, 640), corners / 4);
    }

    #[test]
    fn monotone_tables_give_monotone_times() {
        let m = Measured::new(&sample()).unwrap();
        let mut last = 0;
        for seqs in 1..=40 {
            let t = decode(&m, seqs, 300);
            assert!(t > last, "{seqs} sequences");
            last = t;
        }
        for tokens in [1, 8, 16, 40, 64, 100, 256, 300, 1000] {
            let mut last = 0;
            for context in [0, 100, 256, 700, 1024, 3000] {
                let t = prefill(&m, 3, tokens, context);
                assert!(t > last, "{tokens} tokens after {context}");
                last = t;
            }
        }
        let mut last = 0;
        for context in (0..3000).step_by(50) {
            let t = decode(&m, 4, context);
            assert!(t >= last, "context {context}");
            last = t;
        }
    }

    #[test]
    fn a_lone_prefill_chunk_takes_its_padded_length_where_the_engine_pads() {
        let mut profile = sample();
        let plain = Measured::new(&profile).unwrap();
        profile.graphs = Some(GraphShapes {
            prefill_bucket_tokens: 64,
            prefill_max_tokens: 128,
        });
        let padded = Measured::new(&profile).unwrap();
        // 40 tokens (after 100 cached) run as 64; 64 is a bucket already.
        assert_eq!(prefill(&padded, 1, 40, 100), prefill(&plain, 1, 64, 100));
        assert_eq!(prefill(&padded, 1, 64, 0), prefill(&plain, 1, 64, 0));
        assert!(prefill(&plain, 1, 40, 0) < prefill(&plain, 1, 64, 0));
        // Past the longest graph, two chunks in a step, or a chunk beside decodes: no graph.
        assert_eq!(prefill(&padded, 1, 200, 0), prefill(&plain, 1, 200, 0));
        assert_eq!(prefill(&padded, 2, 40, 0), prefill(&plain, 2, 40, 0));
        let mixed = |m: &Measured| {
            let mut w = StepWork::default();
            w.add_decode(300);
            w.add_prefill(40, 0);
            m.step_ns(&w)
        };
        assert_eq!(mixed(&padded), mixed(&plain));
    }

    #[test]
    fn context_adds_per_sequence_to_the_empty_cache_time() {
        let profile = sample();
        let m = Measured::new(&profile).unwrap();
        let c = profile.prefill_context.as_ref().unwrap();
        // Two chunks of 16 after 1024 cached: the two-sequence prefill plus twice one
        // sequence's context increment.
        let increment = c.time_ns[0][1] - profile.prefill.time_ns[0][0];
        assert_eq!(
            prefill(&m, 2, 16, 1024),
            profile.prefill.time_ns[1][0] + 2 * increment
        );
        let mut flat = profile.clone();
        flat.prefill_context = None;
        let m = Measured::new(&flat).unwrap();
        assert_eq!(prefill(&m, 2, 16, 1024), profile.prefill.time_ns[1][0]);
    }

    #[test]
    fn mixed_steps_pay_the_shared_part_once() {
        let profile = sample();
        let m = Measured::new(&profile).unwrap();
        let step = profile.mixed.step[0];
        let mut w = StepWork::default();
        for _ in 0..step.decode_seqs {
            w.add_decode(step.decode_context_tokens as u64);
        }
        w.add_prefill(
            step.prefill_tokens as u64,
            step.prefill_context_tokens as u64,
        );
        assert_eq!(m.step_ns(&w), step.time_ns);
        let d = m.decode_ns(&w);
        let p = m.prefill_ns(&w);
        assert_eq!(m.step_ns(&w) as f64, d + p - profile.mixed.shared_ns as f64);
        // Never less than either part alone.
        let mut greedy = profile.clone();
        greedy.mixed.shared_ns = u64::MAX / 4;
        let m = Measured::new(&greedy).unwrap();
        assert_eq!(m.step_ns(&w) as f64, d.max(p));
        assert_eq!(m.step_ns(&StepWork::default()), 0);
    }

    #[test]
    fn a_bad_profile_is_refused() {
        let mut profile = sample();
        profile.decode.time_ns.pop();
        let err = Measured::new(&profile).unwrap_err();
        assert_eq!(err.path, "decode.time_ns");
    }
}
