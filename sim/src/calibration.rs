//! Calibration profiles: step and KV transfer times measured on one device for one model.
//!
//! `disagg-hw calibrate` writes a profile; [`crate::cost::Measured`] interpolates its tables
//! and a scenario names it (`profile = "FILE"` in a `[[setup]]`), whose `link` may then name
//! a link fitted from its transfers. A profile is TOML:
//!
//! - `[meta]`: what was measured, where, with what.
//! - `[prefill]`: steps of `seqs` sequences of `tokens` new tokens each, from an empty cache.
//! - `[prefill_context]` (optional): one sequence's chunk of `tokens` after `context_tokens`
//!   already cached; without it, context is taken to cost nothing beyond the chunk.
//! - `[decode]`: steps of `seqs` sequences decoding one token after `context_tokens` each.
//! - `[mixed]`: steps of decodes and one prefill chunk, and `shared_ns`: what such a step
//!   pays once rather than twice (see [`crate::cost::Measured`]).
//! - `[[transfer]]`: KV transfer times by payload size over one transport, and `[[link]]`: the
//!   links fitted to them ([`fit_link`]).
//!
//! Every time is the median of the repeats, in nanoseconds.

use crate::config::{ConfigError, from_toml, invalid_at};
use crate::cost::{CostModel, Measured, StepWork};
use crate::network::{LinkKind, LinkSpec};
use models::DType;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A measured device and model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub meta: Meta,
    /// The shapes the engine pads its steps to, where it replays recorded ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphs: Option<GraphShapes>,
    pub prefill: PrefillTable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_context: Option<ContextTable>,
    pub decode: DecodeTable,
    pub mixed: MixedSteps,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfer: Vec<TransferTable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<LinkSpec>,
}

/// Where and how the profile was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The machine, in words (CPU model and cores, or GPU).
    pub machine: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The model preset measured; a scenario using the profile must name the same.
    pub model: String,
    /// Weights and KV cache element type.
    pub dtype: DType,
    /// Threads the runtime computed with.
    pub threads: u32,
    pub block_size_tokens: u32,
    /// How finished rows were sampled (the engine samples each after its step).
    pub sampling: String,
    pub disagg_version: String,
    pub candle_version: String,
    /// UTC, YYYY-MM-DD.
    pub date: String,
    /// The command that wrote the profile.
    pub command: String,
}

/// Prefill steps from an empty cache: `time_ns[i][j]` is `seqs[i]` sequences of `tokens[j]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillTable {
    /// Timed repetitions behind each median.
    pub repeats: u32,
    pub seqs: Vec<u32>,
    pub tokens: Vec<u32>,
    pub time_ns: Vec<Vec<u64>>,
}

/// One sequence's prefill chunk after a cached context: `time_ns[i][j]` is a chunk of
/// `tokens[i]` after `context_tokens[j]`. Context 0 is the prefill table's one-sequence row,
/// so every `tokens` must be in that table and every context positive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextTable {
    pub repeats: u32,
    pub tokens: Vec<u32>,
    pub context_tokens: Vec<u32>,
    pub time_ns: Vec<Vec<u64>>,
}

/// Decode steps: `time_ns[i][j]` is `seqs[i]` sequences each with `context_tokens[j]` in its
/// cache before the step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeTable {
    pub repeats: u32,
    pub seqs: Vec<u32>,
    pub context_tokens: Vec<u32>,
    pub time_ns: Vec<Vec<u64>>,
}

/// An engine that replays recorded steps (CUDA graphs) runs a one-sequence prefill of up to
/// `prefill_max_tokens` tokens as the graph of its token count rounded up to a multiple of
/// `prefill_bucket_tokens`: the step takes the rounded count's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphShapes {
    pub prefill_bucket_tokens: u32,
    pub prefill_max_tokens: u32,
}

impl GraphShapes {
    /// The tokens a lone prefill chunk of `tokens` computes.
    pub fn prefill_tokens(&self, tokens: u64) -> u64 {
        if tokens <= u64::from(self.prefill_max_tokens) {
            tokens.next_multiple_of(u64::from(self.prefill_bucket_tokens))
        } else {
            tokens
        }
    }
}

