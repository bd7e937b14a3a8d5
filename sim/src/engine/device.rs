//! Workers time-sharing a device: two processes on one GPU, or single-threaded workers on the
//! cores of one CPU, each step at the speed [`crate::sharing`] gives it. Each change in the
//! steps in flight moves the others' completion times.

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
        let mut others = [0u32; 2];
        for &w in self.devices[d].busy.iter().filter(|&&w| w != m) {
            others[usize::from(self.workers[w as usize].step.prefills)] += 1;
        }
        let prefills = self.workers[m as usize].step.prefills;
        self.setup.device.speed(others, prefills)
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
