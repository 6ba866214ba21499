//! Aligned buffers for O_DIRECT I/O.

/// A page-aligned heap buffer: O_DIRECT needs aligned memory, and FUSE hands
/// write data at an arbitrary offset inside its request buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

/// The memory alignment every buffer has; O_DIRECT on a filesystem that
/// needs more (`STATX_DIOALIGN` mem) cannot use these buffers.
pub const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    pub const fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// Returns a slice of at least `len` bytes, growing (never shrinking) the buffer.
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(BUF_ALIGN).max(BUF_ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, BUF_ALIGN).expect("layout");
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if self.cap == 0 {
            return &mut [];
        }
        // SAFETY: ptr is valid for cap >= len initialized bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            let layout = std::alloc::Layout::from_size_align(self.cap, BUF_ALIGN).expect("layout");
            // SAFETY: ptr was allocated with this layout in `get`.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}
