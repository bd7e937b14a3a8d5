//! Open-loop arrival processes: when new conversations (or trace-less requests) start.

use rand_distr::{Distribution, Exp1, Gamma};
use serde::{Deserialize, Serialize};

use super::WorkloadError;
use super::dist::{FieldError, positive};
use crate::rng::Rng;
use crate::time::{NS_PER_S, Nanos};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "process", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArrivalProcess {
    /// Exponential gaps: independent arrivals.
    Poisson { rate_per_s: f64 },
    /// Gamma-distributed gaps with the given coefficient of variation: bursty when cv > 1,
    /// smoother than Poisson when cv < 1, evenly spaced at cv = 0.
    Gamma { rate_per_s: f64, cv: f64 },
    /// Evenly spaced.
    Constant { rate_per_s: f64 },
}

impl ArrivalProcess {
    pub fn rate_per_s(&self) -> f64 {
        match *self {
            ArrivalProcess::Poisson { rate_per_s }
            | ArrivalProcess::Gamma { rate_per_s, .. }
            | ArrivalProcess::Constant { rate_per_s } => rate_per_s,
        }
    }

    /// Checks the parameters; the message starts with the offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        self.check()
            .map_err(|(field, msg)| format!("{field}: {msg}"))
    }

    pub(crate) fn check(&self) -> Result<(), FieldError> {
        positive("rate_per_s", self.rate_per_s())?;
        if let ArrivalProcess::Gamma { cv, .. } = *self
            && !(cv.is_finite() && cv >= 0.0)
        {
            return Err(("cv", format!("must be finite and >= 0, got {cv}")));
        }
        Ok(())
    }
}

/// How one gap is drawn, in seconds.
#[derive(Clone, Debug)]
enum Gap {
    Exponential { mean_s: f64 },
    Gamma(Gamma<f64>),
    Fixed { secs: f64 },
}

/// A stream of arrival times. The first gap is drawn from time 0, so the first arrival is not
/// at 0 (except by chance).
///
/// Time accumulates as integer nanoseconds plus the fractional nanosecond that rounding left
/// over, which is carried into the next gap: the sum never drifts from the sum of the exact
/// gaps (a constant 3/s stream stays on k/3 s to within a nanosecond after any number of
/// arrivals), and times stay integer and nondecreasing.
#[derive(Clone, Debug)]
pub struct Arrivals {
    gap: Gap,
    rng: Rng,
    now_ns: Nanos,
    carry_ns: f64,
}

impl Arrivals {
    pub fn new(process: &ArrivalProcess, rng: Rng) -> Result<Self, WorkloadError> {
        process
            .check()
            .map_err(|e| WorkloadError::invalid("workload.arrival", e))?;
        let gap = match *process {
            ArrivalProcess::Poisson { rate_per_s } => Gap::Exponential {
                mean_s: 1.0 / rate_per_s,
            },
            ArrivalProcess::Gamma { rate_per_s, cv } if cv > 0.0 => {
                // Shape 1/cv^2 and scale cv^2/rate give mean 1/rate and std cv/rate.
                let shape = 1.0 / (cv * cv);
                let scale = cv * cv / rate_per_s;
                Gap::Gamma(
                    Gamma::new(shape, scale).map_err(|e| WorkloadError::Invalid {
                        field: "workload.arrival.cv".into(),
                        message: format!("gives no gamma distribution: {e}"),
                    })?,
                )
            }
            ArrivalProcess::Gamma { rate_per_s, .. } | ArrivalProcess::Constant { rate_per_s } => {
                Gap::Fixed {
                    secs: 1.0 / rate_per_s,
                }
            }
        };
        Ok(Arrivals {
            gap,
            rng,
            now_ns: 0,
            carry_ns: 0.0,
        })
    }

    /// The next arrival time; nondecreasing, saturating at `Nanos::MAX`.
    pub fn next_ns(&mut self) -> Nanos {
        let gap_s = match &self.gap {
            Gap::Exponential { mean_s } => {
                let e: f64 = Exp1.sample(&mut self.rng);
                mean_s * e
            }
            Gap::Gamma(g) => g.sample(&mut self.rng),
            Gap::Fixed { secs } => *secs,
        };
        let exact_ns = gap_s * NS_PER_S as f64 + self.carry_ns;
        if exact_ns.is_nan() || exact_ns >= Nanos::MAX as f64 {
            self.now_ns = Nanos::MAX;
            return self.now_ns;
        }
        let whole_ns = exact_ns.max(0.0).floor();
        self.carry_ns = exact_ns - whole_ns;
        self.now_ns = self.now_ns.saturating_add(whole_ns as Nanos);
        self.now_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Stream, stream};

    fn gaps_s(p: &ArrivalProcess, n: usize) -> Vec<f64> {
        let mut a = Arrivals::new(p, stream(3, Stream::Arrivals)).unwrap();
        let mut prev = 0;
        (0..n)
            .map(|_| {
                let t = a.next_ns();
                assert!(t >= prev);
                let g = (t - prev) as f64 / NS_PER_S as f64;
                prev = t;
                g
            })
            .collect()
    }

    fn mean_cv(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let (mean, cv) = mean_cv(&gaps_s(
            &ArrivalProcess::Poisson { rate_per_s: 50.0 },
            100_000,
        ));
        assert!((mean - 0.02).abs() / 0.02 < 0.01, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.02, "cv {cv}");
    }

    #[test]
    fn gamma_gaps_have_the_asked_cv() {
        for want in [0.5, 2.0, 4.0] {
            let p = ArrivalProcess::Gamma {
                rate_per_s: 10.0,
                cv: want,
            };
            let (mean, cv) = mean_cv(&gaps_s(&p, 200_000));
            assert!(
                (mean - 0.1).abs() / 0.1 < 0.03,
                "cv {want}: mean gap {mean}"
            );
            assert!((cv - want).abs() / want < 0.05, "cv {want}: got {cv}");
        }
    }

    #[test]
    fn constant_rate_does_not_drift() {
        let mut a = Arrivals::new(
            &ArrivalProcess::Constant { rate_per_s: 3.0 },
            stream(0, Stream::Arrivals),
        )
        .unwrap();
        let first = a.next_ns();
        assert_eq!(first, 333_333_333);
        let mut last = first;
        for _ in 1..3_000_000 {
            last = a.next_ns();
        }
        assert!(
            (last as i128 - 1_000_000 * NS_PER_S as i128).abs() <= 1,
            "{last}"
        );
        let zero_cv = ArrivalProcess::Gamma {
            rate_per_s: 4.0,
            cv: 0.0,
        };
        let gaps = gaps_s(&zero_cv, 10);
        assert!(gaps.iter().all(|&g| g == 0.25));
    }

    #[test]
    fn bad_parameters_are_rejected_with_the_field() {
        let err = Arrivals::new(
            &ArrivalProcess::Poisson { rate_per_s: 0.0 },
            stream(0, Stream::Arrivals),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("workload.arrival.rate_per_s: "),
            "{err}"
        );
        let err = ArrivalProcess::Gamma {
            rate_per_s: 1.0,
            cv: f64::NAN,
        }
        .validate()
        .unwrap_err();
        assert!(err.starts_with("cv: "), "{err}");
    }

    #[test]
    fn tiny_rates_saturate_instead_of_overflowing() {
        let mut a = Arrivals::new(
            &ArrivalProcess::Constant { rate_per_s: 1e-300 },
            stream(0, Stream::Arrivals),
        )
        .unwrap();
        assert_eq!(a.next_ns(), Nanos::MAX);
        assert_eq!(a.next_ns(), Nanos::MAX);
    }
}
