//! Writers outside the mount: processes that hold an image's backing open
//! for writing where this daemon cannot fence them. One `/proc` pass per
//! command (`WriterScan`), and the daemon's kept answers of earlier passes
//! (`WriterCache`), checked against the opens fanotify reports since.

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use super::holders::{Holder, Identity, comm_of, mount_devices, other_pids};
use crate::mountinfo;
use crate::sys;

/// The /proc pass shared by every image of one command (or one `status`):
/// taken at the first image that needs it, so a command over 500 images
/// costs one pass, not 500. What it reports is a snapshot of that moment,
/// as every scan is (a writer may open or close right after). With the
/// daemon's `WriterCache`, an image whose backing nobody else opened since
/// an earlier pass is answered from that pass instead, after a look at the
/// few processes that matter (see `WriterCache`).
#[derive(Default)]
pub struct WriterScan {
    /// The pass, with the cache's sequence number when it started.
    once: std::sync::OnceLock<(u64, OpenWriters)>,
    cache: Option<Arc<WriterCache>>,
}

impl WriterScan {
    /// A scan that keeps nothing: every answer comes from its own pass.
    pub fn new() -> WriterScan {
        WriterScan::default()
    }

    /// A scan that asks the daemon's cache first and feeds it.
    pub fn with_cache(cache: &Arc<WriterCache>) -> WriterScan {
        WriterScan {
            once: Default::default(),
            cache: Some(cache.clone()),
        }
    }

    /// Processes that hold the image open for writing where this daemon
    /// cannot fence them: directly on the backing (not through any migsafe
    /// mount), or through another FUSE mount of it, a crashed instance's
    /// included (after a crash the kernel still passes a passthrough fd's
    /// writes to the backing, and such a mount may be detached, so it is no
    /// longer in mountinfo). `rel_path` is the image's path below the mount
    /// root, `own_mounts` the mount ids of this daemon's own mount, whose
    /// users it does fence. `open` opens the backing (read-only), called
    /// once per image for the cache's watch.
    pub fn unfenced(
        &self,
        id: Identity,
        rel_path: &str,
        own_mounts: &[u64],
        open: impl FnOnce() -> std::io::Result<fs::File>,
    ) -> Vec<Holder> {
        let Some(cache) = &self.cache else {
            return self.pass(None).1.unfenced(id, rel_path, own_mounts);
        };
        cache.start_refresher();
        if let Some(found) = cache.lookup(id, rel_path, own_mounts, open) {
            return found;
        }
        let (seq, pass) = self.pass(Some(cache));
        let found = pass.unfenced(id, rel_path, own_mounts);
        cache.store(id, rel_path, own_mounts, *seq, &found);
        found
    }

    fn pass(&self, cache: Option<&WriterCache>) -> &(u64, OpenWriters) {
        self.once.get_or_init(|| {
            let seq = cache.map_or(0, WriterCache::begin_pass);
            (seq, OpenWriters::scan(other_pids()))
        })
    }
}

/// The answers of earlier /proc passes, per image, kept until they may
/// have changed (docs/DESIGN.md §3, "Writers outside the mount"). A process
/// gains a new open file of an image's backing only by opening it, and
/// every open of a watched backing (by any process on this host, by any
/// path to its inode) is reported by fanotify with the opener's pid before
/// open(2) returns. Each use reads the fds of the writers the answer named
/// and of the processes that opened a watched backing since the watch
/// began ("candidates", kept while they live: an open reported before a
/// pass may install its fd only after the pass looked at that process).
/// The answer stands if the same writers are found and none of them opened
/// again since. The pass runs again when:
///  - a named writer is gone (it may have handed its file on first), a new
///    writer appeared, or a writer opened again (it may be a server, such
///    as another instance's relay, whose clients open its mount, not the
///    backing);
///  - a candidate exited (it may have passed its file to a child or over a
///    socket), or events were lost (queue overflow, an opener the kernel
///    does not name, a read error): every answer is dropped.
///
/// An image whose backing cannot be watched (no fanotify, a filesystem
/// without file handles, the mark limit) gets a pass every time, as without
/// this cache. A background thread reads the queue twice a second and
/// refreshes the dropped and new answers off the commands' path.
pub struct WriterCache {
    events: Option<sys::OpenEvents>,
    state: Mutex<CacheState>,
    /// Signalled on every new watch (wakes the refresher).
    wake: std::sync::Condvar,
    refresher: std::sync::OnceLock<()>,
    /// This daemon's mount point: the refresher's passes leave out its
    /// mount's users, as commands do.
    mountpoint: std::path::PathBuf,
}

