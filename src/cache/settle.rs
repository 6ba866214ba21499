//! Which pages of a file may still hold bytes read from storage before a
//! drop: the rule of step 4 of the handover (docs/DESIGN.md §3).
//!
//! A page whose read is in flight is already in the page cache, locked and
//! not uptodate, and `POSIX_FADV_DONTNEED` skips it; when the read lands the
//! page is uptodate with what the backing returned, which it may have read
//! before the source's last write. cachestat(2) counts such a page (it counts
//! every folio in the cache); mincore(2) does not (it reports a page only
//! when its folio is uptodate). So "counted by cachestat, not reported by
//! mincore" is "under read", and a page stays that way, continuously, from
//! before its read is issued until it lands.
//!
//! The rule, per page index, from probes made after the command started: an
//! index is *cleared* once it was seen
//! - absent (cachestat over a range holding it counts 0): the page read
//!   before the command is gone, whatever comes later was read after; or
//! - not uptodate after having been seen uptodate: the folio seen uptodate
//!   is gone, or will be read again before anyone is served from it (a
//!   folio that is not uptodate is never served without a new read).
//!
//! Whatever occupies a cleared index later was read from storage after the
//! command started, that is after the source's last sync: it is current
//! ("read again after the drop"). An index that is neither may be stale:
//! one never seen uptodate may be a read begun before the command and still
//! in flight; one seen uptodate at every probe since may be a page read
//! before the command that every drop skipped (mapped, being copied). The
//! caller drops and probes again until every index is cleared.
//!
//! A read in flight is waited for with a read of the page in a helper
//! thread (`wait_for_read`), which stays blocked as long as the backing
//! does not answer, past the command that started it. So there is at most
//! one such read per page of a file in the daemon, which later waits join,
//! and at most `MAX_SETTLE_READS` in all: retries of a command on a hung
//! backing join the read its first attempt left, and over the bound a page under read is not
//! waited for: it stays uncleared unless a probe sees it gone (the command
//! fails, never passes on it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{MAX_RANGES, Method, WINDOW};
use crate::sys;

/// The uncleared page indices of one file across the probes of one command.
#[derive(Debug, Default)]
pub struct Settle {
    /// Uncleared index -> whether it has been seen uptodate.
    pending: BTreeMap<u64, bool>,
    probed: bool,
}

impl Settle {
    pub fn new() -> Settle {
        Settle::default()
    }

    /// True once every index present at the first probe is cleared.
    pub fn is_done(&self) -> bool {
        self.probed && self.pending.is_empty()
    }

    /// Looks at the file once (after a drop) and clears what it can.
    ///
    /// With `Method::Mincore` (no cachestat(2)) a page under read cannot be
    /// told from an absent one: both read as not resident, so only pages
    /// seen uptodate are followed, and a read in flight is not seen at all.
    pub fn probe(&mut self, file: &File, size: u64, method: Method) -> io::Result<()> {
        let fd = file.as_fd();
        let page = sys::page_size() as u64;
        if !self.probed {
            self.probed = true;
            let runs = match method {
                Method::Cachestat => {
                    let mut pages = size.div_ceil(page).max(1);
                    // Pages past the size this host knows (the file grew
                    // elsewhere, or the size is stale).
                    while sys::cachestat_range(fd, pages * page, 0)?.cached > 0 {
                        pages = pages.saturating_mul(2);
                    }
                    present_runs(fd, 0, pages)?
                }
                Method::Mincore => vec![(0, size.div_ceil(page))],
            };
            for (lo, hi) in runs {
                self.look(fd, lo, hi, method)?;
            }
            return Ok(());
        }
        for (lo, hi) in self.pending_runs() {
            let present = match method {
                Method::Cachestat => present_runs(fd, lo, hi)?,
                Method::Mincore => vec![(lo, hi)],
            };
            // Indices of the run not found present were seen absent.
            let mut at = lo;
            for &(plo, phi) in &present {
                self.clear(at, plo);
                at = phi;
            }
            self.clear(at, hi);
            for (plo, phi) in present {
                self.look(fd, plo, phi, method)?;
            }
        }
        Ok(())
    }

