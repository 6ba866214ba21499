//! Page-cache inspection and control for backing files and block devices:
//! counts (cachestat), resident ranges (mincore), eviction (fadvise), the
//! processes holding a file and the writers outside the mount. Shared by the
//! control commands and `migsafe residency`. Beside them: step 4's settle
//! rule (`settle`), which file holds a (device, inode) (`incarnation`), and
//! the FUSE inode invalidations (`invalidator`).

pub mod holders;
pub mod incarnation;
pub mod invalidator;
pub mod settle;
mod writers;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use crate::sys::{self, PageCounts};

pub use holders::{Holder, Identity, find_holders};
pub use incarnation::Incarnation;
pub use settle::Settle;
pub use writers::{WriterCache, WriterScan};

/// mincore is done in windows this size, like QEMU's check, so a huge image
/// never needs one huge mapping.
pub(crate) const WINDOW: u64 = 128 << 20;

/// How many resident ranges a report lists; an operator needs the first few,
/// not millions.
pub const MAX_RANGES: usize = 16;

/// Page counts, using cachestat and falling back to counting mincore pages
/// (which cannot tell dirty from clean) where cachestat is missing.
pub fn page_counts(file: &File, size: u64) -> io::Result<(PageCounts, Method)> {
    match sys::cachestat(file.as_fd()) {
        Ok(c) => Ok((c, Method::Cachestat)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            let (resident, _) = resident_ranges(file, size, 0)?;
            Ok((
                PageCounts {
                    cached: resident,
                    dirty: 0,
                    writeback: 0,
                },
                Method::Mincore,
            ))
        }
        Err(e) => Err(e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Cachestat,
    Mincore,
}

/// Resident pages and the first `max_ranges` resident byte ranges
/// `[start, end)`, scanning with `mmap(PROT_NONE)` + `mincore`.
pub fn resident_ranges(
    file: &File,
    size: u64,
    max_ranges: usize,
) -> io::Result<(u64, Vec<(u64, u64)>)> {
    let page = sys::page_size() as u64;
    let mut resident = 0u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut open_range: Option<(u64, u64)> = None;
    let mut offset = 0u64;
    while offset < size {
        let len = WINDOW.min(size - offset);
        let pages = sys::mincore_window(file.as_fd(), offset, len as usize)?;
        for (i, in_core) in pages.into_iter().enumerate() {
            let start = offset + i as u64 * page;
            if in_core {
                resident += 1;
                open_range = match open_range {
                    Some((s, e)) if e == start => Some((s, (start + page).min(size))),
                    Some(r) => {
                        push_range(&mut ranges, r, max_ranges);
                        Some((start, (start + page).min(size)))
                    }
                    None => Some((start, (start + page).min(size))),
                };
            }
        }
        offset += len;
    }
    if let Some(r) = open_range {
        push_range(&mut ranges, r, max_ranges);
    }
    Ok((resident, ranges))
}

fn push_range(ranges: &mut Vec<(u64, u64)>, r: (u64, u64), max: usize) {
    if ranges.len() < max {
        ranges.push(r);
    }
}

/// Formats ranges as `0-4096,8192-12288` for result lines and logs.
pub fn format_ranges(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|(s, e)| format!("{s}-{e}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Drops clean cached pages. DONTNEED starts writeback of dirty pages and
/// keeps them, so callers check for dirty pages first when that matters.
pub fn evict(file: &File) -> io::Result<()> {
    sys::fadvise_dontneed(file.as_fd())
}

/// Size in bytes of a regular file or block device.
pub fn file_size(file: &File) -> io::Result<u64> {
    let st = sys::fstat_fd(file.as_fd())?;
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        sys::blkdev_size(file.as_fd())
    } else {
        Ok(st.st_size as u64)
    }
}

/// A full residency report of one file: what `check` and `residency` print.
#[derive(Debug, Clone)]
pub struct Report {
    pub size: u64,
    pub counts: PageCounts,
    pub method: Method,
    pub ranges: Vec<(u64, u64)>,
    pub holders: Vec<Holder>,
}

impl Report {
    /// Builds a report; ranges and holders are computed only when something
    /// is resident, so the common "nothing cached" case costs one cachestat.
    pub fn of(file: &File, identity: holders::Identity) -> io::Result<Report> {
        let size = file_size(file)?;
        let (counts, method) = page_counts(file, size)?;
        let (ranges, holders) = if counts.cached > 0 {
            let (_, ranges) = resident_ranges(file, size, MAX_RANGES)?;
            (ranges, find_holders(identity))
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Report {
            size,
            counts,
            method,
            ranges,
            holders,
        })
    }

    pub fn to_json(&self, path: &str) -> serde_json::Value {
        let page = sys::page_size() as u64;
        serde_json::json!({
            "path": path,
            "size": self.size,
            "total_pages": self.size.div_ceil(page),
            "cached_pages": self.counts.cached,
            "dirty_pages": self.counts.dirty,
            "writeback_pages": self.counts.writeback,
            "method": match self.method { Method::Cachestat => "cachestat", Method::Mincore => "mincore" },
            "resident_ranges": self.ranges.iter().map(|(s, e)| [s, e]).collect::<Vec<_>>(),
            "holders": self.holders.iter().map(Holder::to_json).collect::<Vec<_>>(),
        })
    }
}
