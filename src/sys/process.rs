//! The process itself: forking into the background, signal dispositions.

use std::io;

pub use nix::unistd::ForkResult;

/// The number of threads of this process (`Threads:` of `/proc/self/status`).
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("/proc/self/status has no Threads: line"))
}

/// `fork(2)` while this process has a single thread, and only then: the
/// child of a multi-threaded process holds copies of locks other threads
/// may have held, which nothing will ever release, so it may only call
/// async-signal-safe functions. With one thread the child is a faithful
/// copy; with more the call is refused (EBUSY), so it has to happen before
/// any thread is started.
pub fn fork_single_threaded() -> io::Result<ForkResult> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("the process already has {threads} threads; fork before starting any"),
        ));
    }
    // SAFETY: the process has one thread (checked just above, and only this
    // thread could start another), so no lock is held by a thread that the
    // child would lack, and the child may run any code.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Gives signal `sig` its default disposition (undoing an inherited
/// SIG_IGN), for a signal that is then blocked and waited for.
pub fn default_disposition(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: installs no handler (SIG_DFL), so no code of ours runs in
    // signal context; called before the daemon starts its threads.
    if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the kernel SIGKILL this process when its parent (`parent`, the
/// keeper) dies, and fails if that parent is already gone.
pub fn die_with_parent(parent: i32) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The parent may have died before the request took effect.
    if nix::unistd::getppid().as_raw() != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// The keeper this daemon serves for (0: none). Its fds are the daemon's
/// own (the backing files of open handles it keeps for a restart).
static KEEPER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Records the keeper process this serving process belongs to.
pub fn set_keeper(pid: u32) {
    KEEPER.store(pid, std::sync::atomic::Ordering::Relaxed);
}

/// The keeper this serving process belongs to, if any.
pub fn keeper_pid() -> Option<u32> {
    match KEEPER.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        pid => Some(pid),
    }
}

/// Whether `pid` is this daemon: this process or its keeper. Their fds of
/// an image are never another writer's.
pub fn is_daemon(pid: u32) -> bool {
    pid == std::process::id() || pid == KEEPER.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test harness runs tests on their own threads besides the main one,
    /// so a fork here must be refused; the count itself is read correctly.
    #[test]
    fn fork_refused_with_threads() {
        let t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(500)));
        assert!(thread_count().unwrap() >= 2);
        let err = fork_single_threaded().expect_err("forked with threads");
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        t.join().unwrap();
    }
}
