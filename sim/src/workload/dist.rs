//! Length and duration distributions as scenario files spell them.
//!
//! Distributions are plain enums sampled directly from standard variates (no prebuilt sampler
//! objects), so a configuration value is also its sampler and needs no separate build step.

use rand::RngExt;
use rand_distr::{Distribution, Exp1, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::time::{Nanos, secs_to_ns};

/// A field name and what is wrong with it; callers prefix the field with where the
/// distribution sits in the configuration.
pub(crate) type FieldError = (&'static str, String);

/// A distribution of token counts. Every sample is rounded, clamped to `[min, max]` where those
/// are given, and is at least 1: a request always has a token to prefill and one to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthDist {
    Constant {
        value: u32,
    },
    /// Inclusive on both ends.
    Uniform {
        min: u32,
        max: u32,
    },
    Normal {
        mean: f64,
        std: f64,
        #[serde(default)]
        min: Option<u32>,
        #[serde(default)]
        max: Option<u32>,
    },
    /// Parametrised by its mean and coefficient of variation (std / mean), the two numbers a
    /// workload description usually gives, rather than by the log-space mu and sigma.
    LogNormal {
        mean: f64,
        cv: f64,
        #[serde(default)]
        min: Option<u32>,
        #[serde(default)]
        max: Option<u32>,
    },
    Exponential {
        mean: f64,
        #[serde(default)]
        min: Option<u32>,
        #[serde(default)]
        max: Option<u32>,
    },
}

impl LengthDist {
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        match *self {
            LengthDist::Constant { value } => value.max(1),
            LengthDist::Uniform { min, max } => {
                let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
                rng.random_range(lo..=hi).max(1)
            }
            LengthDist::Normal {
                mean,
                std,
                min,
                max,
            } => {
                let z: f64 = StandardNormal.sample(rng);
                clamp_tokens(mean + std * z, min, max)
            }
            LengthDist::LogNormal { mean, cv, min, max } => {
                clamp_tokens(log_normal(mean, cv, rng), min, max)
            }
            LengthDist::Exponential { mean, min, max } => {
                let e: f64 = Exp1.sample(rng);
                clamp_tokens(mean * e, min, max)
            }
        }
    }

    /// The distribution's mean before rounding and clamping.
    pub fn mean(&self) -> f64 {
        match *self {
            LengthDist::Constant { value } => value as f64,
            LengthDist::Uniform { min, max } => (min as f64 + max as f64) / 2.0,
            LengthDist::Normal { mean, .. }
            | LengthDist::LogNormal { mean, .. }
            | LengthDist::Exponential { mean, .. } => mean,
        }
    }

    /// Checks the parameters; the message starts with the offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        self.check()
            .map_err(|(field, msg)| format!("{field}: {msg}"))
    }

    pub(crate) fn check(&self) -> Result<(), FieldError> {
        match *self {
            LengthDist::Constant { value } => at_least_one("value", value),
            LengthDist::Uniform { min, max } => {
                at_least_one("min", min)?;
                ordered(Some(min), Some(max))
            }
            LengthDist::Normal {
                mean,
                std,
                min,
                max,
            } => {
                finite("mean", mean)?;
                non_negative("std", std)?;
                bounds(min, max)
            }
            LengthDist::LogNormal { mean, cv, min, max } => {
                positive("mean", mean)?;
                non_negative("cv", cv)?;
                bounds(min, max)
            }
            LengthDist::Exponential { mean, min, max } => {
                positive("mean", mean)?;
                bounds(min, max)
            }
        }
    }
}

/// A distribution of durations, given in seconds and sampled in nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum DurationDist {
    Constant {
        secs: f64,
    },
    Uniform {
        min_secs: f64,
        max_secs: f64,
    },
    Exponential {
        mean_secs: f64,
    },
    /// Parametrised by mean and coefficient of variation, as [`LengthDist::LogNormal`].
    LogNormal {
        mean_secs: f64,
        cv: f64,
    },
}

impl Default for DurationDist {
    /// No wait at all.
    fn default() -> Self {
        DurationDist::Constant { secs: 0.0 }
    }
}

impl DurationDist {
    pub fn sample_ns(&self, rng: &mut Rng) -> Nanos {
        let secs = match *self {
            DurationDist::Constant { secs } => secs,
            DurationDist::Uniform { min_secs, max_secs } => {
                let u: f64 = rng.random();
                min_secs + (max_secs - min_secs) * u
            }
            DurationDist::Exponential { mean_secs } => {
                let e: f64 = Exp1.sample(rng);
                mean_secs * e
            }
            DurationDist::LogNormal { mean_secs, cv } => log_normal(mean_secs, cv, rng),
        };
        secs_to_ns(secs)
    }

