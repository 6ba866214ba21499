//! `migsafe residency`: page-cache residency of any file or block device,
//! like `fincore` + `vmtouch`, with dirty/writeback counts and holders.

use std::os::fd::AsFd;
use std::path::Path;

use crate::cache::{self, Identity, Report, format_ranges, holders::format_holders};
use crate::sys;

/// Returns the exit status: 0 ok, 2 when a file could not be examined.
pub fn run(files: &[std::path::PathBuf], evict: bool, json: bool) -> i32 {
    let mut docs = Vec::new();
    let mut status = 0;
    for path in files {
        match examine(path, evict) {
            Ok(report) => {
                if json {
                    docs.push(report.to_json(&path.display().to_string()));
                } else {
                    print_report(path, &report);
                }
            }
            Err(e) => {
                eprintln!("migsafe residency: {}: {e}", path.display());
                status = 2;
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({ "files": docs }));
    }
    status
}

fn examine(path: &Path, evict: bool) -> std::io::Result<Report> {
    let file = std::fs::File::open(path)?;
    let st = sys::fstat_fd(file.as_fd())?;
    if evict {
        cache::evict(&file)?;
    }
    Report::of(&file, Identity::of_stat(&st))
}

fn print_report(path: &Path, r: &Report) {
    let page = sys::page_size() as u64;
    let total = r.size.div_ceil(page);
    let pct = if total == 0 {
        0.0
    } else {
        r.counts.cached as f64 * 100.0 / total as f64
    };
    println!(
        "{}: {} of {} pages cached ({pct:.1}%), {} dirty, {} writeback",
        path.display(),
        r.counts.cached,
        total,
        r.counts.dirty,
        r.counts.writeback
    );
    if !r.ranges.is_empty() {
        println!("  resident byte ranges: {}", format_ranges(&r.ranges));
    }
    if !r.holders.is_empty() {
        println!("  held by: {}", format_holders(&r.holders));
    }
}
