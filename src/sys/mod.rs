//! Thin, safe wrappers over the Linux syscalls migsafe needs and `libc`/`nix`
//! do not wrap conveniently. Every `unsafe` block states the invariant it relies on.
//! Raw syscalls live only here, one file per concern; everything is
//! re-exported so callers name it as `crate::sys::X`.

mod buf;
mod cache;
mod creds;
mod fanotify;
mod fd;
mod fuse_dev;
mod ident;
mod lease;
mod meta;
mod names;
mod process;

pub use buf::*;
pub use cache::*;
pub use creds::*;
pub use fanotify::*;
pub use fd::*;
pub use fuse_dev::*;
pub use ident::*;
pub use lease::*;
pub use meta::*;
pub use names::*;
pub use process::*;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// Converts a `-1`-returning libc result into `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether `name` is one path component: not empty, not `.` or `..`, no
/// `/`. The one rule for a name a FUSE request gives, a `--device` entry's
/// name and `--ctl-name`.
pub fn is_component(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/')
}

/// Name of an errno ("EBUSY"), for result lines and logs.
pub fn errno_name(errno: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(errno))
}

pub fn errno_of(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// The calling thread's id (the pid FUSE requests carry).
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}
