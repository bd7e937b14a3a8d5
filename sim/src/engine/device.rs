//! Workers time-sharing a device: two processes on one GPU, or single-threaded workers on the
//! cores of one CPU. A device runs `parallelism` steps at full speed; with more busy, every
//! busy step progresses at `p / (p + c (busy - p))` of full speed (`c` the setup's
//! contention; 1 is processor sharing), so each change in the number of busy workers moves
//! the others' completion times.

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
    /// Bumped whenever the completion is rescheduled; older `StepDone` events are stale.
    pub generation: u32,
}

/// Speed of each busy step, as numerator / denominator of full speed, with `contention_ppm`
/// the setup's contention in millionths.
fn speed(busy: usize, parallelism: u32, contention_ppm: u64) -> (u128, u128) {
    let (busy, parallelism) = (busy as u128, u128::from(parallelism));
    if busy > parallelism {
        let p = parallelism * 1_000_000;
        (p, p + u128::from(contention_ppm) * (busy - parallelism))
    } else {
        (1, 1)
    }
}

impl Simulation<'_> {
    pub(super) fn device_of(&self, w: WorkerId) -> usize {
        (w / self.setup.workers_per_device) as usize
    }

    /// Starts `w`'s step, `work_ns` long at full speed.
    pub(super) fn begin_step(&mut self, w: WorkerId, work_ns: Nanos) {
        let d = self.device_of(w);
        let (parallelism, c) = (
            self.setup.device_parallelism,
            self.setup.device_contention_ppm,
        );
        let before = speed(self.devices[d].busy.len(), parallelism, c);
        let after = speed(self.devices[d].busy.len() + 1, parallelism, c);
        if before != after {
            self.settle(d, before);
        }
        let step = &mut self.workers[w as usize].step;
        step.left_ns = work_ns;
        step.since_ns = self.now;
        step.started_ns = self.now;
        self.devices[d].busy.push(w);
        if before != after {
            self.reschedule(d, after);
        } else {
            self.schedule_completion(w, after);
        }
    }

    /// `w`'s step is over: the device's other steps speed up if it was oversubscribed.
    pub(super) fn end_step(&mut self, w: WorkerId) {
        let d = self.device_of(w);
        let (parallelism, c) = (
            self.setup.device_parallelism,
            self.setup.device_contention_ppm,
        );
        let before = speed(self.devices[d].busy.len(), parallelism, c);
        let after = speed(self.devices[d].busy.len() - 1, parallelism, c);
        if before != after {
            self.settle(d, before);
        }
        self.devices[d].busy.retain(|&x| x != w);
        if before != after {
            self.reschedule(d, after);
        }
    }

    /// Charges the device's busy steps for the time since they were last settled.
    fn settle(&mut self, d: usize, (num, den): (u128, u128)) {
        for &m in &self.devices[d].busy {
            let step = &mut self.workers[m as usize].step;
            let done = ((self.now - step.since_ns) as u128 * num / den) as Nanos;
            step.left_ns = step.left_ns.saturating_sub(done);
            step.since_ns = self.now;
        }
    }

    fn reschedule(&mut self, d: usize, speed: (u128, u128)) {
        for i in 0..self.devices[d].busy.len() {
            let m = self.devices[d].busy[i];
            self.schedule_completion(m, speed);
        }
    }

    fn schedule_completion(&mut self, w: WorkerId, (num, den): (u128, u128)) {
        let step = &mut self.workers[w as usize].step;
        step.generation = step.generation.wrapping_add(1);
        let wall_ns = (step.left_ns as u128 * den).div_ceil(num) as Nanos;
        self.queue
            .push(self.now + wall_ns, Event::StepDone(w, step.generation));
    }
}
