//! The control plane's worker threads, bounded (docs/DESIGN.md §3, "Load").
//! Two lanes that never share a thread: commands (only root and the
//! mounting user may write them) and status builds (any user may open
//! `status` with `allow_other`). A FUSE request thread only queues work
//! here and returns; it never waits for a worker. A command waiting for its
//! turn on an image holds no thread: it is [`Parked`], and put back on the
//! lane (ahead of new work) when its turn comes.
//!
//! Status opens of root and the mounting user are served before other
//! users' ones. Another user has at most `STATUS_PER_UID` status opens
//! waiting or being built, and all other users together `STATUS_OTHERS`;
//! an open over either bound fails at once with EAGAIN, so a flood costs
//! the daemon a queue entry, never a thread, and a reader sees an error
//! instead of a hang.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Threads building status documents.
pub const STATUS_THREADS: usize = 2;
/// Status opens of one user other than root and the mounting user,
/// waiting or being built.
pub const STATUS_PER_UID: usize = 8;
/// Status opens of all users other than root and the mounting user,
/// waiting or being built.
pub const STATUS_OTHERS: usize = 32;
/// Status opens of root and the mounting user waiting.
pub const STATUS_OWNER_QUEUE: usize = 256;
/// Threads running commands: commands on different images run in
/// parallel, up to this many; later ones wait in arrival order. A thread
/// is held while a command resolves its paths or runs on an image, never
/// while it waits for its turn on one.
pub const COMMAND_THREADS: usize = 16;
/// Commands waiting for a thread or for their turn on an image.
pub const COMMAND_QUEUE: usize = 1024;

type Task = Box<dyn FnOnce() + Send>;

/// Who a task is for: root or the mounting user (served first, no per-user
/// bound), or another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Owner,
    Other(u32),
}

/// Threads started on demand up to a bound, each serving queued tasks
/// (resumed ones first, then owners', each queue in order) until none is
/// left.
struct Lane {
    name: &'static str,
    max_threads: usize,
    max_owner_queue: usize,
    max_per_uid: usize,
    max_others: usize,
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    /// Parked tasks whose wait is over: they hold an image's turn.
    resumed: VecDeque<Task>,
    owner: VecDeque<Task>,
    others: VecDeque<Task>,
    threads: usize,
    /// Tasks waiting elsewhere (for a turn), holding no thread; counted
    /// with the owners' queue against its bound.
    parked: usize,
    /// Other users' tasks waiting or running, by uid, and in all.
    per_uid: HashMap<u32, usize>,
    others_pending: usize,
    /// Refusals since the last log message about them.
    refused: u64,
    last_warning: Option<Instant>,
}

