//! Handover soak on the two-host loop-device bed: `scripts/soak.sh` writes a
//! per-round fio pattern on one "host", hands the image over (inactivate /
//! activate) and verifies it on the other, back and forth, then runs its
//! negative control (verify before activate), which must find stale reads.
//! `MIGSAFE_SOAK_ROUNDS` overrides the number of rounds (default 200).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn handover_soak_has_no_stale_reads_and_negative_control_finds_them() {
    if !require_root() || !have_tool("fio") || !have_tool("python3") {
        return;
    }
    let rounds = std::env::var("MIGSAFE_SOAK_ROUNDS").unwrap_or_else(|_| "200".into());
    let tmp = scratch();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/soak.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .args(["--migsafe", BIN, "--rounds", &rounds])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run soak.sh");
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let describe =
        format!("exit status {code}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    eprintln!(
        "soak.sh --rounds {rounds} -> exit {code} in {:.1}s\n{stdout}",
        started.elapsed().as_secs_f64()
    );

    let summary = stdout
        .lines()
        .find(|l| l.starts_with("rounds="))
        .unwrap_or_else(|| panic!("no summary line\n{describe}"));
    let field = |key: &str| -> String {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {key}= in summary\n{describe}"))
    };
    assert_eq!(field("rounds"), rounds, "{describe}");
    assert_eq!(
        field("stale_reads"),
        "0",
        "stale reads after handover\n{describe}"
    );
    assert_eq!(
        field("negative_control"),
        "found",
        "the negative control (no activate before the verify) must find stale reads\n{describe}"
    );
    let nc = field("negative_control_stale_reads");
    let found: u32 = nc.split('/').next().unwrap().parse().unwrap();
    assert!(found > 0, "{describe}");
    assert_eq!(code, 0, "{describe}");

    // Nothing left behind.
    assert_nothing_left(tmp.path(), &describe);
}