    pub fn mean_secs(&self) -> f64 {
        match *self {
            DurationDist::Constant { secs } => secs,
            DurationDist::Uniform { min_secs, max_secs } => (min_secs + max_secs) / 2.0,
            DurationDist::Exponential { mean_secs } | DurationDist::LogNormal { mean_secs, .. } => {
                mean_secs
            }
        }
    }

    /// Checks the parameters; the message starts with the offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        self.check()
            .map_err(|(field, msg)| format!("{field}: {msg}"))
    }

    pub(crate) fn check(&self) -> Result<(), FieldError> {
        match *self {
            DurationDist::Constant { secs } => non_negative("secs", secs),
            DurationDist::Uniform { min_secs, max_secs } => {
                non_negative("min_secs", min_secs)?;
                non_negative("max_secs", max_secs)?;
                if min_secs > max_secs {
                    return Err((
                        "max_secs",
                        format!("must be at least min_secs ({min_secs}), got {max_secs}"),
                    ));
                }
                Ok(())
            }
            DurationDist::Exponential { mean_secs } => non_negative("mean_secs", mean_secs),
            DurationDist::LogNormal { mean_secs, cv } => {
                non_negative("mean_secs", mean_secs)?;
                non_negative("cv", cv)
            }
        }
    }
}

/// A log-normal variate with the given linear-space mean and coefficient of variation
/// (sigma^2 = ln(1 + cv^2), mu = ln(mean) - sigma^2 / 2, as rand_distr's `from_mean_cv`).
fn log_normal(mean: f64, cv: f64, rng: &mut Rng) -> f64 {
    if mean <= 0.0 {
        return 0.0;
    }
    let var = (1.0 + cv * cv).ln();
    let z: f64 = StandardNormal.sample(rng);
    (mean.ln() - var / 2.0 + var.sqrt() * z).exp()
}

/// Rounds a continuous sample to a token count in `[min, max]` and at least 1; NaN gives the
/// lower bound. Written without `f64::clamp`, which panics on crossed bounds.
fn clamp_tokens(x: f64, min: Option<u32>, max: Option<u32>) -> u32 {
    let lo = min.unwrap_or(1).max(1) as f64;
    let hi = max.unwrap_or(u32::MAX) as f64;
    let x = if x.is_nan() { lo } else { x.round() };
    x.max(lo).min(hi).max(1.0) as u32
}

fn at_least_one(field: &'static str, v: u32) -> Result<(), FieldError> {
    if v == 0 {
        return Err((
            field,
            "must be at least 1 (token counts are positive)".into(),
        ));
    }
    Ok(())
}

fn bounds(min: Option<u32>, max: Option<u32>) -> Result<(), FieldError> {
    if let Some(min) = min {
        at_least_one("min", min)?;
    }
    if let Some(max) = max {
        at_least_one("max", max)?;
    }
    ordered(min, max)
}

fn ordered(min: Option<u32>, max: Option<u32>) -> Result<(), FieldError> {
    match (min, max) {
        (Some(min), Some(max)) if min > max => {
            Err(("max", format!("must be at least min ({min}), got {max}")))
        }
        _ => Ok(()),
    }
}

fn finite(field: &'static str, v: f64) -> Result<(), FieldError> {
    if !v.is_finite() {
        return Err((field, format!("must be a finite number, got {v}")));
    }
    Ok(())
}

fn non_negative(field: &'static str, v: f64) -> Result<(), FieldError> {
    if !(v.is_finite() && v >= 0.0) {
        return Err((field, format!("must be finite and >= 0, got {v}")));
    }
    Ok(())
}

