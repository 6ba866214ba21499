//! Command requests in arrival order, each until it has queued on its
//! images (docs/DESIGN.md §3, "Order"). A request learns which images it
//! names only by resolving its paths on the backing, which may be slow or
//! hung; so a later request waits for an earlier one only while that one
//! has been resolving for less than [`RESOLVE_BOUND`], and then passes it:
//! the passed request queues behind it once resolved. A hung backing thus
//! delays later requests by the bound at most, never stalls them.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a later request waits for an earlier one to resolve its paths.
/// Resolving is a few syscalls on the backing (microseconds on a healthy
/// one): a request still resolving after this is held up by its storage.
pub const RESOLVE_BOUND: Duration = Duration::from_secs(1);

/// The arrival queue; requests take their numbers in the order they
/// reached the daemon.
#[derive(Debug, Default)]
pub struct Arrivals(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    /// Signalled whenever a request has queued on its images or gone.
    queued: Condvar,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Requests that have not queued on their images yet, by number: since
    /// when each has been resolving its paths (None: not started).
    open: BTreeMap<u64, Option<Instant>>,
}

/// One request's place in arrival order, until it has queued on its
/// images. Dropping it unqueued (a rejected request) frees the requests
/// after it.
#[derive(Debug)]
pub struct Arrival {
    inner: Arc<Inner>,
    number: u64,
}

impl Arrivals {
    /// The next number (without waiting).
    pub fn take(&self) -> Arrival {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        let number = st.next;
        st.next += 1;
        st.open.insert(number, None);
        Arrival {
            inner: self.0.clone(),
            number,
        }
    }
}

impl Arrival {
    /// Its place in arrival order, from 0.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The request starts resolving its paths now: later requests wait for
    /// it up to `bound` from now.
    pub fn resolving(&self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(started) = st.open.get_mut(&self.number) {
            *started = Some(Instant::now());
        }
    }

    /// Waits until every earlier request has queued on its images or has
    /// been resolving for longer than `bound` (one not started yet counts
    /// from now), then runs `queue`, which takes this request's tickets:
    /// no other request queues meanwhile, so any two requests hold their
    /// tickets in one order on every image they share. Returns what `queue`
    /// returned and the numbers of the earlier requests passed (still
    /// resolving; they will queue behind this one).
    pub fn queue<T>(self, bound: Duration, queue: impl FnOnce() -> T) -> (T, Vec<u64>) {
        let waited_from = Instant::now();
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            let until = st
                .open
                .range(..self.number)
                .map(|(_, started)| started.unwrap_or(waited_from) + bound)
                .filter(|deadline| *deadline > now)
                .min();
            let Some(until) = until else { break };
            st = self
                .inner
                .queued
                .wait_timeout(st, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let passed = st.open.range(..self.number).map(|(n, _)| *n).collect();
        let out = queue();
        st.open.remove(&self.number);
        drop(st);
        self.inner.queued.notify_all();
        (out, passed)
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.open.remove(&self.number).is_some() {
            drop(st);
            self.inner.queued.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn requests_queue_in_arrival_order_while_each_resolves_within_the_bound() {
        let arrivals = Arrivals::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Arrival> = (0..6).map(|_| arrivals.take()).collect();
        std::thread::scope(|s| {
            // Later requests reach their queue step first.
            for (i, a) in tickets.into_iter().enumerate().rev() {
                let order = order.clone();
                a.resolving();
                s.spawn(move || {
                    let ((), passed) =
                        a.queue(Duration::from_secs(60), || order.lock().unwrap().push(i));
                    assert!(passed.is_empty(), "{i} passed {passed:?}");
                });
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        assert_eq!(*order.lock().unwrap(), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn a_request_resolving_past_the_bound_is_passed_and_queues_behind() {
        let arrivals = Arrivals::default();
        let slow = arrivals.take();
        let fast = arrivals.take();
        let after = arrivals.take();
        slow.resolving();
        fast.resolving();
        let bound = Duration::from_millis(200);
        let ((), passed) = fast.queue(bound, || ());
        assert_eq!(passed, vec![0]);
        // A request after it passes the slow one too, and a rejected one
        // (dropped unqueued) holds up nobody.
        let rejected = arrivals.take();
        let last = arrivals.take();
        drop(rejected);
        after.resolving();
        last.resolving();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ((), passed) = after.queue(bound, || tx.send("after").unwrap());
                assert_eq!(passed, vec![0]);
            });
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                let ((), passed) = last.queue(bound, || tx.send("last").unwrap());
                assert_eq!(passed, vec![0]);
            });
        });
        let ((), passed) = slow.queue(bound, || tx.send("slow").unwrap());
        assert!(passed.is_empty());
        let order: Vec<_> = rx.try_iter().collect();
        assert_eq!(order, ["after", "last", "slow"]);
    }
}
