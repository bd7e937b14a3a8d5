//! The event queue: a binary heap keyed by time, then by insertion order, so simultaneous
//! events run in the order they were scheduled.

use crate::time::Nanos;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// The workload's next open-loop arrival is due.
    NextArrival,
    /// A follow-up turn held in the request slab arrives.
    Arrive(u32),
    /// A routed request, in the request slab, reaches its worker after the way in.
    Reach(u32),
    /// A worker's import of landed KV is over.
    Imported(u32),
    /// A worker's iteration ends, unless it was rescheduled since (worker, generation).
    StepDone(u32, u32),
    /// A transfer's sender-side work (setup, staging copies, serialization) is done; its bytes
    /// enter the network.
    TransferSent(u32),
    /// A transfer's last byte has crossed the wire and the receiver has it.
    TransferLanded(u32),
    /// The decode worker has a landed transfer in hand, after the hand-off.
    HandedOff(u32),
    /// The network's next flow completion, valid only for this version of the flow set.
    NetworkWake(u64),
    /// The oldest batch of KV events reaches the router's block index.
    Registry,
}

#[derive(Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    /// Events pushed in time order (a fixed delay after the current time): a FIFO merged
    /// with the heap by (time, insertion order) pops them exactly when the heap would, without
    /// the heap's cost. KV registry deliveries, a fifth of all events, go here.
    in_order: VecDeque<(Nanos, u64, Event)>,
    next_seq: u64,
}

impl EventQueue {
    pub fn push(&mut self, at: Nanos, event: Event) {
        self.heap.push(Reverse((at, self.next_seq, event)));
        self.next_seq += 1;
    }

    /// `push` for an event due no earlier than every event pushed here before.
    pub fn push_in_order(&mut self, at: Nanos, event: Event) {
        debug_assert!(self.in_order.back().is_none_or(|&(last, _, _)| last <= at));
        self.in_order.push_back((at, self.next_seq, event));
        self.next_seq += 1;
    }

    pub fn pop(&mut self) -> Option<(Nanos, Event)> {
        let fifo_first = match (self.in_order.front(), self.heap.peek()) {
            (Some(&(at, seq, _)), Some(Reverse((heap_at, heap_seq, _)))) => {
                (at, seq) < (*heap_at, *heap_seq)
            }
            (front, _) => front.is_some(),
        };
        if fifo_first {
            self.in_order.pop_front().map(|(at, _, event)| (at, event))
        } else {
            self.heap.pop().map(|Reverse((at, _, event))| (at, event))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_pop_in_insertion_order() {
        let mut q = EventQueue::default();
        q.push(5, Event::StepDone(2, 0));
        q.push(3, Event::Registry);
        q.push(5, Event::StepDone(1, 0));
        q.push(5, Event::NextArrival);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (3, Event::Registry),
                (5, Event::StepDone(2, 0)),
                (5, Event::StepDone(1, 0)),
                (5, Event::NextArrival)
            ]
        );
    }

    #[test]
    fn in_order_events_merge_by_time_then_insertion() {
        let mut q = EventQueue::default();
        q.push_in_order(4, Event::Registry);
        q.push(5, Event::StepDone(1, 0));
        q.push_in_order(5, Event::Registry);
        q.push(4, Event::StepDone(2, 0));
        q.push(9, Event::StepDone(3, 0));
        q.push_in_order(9, Event::NextArrival);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (4, Event::Registry),
                (4, Event::StepDone(2, 0)),
                (5, Event::StepDone(1, 0)),
                (5, Event::Registry),
                (9, Event::StepDone(3, 0)),
                (9, Event::NextArrival)
            ]
        );
    }
}
