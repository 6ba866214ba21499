//! The control plane under load from other users: any local user may read
//! `.ctl/status` (with `allow_other`), and a flood of such reads must
//! neither grow the daemon without bound nor hold up the commands of the
//! users who drive migrations (root, the mounting user).

mod common;

use common::{ChildGuard, Mount, ctl_write_read, make_file, scratch};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const IMAGES: usize = 100;
const FLOODERS: usize = 400;
const FLOOD_UID: &str = "4242";
const ROUNDS: usize = 10;

/// 400 threads of an unprivileged process, each opening and reading
/// `status` in a loop (retrying at once after an error) until the stop
/// file exists; prints "ready" once they run, and their counts (by result)
/// as JSON at the end.
const FLOOD: &str = r#"
import errno, json, os, sys, threading
path, stop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
counts, lock = {}, threading.Lock()
def run():
    while not os.path.exists(stop):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.read(fd, 1 << 16):
                    pass
            finally:
                os.close(fd)
            k = "ok"
        except OSError as e:
            k = errno.errorcode.get(e.errno, str(e.errno))
        with lock:
            counts[k] = counts.get(k, 0) + 1
ts = [threading.Thread(target=run) for _ in range(n)]
for t in ts:
    t.start()
print("ready", flush=True)
for t in ts:
    t.join()
print(json.dumps(counts), flush=True)
"#;

fn threads_of(pid: u32) -> usize {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Root's `activate` of one image, `ROUNDS` times: every one must succeed;
/// returns the wall times in ms.
fn activate_rounds(m: &Mount) -> Vec<f64> {
    (0..ROUNDS)
        .map(|_| {
            let t0 = Instant::now();
            let (res, out) = ctl_write_read(&m.ctl("activate"), "img000.img\n");
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(res, Ok(()), "root's activate failed: {out}");
            assert!(out.contains("result=ok"), "{out}");
            std::thread::sleep(Duration::from_millis(20));
            ms
        })
        .collect()
}

fn median_max(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[s.len() - 1])
}

/// An unprivileged user floods `status` with 400 concurrent opens over 100
/// images while root runs `activate`: every activate succeeds, the daemon's
/// thread count stays bounded, and the flood is still served (some of its
/// reads succeed). Root's activate latency with and without the flood is
/// printed (a benchmark, not an assertion): `cargo test --test ctl_load --
/// --nocapture`.
#[test]
fn a_status_flood_by_another_user_neither_grows_the_daemon_nor_holds_up_root() {
    if !common::require_root() || !common::have_tool("setpriv") {
        return;
    }
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let names: Vec<String> = (0..IMAGES).map(|i| format!("img{i:03}.img")).collect();
    for n in &names {
        make_file(&back.join(n), 64 << 10, b'x');
    }
    let m = Mount::start(dir.path(), &back, &["-o", "allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    let pid = m.pid().expect("daemon pid");
    // Every image known to the mount, so each status lists 100 images.
    let all: String = names.iter().map(|n| format!("{n}\n")).collect();
    let (res, out) = ctl_write_read(&m.ctl("activate"), &all);
    assert_eq!(res, Ok(()), "{out}");
    assert_eq!(out.lines().count(), IMAGES, "{out}");

    let quiet = activate_rounds(&m);
    let t0 = Instant::now();
    fs::read_to_string(m.ctl("status")).expect("root reads status");
    let quiet_status = t0.elapsed().as_secs_f64() * 1000.0;
    let idle_threads = threads_of(pid);

    let stop = dir.path().join("stop-flood");
    let mut child = Command::new("setpriv")
        .args(["--reuid", FLOOD_UID, "--regid", FLOOD_UID, "--clear-groups"])
        .arg("/usr/bin/python3")
        .args(["-c", FLOOD])
        .arg(m.ctl("status"))
        .arg(&stop)
        .arg(FLOODERS.to_string())
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn flood");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let flood = ChildGuard(child);
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "flood did not start");

    let done = AtomicBool::new(false);
    let most_threads = AtomicUsize::new(0);
    let (loaded, root_status) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                most_threads.fetch_max(threads_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let _stop_sampler = common::SetOnDrop(&done);
        // Let the flood build up first.
        std::thread::sleep(Duration::from_millis(500));
        let loaded = activate_rounds(&m);
        // Root's own status read is served during the flood too.
        let t0 = Instant::now();
        let text = fs::read_to_string(m.ctl("status")).expect("root reads status");
        let status_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let doc: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
        assert_eq!(doc["images"].as_array().map(Vec::len), Some(IMAGES));
        (loaded, status_ms)
    });
    fs::write(&stop, b"").unwrap();
    let mut counts = String::new();
    stdout.read_to_string(&mut counts).unwrap();
    drop(flood);
    let counts: serde_json::Value =
        serde_json::from_str(counts.trim()).unwrap_or_else(|e| panic!("{counts:?}: {e}"));

    let (qm, qx) = median_max(&quiet);
    let (lm, lx) = median_max(&loaded);
    let most = most_threads.load(Ordering::Relaxed);
    println!(
        "root activate of 1 of {IMAGES} images, {ROUNDS} rounds: quiet median {qm:.1} ms max {qx:.1} ms; \
         under a {FLOODERS}-thread status flood by uid {FLOOD_UID}: median {lm:.1} ms max {lx:.1} ms; \
         root status read quiet {quiet_status:.1} ms, under the flood {root_status:.1} ms; \
         daemon threads idle {idle_threads}, \
         most during the flood {most}; flood results {counts}"
    );
    assert!(
        counts["EAGAIN"].as_u64().unwrap_or(0) > 0,
        "the flood stayed under the per-user bound, so it proves nothing: {counts}"
    );
    assert!(
        counts["ok"].as_u64().unwrap_or(0) > 0,
        "the flood's status reads must still be served, some of them: {counts}"
    );
    // The bound: the event loop and helper threads, the status workers and
    // the command workers; nothing per status open.
    assert!(
        most <= idle_threads + 8,
        "daemon grew from {idle_threads} to {most} threads under a status flood"
    );
}
