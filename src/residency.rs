//! `migsafe residency`: page-cache residency of any file or block device,
//! like `fincore` + `vmtouch`, with dirty/writeback counts and holders.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use crate::cache::{self, Identity, Report, format_ranges, holders::format_holders};
use crate::sys;

/// Returns the exit status: 0 ok, 2 when a file could not be examined or
/// the output could not be written. A reader that closed the pipe early
/// (`| head -1`) ends the output quietly.
pub fn run(files: &[std::path::PathBuf], evict: bool, json: bool) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut docs = Vec::new();
    let mut status = 0;
    for path in files {
        let written = match examine(path, evict) {
            Ok(report) if json => {
                docs.push(report.to_json(&path.display().to_string()));
                Ok(())
            }
            Ok(report) => print_report(&mut out, path, &report),
            Err(e) => {
                eprintln!("migsafe residency: {}: {e}", path.display());
                status = 2;
                Ok(())
            }
        };
        if let Err(e) = written {
            return output_failed(e);
        }
    }
    if json && let Err(e) = writeln!(out, "{}", serde_json::json!({ "files": docs })) {
        return output_failed(e);
    }
    if let Err(e) = out.flush() {
        return output_failed(e);
    }
    status
}

fn output_failed(e: std::io::Error) -> i32 {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return 0;
    }
    eprintln!("migsafe residency: cannot write the report: {e}");
    2
}

fn examine(path: &Path, evict: bool) -> std::io::Result<Report> {
    let file = std::fs::File::open(path)?;
    let st = sys::fstat_fd(file.as_fd())?;
    if evict {
        cache::evict(&file)?;
    }
    Report::of(&file, Identity::of_stat(&st))
}

fn print_report(out: &mut impl Write, path: &Path, r: &Report) -> std::io::Result<()> {
    let page = sys::page_size() as u64;
    let total = r.size.div_ceil(page);
    let pct = if total == 0 {
        0.0
    } else {
        r.counts.cached as f64 * 100.0 / total as f64
    };
    writeln!(
        out,
        "{}: {} of {} pages cached ({pct:.1}%), {} dirty, {} writeback",
        path.display(),
        r.counts.cached,
        total,
        r.counts.dirty,
        r.counts.writeback
    )?;
    if !r.ranges.is_empty() {
        writeln!(out, "  resident byte ranges: {}", format_ranges(&r.ranges))?;
    }
    if !r.holders.is_empty() {
        writeln!(out, "  held by: {}", format_holders(&r.holders))?;
    }
    Ok(())
}
