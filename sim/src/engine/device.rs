//! Workers time-sharing a device: two processes on one GPU, or single-threaded workers on the
//! cores of one CPU. A device runs `parallelism` steps at full speed; with more busy, every
//! busy step progresses at `p / (p + c (busy - p))` of full speed (`c` the setup's
//! contention; 1 is processor sharing). On top of that, each step is slowed by every other in
//! flight as the setup's interference says for their kinds (cores of one CPU share its memory
//! bus and caches). Each change in the steps in flight moves the others' completion times.

use super::Simulation;
use super::queue::Event;
use crate::routing::WorkerId;
use crate::time::Nanos;

/// The workers of one device with a step in flight.
#[derive(Default)]
pub(super) struct Device {
    busy: Vec<WorkerId>,
}

/// A step in flight: its work left at full speed, as of `since_ns`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct StepProgress {
    pub left_ns: Nanos,
    pub since_ns: Nanos,
    pub started_ns: Nanos,
    /// Whether the step prefills (else it only decodes): what the interference depends on.
    pub prefills: bool,
    /// Its speed since `since_ns`, as numerator / denominator of full speed.
    speed: (u128, u128),
    /// Bumped whenever the completion is rescheduled; older `StepDone` events are stale.
    pub generation: u32,
}

const PPM: u128 = 1_000_000;

impl Simulation<'_> {
    pub(super) fn device_of(&self, w: WorkerId) -> usize {
        (w / self.setup.workers_per_device) as usize
    }

    /// Starts `w`'s step, `work_ns` long at full speed.
    pub(super) fn begin_step(&mut self, w: WorkerId, work_ns: Nanos, prefills: bool) {
        let d = self.device_of(w);
        let now = self.now;
        let step = &mut self.workers[w as usize].step;
        step.left_ns = work_ns;
        step.since_ns = now;
        step.started_ns = now;
        step.prefills = prefills;
        step.speed = (0, 0);
        self.devices[d].busy.push(w);
        self.respeed(d);
    }

    /// `w`'s step is over: the device's other steps may speed up.
    pub(super) fn end_step(&mut self, w: WorkerId) {
        let d = self.device_of(w);
        self.devices[d].busy.retain(|&x| x != w);
        self.respeed(d);
    }

    /// The speed of busy worker `m`'s step on device `d`, as numerator / denominator.
    fn speed(&self, d: usize, m: WorkerId) -> (u128, u128) {
        let busy = &self.devices[d].busy;
        let (n, p) = (
            busy.len() as u128,
            u128::from(self.setup.device_parallelism),
        );
        let (num, den) = if n > p {
            let c = u128::from(self.setup.device_contention_ppm);
            (p * PPM, p * PPM + c * (n - p))
        } else {
            (1, 1)
        };
        let interference = &self.setup.device_interference_ppm;
        let prefills = self.workers[m as usize].step.prefills;
        let slowed: u128 = busy
            .iter()
            .filter(|&&o| o != m)
            .map(|&o| {
                let other = self.workers[o as usize].step.prefills;
                u128::from(interference[usize::from(prefills)][usize::from(other)])
            })
            .sum();
        if slowed == 0 {
            (num, den)
        } else {
            (num * PPM, den * (PPM + slowed))
        }
    }

    /// Gives every step in flight on `d` whose speed changed its new speed: charges it for the
    /// time since it was last settled, then moves its completion.
    fn respeed(&mut self, d: usize) {
        for i in 0..self.devices[d].busy.len() {
            let m = self.devices[d].busy[i];
            let speed = self.speed(d, m);
            let now = self.now;
            let step = &mut self.workers[m as usize].step;
            if step.speed == speed {
                continue;
            }
            if step.speed.1 != 0 {
                let (num, den) = step.speed;
                let done = ((now - step.since_ns) as u128 * num / den) as Nanos;
                step.left_ns = step.left_ns.saturating_sub(done);
                step.since_ns = now;
            }
            step.speed = speed;
            step.generation = step.generation.wrapping_add(1);
            let wall_ns = (step.left_ns as u128 * speed.1).div_ceil(speed.0) as Nanos;
            self.queue
                .push(now + wall_ns, Event::StepDone(m, step.generation));
        }
    }
}