#[derive(Default)]
struct CacheState {
    /// Bumped at every new watch and every loss of events: an answer is
    /// kept only from a look that started after both.
    seq: u64,
    /// Watched images with the `seq` of their watch (None: cannot be
    /// watched).
    watched: HashMap<Identity, Option<u64>>,
    lost_at: u64,
    /// The `seq` the refresher's last pass started at.
    refreshed_at: u64,
    /// Each watched image's last path (for the refresher's passes).
    paths: HashMap<Identity, String>,
    answers: HashMap<Identity, Answer>,
    candidates: HashMap<u32, Candidate>,
}

/// A process that opened a watched backing.
struct Candidate {
    /// Its start time when first seen (None: gone by then).
    start: Option<u64>,
    /// The `seq` of the last drain that saw it open one.
    opened_at: u64,
}

/// One image's last answer and what it was computed for.
struct Answer {
    path: String,
    own_mounts: Vec<u64>,
    /// Sorted pids of the writers it named.
    named: Vec<u32>,
    /// The `seq` its look started at.
    seq: u64,
}

impl WriterCache {
    /// Without fanotify (an old kernel, the per-user group limit) every
    /// image gets a pass every time.
    pub fn new(mountpoint: std::path::PathBuf) -> WriterCache {
        let events = sys::OpenEvents::new()
            .map_err(|e| {
                log::info!(
                    "cannot watch opens of images ({e}): every command that reports fencing \
                     of an image held open for writing scans /proc"
                )
            })
            .ok();
        WriterCache {
            events,
            state: Mutex::default(),
            wake: Default::default(),
            refresher: Default::default(),
            mountpoint,
        }
    }

    /// The image's answer from its last pass, checked against what changed
    /// since; None when a pass is needed.
    fn lookup(
        &self,
        id: Identity,
        rel_path: &str,
        own_mounts: &[u64],
        open: impl FnOnce() -> std::io::Result<fs::File>,
    ) -> Option<Vec<Holder>> {
        let events = self.events.as_ref()?;
        let known = self.lock().watched.get(&id).copied();
        match known {
            Some(None) => return None,
            Some(Some(_)) => {}
            None => {
                // Opened outside the lock: a backing that hangs holds up
                // this image only. The watch comes before the pass that
                // will be kept (`store` checks).
                if let Ok(file) = open() {
                    self.watch(events, id, rel_path, &file);
                }
                return None;
            }
        }
        let (candidates, named, fresh, seq) = {
            let mut st = self.lock();
            st.paths.insert(id, rel_path.to_string());
            self.drain(&mut st, events);
            let answer = st
                .answers
                .get(&id)
                .filter(|a| a.path == rel_path && a.own_mounts == own_mounts)?;
            let named = answer.named.clone();
            let since = answer.seq;
            let candidates: Vec<(u32, Option<u64>)> =
                st.candidates.iter().map(|(p, c)| (*p, c.start)).collect();
            let fresh: Vec<u32> = st
                .candidates
                .iter()
                .filter(|(_, c)| c.opened_at > since)
                .map(|(p, _)| *p)
                .collect();
            (candidates, named, fresh, st.seq)
        };
        if candidates
            .iter()
            .any(|(pid, start)| start.is_none() || start_time(*pid) != *start)
        {
            // It may have passed its file on before it went.
            self.lose(&mut self.lock());
            return None;
        }
        let mut pids: Vec<u32> = candidates
            .iter()
            .map(|c| c.0)
            .chain(named.clone())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        let found = OpenWriters::scan(pids.into_iter()).unfenced(id, rel_path, own_mounts);
        let mut now: Vec<u32> = found.iter().map(|h| h.pid).collect();
        now.sort_unstable();
        // A writer gone may have handed its file on first; a new one, or
        // one that opened again, may be a server (another instance's relay)
        // whose clients opened its mount, not the backing: both need the
        // pass to name everyone.
        if now != named || found.iter().any(|h| fresh.contains(&h.pid)) {
            return None;
        }
        self.store(id, rel_path, own_mounts, seq, &found);
        Some(found)
    }