impl Lane {
    fn submit(self: &Arc<Self>, class: Class, task: Task) -> Result<(), i32> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match class {
            Class::Owner if st.owner.len() + st.parked >= self.max_owner_queue => {
                return Err(self.refuse(&mut st, class));
            }
            Class::Owner => st.owner.push_back(task),
            Class::Other(uid) => {
                let mine = st.per_uid.get(&uid).copied().unwrap_or(0);
                if mine >= self.max_per_uid || st.others_pending >= self.max_others {
                    return Err(self.refuse(&mut st, class));
                }
                *st.per_uid.entry(uid).or_default() += 1;
                st.others_pending += 1;
                // Counted until it has run or is dropped unrun, also when
                // it panics.
                let counted = Counted {
                    lane: self.clone(),
                    uid,
                };
                st.others.push_back(Box::new(move || {
                    let _counted = counted;
                    task();
                }));
            }
        }
        if st.threads < self.max_threads {
            match self.spawn() {
                Ok(()) => st.threads += 1,
                // The threads already running serve the task later.
                Err(e) if st.threads > 0 => {
                    log::warn!("{}: cannot start another worker thread: {e}", self.name)
                }
                Err(e) => {
                    log::warn!("{}: cannot start a worker thread: {e}", self.name);
                    let task = match class {
                        Class::Owner => st.owner.pop_back(),
                        Class::Other(_) => st.others.pop_back(),
                    };
                    // Dropped unlocked: dropping it un-counts it (and drops
                    // its reply unsent; the caller answers EAGAIN).
                    drop(st);
                    drop(task);
                    return Err(libc::EAGAIN);
                }
            }
        }
        Ok(())
    }

    fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let lane = self.clone();
        std::thread::Builder::new()
            .name(format!("migsafe-{}", self.name))
            .spawn(move || lane.serve())
            .map(drop)
    }

    /// Puts a parked task back, ahead of new work: it holds an image's
    /// turn, which every later command on that image waits for.
    fn resume(self: &Arc<Self>, task: Task) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.parked -= 1;
        st.resumed.push_back(task);
        if st.threads < self.max_threads {
            match self.spawn() {
                Ok(()) => st.threads += 1,
                Err(e) if st.threads > 0 => {
                    log::warn!("{}: cannot start another worker thread: {e}", self.name)
                }
                Err(e) => {
                    // Dropped unrun: its reply goes unsent (the kernel then
                    // gets an error) and its turn ends.
                    log::error!("{}: cannot start a worker thread: {e}", self.name);
                    let task = st.resumed.pop_back();
                    drop(st);
                    drop(task);
                }
            }
        }
    }

    /// EAGAIN, logged at most every 10 seconds with the count since.
    fn refuse(&self, st: &mut LaneState, class: Class) -> i32 {
        st.refused += 1;
        let due = st
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            let who = match class {
                Class::Owner => "root or the mounting user".to_string(),
                Class::Other(uid) => format!("uid {uid}"),
            };
            log::warn!(
                "{}: too many requests waiting (last from {who}; at most {} per user and {} \
                 in all for other users, {} for root and the mounting user): {} refused with \
                 EAGAIN since the last message",
                self.name,
                self.max_per_uid,
                self.max_others,
                self.max_owner_queue,
                st.refused
            );
            st.refused = 0;
            st.last_warning = Some(Instant::now());
        }
        libc::EAGAIN
    }

    fn serve(&self) {
        loop {
            let task = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let next = st.resumed.pop_front();
                match next
                    .or_else(|| st.owner.pop_front())
                    .or_else(|| st.others.pop_front())
                {
                    Some(t) => t,
                    None => {
                        st.threads -= 1;
                        return;
                    }
                }
            };
            // A panicking task drops its reply (the kernel then gets an
            // error); the thread goes on serving.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                log::error!("{}: a worker task panicked", self.name);
            }
        }
    }
}

/// One of another user's tasks, waiting or running.
struct Counted {
    lane: Arc<Lane>,
    uid: u32,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut st = self.lane.state.lock().unwrap_or_else(|p| p.into_inner());
        st.others_pending -= 1;
        if let Some(n) = st.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                st.per_uid.remove(&self.uid);
            }
        }
    }
}

/// A task waiting for something other than a thread (its turn on an
/// image), holding none; counted among the lane's waiting tasks until it is
/// resumed or dropped.
pub struct Parked {
    lane: Option<Arc<Lane>>,
}

impl Parked {
    /// Queues `task` on the lane, ahead of new work. Never refused: the
    /// task was accepted when it arrived.
    pub fn resume(mut self, task: impl FnOnce() + Send + 'static) {
        if let Some(lane) = self.lane.take() {
            lane.resume(Box::new(task));
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            let mut st = lane.state.lock().unwrap_or_else(|p| p.into_inner());
            st.parked -= 1;
        }
    }
}

/// The command lane, for a command to park itself on while it waits.
#[derive(Clone)]
pub struct CommandLane(Arc<Lane>);

impl CommandLane {
    /// Counts a command as waiting without a thread until the returned
    /// [`Parked`] resumes it.
    pub fn park(&self) -> Parked {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.parked += 1;
        Parked {
            lane: Some(self.0.clone()),
        }
    }
}

/// The two lanes.
pub struct Workers {
    commands: Arc<Lane>,
    status: Arc<Lane>,
}

impl Default for Workers {
    fn default() -> Self {
        let lane = |name, max_threads, max_owner_queue, max_per_uid, max_others| {
            Arc::new(Lane {
                name,
                max_threads,
                max_owner_queue,
                max_per_uid,
                max_others,
                state: Mutex::default(),
            })
        };
        Workers {
            // Only owners write commands: nobody else gets a place.
            commands: lane("command", COMMAND_THREADS, COMMAND_QUEUE, 0, 0),
            status: lane(
                "status",
                STATUS_THREADS,
                STATUS_OWNER_QUEUE,
                STATUS_PER_UID,
                STATUS_OTHERS,
            ),
        }
    }
}