pub(crate) fn positive(field: &'static str, v: f64) -> Result<(), FieldError> {
    if !(v.is_finite() && v > 0.0) {
        return Err((field, format!("must be finite and > 0, got {v}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, stream};
    use crate::time::NS_PER_S;

    fn sample_mean(d: &LengthDist, n: usize) -> (f64, u32, u32) {
        let mut rng = stream(11, Stream::Lengths);
        let (mut sum, mut lo, mut hi) = (0.0, u32::MAX, 0);
        for _ in 0..n {
            let x = d.sample(&mut rng);
            sum += x as f64;
            lo = lo.min(x);
            hi = hi.max(x);
        }
        (sum / n as f64, lo, hi)
    }

    #[test]
    fn means_match_when_clamping_is_rare() {
        let cases = [
            LengthDist::Constant { value: 7 },
            LengthDist::Uniform { min: 10, max: 30 },
            LengthDist::Normal {
                mean: 500.0,
                std: 50.0,
                min: None,
                max: None,
            },
            LengthDist::LogNormal {
                mean: 800.0,
                cv: 0.5,
                min: None,
                max: None,
            },
            LengthDist::Exponential {
                mean: 300.0,
                min: None,
                max: None,
            },
        ];
        for d in &cases {
            d.validate().unwrap();
            let (m, _, _) = sample_mean(d, 50_000);
            let rel = (m - d.mean()).abs() / d.mean();
            assert!(rel < 0.02, "{d:?}: sample mean {m} vs {}", d.mean());
        }
    }

    #[test]
    fn samples_are_clamped_and_positive() {
        let cases = [
            (
                LengthDist::Normal {
                    mean: 100.0,
                    std: 200.0,
                    min: Some(20),
                    max: Some(150),
                },
                20,
                150,
            ),
            (
                LengthDist::LogNormal {
                    mean: 100.0,
                    cv: 3.0,
                    min: Some(5),
                    max: Some(400),
                },
                5,
                400,
            ),
            (
                LengthDist::Exponential {
                    mean: 100.0,
                    min: None,
                    max: Some(120),
                },
                1,
                120,
            ),
            (
                LengthDist::Normal {
                    mean: -50.0,
                    std: 1.0,
                    min: None,
                    max: None,
                },
                1,
                1,
            ),
            (LengthDist::Uniform { min: 3, max: 3 }, 3, 3),
        ];
        for (d, want_lo, want_hi) in &cases {
            let (_, lo, hi) = sample_mean(d, 20_000);
            assert_eq!((lo, hi), (*want_lo, *want_hi), "{d:?}");
        }
    }

    #[test]
    fn unvalidated_nonsense_never_panics() {
        let mut rng = stream(1, Stream::Lengths);
        let weird = [
            LengthDist::Uniform { min: 9, max: 2 },
            LengthDist::Constant { value: 0 },
            LengthDist::Normal {
                mean: f64::NAN,
                std: f64::INFINITY,
                min: Some(10),
                max: Some(5),
            },
            LengthDist::LogNormal {
                mean: -1.0,
                cv: -2.0,
                min: None,
                max: None,
            },
        ];
        for d in &weird {
            assert!(d.sample(&mut rng) >= 1);
        }
        assert_eq!(DurationDist::Constant { secs: -3.0 }.sample_ns(&mut rng), 0);
    }

    #[test]
    fn validation_names_the_field() {
        let err = LengthDist::LogNormal {
            mean: -1.0,
            cv: 0.5,
            min: None,
            max: None,
        }
        .validate()
        .unwrap_err();
        assert!(err.starts_with("mean: "), "{err}");
        let err = LengthDist::Uniform { min: 5, max: 4 }
            .validate()
            .unwrap_err();
        assert!(err.starts_with("max: "), "{err}");
        let err = LengthDist::Normal {
            mean: 1.0,
            std: -1.0,
            min: None,
            max: None,
        }
        .validate()
        .unwrap_err();
        assert!(err.starts_with("std: "), "{err}");
        let err = DurationDist::Uniform {
            min_secs: 2.0,
            max_secs: 1.0,
        }
        .validate()
        .unwrap_err();
        assert!(err.starts_with("max_secs: "), "{err}");
        assert!(DurationDist::default().validate().is_ok());
    }

    #[test]
    fn durations_have_their_means() {
        let mut rng = stream(5, Stream::Lengths);
        let cases = [
            DurationDist::Constant { secs: 1.5 },
            DurationDist::Uniform {
                min_secs: 1.0,
                max_secs: 3.0,
            },
            DurationDist::Exponential { mean_secs: 2.0 },
            DurationDist::LogNormal {
                mean_secs: 2.0,
                cv: 1.0,
            },
        ];
        for d in &cases {
            let n = 50_000;
            let total: f64 = (0..n).map(|_| d.sample_ns(&mut rng) as f64).sum();
            let mean_s = total / n as f64 / NS_PER_S as f64;
            assert!(
                (mean_s - d.mean_secs()).abs() / d.mean_secs() < 0.03,
                "{d:?}: {mean_s}"
            );
        }
    }

    #[test]
    fn toml_shapes() {
        #[derive(Deserialize)]
        struct W {
            a: LengthDist,
            b: LengthDist,
            t: DurationDist,
        }
        let w: W = toml::from_str(
            r#"
            a = { dist = "log_normal", mean = 500, cv = 0.5, max = 4000 }
            b = { dist = "constant", value = 3 }
            t = { dist = "exponential", mean_secs = 2 }
            "#,
        )
        .unwrap();
        assert_eq!(
            w.a,
            LengthDist::LogNormal {
                mean: 500.0,
                cv: 0.5,
                min: None,
                max: Some(4000)
            }
        );
        assert_eq!(w.b, LengthDist::Constant { value: 3 });
        assert_eq!(w.t, DurationDist::Exponential { mean_secs: 2.0 });
        let bad = toml::from_str::<W>(
            r#"
            a = { dist = "constant", value = 3, typo = 1 }
            b = { dist = "constant", value = 3 }
            t = { dist = "constant", secs = 0 }
            "#,
        );
        assert!(bad.is_err());
    }
}