/// Steps that carry decodes and a prefill chunk together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixedSteps {
    /// Paid once by a mixed step although both its decode and its prefill time include it
    /// (the pass over the weights, the step's fixed cost); fitted to `step`.
    pub shared_ns: u64,
    pub repeats: u32,
    #[serde(default)]
    pub step: Vec<MixedStep>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixedStep {
    pub decode_seqs: u32,
    pub decode_context_tokens: u32,
    /// One prefill chunk of this many tokens after `prefill_context_tokens`.
    pub prefill_tokens: u32,
    pub prefill_context_tokens: u32,
    pub time_ns: u64,
}

impl MixedStep {
    pub fn shape(&self) -> StepShape {
        StepShape {
            decode_seqs: self.decode_seqs,
            decode_context_tokens: self.decode_context_tokens,
            prefill_seqs: 1,
            prefill_tokens: self.prefill_tokens,
            prefill_context_tokens: self.prefill_context_tokens,
        }
    }
}

/// A step of identical sequences: `decode_seqs` decodes after `decode_context_tokens` each and
/// `prefill_seqs` chunks of `prefill_tokens` after `prefill_context_tokens` each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepShape {
    pub decode_seqs: u32,
    pub decode_context_tokens: u32,
    pub prefill_seqs: u32,
    pub prefill_tokens: u32,
    pub prefill_context_tokens: u32,
}

impl StepShape {
    pub fn prefill(seqs: u32, tokens: u32, context_tokens: u32) -> StepShape {
        StepShape {
            prefill_seqs: seqs,
            prefill_tokens: tokens,
            prefill_context_tokens: context_tokens,
            ..StepShape::default()
        }
    }

    pub fn decode(seqs: u32, context_tokens: u32) -> StepShape {
        StepShape {
            decode_seqs: seqs,
            decode_context_tokens: context_tokens,
            ..StepShape::default()
        }
    }

    /// Tokens the step feeds the model: one per decode, and every prefill chunk's.
    pub fn tokens(&self) -> u32 {
        self.decode_seqs + self.prefill_seqs * self.prefill_tokens
    }

    /// The step as the simulator's engine describes it.
    pub fn work(&self) -> StepWork {
        let mut w = StepWork::default();
        for _ in 0..self.decode_seqs {
            w.add_decode(self.decode_context_tokens as u64);
        }
        for _ in 0..self.prefill_seqs {
            w.add_prefill(
                self.prefill_tokens as u64,
                self.prefill_context_tokens as u64,
            );
        }
        w
    }
}

/// How closely a fitted model reproduces one group of measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct Accuracy {
    pub what: String,
    pub points: usize,
    /// |model - measured| / measured, largest and median over the points.
    pub max_rel_error: f64,
    pub median_rel_error: f64,
}

impl Accuracy {
    /// The accuracy over `(model, measured)` pairs.
    pub fn of(what: impl Into<String>, pairs: impl IntoIterator<Item = (f64, f64)>) -> Accuracy {
        let mut errors: Vec<f64> = pairs
            .into_iter()
            .map(|(model, measured)| (model - measured).abs() / measured)
            .collect();
        errors.sort_by(f64::total_cmp);
        let n = errors.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => errors[n / 2],
            _ => (errors[n / 2 - 1] + errors[n / 2]) / 2.0,
        };
        Accuracy {
            what: what.into(),
            points: n,
            max_rel_error: errors.last().copied().unwrap_or(0.0),
            median_rel_error: median,
        }
    }
}

