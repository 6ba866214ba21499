//! O_DIRECT I/O, the way a VMM with `cache=none` does it.

use std::alloc::Layout;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// A page-aligned, zero-initialized heap buffer, freed on drop: O_DIRECT needs
/// aligned memory, and tests must not depend on where the allocator happens to
/// put a Vec.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` zero bytes (at least one page is allocated).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, len, layout }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialized for len <= layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Reads `len` bytes at `offset` with O_DIRECT (bypassing this host's cache).
pub fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open O_DIRECT {}: {e}", path.display()));
    let mut buf = AlignedBuf::zeroed(len);
    // SAFETY: the buffer is valid for len bytes and aligned for O_DIRECT.
    let n = unsafe {
        libc::pread(
            f.as_raw_fd(),
            buf.as_mut_slice().as_mut_ptr().cast(),
            len,
            offset as i64,
        )
    };
    assert_eq!(n, len as isize, "O_DIRECT read of {}", path.display());
    buf.as_slice().to_vec()
}

/// Writes `data` at `offset` with O_DIRECT (creating the file if needed), the
/// way a VMM with `cache=none` does; returns the error of open or pwrite.
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let buf = AlignedBuf::from_slice(data);
    // SAFETY: the buffer is valid for data.len() bytes for the duration of the call.
    let n = unsafe {
        libc::pwrite(
            f.as_raw_fd(),
            buf.as_slice().as_ptr().cast(),
            data.len(),
            offset as i64,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    assert_eq!(
        n as usize,
        data.len(),
        "short O_DIRECT write to {}",
        path.display()
    );
    Ok(())
}
