//! Credentials: who a request comes from (`Caller`), serving it as that
//! caller (`FsCreds`: per-thread fsuid, fsgid, groups and capabilities), and
//! the daemon's own groups and capabilities.

use std::io;

use super::check;

/// The identity a request is served with: the caller's filesystem uid and
/// gid (as the kernel sends them) and its supplementary groups, which the
/// kernel does not send and which are read from `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// The caller of a request. Its groups come from `/proc/PID/status` of the
    /// requesting task, and only when that task's fsuid and fsgid are the
    /// request's: if the task is gone or its pid now names another process,
    /// the caller gets no supplementary groups (fewer rights, never others').
    /// Root (uid and gid 0) needs none: its capabilities decide.
    pub fn of_request(uid: u32, gid: u32, pid: u32) -> Caller {
        let groups = if (uid == 0 && gid == 0) || pid == 0 {
            Vec::new()
        } else {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| groups_from_status(&s, uid, gid))
                .unwrap_or_default()
        };
        Caller { uid, gid, groups }
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The kernel's generic permission check without ACLs: the owner bits if
    /// the caller owns the object, else the group bits if its gid or one of
    /// its groups is the object's, else the other bits; root may read and
    /// write anything and execute what has any execute bit. `mask` is a
    /// combination of `libc::R_OK`, `W_OK` and `X_OK`.
    pub fn may(&self, st: &libc::stat, mask: i32) -> bool {
        let mask = (mask & 0o7) as u32;
        if self.uid == 0 {
            return mask & libc::X_OK as u32 == 0 || st.st_mode & 0o111 != 0;
        }
        let bits = if self.uid == st.st_uid {
            st.st_mode >> 6
        } else if self.in_group(st.st_gid) {
            st.st_mode >> 3
        } else {
            st.st_mode
        } & 0o7;
        bits & mask == mask
    }
}

/// Supplementary groups from the text of `/proc/PID/status`, if the task's
/// fsuid and fsgid (the fourth fields of `Uid:` and `Gid:`) are `uid`/`gid`.
fn groups_from_status(status: &str, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let field = |key: &str, n: usize| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().nth(n)?.parse().ok()
    };
    if field("Uid:", 3)? != uid || field("Gid:", 3)? != gid {
        return None;
    }
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    line["Groups:".len()..]
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

/// Drops the daemon's own supplementary groups from every thread (glibc's
/// `setgroups` applies to all threads), so that only a caller's groups ever
/// take part in a permission check. Fails with EPERM when not root, where
/// there is nothing to switch anyway.
pub fn drop_supplementary_groups() -> io::Result<()> {
    // SAFETY: setgroups with an empty list reads no memory.
    let ret = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(ret as libc::c_long).map(|_| ())
}

/// Sets this thread's supplementary groups only: the raw syscall, because
/// glibc's `setgroups` changes every thread of the process.
fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t (u32).
    let ret = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    check(ret).map(|_| ())
}

/// `setfsuid`/`setfsgid` (raw, per thread), checked: the call returns the
/// previous id whether or not it succeeded, so a second call reads it back.
fn set_thread_fsid(nr: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: setfsuid/setfsgid only change this thread's credentials.
    let now = unsafe {
        libc::syscall(nr, id);
        libc::syscall(nr, u32::MAX)
    };
    if now as u32 != id {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's capability sets (capget(2), version 3: two words).
fn thread_caps() -> io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are live and laid out as capget(2) expects for
    // version 3 (two CapData words).
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check(ret)?;
    Ok(data)
}

/// Sets this thread's capability sets (capset(2) with pid 0 is per thread).
fn set_thread_caps(data: &[CapData; 2]) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: as in thread_caps; the kernel only reads data.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check(ret).map(|_| ())
}

fn daemon_is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    *ROOT.get_or_init(|| unsafe { libc::geteuid() } == 0)
}

/// Serves a request as its caller: switches this thread's fsuid, fsgid and
/// supplementary groups to the caller's, and for a non-root caller empties
/// the effective capability set, so the backing filesystem checks
/// permissions (EACCES/EPERM) and assigns ownership exactly as for the
/// caller. Everything here is per thread (raw syscalls; glibc would
/// broadcast setgroups to every thread), and dropping the guard restores
/// root. A daemon that is not root cannot switch and serves as itself.
pub struct FsCreds {
    caller: Caller,
    switched: bool,
    /// The capability sets to restore, when they were emptied.
    caps: Option<[CapData; 2]>,
}

