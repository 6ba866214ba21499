//! Page counts read in the test process itself.

use std::fs::File;
use std::path::Path;

/// Page counts of a file or block device, read in this process with
/// cachestat(2). Not `migsafe residency`: spawning a process while this one
/// holds files of the mount open sends the mount a FLUSH for each of them
/// (exec closes the child's copies), and fsync-on-close would sync there,
/// hiding the very dirty pages these tests look for.
pub struct Pages {
    pub dirty: u64,
    pub writeback: u64,
}

pub fn page_state(path: &Path) -> Pages {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: cachestat(2) (451) reads `range` and writes `st`, both live
    // and laid out as the kernel's structs; flags is 0.
    let rc = unsafe {
        libc::syscall(
            451,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Pages {
        dirty: st.dirty,
        writeback: st.writeback,
    }
}