/// KV transfers of growing size over one transport, each from the sender's export to the
/// receiver's import. `time_ns` is the whole; the other columns are its parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferTable {
    /// The `[[link]]` fitted to these times.
    pub link: String,
    pub repeats: u32,
    pub payload_bytes: Vec<u64>,
    pub time_ns: Vec<u64>,
    /// Copying the blocks out of the sender's cache.
    pub export_ns: Vec<u64>,
    /// Framing, the socket and the receiver's acknowledgement.
    pub send_ns: Vec<u64>,
    /// Copying the blocks into the receiver's cache.
    pub import_ns: Vec<u64>,
}

/// A profile field that is wrong: its dotted path and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ProfileError {
    pub path: String,
    pub message: String,
}

fn bad(path: impl Into<String>, message: impl Into<String>) -> ProfileError {
    ProfileError {
        path: path.into(),
        message: message.into(),
    }
}

/// Fitting a link to transfer times failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("a link fit needs at least two payload sizes, got {0}")]
    TooFewSizes(usize),
    #[error("transfer times do not grow with the payload: no bandwidth can be fitted")]
    NoSlope,
}

impl Profile {
    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Profile, ConfigError> {
        let (text, file) = crate::config::read_config(path)?;
        Profile::parse(&text, &file)
    }

