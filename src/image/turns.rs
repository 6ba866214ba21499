//! First come, first served: a ticket lock whose tickets can be taken on
//! one thread and waited for on another. `std::sync::Mutex` promises no
//! order among waiters; control commands on one image must take effect in
//! the order their requests arrived (docs/DESIGN.md §3).

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Default)]
struct Inner {
    counters: Mutex<Counters>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct Counters {
    next: u64,
    serving: u64,
    /// Tickets given up before their turn: skipped when it comes.
    given_up: BTreeSet<u64>,
}

impl Counters {
    fn advance(&mut self) {
        self.serving += 1;
        while self.given_up.remove(&self.serving) {
            self.serving += 1;
        }
    }
}

/// A queue of turns; cloning shares it.
#[derive(Debug, Default, Clone)]
pub struct Turns(Arc<Inner>);

/// A place in a [`Turns`] queue. Dropping it ends its turn, or gives up a
/// turn that has not come yet (without waiting: a request refused on a
/// FUSE request thread drops its ticket there), so a ticket given up never
/// holds up the tickets after it.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    number: u64,
}

impl Turns {
    /// Takes the next place in the queue (without waiting).
    pub fn take(&self) -> Ticket {
        let mut c = self.0.counters.lock().unwrap_or_else(|p| p.into_inner());
        let number = c.next;
        c.next += 1;
        Ticket {
            inner: self.0.clone(),
            number,
        }
    }

    /// Tickets taken and not yet done (waiting or being served).
    pub fn pending(&self) -> u64 {
        let c = self.0.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.next - c.serving - c.given_up.len() as u64
    }
}

impl Ticket {
    /// Its place in the queue, from 0.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Blocks until every ticket taken before this one is done.
    pub fn wait(&self) {
        let mut c = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while c.serving != self.number {
            c = self.inner.turn.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if c.serving == self.number {
            c.advance();
            self.inner.turn.notify_all();
        } else {
            c.given_up.insert(self.number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn turns_come_in_ticket_order_whatever_the_threads_do() {
        let turns = Turns::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..8).map(|_| turns.take()).collect();
        assert_eq!(turns.pending(), 8);
        std::thread::scope(|s| {
            // Later tickets start waiting first.
            for (i, t) in tickets.into_iter().enumerate().rev() {
                let order = order.clone();
                s.spawn(move || {
                    t.wait();
                    order.lock().unwrap().push(i);
                });
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(turns.pending(), 0);
    }

    #[test]
    fn a_ticket_given_up_before_its_turn_is_skipped() {
        let turns = Turns::default();
        let first = turns.take();
        let skipped = turns.take();
        let third = turns.take();
        drop(skipped);
        first.wait();
        drop(first);
        third.wait();
        drop(third);
        assert_eq!(turns.pending(), 0);
    }
}