thread_local! {
    /// Set while this thread serves as a caller: a second switch would
    /// save the caller's (empty) capabilities as the ones to restore.
    static SWITCHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl FsCreds {
    pub fn switch(caller: Caller) -> io::Result<FsCreds> {
        let mut guard = FsCreds {
            caller,
            switched: false,
            caps: None,
        };
        guard.enter()?;
        Ok(guard)
    }

    /// Runs `f` with the daemon's own identity, then serves as the caller
    /// again: for the few steps the kernel itself performs with more rights
    /// than the caller's (clearing set-id bits for a writer).
    pub fn as_daemon<T>(&mut self, f: impl FnOnce() -> T) -> io::Result<T> {
        self.leave();
        let out = f();
        self.enter()?;
        Ok(out)
    }

    fn enter(&mut self) -> io::Result<()> {
        let c = &self.caller;
        if !daemon_is_root() || (c.uid == 0 && c.gid == 0) {
            return Ok(());
        }
        if SWITCHED.get() {
            log::error!("nested credential switch refused");
            return Err(io::Error::from_raw_os_error(libc::EDEADLK));
        }
        let saved = thread_caps()?;
        // From here on, leave() restores whatever was changed.
        self.switched = true;
        SWITCHED.set(true);
        set_thread_groups(&c.groups)?;
        set_thread_fsid(libc::SYS_setfsgid, c.gid)?;
        set_thread_fsid(libc::SYS_setfsuid, c.uid)?;
        if c.uid != 0 {
            // Leaving fsuid 0 already cleared the file capabilities; the
            // others (CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_SETFCAP...) go too.
            let mut none = saved;
            for d in &mut none {
                d.effective = 0;
            }
            self.caps = Some(saved);
            set_thread_caps(&none)?;
        }
        Ok(())
    }

    fn leave(&mut self) {
        if !self.switched {
            return;
        }
        // Capabilities first: setfsuid and setgroups need CAP_SETUID/SETGID.
        let restored = self
            .caps
            .take()
            .map_or(Ok(()), |c| set_thread_caps(&c))
            .and_then(|()| set_thread_fsid(libc::SYS_setfsuid, 0))
            .and_then(|()| set_thread_fsid(libc::SYS_setfsgid, 0))
            .and_then(|()| set_thread_groups(&[]));
        match restored {
            Ok(()) => SWITCHED.set(false),
            // Cannot happen while the daemon keeps its permitted set. The
            // thread then has less than root's rights, never more, and
            // refuses further switches (SWITCHED stays set).
            Err(e) => log::error!("restoring the daemon's credentials after a request: {e}"),
        }
        self.switched = false;
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        self.leave();
    }
}

/// True when the process has CAP_SYS_ADMIN in its effective set, which the
/// kernel requires to register FUSE passthrough backing files.
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("CapEff:"))
                .and_then(|l| u64::from_str_radix(l[7..].trim(), 16).ok())
        })
        .map(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tcat\nUid:\t1000\t1000\t1000\t1001\nGid:\t100\t100\t100\t101\nGroups:\t4 24 27 \n";

    #[test]
    fn groups_only_when_the_task_is_the_caller() {
        assert_eq!(groups_from_status(STATUS, 1001, 101), Some(vec![4, 24, 27]));
        assert_eq!(groups_from_status(STATUS, 1000, 100), None);
        assert_eq!(
            groups_from_status("Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nGroups:\t\n", 5, 5),
            Some(vec![])
        );
    }

    fn status_line(task: &str, key: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .trim_end()
            .to_string()
    }

    fn groups_of(task: &str) -> String {
        status_line(task, "Groups:")
    }

    /// A switch changes the serving thread only: another thread serving at
    /// the same time keeps its own groups and ids (glibc's setgroups would
    /// change every thread), and dropping the guard restores the thread.
    #[test]
    fn switch_is_per_thread_and_restored() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let before = groups_of("thread-self");
        let (switched_tx, switched_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let caller = Caller {
                uid: 65534,
                gid: 65534,
                groups: vec![65533, 65532],
            };
            let guard = FsCreds::switch(caller.clone()).unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            // A nested switch would save the caller's empty capabilities.
            assert!(FsCreds::switch(caller).is_err());
            let caps = status_line("thread-self", "CapEff:");
            switched_tx
                .send((tid, groups_of("thread-self"), caps))
                .unwrap();
            done_rx.recv().unwrap();
            drop(guard);
            (
                groups_of("thread-self"),
                status_line("thread-self", "CapEff:"),
            )
        });
        let caps_before = status_line("thread-self", "CapEff:");
        let (tid, inside, caps_inside) = switched_rx.recv().unwrap();
        // A non-root caller is served without any capability.
        assert_eq!(caps_inside, "CapEff:\t0000000000000000");
        // The kernel keeps groups sorted.
        assert_eq!(inside, "Groups:\t65532 65533");
        assert_eq!(
            groups_of(&format!("self/task/{tid}")),
            "Groups:\t65532 65533"
        );
        assert_eq!(
            groups_of("thread-self"),
            before,
            "another thread's switch changed this one"
        );
        done_tx.send(()).unwrap();
        assert_eq!(
            t.join().unwrap(),
            (before, caps_before),
            "the guard did not restore the groups and capabilities"
        );
    }

    #[test]
    fn generic_permission_check() {
        // SAFETY: stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o640;
        st.st_uid = 10;
        st.st_gid = 20;
        let c = |uid, gid, groups: &[u32]| Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(c(10, 1, &[]).may(&st, libc::R_OK | libc::W_OK));
        assert!(c(11, 20, &[]).may(&st, libc::R_OK));
        assert!(!c(11, 20, &[]).may(&st, libc::W_OK));
        assert!(c(11, 1, &[20]).may(&st, libc::R_OK));
        assert!(!c(11, 1, &[21]).may(&st, libc::R_OK));
        // The owner class decides even when group or other would allow.
        st.st_mode = libc::S_IFREG | 0o066;
        assert!(!c(10, 20, &[]).may(&st, libc::R_OK));
        assert!(c(0, 0, &[]).may(&st, libc::R_OK | libc::W_OK));
        assert!(!c(0, 0, &[]).may(&st, libc::X_OK));
    }
}
