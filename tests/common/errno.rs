//! Errnos of failed calls, as the tests compare them: VMMs and scripts act on
//! the errno, so it must reach the caller unchanged.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The errno of a call that must fail; panics (naming `what`) if it succeeded.
pub fn errno_of<T: std::fmt::Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

/// `Ok(())` or the errno (0 if the error has none), for `assert_eq!` against
/// `Ok(())` or `Err(libc::E...)`.
pub fn errno_result<T>(r: io::Result<T>) -> Result<(), i32> {
    r.map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(0))
}

/// errno of the last failed libc call in this thread.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `p` as a C string for libc calls.
pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}