    /// Marks the image's backing (`file`, checked to be the image's inode).
    fn watch(&self, events: &sys::OpenEvents, id: Identity, rel_path: &str, file: &fs::File) {
        use std::os::unix::fs::MetadataExt;
        match file.metadata() {
            Ok(m) if m.dev() == id.dev && m.ino() == id.ino => {}
            // Another file took the image's path meanwhile: the next
            // command tries again.
            _ => return,
        }
        let watched = events.watch(file.as_fd());
        let mut st = self.lock();
        if st.watched.contains_key(&id) {
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        if let Err(e) = &watched {
            log::info!(
                "image {rel_path}: cannot watch opens of its backing ({e}); \
                 each fencing report scans /proc"
            );
        }
        st.watched.insert(id, watched.ok().map(|_| seq));
        st.paths.insert(id, rel_path.to_string());
        self.wake.notify_all();
    }

    /// An image was opened through the mount (`file`: the handle's backing
    /// fd): watch its backing now and have a pass run in the background,
    /// so that the first command on it (the `activate` of an incoming
    /// migration, whose VMM opened the image long before) finds its answer
    /// ready instead of scanning during the VM's downtime.
    pub fn warm(self: &Arc<Self>, id: Identity, rel_path: &str, file: &fs::File) {
        let Some(events) = &self.events else {
            return;
        };
        if self.lock().watched.contains_key(&id) {
            return;
        }
        self.watch(events, id, rel_path, file);
        self.start_refresher();
    }

    /// One thread per daemon, started by the first open or command that
    /// uses the cache (it ends at once where opens cannot be watched): it
    /// reads the queue twice a second (so it never overflows for want of
    /// commands) and runs a pass for the watched images without an answer
    /// after a new watch or a loss (an opener exited), off the commands'
    /// path.
    fn start_refresher(self: &Arc<Self>) {
        self.refresher.get_or_init(|| {
            let me = Arc::downgrade(self);
            if let Err(e) = std::thread::Builder::new()
                .name("writers-bg".into())
                .spawn(move || refresh_loop(me))
            {
                log::warn!("cannot start the writer-answer thread: {e}");
            }
        });
    }

    /// Keeps `found`, from a look that started at `seq`, if nothing was
    /// lost and the image was watched before it started.
    fn store(&self, id: Identity, rel_path: &str, own_mounts: &[u64], seq: u64, found: &[Holder]) {
        let mut st = self.lock();
        let Some(Some(watched_at)) = st.watched.get(&id).copied() else {
            return;
        };
        if seq < watched_at || seq < st.lost_at {
            return;
        }
        let mut named: Vec<u32> = found.iter().map(|h| h.pid).collect();
        named.sort_unstable();
        st.answers.insert(
            id,
            Answer {
                path: rel_path.to_string(),
                own_mounts: own_mounts.to_vec(),
                named,
                seq,
            },
        );
    }

    /// A full pass starts: candidates gone by now are covered by it (what
    /// they handed on is in the fds it reads). Returns the `seq` it starts at.
    fn begin_pass(&self) -> u64 {
        let mut st = self.lock();
        if let Some(events) = &self.events {
            self.drain(&mut st, events);
        }
        st.candidates
            .retain(|pid, c| c.start.is_some() && start_time(*pid) == c.start);
        st.seq
    }

    fn drain(&self, st: &mut CacheState, events: &sys::OpenEvents) {
        match events.drain() {
            Ok(opens) if !opens.overflow && !opens.others.contains(&0) => {
                if opens.others.is_empty() {
                    return;
                }
                st.seq += 1;
                let seq = st.seq;
                for pid in opens.others {
                    st.candidates
                        .entry(pid)
                        .or_insert_with(|| Candidate {
                            start: start_time(pid),
                            opened_at: seq,
                        })
                        .opened_at = seq;
                }
            }
            Ok(_) => self.lose(st),
            Err(e) => {
                log::warn!("cannot read open events: {e}; scanning /proc");
                self.lose(st);
            }
        }
    }

    fn lose(&self, st: &mut CacheState) {
        st.answers.clear();
        st.seq += 1;
        st.lost_at = st.seq;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The refresher's loop (`WriterCache::start_refresher`); ends with the
/// cache.
fn refresh_loop(cache: std::sync::Weak<WriterCache>) {
    loop {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let Some(events) = &cache.events else {
            return;
        };
        let images: Vec<(Identity, String)> = {
            let st = cache.lock();
            let (mut st, _) = cache
                .wake
                .wait_timeout(st, std::time::Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner());
            cache.drain(&mut st, events);
            if st
                .candidates
                .iter()
                .any(|(pid, c)| c.start.is_none() || start_time(*pid) != c.start)
            {
                cache.lose(&mut st);
            }
            let since = st.refreshed_at;
            let due = st.lost_at > since || st.watched.values().flatten().any(|w| *w > since);
            if !due {
                continue;
            }
            st.watched
                .iter()
                .filter(|(id, w)| w.is_some() && !st.answers.contains_key(id))
                .filter_map(|(id, _)| Some((*id, st.paths.get(id)?.clone())))
                .collect()
        };
        let seq = cache.begin_pass();
        cache.lock().refreshed_at = seq;
        if images.is_empty() {
            continue;
        }
        let t0 = std::time::Instant::now();
        let pass = OpenWriters::scan(other_pids());
        let own = mountinfo::ids_at(&cache.mountpoint);
        for (id, path) in &images {
            let found = pass.unfenced(*id, path, &own);
            cache.store(*id, path, &own, seq, &found);
        }
        log::debug!(
            "writers outside the mount: background pass for {} images in {} ms",
            images.len(),
            t0.elapsed().as_millis()
        );
    }
}

/// The start time of process `pid` (clock ticks after boot, field 22 of
/// /proc/PID/stat), None when it is gone or a zombie: with the pid, it
/// names one process even if the pid is reused.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start
    // after the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// One writable fd of another process, as its fdinfo shows it.
struct WritableFd {
    pid: u32,
    fd: u32,
    mnt: u64,
}

/// Every writable fd of every other process, by inode number, with the
/// mount tables needed to tell which file the inode number belongs to.
struct OpenWriters {
    by_ino: HashMap<u64, Vec<WritableFd>>,
    /// mount id -> device number.
    mounts: HashMap<u64, u64>,
    fuse_mounts: Vec<u64>,
}

impl OpenWriters {
    /// Reads `/proc/PID/fdinfo/*` (`mnt_id`, `ino`, `flags`) of the given
    /// processes (all or a few) but this one, keeping the fds open for
    /// writing. Reads only /proc, never an fd's target: a scan must not
    /// wait on a FUSE mount, this one or a dead one. Processes that vanish or deny access
    /// mid-scan are skipped.
    fn scan(pids: impl Iterator<Item = u32>) -> OpenWriters {
        let mut by_ino: HashMap<u64, Vec<WritableFd>> = HashMap::new();
        // pos, flags, mnt_id and ino are the first lines of every fdinfo:
        // one read of a small buffer (3 syscalls per fd: open, read, close).
        let mut buf = [0u8; 256];
        for pid in pids.filter(|p| !crate::sys::is_daemon(*p)) {
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(mut f) = fs::File::open(fd.path()) else {
                    continue;
                };
                let Ok(n) = std::io::Read::read(&mut f, &mut buf) else {
                    continue;
                };
                drop(f);
                let info = String::from_utf8_lossy(&buf[..n]);
                let field = |name: &str, radix: u32| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
                };
                let (Some(mnt), Some(ino), Some(flags)) =
                    (field("mnt_id:", 10), field("ino:", 10), field("flags:", 8))
                else {
                    continue;
                };
                if flags as i32 & libc::O_ACCMODE == libc::O_RDONLY {
                    continue;
                }
                by_ino
                    .entry(ino)
                    .or_default()
                    .push(WritableFd { pid, fd: num, mnt });
            }
        }
        if by_ino.is_empty() {
            // No writable fd at all: the mount tables would not be read.
            return OpenWriters {
                by_ino,
                mounts: HashMap::new(),
                fuse_mounts: Vec::new(),
            };
        }
        OpenWriters {
            by_ino,
            mounts: mount_devices(),
            fuse_mounts: fuse_mount_ids(),
        }
    }

    fn unfenced(&self, id: Identity, rel_path: &str, own_mounts: &[u64]) -> Vec<Holder> {
        let suffix = format!("/{rel_path}");
        let mut out: Vec<Holder> = Vec::new();
        for w in self.by_ino.get(&id.ino).into_iter().flatten() {
            if own_mounts.contains(&w.mnt) || out.iter().any(|h| h.pid == w.pid) {
                continue;
            }
            let how = if self.mounts.get(&w.mnt) == Some(&id.dev) {
                "backing-writer"
            } else if self.mounts.contains_key(&w.mnt) && !self.fuse_mounts.contains(&w.mnt) {
                continue;
            } else {
                // Another FUSE mount, or a detached one: the same image if
                // the fd's path ends with the image's path.
                let Ok(link) = fs::read_link(format!("/proc/{}/fd/{}", w.pid, w.fd)) else {
                    continue;
                };
                let link = link.to_string_lossy();
                if !(link.ends_with(&suffix) || link == rel_path) {
                    continue;
                }
                "writer-through-another-mount"
            };
            out.push(Holder {
                pid: w.pid,
                comm: comm_of(w.pid),
                how,
            });
        }
        out
    }
}

/// Mount ids of the migsafe mounts in this process's mountinfo (type
/// `fuse.migsafe`, or plain `fuse` as older versions mounted): other FUSE
/// filesystems are backings, not other instances.
fn fuse_mount_ids() -> Vec<u64> {
    mountinfo::mountinfo()
        .into_iter()
        .filter(|m| m.fstype == "fuse" || m.fstype == "fuse.migsafe")
        .map(|m| m.id)
        .collect()
}
