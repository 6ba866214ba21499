//! First come, first served: a ticket lock whose tickets can be taken on
//! one thread and used on another, and whose waiters hold no thread.
//! `std::sync::Mutex` promises no order among waiters; control commands on
//! one image must take effect in the order their requests arrived
//! (docs/DESIGN.md §3). A command waiting for its turn parks what it will
//! do then with its ticket, and the thread that ends the turn before it
//! hands it on: any number of commands can wait for a busy image without
//! holding a command thread that commands on other images need.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    counters: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    next: u64,
    serving: u64,
    /// Tickets given up before their turn: skipped when it comes.
    given_up: BTreeSet<u64>,
    /// Tickets waiting for their turn, each with what to run when it comes
    /// (the ticket itself is inside).
    parked: BTreeMap<u64, Parked>,
}

/// What a parked ticket runs when its turn comes.
struct Parked(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parked")
    }
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
/// turn that has not come yet, without waiting (a command dropped unrun,
/// or one that unwinds, gives up the tickets it still holds), so a ticket
/// given up never holds up the tickets after it.
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

    /// Whether every ticket taken before this one is done. Once true, it
    /// stays true until this ticket is dropped.
    pub fn is_turn(&self) -> bool {
        let c = self
            .inner
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.serving == self.number
    }

    /// Runs `then` with this ticket once every ticket taken before it is
    /// done: at once on this thread if that is so already, else on the
    /// thread that ends the turn before it, from inside that ticket's drop.
    /// No thread waits meanwhile; `then` must not block (it hands the
    /// ticket on, e.g. queues work that holds it).
    pub fn when_turn(self, then: impl FnOnce(Ticket) + Send + 'static) {
        let inner = self.inner.clone();
        let mut c = inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        if c.serving == self.number {
            drop(c);
            return then(self);
        }
        let number = self.number;
        c.parked
            .insert(number, Parked(Box::new(move || then(self))));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let next = {
            let mut c = self
                .inner
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if c.serving == self.number {
                c.advance();
                let serving = c.serving;
                c.parked.remove(&serving)
            } else {
                c.given_up.insert(self.number);
                None
            }
        };
        // Unlocked: it may end its own turn at once.
        if let Some(Parked(run)) = next {
            run();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn turns_come_in_ticket_order_whatever_the_threads_do() {
        let turns = Turns::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..8).map(|_| turns.take()).collect();
        assert_eq!(turns.pending(), 8);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            // Later tickets park first, each from a thread of its own that
            // then ends: none waits.
            for (i, t) in tickets.into_iter().enumerate().rev() {
                let order = order.clone();
                let tx = tx.clone();
                s.spawn(move || {
                    t.when_turn(move |t| {
                        order.lock().unwrap().push(i);
                        // Ends the turn on yet another thread.
                        std::thread::spawn(move || drop(t));
                        let _ = tx.send(());
                    })
                });
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("a turn never came");
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while turns.pending() != 0 {
            assert!(std::time::Instant::now() < deadline, "turns left pending");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_ticket_given_up_before_its_turn_is_skipped() {
        let turns = Turns::default();
        let first = turns.take();
        let skipped = turns.take();
        let third = turns.take();
        assert!(first.is_turn() && !third.is_turn());
        let (tx, rx) = mpsc::channel();
        third.when_turn(move |t| tx.send(t).unwrap());
        drop(skipped);
        assert!(
            rx.try_recv().is_err(),
            "third's turn came before first's ended"
        );
        drop(first);
        let third = rx.try_recv().expect("third's turn came when first's ended");
        assert!(third.is_turn());
        drop(third);
        assert_eq!(turns.pending(), 0);
    }
}