    /// Parses and checks profile text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Profile, ConfigError> {
        let profile: Profile = from_toml(text, file)?;
        profile
            .validate()
            .map_err(|e| invalid_at(text, file, &e.path, e.message))?;
        Ok(profile)
    }

    /// The profile as TOML, as [`Profile::parse`] reads it.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Sets `mixed.shared_ns` to the value whose rule reproduces the mixed steps best (least
    /// squares of the relative errors), from 0 (a mixed step costs its decode plus its
    /// prefill) up to where it costs only the larger of the two.
    pub fn fit_shared_ns(&mut self) -> Result<(), ProfileError> {
        self.mixed.shared_ns = 0;
        let model = Measured::new(self)?;
        let parts: Vec<(f64, f64, f64)> = self
            .mixed
            .step
            .iter()
            .map(|s| {
                let w = s.shape().work();
                (model.decode_ns(&w), model.prefill_ns(&w), s.time_ns as f64)
            })
            .collect();
        let cost = |shared: f64| -> f64 {
            parts
                .iter()
                .map(|&(d, p, m)| {
                    let e = (d + p - shared.min(d).min(p) - m) / m;
                    e * e
                })
                .sum()
        };
        let ceiling = parts.iter().map(|&(d, p, _)| d.min(p)).fold(0.0, f64::max);
        // The cost is piecewise quadratic in `shared`: a fine scan finds its minimum.
        const STEPS: u32 = 4096;
        let best = (0..=STEPS)
            .map(|i| ceiling * i as f64 / STEPS as f64)
            .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))
            .unwrap_or(0.0);
        self.mixed.shared_ns = best.round() as u64;
        Ok(())
    }

    /// How closely the interpolated tables, the mixing rule and the fitted links reproduce
    /// the measurements they were made from.
    pub fn accuracy(&self) -> Result<Vec<Accuracy>, ProfileError> {
        let model = Measured::new(self)?;
        let at = |shape: StepShape| model.step_ns(&shape.work()) as f64;
        let mut rows = Vec::new();
        let p = &self.prefill;
        rows.push(Accuracy::of(
            "prefill from an empty cache",
            p.seqs.iter().zip(&p.time_ns).flat_map(|(&b, row)| {
                p.tokens
                    .iter()
                    .zip(row)
                    .map(move |(&t, &m)| (at(StepShape::prefill(b, t, 0)), m as f64))
            }),
        ));
        if let Some(c) = &self.prefill_context {
            rows.push(Accuracy::of(
                "prefill after a cached context",
                c.tokens.iter().zip(&c.time_ns).flat_map(|(&t, row)| {
                    c.context_tokens
                        .iter()
                        .zip(row)
                        .map(move |(&ctx, &m)| (at(StepShape::prefill(1, t, ctx)), m as f64))
                }),
            ));
        }
        let d = &self.decode;
        rows.push(Accuracy::of(
            "decode",
            d.seqs.iter().zip(&d.time_ns).flat_map(|(&b, row)| {
                d.context_tokens
                    .iter()
                    .zip(row)
                    .map(move |(&ctx, &m)| (at(StepShape::decode(b, ctx)), m as f64))
            }),
        ));
        if !self.mixed.step.is_empty() {
            rows.push(Accuracy::of(
                format!(
                    "mixed steps: decode + prefill - min({:.1} ms, decode, prefill)",
                    self.mixed.shared_ns as f64 / 1e6
                ),
                self.mixed
                    .step
                    .iter()
                    .map(|s| (at(s.shape()), s.time_ns as f64)),
            ));
            rows.push(Accuracy::of(
                "mixed steps if summed (for comparison)",
                self.mixed.step.iter().map(|s| {
                    let w = s.shape().work();
                    (model.decode_ns(&w) + model.prefill_ns(&w), s.time_ns as f64)
                }),
            ));
        }
        for t in &self.transfer {
            let link = self.link(&t.link).expect("validated");
            rows.push(Accuracy::of(
                format!("transfers over {}", t.link),
                t.payload_bytes
                    .iter()
                    .zip(&t.time_ns)
                    .map(|(&b, &m)| (link.lone_transfer_ns(b) as f64, m as f64)),
            ));
        }
        Ok(rows)
    }

    /// A link of the profile, by name.
    pub fn link(&self, name: &str) -> Option<&LinkSpec> {
        self.link.iter().find(|l| l.name == name)
    }

    /// Checks that every table is complete, every grid strictly increasing and every time
    /// positive, so that interpolation is defined everywhere.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.meta.model.trim().is_empty() {
            return Err(bad("meta.model", "must name the model measured"));
        }
        if self.meta.block_size_tokens == 0 {
            return Err(bad("meta.block_size_tokens", "must be positive"));
        }
        if let Some(g) = &self.graphs {
            if g.prefill_bucket_tokens == 0 {
                return Err(bad("graphs.prefill_bucket_tokens", "must be positive"));
            }
            if g.prefill_max_tokens < g.prefill_bucket_tokens {
                return Err(bad(
                    "graphs.prefill_max_tokens",
                    "must be at least graphs.prefill_bucket_tokens",
                ));
            }
        }
        let p = &self.prefill;
        axis("prefill.seqs", &p.seqs, 1)?;
        axis("prefill.tokens", &p.tokens, 1)?;
        table("prefill.time_ns", &p.time_ns, p.seqs.len(), p.tokens.len())?;
        if let Some(c) = &self.prefill_context {
            axis("prefill_context.tokens", &c.tokens, 1)?;
            axis("prefill_context.context_tokens", &c.context_tokens, 1)?;
            table(
                "prefill_context.time_ns",
                &c.time_ns,
                c.tokens.len(),
                c.context_tokens.len(),
            )?;
            if p.seqs[0] != 1 {
                return Err(bad(
                    "prefill.seqs",
                    "must start at 1: the one-sequence row is prefill_context's context 0",
                ));
            }
            if let Some(t) = c.tokens.iter().find(|t| !p.tokens.contains(t)) {
                return Err(bad(
                    "prefill_context.tokens",
                    format!("{t} is not in prefill.tokens, which holds its context 0"),
                ));
            }
        }
        let d = &self.decode;
        axis("decode.seqs", &d.seqs, 1)?;
        axis("decode.context_tokens", &d.context_tokens, 0)?;
        table(
            "decode.time_ns",
            &d.time_ns,
            d.seqs.len(),
            d.context_tokens.len(),
        )?;
        for (i, s) in self.mixed.step.iter().enumerate() {
            if s.decode_seqs == 0 || s.prefill_tokens == 0 || s.time_ns == 0 {
                return Err(bad(
                    format!("mixed.step[{i}]"),
                    "decode_seqs, prefill_tokens and time_ns must be positive",
                ));
            }
        }
        for (i, link) in self.link.iter().enumerate() {
            link.validate().map_err(|e| {
                let (field, message) = e.split_once(' ').unwrap_or((&e, ""));
                bad(format!("link[{i}].{field}"), message.trim_start())
            })?;
            if self.link[..i].iter().any(|l| l.name == link.name) {
                return Err(bad(
                    format!("link[{i}].name"),
                    format!("`{}` is defined twice", link.name),
                ));
            }
        }
        for (i, t) in self.transfer.iter().enumerate() {
            let at = |field: &str| format!("transfer[{i}].{field}");
            if self.link(&t.link).is_none() {
                return Err(bad(
                    at("link"),
                    format!("`{}` is not a [[link]] of this profile", t.link),
                ));
            }
            if t.payload_bytes.is_empty() || t.payload_bytes.windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad(
                    at("payload_bytes"),
                    "must be a non-empty, strictly increasing list",
                ));
            }
            if t.payload_bytes[0] == 0 {
                return Err(bad(at("payload_bytes"), "sizes must be positive"));
            }
            for (field, column) in [
                ("time_ns", &t.time_ns),
                ("export_ns", &t.export_ns),
                ("send_ns", &t.send_ns),
                ("import_ns", &t.import_ns),
            ] {
                if column.len() != t.payload_bytes.len() {
                    return Err(bad(
                        at(field),
                        format!(
                            "has {} entries, payload_bytes has {}",
                            column.len(),
                            t.payload_bytes.len()
                        ),
                    ));
                }
            }
            if t.time_ns.contains(&0) {
                return Err(bad(at("time_ns"), "times must be positive"));
            }
        }
        Ok(())
    }
}