    /// The first index never seen uptodate: a read that may have begun
    /// before the command, still in flight.
    pub fn first_under_read(&self) -> Option<u64> {
        self.pending
            .iter()
            .find(|(_, uptodate)| !**uptodate)
            .map(|(&i, _)| i)
    }

    /// Looks at index `i` alone, right after `wait_for_read` returned: if
    /// it is uptodate now, that is recorded (mincore, not the read's return,
    /// is the observation: a read of a file opened for direct I/O by its
    /// filesystem returns without the page cache).
    pub fn look_at(&mut self, file: &File, i: u64) -> io::Result<()> {
        let page = sys::page_size() as u64;
        let uptodate = sys::mincore_window(file.as_fd(), i * page, page as usize)?;
        if uptodate.first() == Some(&true)
            && let Some(u) = self.pending.get_mut(&i)
        {
            *u = true;
        }
        Ok(())
    }

    /// Pages never seen uptodate (reads that may have begun before the
    /// command) and the first of their byte ranges.
    pub fn under_read(&self) -> (u64, Vec<(u64, u64)>) {
        self.select(false)
    }

    /// Pages uptodate at every probe since first seen uptodate, and the
    /// first of their byte ranges.
    pub fn resident(&self) -> (u64, Vec<(u64, u64)>) {
        self.select(true)
    }

    fn select(&self, uptodate: bool) -> (u64, Vec<(u64, u64)>) {
        let page = sys::page_size() as u64;
        let mut count = 0;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (&i, _) in self.pending.iter().filter(|(_, u)| **u == uptodate) {
            count += 1;
            let full = ranges.len() >= MAX_RANGES;
            match ranges.last_mut() {
                Some(r) if r.1 == i * page => r.1 += page,
                _ if full => {}
                _ => ranges.push((i * page, (i + 1) * page)),
            }
        }
        (count, ranges)
    }

    /// mincore over the present indices `[lo, hi)`: records pages seen
    /// uptodate, clears those that were uptodate before and are not now.
    fn look(&mut self, fd: BorrowedFd<'_>, lo: u64, hi: u64, method: Method) -> io::Result<()> {
        let page = sys::page_size() as u64;
        let window = WINDOW / page;
        let mut start = lo;
        while start < hi {
            let end = hi.min(start + window);
            let bits = sys::mincore_window(fd, start * page, ((end - start) * page) as usize)?;
            for (i, uptodate) in (start..end).zip(bits) {
                let seen = self.pending.get(&i).copied();
                match (uptodate, seen, method) {
                    (true, _, _) => {
                        self.pending.insert(i, true);
                    }
                    // Seen uptodate before, not now: cleared.
                    (false, Some(true), _) => {
                        self.pending.remove(&i);
                    }
                    // Counted by cachestat, not uptodate: under read (or
                    // inserted since the count; either way not cleared).
                    (false, _, Method::Cachestat) => {
                        self.pending.entry(i).or_insert(false);
                    }
                    (false, _, Method::Mincore) => {
                        self.pending.remove(&i);
                    }
                }
            }
            start = end;
        }
        Ok(())
    }

    fn clear(&mut self, lo: u64, hi: u64) {
        if lo < hi {
            let gone: Vec<u64> = self.pending.range(lo..hi).map(|(&i, _)| i).collect();
            for i in gone {
                self.pending.remove(&i);
            }
        }
    }

    /// The pending indices as runs `[lo, hi)`.
    fn pending_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &i in self.pending.keys() {
            match runs.last_mut() {
                Some(r) if r.1 == i => r.1 += 1,
                _ => runs.push((i, i + 1)),
            }
        }
        runs
    }
}

