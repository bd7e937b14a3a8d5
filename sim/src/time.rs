//! Simulated time: integer nanoseconds.

/// A point in time or a duration, in nanoseconds.
pub type Nanos = u64;

pub const NS_PER_US: Nanos = 1_000;
pub const NS_PER_MS: Nanos = 1_000_000;
pub const NS_PER_S: Nanos = 1_000_000_000;

/// Seconds to nanoseconds, rounded to the nearest nanosecond; negative and NaN give 0.
pub fn secs_to_ns(secs: f64) -> Nanos {
    if secs.is_nan() || secs <= 0.0 {
        0
    } else {
        (secs * NS_PER_S as f64).round().min(u64::MAX as f64) as Nanos
    }
}

pub fn ns_to_secs(ns: Nanos) -> f64 {
    ns as f64 / NS_PER_S as f64
}

pub fn ns_to_ms(ns: Nanos) -> f64 {
    ns as f64 / NS_PER_MS as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        assert_eq!(secs_to_ns(1.5), 1_500_000_000);
        assert_eq!(secs_to_ns(-1.0), 0);
        assert_eq!(secs_to_ns(f64::NAN), 0);
        assert_eq!(ns_to_ms(2_500_000), 2.5);
        assert_eq!(ns_to_secs(NS_PER_S), 1.0);
    }
}
