//! The event queue: a binary heap keyed by time, then by insertion order, so simultaneous
//! events run in the order they were scheduled.

use crate::time::Nanos;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// The workload's next open-loop arrival is due.
    NextArrival,
    /// A follow-up turn held in the request slab arrives.
    Arrive(u32),
    /// A worker's iteration ends.
    StepDone(u32),
    /// A transfer's sender-side work (setup, staging copies, serialization) is done; its bytes
    /// enter the network.
    TransferSent(u32),
    /// A transfer's last byte has crossed the wire and the receiver has it.
    TransferLanded(u32),
    /// The network's next flow completion, valid only for this version of the flow set.
    NetworkWake(u64),
    /// The oldest batch of KV events reaches the router's block index.
    Registry,
}

#[derive(Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    next_seq: u64,
}

impl EventQueue {
    pub fn push(&mut self, at: Nanos, event: Event) {
        self.heap.push(Reverse((at, self.next_seq, event)));
        self.next_seq += 1;
    }

    pub fn pop(&mut self) -> Option<(Nanos, Event)> {
        self.heap.pop().map(|Reverse((at, _, event))| (at, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_pop_in_insertion_order() {
        let mut q = EventQueue::default();
        q.push(5, Event::StepDone(2));
        q.push(3, Event::Registry);
        q.push(5, Event::StepDone(1));
        q.push(5, Event::NextArrival);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (3, Event::Registry),
                (5, Event::StepDone(2)),
                (5, Event::StepDone(1)),
                (5, Event::NextArrival)
            ]
        );
    }
}