/// Settle reads outstanding in this daemon at most, in all. Each is a
/// thread blocked until the backing answers; a backing that never answers
/// keeps them, so this bounds what a hung backing costs (with one read per
/// page, each retry of a command joins the read it left behind).
pub const MAX_SETTLE_READS: usize = 32;

/// Stack of a settle-read thread: it reads one byte.
const SETTLE_READ_STACK: usize = 64 << 10;

/// One settle read in flight, shared by every wait for its page.
#[derive(Default)]
struct Flight {
    /// The read's result (bytes read, or errno) once it returned.
    result: Mutex<Option<Result<usize, i32>>>,
    landed: Condvar,
}

/// The settle reads in flight, by (device, inode, page index) of the file
/// read: at most one per page, whichever command started it.
static FLIGHTS: Mutex<BTreeMap<(u64, u64, u64), Arc<Flight>>> = Mutex::new(BTreeMap::new());

/// Waits, at most `timeout`, for the read in flight on page `index` of
/// `file` to land, by reading one byte of that page: a read that finds the
/// page under read waits for it, and returns once it is uptodate. Probing
/// alone cannot tell a page that a reader keeps dropping and reading again
/// (under read at nearly every probe) from one long read; a look right
/// after this returns (`Settle::look_at`) catches it uptodate.
///
/// True when a byte came back; false at end of file or when `timeout`
/// passed first. The read runs in a helper thread ("settle-read"), which
/// ends when the backing answers, also after `timeout`. There is at most
/// one such read per page of a file in the daemon: a wait for a page whose
/// read is still outstanding (a retry of a command that gave up on a hung
/// backing) waits for that read, with its own `timeout`, instead of
/// starting another thread. Only the look after it is an observation, so
/// a read that began before the command serves as well as a new one. With
/// `MAX_SETTLE_READS` outstanding no read is started: an error, the page
/// stays under read for the caller (never cleared by this). The read is
/// made without readahead, so a page that is absent by then costs one page
/// read.
pub fn wait_for_read(file: &File, index: u64, timeout: Duration) -> io::Result<bool> {
    let flight = join_or_start(file, index)?;
    let result = lock(&flight.result);
    let (result, _) = flight
        .landed
        .wait_timeout_while(result, timeout, |r| r.is_none())
        .unwrap_or_else(PoisonError::into_inner);
    match *result {
        Some(Ok(n)) => Ok(n > 0),
        Some(Err(errno)) => Err(io::Error::from_raw_os_error(errno)),
        None => Ok(false),
    }
}

