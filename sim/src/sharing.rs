//! How the steps of workers that share one device slow each other: two processes on one GPU,
//! or single-threaded workers on the cores of one CPU. The simulator runs its devices by it,
//! and `disagg-validate` fits its figures to the steps a real cluster ran by the same rule.
//!
//! A device runs `parallelism` steps at full speed; with more busy, every busy step progresses
//! at `p / (p + c (busy - p))` of full speed (`c` the contention; 1 is processor sharing). On
//! top of that, each step is slowed by the steps that run beside it, as the interference says
//! for their kinds (cores of one CPU share its memory bus and caches): within the parallelism
//! every other step in flight; beyond it, a step runs beside `p - 1` of the `busy - 1` others
//! at a time (three single-threaded workers on two cores: one other, not two), so each other
//! step in flight counts that share.

/// A device's sharing figures, in millionths (the setup's `device_*` fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSharing {
    /// Steps at full speed at once.
    pub parallelism: u32,
    /// The contention `c` beyond the parallelism.
    pub contention_ppm: u64,
    /// How much each step in flight slows another, `[slowed step prefills][other step
    /// prefills]`.
    pub interference_ppm: [[u64; 2]; 2],
}

const PPM: u128 = 1_000_000;

impl DeviceSharing {
    /// The speed of a step (`prefills`) on a device with `others` other steps in flight,
    /// `[only decoding, prefilling]`: numerator and denominator of full speed.
    pub fn speed(&self, others: [u32; 2], prefills: bool) -> (u128, u128) {
        let n = u128::from(1 + others[0] + others[1]);
        let p = u128::from(self.parallelism.max(1));
        let (num, den) = if n > p {
            let c = u128::from(self.contention_ppm);
            (p * PPM, p * PPM + c * (n - p))
        } else {
            (1, 1)
        };
        let i = &self.interference_ppm[usize::from(prefills)];
        let slowed =
            u128::from(others[0]) * u128::from(i[0]) + u128::from(others[1]) * u128::from(i[1]);
        if slowed == 0 {
            return (num, den);
        }
        // Beyond the parallelism a step runs beside p - 1 of the n - 1 others at a time: only
        // those slow it.
        let (beside, of) = if n > p { (p - 1, n - 1) } else { (1, 1) };
        (num * PPM * of, den * (PPM * of + slowed * beside))
    }

    /// [`DeviceSharing::speed`] as a fraction.
    pub fn speed_f64(&self, others: [u32; 2], prefills: bool) -> f64 {
        let (num, den) = self.speed(others, prefills);
        num as f64 / den as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharing(p: u32, c: f64) -> DeviceSharing {
        DeviceSharing {
            parallelism: p,
            contention_ppm: (c * 1e6) as u64,
            interference_ppm: [[0; 2]; 2],
        }
    }

    #[test]
    fn within_the_parallelism_steps_run_at_full_speed() {
        let s = sharing(2, 1.0);
        assert_eq!(s.speed_f64([0, 1], true), 1.0);
        assert_eq!(s.speed_f64([1, 0], false), 1.0);
    }

    #[test]
    fn beyond_it_the_busy_steps_share_the_device_as_the_contention_says() {
        // Processor sharing: three steps on two units run at two thirds.
        let s = sharing(2, 1.0);
        assert!((s.speed_f64([1, 1], true) - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.speed_f64([1, 1], false) - 2.0 / 3.0).abs() < 1e-12);
        // Two processes on one GPU that overlap in part: 1 / (1 + c).
        let gpu = sharing(1, 0.7);
        assert!((gpu.speed_f64([0, 1], false) - 1.0 / 1.7).abs() < 1e-12);
    }

    #[test]
    fn interference_slows_each_step_per_other_step_beside_it_by_their_kinds() {
        let mut s = sharing(2, 1.0);
        s.interference_ppm = [[200_000, 100_000], [50_000, 0]];
        // Within the parallelism every other step in flight runs beside it.
        assert!((s.speed_f64([1, 0], false) - 1.0 / 1.2).abs() < 1e-12);
        assert!((s.speed_f64([0, 1], false) - 1.0 / 1.1).abs() < 1e-12);
        // Three on two cores: a step runs beside one of the two others at a time. A decode
        // beside a decode and a prefill: 1 / (1 + (0.2 + 0.1) / 2) on top of 2/3.
        assert!((s.speed_f64([1, 1], false) - 2.0 / 3.0 / 1.15).abs() < 1e-12);
        // A prefill beside two decodes: 1 / (1 + 2 * 0.05 / 2).
        assert!((s.speed_f64([2, 0], true) - 2.0 / 3.0 / 1.05).abs() < 1e-12);
        // One at a time (a GPU shared by two processes): nothing runs beside it.
        let mut gpu = sharing(1, 0.5);
        gpu.interference_ppm = [[300_000; 2]; 2];
        assert!((gpu.speed_f64([0, 1], false) - 1.0 / 1.5).abs() < 1e-12);
    }
}