impl Workers {
    /// Runs `work` on a command thread, handing it `done`. Commands start
    /// in the order of these calls.
    pub fn command<T, D>(&self, done: D, work: impl FnOnce(D) + Send + 'static)
    where
        D: FnOnce(Result<T, Error>) + Send + 'static,
    {
        on_lane(&self.commands, Class::Owner, done, work)
    }

    /// The command lane, on which a command waiting for its turn parks.
    pub fn command_lane(&self) -> CommandLane {
        CommandLane(self.commands.clone())
    }

    /// Runs `work` on a status thread for `class`, handing it `done`; over
    /// the bounds, `done` gets EAGAIN at once.
    pub fn status<T, D>(&self, class: Class, done: D, work: impl FnOnce(D) + Send + 'static)
    where
        D: FnOnce(Result<T, Error>) + Send + 'static,
    {
        on_lane(&self.status, class, done, work)
    }
}

/// `done` stays reachable here if the lane refuses the task (over a bound,
/// or out of threads): the caller then gets EAGAIN, never a hang.
fn on_lane<T, D>(lane: &Arc<Lane>, class: Class, done: D, work: impl FnOnce(D) + Send + 'static)
where
    D: FnOnce(Result<T, Error>) + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(done)));
    let worker_slot = slot.clone();
    let task: Task = Box::new(move || {
        let done = worker_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done {
            work(done);
        }
    });
    if let Err(errno) = lane.submit(class, task) {
        let done = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done {
            done(Err(Error::Refused(errno)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn other_users_get_eagain_over_their_bound_and_owners_go_first() {
        let w = Workers::default();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let (tx, rx) = mpsc::channel::<(String, Result<(), i32>)>();
        let submit = |class: Class, tag: String| {
            let gate = gate.clone();
            let tx = tx.clone();
            let tx2 = tx.clone();
            let tag2 = tag.clone();
            w.status(
                class,
                move |r: Result<(), Error>| {
                    let _ = tx2.send((tag2, r.map_err(|e| e.errno())));
                },
                move |done| {
                    let _ = gate.lock().unwrap().recv();
                    let _ = tx;
                    done(Ok(()))
                },
            );
        };
        // One user: STATUS_PER_UID accepted, the next refused at once.
        for i in 0..=STATUS_PER_UID {
            submit(Class::Other(4242), format!("u{i}"));
        }
        let (tag, r) = rx.recv().unwrap();
        assert_eq!((tag.as_str(), r), ("u8", Err(libc::EAGAIN)));
        // An owner's task queued behind them is served before the rest of
        // the queue: the two threads are busy, so it runs third.
        submit(Class::Owner, "owner".into());
        for _ in 0..STATUS_PER_UID + 1 {
            gate_tx.send(()).unwrap();
        }
        let order: Vec<String> = (0..STATUS_PER_UID + 1)
            .map(|_| rx.recv().unwrap().0)
            .collect();
        let owner_at = order.iter().position(|t| t == "owner").unwrap();
        assert!(owner_at <= STATUS_THREADS, "{order:?}");
        // Done tasks free their places.
        submit(Class::Other(4242), "again".into());
        gate_tx.send(()).unwrap();
        assert_eq!(rx.recv().unwrap(), ("again".to_string(), Ok(())));
    }

    #[test]
    fn parked_tasks_count_against_the_bound_and_resume_ahead_of_new_ones() {
        let lane = Arc::new(Lane {
            name: "test",
            max_threads: 1,
            max_owner_queue: 2,
            max_per_uid: 0,
            max_others: 0,
            state: Mutex::default(),
        });
        let commands = CommandLane(lane.clone());
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel::<&str>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let tx1 = tx.clone();
        // The one thread runs A until the gate opens.
        lane.submit(
            Class::Owner,
            Box::new(move || {
                started_tx.send(()).unwrap();
                gate_rx.recv().unwrap();
                tx1.send("A").unwrap();
            }),
        )
        .unwrap();
        started_rx.recv().unwrap();
        let parked = commands.park();
        let tx2 = tx.clone();
        assert_eq!(
            lane.submit(Class::Owner, Box::new(move || tx2.send("B").unwrap())),
            Ok(())
        );
        // B waiting and one parked: the queue of 2 is full.
        assert_eq!(
            lane.submit(Class::Owner, Box::new(|| ())),
            Err(libc::EAGAIN)
        );
        let tx3 = tx.clone();
        parked.resume(move || tx3.send("resumed").unwrap());
        gate_tx.send(()).unwrap();
        let order: Vec<&str> = (0..3).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(order, ["A", "resumed", "B"]);
        // A parked task dropped unresumed frees its place too.
        drop(commands.park());
        assert_eq!(lane.state.lock().unwrap().parked, 0);
    }
}