/// The settle read outstanding on page `index` of `file`, started here if
/// there is none.
fn join_or_start(file: &File, index: u64) -> io::Result<Arc<Flight>> {
    let st = sys::fstat_fd(file.as_fd())?;
    let key = (st.st_dev, st.st_ino, index);
    let mut flights = lock(&FLIGHTS);
    if let Some(flight) = flights.get(&key) {
        return Ok(flight.clone());
    }
    if flights.len() >= MAX_SETTLE_READS {
        return Err(io::Error::other(format!(
            "{} reads waiting for pages under read are outstanding (the backing has not \
             answered them); none started for page {index}",
            flights.len()
        )));
    }
    let f = file.try_clone()?;
    sys::fadvise_random(f.as_fd())?;
    let offset = index * sys::page_size() as u64;
    let flight = Arc::new(Flight::default());
    let mine = flight.clone();
    // Spawned under the lock: the thread's removal below comes after the
    // insertion.
    std::thread::Builder::new()
        .name("settle-read".into())
        .stack_size(SETTLE_READ_STACK)
        .spawn(move || {
            let mut byte = [0u8; 1];
            let read = f
                .read_at(&mut byte, offset)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
            // Out of the table before the result is out: a later wait
            // starts a read of its own rather than take this one's.
            lock(&FLIGHTS).remove(&key);
            *lock(&mine.result) = Some(read);
            mine.landed.notify_all();
        })?;
    flights.insert(key, flight.clone());
    Ok(flight)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The runs of page indices in `[lo, hi)` present in the page cache, found
/// by splitting ranges that cachestat counts as partly cached (a range
/// counted 0 was absent at that moment; one counted full is one run).
fn present_runs(fd: BorrowedFd<'_>, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
    let page = sys::page_size() as u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut stack = vec![(lo, hi)];
    while let Some((lo, hi)) = stack.pop() {
        if lo >= hi {
            continue;
        }
        let cached = sys::cachestat_range(fd, lo * page, (hi - lo) * page)?.cached;
        if cached == 0 {
            continue;
        }
        if cached >= hi - lo {
            runs.push((lo, hi));
            continue;
        }
        let mid = lo + (hi - lo) / 2;
        // Upper half first, so the lower one is popped (and pushed) first.
        stack.push((mid, hi));
        stack.push((lo, mid));
    }
    // Merge adjacent runs.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for r in runs {
        match merged.last_mut() {
            Some(m) if m.1 == r.0 => m.1 = r.1,
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    //! The rule on a real file: pages resident at every probe stay pending,
    //! a drop clears them.
    use super::*;

    #[test]
    fn pages_stay_pending_until_seen_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 64 << 10]).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        let size = 64 << 10;
        let mut s = Settle::new();
        s.probe(&f, size, Method::Cachestat).unwrap();
        let (kept, ranges) = s.resident();
        assert_eq!(kept, 16, "the written pages are resident and uptodate");
        assert_eq!(ranges, vec![(0, 64 << 10)]);
        assert_eq!(s.under_read().0, 0);
        // Not dropped: still the same uptodate pages, nothing cleared.
        s.probe(&f, size, Method::Cachestat).unwrap();
        assert!(!s.is_done());
        assert_eq!(s.resident().0, 16);
        super::super::evict(&f).unwrap();
        s.probe(&f, size, Method::Cachestat).unwrap();
        assert!(s.is_done(), "dropped pages are cleared: {s:?}");
    }

    /// Removes the given keys from the table of settle reads on drop.
    struct Unseed(Vec<(u64, u64, u64)>);

    impl Drop for Unseed {
        fn drop(&mut self) {
            let mut flights = lock(&FLIGHTS);
            for k in &self.0 {
                flights.remove(k);
            }
        }
    }

    /// A wait joins the read outstanding on its page (a read the test
    /// seeds, which never returns until the test sets its result) instead of
    /// reading, and starts no read with `MAX_SETTLE_READS` outstanding.
    #[test]
    fn waits_join_the_outstanding_read_and_stop_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 64 << 10]).unwrap();
        let f = File::open(&path).unwrap();
        let st = sys::fstat_fd(f.as_fd()).unwrap();
        let key = |i| (st.st_dev, st.st_ino, i);
        // A read of its own: it lands and leaves nothing outstanding.
        assert!(wait_for_read(&f, 1, Duration::from_secs(10)).unwrap());
        assert!(!lock(&FLIGHTS).contains_key(&key(1)));

        // Joined: the seeded read has not returned, so the wait times out
        // (a read of its own would have returned the byte at once).
        let mut seeded = Unseed(vec![key(2)]);
        let flight = Arc::new(Flight::default());
        lock(&FLIGHTS).insert(key(2), flight.clone());
        assert!(!wait_for_read(&f, 2, Duration::from_millis(50)).unwrap());
        *lock(&flight.result) = Some(Ok(1));
        flight.landed.notify_all();
        assert!(wait_for_read(&f, 2, Duration::from_secs(10)).unwrap());

        // At the bound: no read is started, and the caller is told.
        {
            let mut flights = lock(&FLIGHTS);
            let mut i = 0;
            while flights.len() < MAX_SETTLE_READS {
                let k = (u64::MAX, u64::MAX, i);
                flights.insert(k, Arc::new(Flight::default()));
                seeded.0.push(k);
                i += 1;
            }
        }
        let e = wait_for_read(&f, 3, Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("outstanding"), "{e}");
        assert!(!lock(&FLIGHTS).contains_key(&key(3)));
    }
}
