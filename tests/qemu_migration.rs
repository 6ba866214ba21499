//! A real VMM: live migration of a QEMU VM between two QEMU processes over
//! 127.0.0.1, its image on two migsafe mounts standing for two hosts over one
//! shared storage (docs/DESIGN.md §3 and §5). The flow itself lives in
//! `scripts/qemu-migrate-e2e.sh`; these tests run it for raw and qcow2 on the
//! loop-device bed (SAN-like) and the mergerfs bed (NFS-like), with asserted
//! negative controls (no `activate` on the destination: stale reads) and a
//! cancelled migration whose source must take its image back.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// The runs are serialized: each one starts two TCG QEMUs and two daemons, and
/// running them side by side on a small CI machine only adds timing noise.
static SERIAL: Mutex<()> = Mutex::new(());

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn prerequisites(dir_bed: bool) -> bool {
    require_root()
        && have_tool("qemu-system-x86_64")
        && have_tool("qemu-img")
        && have_tool("python3")
        && (!dir_bed || have_tool("mergerfs"))
}

/// Runs the e2e script with `args`, its temp files in a fresh scratch dir, and
/// checks that it left nothing mounted or attached there, whatever the result.
fn e2e(args: &[&str]) -> Run {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = scratch();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/qemu-migrate-e2e.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .args(["--migsafe", BIN])
        .args(args)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run qemu-migrate-e2e.sh");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "qemu-migrate-e2e.sh {} -> exit {} in {:.1}s\n{}",
        args.join(" "),
        run.code,
        started.elapsed().as_secs_f64(),
        run.stdout
    );
    assert_nothing_left(tmp.path(), &run.describe());
    run
}

fn assert_pass(args: &[&str]) -> Run {
    let run = e2e(args);
    assert_eq!(run.code, 0, "expected PASS\n{}", run.describe());
    assert!(run.stdout.contains("RESULT: PASS"), "{}", run.describe());
    assert!(!run.stdout.contains("FAILED"), "{}", run.describe());
    let io = args
        .iter()
        .position(|a| *a == "--io")
        .map(|i| args[i + 1])
        .unwrap_or("relay");
    let device_io = args
        .iter()
        .position(|a| *a == "--device-io")
        .map(|i| args[i + 1])
        .unwrap_or("cached");
    if !args.contains(&"--direct") && io != "auto" {
        let want = if args.contains(&"loop") {
            device_io
        } else {
            io
        };
        assert!(
            run.stdout.contains(&format!("data_path={want} ")),
            "expected data_path={want}\n{}",
            run.describe()
        );
    }
    if args.contains(&"--cancel") && (io == "relay" || args.contains(&"loop")) {
        assert!(
            run.stdout.contains("fencing=full"),
            "the inactive image must have refused the source's write\n{}",
            run.describe()
        );
    }
    run
}

/// Negative control: the same migration without `activate` on the destination
/// must read stale data, in place (raw and qcow2) and in newly allocated
/// clusters (qcow2: a stale L2 table).
fn assert_stale_without_activate(args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.push("--no-activate");
    let run = e2e(&all);
    assert_eq!(
        run.code,
        3,
        "negative control: expected STALE (exit 3)\n{}",
        run.describe()
    );
    assert!(run.stdout.contains("RESULT: STALE"), "{}", run.describe());
    assert!(
        run.stdout.contains("FAILED read -P 0xa5 0 1M"),
        "the overwritten first MiB should read stale\n{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("FAILED read -P 0x3c 8M 2M"),
        "the newly written region should read stale\n{}",
        run.describe()
    );
    run
}

#[test]
fn raw_on_loop_devices() {
    if prerequisites(false) {
        assert_pass(&["--format", "raw", "--backing", "loop"]);
    }
}

#[test]
fn raw_on_loop_devices_without_activate_reads_stale() {
    if prerequisites(false) {
        assert_stale_without_activate(&["--format", "raw", "--backing", "loop"]);
    }
}

#[test]
fn qcow2_on_loop_devices() {
    if prerequisites(false) {
        assert_pass(&["--format", "qcow2", "--backing", "loop"]);
    }
}

#[test]
fn qcow2_on_loop_devices_without_activate_reads_stale() {
    if prerequisites(false) {
        assert_stale_without_activate(&["--format", "qcow2", "--backing", "loop"]);
    }
}

#[test]
fn raw_on_loop_devices_relay() {
    if prerequisites(false) {
        assert_pass(&[
            "--format",
            "raw",
            "--backing",
            "loop",
            "--device-io",
            "relay",
        ]);
    }
}

#[test]
fn raw_on_loop_devices_relay_without_activate_reads_stale() {
    if prerequisites(false) {
        assert_stale_without_activate(&[
            "--format",
            "raw",
            "--backing",
            "loop",
            "--device-io",
            "relay",
        ]);
    }
}

/// On the cached device path the FUSE inode's page cache is the only one,
/// so QEMU's own invalidation at activation (its drop-cache fadvise on its
/// FUSE fd) reaches it: a migration with no control command at all reads
/// the source's last writes. The negative controls above are the same
/// migration with QEMU's drop-cache off.
#[test]
fn qemu_drop_cache_alone_suffices_on_cached_devices() {
    if prerequisites(false) {
        assert_pass(&["--format", "raw", "--backing", "loop", "--qemu-only"]);
        assert_pass(&["--format", "qcow2", "--backing", "loop", "--qemu-only"]);
        // On relay the device's page cache is the one that matters, and
        // QEMU's fadvise on its FUSE fd never reaches it.
        let run = e2e(&[
            "--format",
            "raw",
            "--backing",
            "loop",
            "--qemu-only",
            "--device-io",
            "relay",
        ]);
        assert_eq!(
            run.code,
            3,
            "relay devices with QEMU's drop-cache alone must read stale data\n{}",
            run.describe()
        );
    }
}