/// A grid axis: non-empty, strictly increasing, every value at least `min`.
fn axis(path: &str, values: &[u32], min: u32) -> Result<(), ProfileError> {
    if values.is_empty() || values.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad(path, "must be a non-empty, strictly increasing list"));
    }
    if values[0] < min {
        return Err(bad(path, format!("values must be at least {min}")));
    }
    Ok(())
}

/// A table of `rows` rows of `cols` positive times.
fn table(path: &str, values: &[Vec<u64>], rows: usize, cols: usize) -> Result<(), ProfileError> {
    if values.len() != rows {
        return Err(bad(
            path,
            format!(
                "has {} rows, its first axis has {rows} values",
                values.len()
            ),
        ));
    }
    for (i, row) in values.iter().enumerate() {
        if row.len() != cols {
            return Err(bad(
                format!("{path}[{i}]"),
                format!("has {} values, the second axis has {cols}", row.len()),
            ));
        }
        if row.contains(&0) {
            return Err(bad(format!("{path}[{i}]"), "times must be positive"));
        }
    }
    Ok(())
}

/// Weighted least squares of `y = a + k x` minimising relative error; the intercept is held
/// at 0 when the free fit would make it negative. Returns (a, k).
fn fit_line(x: &[f64], y: &[f64]) -> (f64, f64) {
    let (mut s, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (&x, &y) in x.iter().zip(y) {
        let w = 1.0 / (y * y);
        s += w;
        sx += w * x;
        sy += w * y;
        sxx += w * x * x;
        sxy += w * x * y;
    }
    let det = s * sxx - sx * sx;
    let k = (s * sxy - sx * sy) / det;
    let a = (sy - k * sx) / s;
    if a >= 0.0 && k.is_finite() {
        (a, k)
    } else {
        (0.0, sxy / sxx)
    }
}

/// The link that reproduces a transport's measured transfer times in the simulator's network
/// model: the fixed part of the time becomes `per_transfer_overhead_ns` (on loopback the
/// route's latency cannot be told apart from setting up the connection), the per-byte cost of
/// the export `host_copy_bytes_per_s` (the sender's copy), that of the import
/// `import_bytes_per_s` (the receiving engine's copy, which the decode worker pays between its
/// steps) and the rest of the per-byte cost (framing, checksums, the socket) the bandwidth. A
/// lone transfer of B bytes, import included, then takes `a + k B`, the line fitted to the
/// whole times.
pub fn fit_link(name: &str, kind: LinkKind, t: &TransferTable) -> Result<LinkSpec, FitError> {
    let n = t.payload_bytes.len();
    if n < 2 {
        return Err(FitError::TooFewSizes(n));
    }
    let x: Vec<f64> = t.payload_bytes.iter().map(|&b| b as f64).collect();
    let slope = |ns: &[u64]| {
        let y: Vec<f64> = ns.iter().map(|&v| v.max(1) as f64).collect();
        fit_line(&x, &y)
    };
    let (a, k) = slope(&t.time_ns);
    if !(k > 0.0 && k.is_finite()) {
        return Err(FitError::NoSlope);
    }
    // Copies take the share they measured; the wire keeps at least a tenth of the slope, so
    // noise in a copy-dominated transfer cannot leave it a rate of zero.
    let (_, k_export) = slope(&t.export_ns);
    let (_, k_import) = slope(&t.import_ns);
    let (k_export, k_import) = (k_export.max(0.0), k_import.max(0.0));
    let scale = (0.9 * k / (k_export + k_import)).min(1.0);
    let (k_export, k_import) = (k_export * scale, k_import * scale);
    let k_wire = k - k_export - k_import;
    let rate = |k: f64| (k > 0.0).then(|| 1e9 / k);
    Ok(LinkSpec {
        name: name.to_string(),
        kind,
        bandwidth_gbit_per_s: 8.0 / k_wire,
        efficiency: 1.0,
        latency_ns: 0,
        per_transfer_overhead_ns: a.round() as u64,
        host_copy_bytes_per_s: rate(k_export),
        serialize_bytes_per_s: None,
        import_bytes_per_s: rate(k_import),
        time_spread: Vec::new(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small consistent profile: prefill ~ 1 ms + 10 us/token/seq with a context cost, decode
    /// ~ 2 ms + 50 us/seq + 10 ns/context token/seq, one link.
    pub(crate) fn sample() -> Profile {
        let prefill_ns = |b: u64, t: u64| 1_000_000 + 10_000 * b * t + 5 * b * t * t;
        let decode_ns = |b: u64, c: u64| 2_000_000 + 50_000 * b + 10 * b * c;
        let seqs = [1, 2, 4];
        let tokens = [16, 64, 256];
        let context_tokens = [256, 1024];
        let decode_seqs = [1, 4, 16];
        let decode_context = [16, 256, 1024];
        let link = LinkSpec {
            name: "tcp-test".into(),
            kind: LinkKind::Tcp,
            bandwidth_gbit_per_s: 16.0,
            efficiency: 1.0,
            latency_ns: 0,
            per_transfer_overhead_ns: 100_000,
            host_copy_bytes_per_s: Some(4e9),
            serialize_bytes_per_s: None,
            import_bytes_per_s: None,
            time_spread: Vec::new(),
        };
        let sizes = vec![1_000_000u64, 4_000_000, 16_000_000];
        Profile {
            meta: Meta {
                machine: "test".into(),
                device: "cpu".into(),
                model: "smollm2-135m".into(),
                dtype: DType::F32,
                threads: 2,
                block_size_tokens: 16,
                sampling: "greedy".into(),
                disagg_version: "0.1.0".into(),
                candle_version: "0.11.0".into(),
                date: "2025-01-01".into(),
                command: "test".into(),
            },
            graphs: None,
            prefill: PrefillTable {
                repeats: 3,
                time_ns: seqs
                    .iter()
                    .map(|&b| tokens.iter().map(|&t| prefill_ns(b, t)).collect())
                    .collect(),
                seqs: seqs.iter().map(|&b| b as u32).collect(),
                tokens: tokens.iter().map(|&t| t as u32).collect(),
            },
            prefill_context: Some(ContextTable {
                repeats: 3,
                time_ns: [16u64, 256]
                    .iter()
                    .map(|&t| {
                        context_tokens
                            .iter()
                            .map(|&c| prefill_ns(1, t) + 20 * t * c)
                            .collect()
                    })
                    .collect(),
                tokens: vec![16, 256],
                context_tokens: context_tokens.iter().map(|&c| c as u32).collect(),
            }),
            decode: DecodeTable {
                repeats: 5,
                time_ns: decode_seqs
                    .iter()
                    .map(|&b| decode_context.iter().map(|&c| decode_ns(b, c)).collect())
                    .collect(),
                seqs: decode_seqs.iter().map(|&b| b as u32).collect(),
                context_tokens: decode_context.iter().map(|&c| c as u32).collect(),
            },
            mixed: MixedSteps {
                shared_ns: 1_500_000,
                repeats: 5,
                step: vec![MixedStep {
                    decode_seqs: 4,
                    decode_context_tokens: 256,
                    prefill_tokens: 64,
                    prefill_context_tokens: 0,
                    time_ns: decode_ns(4, 256) + prefill_ns(1, 64) - 1_500_000,
                }],
            },
            transfer: vec![TransferTable {
                link: "tcp-test".into(),
                repeats: 7,
                time_ns: sizes.iter().map(|&b| link.lone_transfer_ns(b)).collect(),
                export_ns: sizes.iter().map(|&b| b / 8).collect(),
                send_ns: sizes.iter().map(|&b| 100_000 + b / 2).collect(),
                import_ns: sizes.iter().map(|&b| b / 8).collect(),
                payload_bytes: sizes,
            }],
            link: vec![link],
        }
    }

    #[test]
    fn a_profile_round_trips_through_toml() {
        let mut profile = sample();
        profile.validate().unwrap();
        let text = profile.to_toml().unwrap();
        assert_eq!(Profile::parse(&text, "p.toml").unwrap(), profile);
        profile.graphs = Some(GraphShapes {
            prefill_bucket_tokens: 64,
            prefill_max_tokens: 1024,
        });
        let text = profile.to_toml().unwrap();
        assert!(
            text.contains("[graphs]\nprefill_bucket_tokens = 64\n"),
            "{text}"
        );
        assert_eq!(Profile::parse(&text, "p.toml").unwrap(), profile);
        profile.graphs = Some(GraphShapes {
            prefill_bucket_tokens: 64,
            prefill_max_tokens: 32,
        });
        let e = profile.validate().unwrap_err();
        assert_eq!(e.path, "graphs.prefill_max_tokens");
    }

    #[test]
    fn graphs_pad_lone_prefills_up_to_their_longest() {
        let g = GraphShapes {
            prefill_bucket_tokens: 64,
            prefill_max_tokens: 1024,
        };
        let padded: Vec<u64> = [1, 64, 65, 600, 1024, 1025]
            .map(|t| g.prefill_tokens(t))
            .into();
        assert_eq!(padded, [64, 64, 128, 640, 1024, 1025]);
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let text = sample().to_toml().unwrap();
        let broken = text.replacen("seqs = [1, 4, 16]", "seqs = [1, 16, 4]", 1);
        assert_ne!(broken, text);
        let line = broken
            .lines()
            .position(|l| l.starts_with("seqs = [1, 16, 4]"))
            .unwrap()
            + 1;
        let msg = Profile::parse(&broken, "p.toml").unwrap_err().to_string();
        assert!(msg.starts_with(&format!("p.toml:{line}:")), "{msg}");
        assert!(
            msg.contains("decode.seqs: must be a non-empty, strictly"),
            "{msg}"
        );

        let mut short = sample();
        short.decode.time_ns[1].pop();
        let msg = Profile::parse(&short.to_toml().unwrap(), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("decode.time_ns[1]: has 2 values"), "{msg}");

        let mut orphan = sample();
        orphan.transfer[0].link = "nowhere".into();
        let msg = Profile::parse(&orphan.to_toml().unwrap(), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("transfer[0].link: `nowhere`"), "{msg}");

        let mut stray = sample();
        stray.prefill_context.as_mut().unwrap().tokens = vec![16, 100];
        let msg = Profile::parse(&stray.to_toml().unwrap(), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("prefill_context.tokens: 100 is not in"),
            "{msg}"
        );

        let unknown = text.replacen("[decode]", "[decode]\nbatch = [1]", 1);
        let msg = Profile::parse(&unknown, "p.toml").unwrap_err().to_string();
        assert!(msg.contains("unknown field `batch`"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn the_mixing_rule_is_fitted_to_the_mixed_steps() {
        let mut profile = sample();
        let exact = profile.mixed.shared_ns;
        profile.mixed.shared_ns = 0;
        profile.fit_shared_ns().unwrap();
        let found = profile.mixed.shared_ns as f64;
        assert!((found / exact as f64 - 1.0).abs() < 1e-3, "{found}");
        // Steps that cost exactly the sum leave nothing shared.
        let model = Measured::new(&profile).unwrap();
        for step in &mut profile.mixed.step {
            let w = step.shape().work();
            step.time_ns = (model.decode_ns(&w) + model.prefill_ns(&w)) as u64;
        }
        profile.fit_shared_ns().unwrap();
        assert_eq!(profile.mixed.shared_ns, 0);
    }

    #[test]
    fn accuracy_is_exact_on_the_grid_and_measures_the_rest() {
        let mut profile = sample();
        let rows = profile.accuracy().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.what.as_str()).collect();
        assert_eq!(names.len(), 6, "{names:?}");
        for row in &rows[..4] {
            assert_eq!(row.max_rel_error, 0.0, "{}", row.what);
        }
        assert_eq!(rows[0].points, 9);
        assert!(rows[4].what.contains("if summed") && rows[4].max_rel_error > 0.1);
        assert!(rows[5].what.contains("tcp-test") && rows[5].max_rel_error < 1e-6);
        profile.mixed.step[0].time_ns *= 2;
        let doubled = &profile.accuracy().unwrap()[3];
        assert!((doubled.max_rel_error - 0.5).abs() < 1e-9);
        let halves = Accuracy::of("x", [(1.0, 2.0), (3.0, 2.0), (2.0, 2.0), (2.2, 2.0)]);
        assert_eq!(halves.points, 4);
        assert_eq!(halves.max_rel_error, 0.5);
        assert!((halves.median_rel_error - 0.3).abs() < 1e-12);
    }

    #[test]
    fn a_fitted_link_reproduces_linear_transfer_times() {
        let profile = sample();
        let t = &profile.transfer[0];
        let fitted = fit_link("fit", LinkKind::Tcp, t).unwrap();
        fitted.validate().unwrap();
        for (&bytes, &time) in t.payload_bytes.iter().zip(&t.time_ns) {
            let got = fitted.lone_transfer_ns(bytes) as f64;
            assert!((got / time as f64 - 1.0).abs() < 1e-6, "{got} vs {time}");
        }
        // Export and import took 1/8 ns per byte each: 8 GB/s, the import left to the engine.
        let copy = fitted.host_copy_bytes_per_s.unwrap();
        assert!((copy / 8e9 - 1.0).abs() < 1e-9, "{copy}");
        let import = fitted.import_bytes_per_s.unwrap();
        assert!((import / 8e9 - 1.0).abs() < 1e-9, "{import}");
        assert_eq!(fitted.import_ns(8_000_000), 1_000_000);
        assert_eq!(fitted.per_transfer_overhead_ns, 100_000);
    }

    #[test]
    fn a_fit_needs_two_sizes_and_a_slope() {
        let mut t = sample().transfer.remove(0);
        let one = TransferTable {
            payload_bytes: vec![1],
            time_ns: vec![1],
            export_ns: vec![0],
            send_ns: vec![1],
            import_ns: vec![0],
            ..t.clone()
        };
        assert_eq!(
            fit_link("x", LinkKind::Tcp, &one),
            Err(FitError::TooFewSizes(1))
        );
        t.time_ns = vec![5_000, 4_000, 3_000];
        assert_eq!(fit_link("x", LinkKind::Tcp, &t), Err(FitError::NoSlope));
    }
}