#[test]
fn raw_on_nfs_like_directory() {
    if prerequisites(true) {
        assert_pass(&["--format", "raw", "--backing", "dir"]);
    }
}

#[test]
fn raw_on_nfs_like_directory_without_activate_reads_stale() {
    if prerequisites(true) {
        assert_stale_without_activate(&["--format", "raw", "--backing", "dir"]);
    }
}

#[test]
fn qcow2_on_nfs_like_directory() {
    if prerequisites(true) {
        assert_pass(&["--format", "qcow2", "--backing", "dir"]);
    }
}

#[test]
fn qcow2_on_nfs_like_directory_without_activate_reads_stale() {
    if prerequisites(true) {
        assert_stale_without_activate(&["--format", "qcow2", "--backing", "dir"]);
    }
}

/// The NFS-like bed with kernel FUSE passthrough (QEMU's reads and writes go
/// to the mergerfs file in the kernel, never through the daemon): `activate`
/// must still drop the backing file's cache.
#[test]
fn qcow2_on_nfs_like_directory_passthrough() {
    if prerequisites(true) {
        let args = [
            "--format",
            "qcow2",
            "--backing",
            "dir",
            "--io",
            "passthrough",
        ];
        let run = assert_pass(&args);
        assert!(
            run.stdout.contains("data_path=passthrough"),
            "QEMU's image should use passthrough\n{}",
            run.describe()
        );
        let run = assert_stale_without_activate(&args);
        assert!(
            run.stdout.contains("data_path=passthrough"),
            "{}",
            run.describe()
        );
    }
}

/// The source's serving process is SIGKILLed 5 times while its guest disk
/// writes and reads (each write read back by the next process), and once
/// more between `inactivate` and the destination's `activate`: the source
/// stays fenced, and the destination ends fresh. (The negative controls of
/// the handover are the `_without_activate` runs above; that of the crashes
/// is tests/restart.rs's `--no-restart` runs.)
#[test]
fn raw_on_loop_devices_across_daemon_crashes() {
    if !prerequisites(false) {
        return;
    }
    assert_pass(&[
        "--backing",
        "loop",
        "--format",
        "raw",
        "--kill-daemons",
        "5",
    ]);
}

#[test]
fn qcow2_on_nfs_like_directory_across_daemon_crashes() {
    if !prerequisites(true) {
        return;
    }
    assert_pass(&[
        "--backing",
        "dir",
        "--format",
        "qcow2",
        "--kill-daemons",
        "5",
    ]);
}

/// A migration cancelled after the source stopped and inactivated its image:
/// the inactive image refuses the source's writes, and after `activate` the
/// source continues with its data intact and can write again.
#[test]
fn cancelled_migration_source_takes_over_again() {
    if prerequisites(false) {
        assert_pass(&["--format", "qcow2", "--backing", "loop", "--cancel"]);
    }
}

#[test]
fn cancelled_migration_source_takes_over_again_on_nfs_like_directory() {
    if prerequisites(true) {
        assert_pass(&["--format", "raw", "--backing", "dir", "--cancel"]);
    }
}

/// The loop bed with write-back devices (`--writeback on`): the guest's
/// writes on the source sit in its page cache until QEMU flushes (it does
/// before it inactivates), `inactivate` writes back what is left and
/// fences, and the destination reads fresh data with `activate`, with
/// QEMU's own drop-cache alone, and not without either (the control); a
/// cancelled migration's source takes over again with no error left from
/// the write the fence refused.
#[test]
fn writeback_devices_migrate_fresh() {
    if prerequisites(false) {
        let wb = ["--backing", "loop", "--writeback", "on"];
        for format in ["raw", "qcow2"] {
            let with = |extra: &[&'static str]| {
                let mut a = vec!["--format", format];
                a.extend_from_slice(&wb);
                a.extend_from_slice(extra);
                a
            };
            assert_pass(&with(&[]));
            assert_stale_without_activate(&with(&[]));
            assert_pass(&with(&["--qemu-only"]));
        }
    }
}

#[test]
fn writeback_devices_cancelled_migration_source_takes_over_again() {
    if prerequisites(false) {
        assert_pass(&[
            "--format",
            "qcow2",
            "--backing",
            "loop",
            "--writeback",
            "on",
            "--cancel",
        ]);
    }
}

/// The bed itself, without migsafe (docs/DESIGN.md §1): QEMU opening the
/// loop devices directly reads stale data on the destination with its own
/// `drop-cache=off`, and fresh data with `drop-cache=on`. This is what QEMU
/// cannot do through a FUSE mount, and what migsafe does instead.
#[test]
fn bed_without_migsafe_reproduces_the_stale_read() {
    if prerequisites(false) {
        assert_stale_without_activate(&["--format", "qcow2", "--backing", "loop", "--direct"]);
        assert_pass(&["--format", "qcow2", "--backing", "loop", "--direct"]);
    }
}
