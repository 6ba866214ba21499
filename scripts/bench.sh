#!/usr/bin/env bash
# scripts/bench.sh - benchmark harness for migsafe (a benchmark, not a test).
#
# Measures, in one run and on one backing image, fio buffered I/O natively and
# through migsafe in each data path (passthrough, relay), next to peers
# (mergerfs cache.files=off, qemu-storage-daemon's FUSE export) when they are
# installed, and prints ratios to native. Optional stages: a block-device
# variant (--blockdev), control-operation timings (--ctl) and daemon memory
# (--rss); --baseline-bin measures a second migsafe binary beside the first in
# the same run (before/after a change). Run as root. See --help.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
	cat <<'EOF'
usage: scripts/bench.sh [OPTIONS]

Data-path table (default stage): fio buffered I/O on one backing image,
native vs migsafe passthrough vs migsafe relay (+ mergerfs, qemu-storage-daemon
when installed), targets alternating per repetition; median of --reps runs.

Options:
  --size SIZE        backing image size (default 2G; numfmt IEC suffixes)
  --dir DIR          where the temp dir is created (default /var/tmp)
  --runtime S        seconds per fio run (default 10)
  --reps N           repetitions per row and target (default 3)
  --quick            smoke run: --runtime 3 --reps 1 (unless given explicitly)
  --rows LIST        comma list of rows to run; an item matches a row name
                     exactly, a base name (randread-4k-qd16 = hot and cold),
                     or "hot" / "cold" / "odirect". Rows:
                       seqread-1m seqwrite-1m randread-4k-qd1 randread-4k-qd16
                       randwrite-4k randwrite-4k-qd16 randrw-4k
                       (each -hot and -cold)
                       odirect-randread-4k
  --targets LIST     comma list of: native passthrough relay cached
                     writeback mergerfs qsd (default: all that are
                     available; native is always run; cached on a file is
                     `migsafe mount --io cached`; writeback is a
                     devices-only mount with --writeback on, devices only)
  --threads N        passed to `migsafe mount --threads N`
  --mount-arg ARG    extra argument for every `migsafe mount` (repeatable)
  --migsafe PATH     migsafe binary (default target/release/migsafe, built
                     with `cargo build --release` first)
  --baseline-bin PATH
                     a second migsafe binary (e.g. a release build of an
                     older commit) measured in the same run: every selected
                     migsafe target T (passthrough relay cached) gets a
                     target T-base, mounted with PATH on the same backing
                     beside T and alternated with the others per
                     repetition; the tables add "x base" (T / T-base
                     median IOPS) and a geometric-mean summary per target
  --csv FILE         write the fio results (aggregated) as CSV
  --json FILE        write everything (raw and aggregated) as JSON
  --blockdev         also run the block-device table: a loop device natively
                     vs `migsafe mount --device disk=/dev/loopN` (cached and
                     relay device paths)
                     (+ qemu-storage-daemon host_device export)
  --no-file          skip the file-backed data-path table
  --ctl              control-op timings: activate on a 100 GiB sparse image
                     (0 / 1 GiB / 8 GiB cached) vs `vmtouch -e; fincore`,
                     and open latency with invalidate-on-open on vs off
  --ctl-scale        control ops against the host's process count: activate
                     and inactivate of one uncached 1 GiB image (none open;
                     held open read-only, and read-write, through the
                     mount; read-write through a relay mount),
                     `activate *` and `inactivate *` over --images images,
                     with --procs idle processes added (part of --ctl)
  --procs N          idle `sleep` processes to add for --ctl-scale (default 0;
                     killed by pid at the end, also on error or ^C)
  --images N         images for the `*` rows of --ctl-scale (default 500)
  --rss              daemon memory with 1000 images (ls -l) and 64 handles
  --all              --blockdev --ctl --rss
  -h, --help         this text

Hot rows: the backing's page cache holds the whole image before each run
(prefilled, read once). Cold rows: the backing's cache is synced and dropped
(vmtouch -e / fadvise DONTNEED) before each run, and the run is one pass over
the image capped at --runtime (not time-based), so it never turns hot behind
the measurement. migsafe relay/passthrough, mergerfs cache.files=off and the
qemu-storage-daemon export keep no FUSE-side page cache, so only the
backing's cache is dropped.
Each migsafe mount keeps one read-only handle open on the benchmark image for
the whole stage (as a VMM does), so fio's opens are never "first opens" and
invalidate-on-open (default on) does not drop the cache of hot rows; the cost
of invalidate-on-open itself is measured by --ctl.
Progress goes to stderr, the tables to stdout.
EOF
}

die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }

# ---------------------------------------------------------------- options --
SIZE=2G
BASEDIR=/var/tmp
RUNTIME=10
REPS=3
RUNTIME_SET=0
REPS_SET=0
QUICK=0
ROWS=""
TARGETS=""
THREADS=""
MIGSAFE=""
BASE_BIN=""
CSV_OUT=""
JSON_OUT=""
DO_FILE=1
DO_BLOCKDEV=0
DO_CTL=0
DO_CTL_SCALE=0
PROCS=0
IMAGES=500
DO_RSS=0
EXTRA_MOUNT_ARGS=()

args=()
for a in "$@"; do
	case $a in
	--*=*) args+=("${a%%=*}" "${a#*=}") ;;
	*) args+=("$a") ;;
	esac
done
set -- "${args[@]+"${args[@]}"}"
need_arg() { [[ $# -ge 2 ]] || die "$1 needs a value"; }
while (($#)); do
	case $1 in
	--size) need_arg "$@"; SIZE=$2; shift 2 ;;
	--dir) need_arg "$@"; BASEDIR=$2; shift 2 ;;
	--runtime) need_arg "$@"; RUNTIME=$2; RUNTIME_SET=1; shift 2 ;;
	--reps) need_arg "$@"; REPS=$2; REPS_SET=1; shift 2 ;;
	--quick) QUICK=1; shift ;;
	--rows) need_arg "$@"; ROWS=$2; shift 2 ;;
	--targets) need_arg "$@"; TARGETS=$2; shift 2 ;;
	--threads) need_arg "$@"; THREADS=$2; shift 2 ;;
	--mount-arg) need_arg "$@"; EXTRA_MOUNT_ARGS+=("$2"); shift 2 ;;
	--migsafe) need_arg "$@"; MIGSAFE=$2; shift 2 ;;
	--baseline-bin) need_arg "$@"; BASE_BIN=$2; shift 2 ;;
	--csv) need_arg "$@"; CSV_OUT=$2; shift 2 ;;
	--json) need_arg "$@"; JSON_OUT=$2; shift 2 ;;
	--blockdev) DO_BLOCKDEV=1; shift ;;
	--no-file) DO_FILE=0; shift ;;
	--ctl) DO_CTL=1; DO_CTL_SCALE=1; shift ;;
	--ctl-scale) DO_CTL_SCALE=1; shift ;;
	--procs) need_arg "$@"; PROCS=$2; shift 2 ;;
	--images) need_arg "$@"; IMAGES=$2; shift 2 ;;
	--rss) DO_RSS=1; shift ;;
	--all) DO_BLOCKDEV=1; DO_CTL=1; DO_CTL_SCALE=1; DO_RSS=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
if ((QUICK)); then
	((RUNTIME_SET)) || RUNTIME=3
	((REPS_SET)) || REPS=1
fi
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -ge 1 ]] || die "--runtime must be a positive integer (seconds)"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "--reps must be a positive integer"
[[ -z $THREADS || $THREADS =~ ^[0-9]+$ ]] || die "--threads must be an integer"
[[ $PROCS =~ ^[0-9]+$ ]] || die "--procs must be a non-negative integer"
[[ $IMAGES =~ ^[0-9]+$ && $IMAGES -ge 1 ]] || die "--images must be a positive integer"
SIZE_BYTES=$(numfmt --from=iec "$SIZE" 2>/dev/null) || die "bad --size: $SIZE"
((SIZE_BYTES >= 64 * 1024 * 1024)) || die "--size must be at least 64M"
SIZE_BYTES=$((SIZE_BYTES / 1048576 * 1048576))
[[ -d $BASEDIR ]] || die "--dir $BASEDIR is not a directory"
[[ -n $CSV_OUT ]] && CSV_OUT=$(realpath -m "$CSV_OUT")
[[ -n $JSON_OUT ]] && JSON_OUT=$(realpath -m "$JSON_OUT")

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE passthrough, loop devices, mounts)"
for t in fio python3 numfmt losetup; do
	command -v "$t" >/dev/null || die "$t is required"
done
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- binary --
if [[ -z $MIGSAFE ]]; then
	MIGSAFE=$REPO/target/release/migsafe
	# Always through cargo (a no-op when the build is current): a release
	# binary left from an older checkout would be measured silently.
	log "== cargo build --release"
	(cd "$REPO" && cargo build --release >&2) || die "cargo build --release failed"
fi
[[ -x $MIGSAFE ]] || die "migsafe binary not executable: $MIGSAFE"
MIGSAFE=$(realpath "$MIGSAFE")
if [[ -n $BASE_BIN ]]; then
	[[ -x $BASE_BIN ]] || die "--baseline-bin: not executable: $BASE_BIN"
	BASE_BIN=$(realpath "$BASE_BIN")
	[[ $BASE_BIN != "$MIGSAFE" ]] || log "   NOTE: --baseline-bin is the measured binary itself (an A/A run: shows the noise)"
fi

# ---------------------------------------------------------------- state --
WORK=""
CLEAN_PIDS=()   # daemons and holders we started
CLEAN_MNTS=()   # mountpoints we mounted (dirs or files)
CLEAN_LOOPS=()  # loop devices we attached
declare -A DAEMON_PID=()   # target -> daemon pid (for CPU accounting)
declare -A TARGET_FILE=()  # target -> path fio uses

is_mounted() {
	# field 5 of mountinfo is the mount point (octal-escaped; our paths have no spaces)
	awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo
}

stop_pid() {
	local pid=$1 i
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "   pid $pid ignored SIGTERM for 5 s: SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

# Unmount everything this script mounted, stop its processes, detach loops.
# Holders first (they keep files on the mounts open), then mounts, then daemons.
teardown() {
	local i m pid
	for ((i = ${#HOLDER_PIDS[@]} - 1; i >= 0; i--)); do
		stop_pid "${HOLDER_PIDS[i]}"
	done
	HOLDER_PIDS=()
	for ((i = ${#CLEAN_MNTS[@]} - 1; i >= 0; i--)); do
		m=${CLEAN_MNTS[i]}
		if is_mounted "$m"; then
			if ! umount "$m" 2>/dev/null && ! fusermount3 -u "$m" 2>/dev/null; then
				log "   WARNING: $m busy: lazy unmount"
				umount -l "$m" 2>/dev/null || log "   WARNING: could not unmount $m"
			fi
		fi
	done
	CLEAN_MNTS=()
	for ((i = ${#CLEAN_PIDS[@]} - 1; i >= 0; i--)); do
		pid=${CLEAN_PIDS[i]}
		stop_pid "$pid"
	done
	CLEAN_PIDS=()
	for m in "${CLEAN_LOOPS[@]+"${CLEAN_LOOPS[@]}"}"; do
		losetup -d "$m" 2>/dev/null || log "   WARNING: could not detach $m"
	done
	CLEAN_LOOPS=()
	DAEMON_PID=()
	TARGET_FILE=()
}
HOLDER_PIDS=()
IDLE_PIDFILE=""  # pids of the idle processes of --procs, one a line

# Kill the idle processes of --procs by pid (they are ours: spawned by the
# helper, which wrote each pid as it spawned it).
stop_idle() {
	[[ -n $IDLE_PIDFILE && -s $IDLE_PIDFILE ]] || return 0
	local n
	n=$(wc -l <"$IDLE_PIDFILE")
	xargs -r kill -KILL <"$IDLE_PIDFILE" 2>/dev/null || true
	# gone from /proc before the next stage counts or scans processes
	local i left
	for ((i = 0; i < 600; i++)); do
		left=$({ xargs -r ps -o pid= -p <"$IDLE_PIDFILE" 2>/dev/null || true; } | wc -l)
		((left == 0)) && break
		sleep 0.1
	done
	log "   killed $n idle processes by pid ($left still in /proc)"
	: >"$IDLE_PIDFILE"
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	stop_idle
	teardown
	if [[ -n $WORK && -d $WORK ]]; then
		# never descend into something still mounted
		rm -rf --one-file-system "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case $BASEDIR in *[[:space:]:]*) die "--dir must not contain spaces or ':' (fio filenames)" ;; esac
WORK=$(mktemp -d "$(realpath "$BASEDIR")/migsafe-bench.XXXXXX")
RESULTS=$WORK/results.tsv
: >"$RESULTS"
HELPER=$WORK/helper.py
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------ python helper --
cat >"$HELPER" <<'PYEOF'
import ctypes, errno, json, os, signal, statistics, subprocess, sys, time

PAGE = os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def cachestat(path):
    """(cached, dirty, writeback, total_pages) via cachestat(2), x86-64 nr 451."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = (ctypes.c_uint64 * 2)(0, 0)  # off 0, len 0 = to the end
        cs = (ctypes.c_uint64 * 5)()
        if libc.syscall(ctypes.c_long(451), ctypes.c_int(fd), ctypes.byref(rng),
                        ctypes.byref(cs), ctypes.c_uint(0)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "cachestat: " + os.strerror(e))
        size = os.lseek(fd, 0, os.SEEK_END)
        return cs[0], cs[1], cs[2], (size + PAGE - 1) // PAGE
    finally:
        os.close(fd)

def cmd_cachestat(path):
    c, d, w, t = cachestat(path)
    print(c, d, w, t)

def cmd_evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

def cmd_warm(path):
    """Read the whole file/device once unless it is fully cached already."""
    c, _, _, t = cachestat(path)
    if c >= t:
        return
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass

def cmd_hold(ready, mode, *paths):
    flags = os.O_RDWR if mode == "rw" else os.O_RDONLY
    fds = [os.open(p, flags) for p in paths]
    with open(ready, "w") as f:
        f.write("%d\n" % len(fds))
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        signal.pause()

def cmd_fioparse(path):
    txt = open(path, errors="replace").read()
    i = txt.find("{")
    d = json.loads(txt[i:])
    iops = bw = 0.0
    err = 0
    for j in d["jobs"]:
        err = err or j.get("error", 0)
        for k in ("read", "write", "trim"):
            if k in j:
                iops += j[k]["iops"]
                bw += j[k]["bw_bytes"]
    if err:
        print("nan nan")
    else:
        print("%.1f %.2f" % (iops, bw / 1e6))

def cmd_ctltime(ctlfile, image):
    """Write IMAGE to a .ctl command file; print wall ms, errno name, result."""
    try:
        fd = os.open(ctlfile, os.O_RDWR)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        print("nan\t-\topen-%s\topen(%s) failed: %s" % (name, ctlfile, e.strerror))
        return
    err = "-"
    t0 = time.perf_counter_ns()
    try:
        os.write(fd, (image + "\n").encode())
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    t1 = time.perf_counter_ns()
    try:
        res = os.pread(fd, 65536, 0).decode(errors="replace").strip().replace("\n", " | ")
    except OSError as e:
        res = "read-back failed: " + errno.errorcode.get(e.errno, str(e.errno))
    os.close(fd)
    ms = "-"
    for tok in res.split():
        if tok.startswith("ms="):
            ms = tok[3:]
    print("%.3f\t%s\t%s\t%s" % ((t1 - t0) / 1e6, ms, err, res.replace("\t", " ")))

def cmd_ctlmany(ctlfile, what):
    """Write WHAT (e.g. "*") to a .ctl command file; print wall ms, "-",
    errno name and a summary of the result lines."""
    fd = os.open(ctlfile, os.O_RDWR)
    err = "-"
    t0 = time.perf_counter_ns()
    try:
        os.write(fd, (what + "\n").encode())
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    t1 = time.perf_counter_ns()
    res = b""
    while True:
        chunk = os.pread(fd, 1 << 20, len(res))
        if not chunk:
            break
        res += chunk
    os.close(fd)
    lines = res.decode(errors="replace").splitlines()
    ok = sum(1 for l in lines if " result=ok " in l)
    partial = sum(1 for l in lines if "fencing=partial" in l)
    ms = sorted(int(t[3:]) for l in lines for t in l.split() if t.startswith("ms=") and t[3:].isdigit())
    print("%.3f\t-\t%s\t%d lines: %d ok, %d fencing=partial, %d error; per-image ms max %s" % (
        (t1 - t0) / 1e6, err, len(lines), ok, partial, len(lines) - ok, ms[-1] if ms else "-"))

def cmd_idle(n, pidfile):
    """Spawn N idle `sleep infinity` processes, appending each pid to PIDFILE
    as it is spawned (so an interrupted run still kills every one)."""
    sleep = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
    with open(pidfile, "a") as f:
        for _ in range(int(n)):
            pid = os.posix_spawn(sleep, [sleep, "infinity"], os.environ)
            f.write("%d\n" % pid)
            f.flush()

def cmd_nprocs():
    print(sum(1 for e in os.listdir("/proc") if e.isdigit()))

def cmd_mantime(path):
    # (vmtouch -e is posix_fadvise DONTNEED on the whole file; fincore is mincore)
    """Time the by-hand way: vmtouch -e FILE; fincore FILE."""
    t0 = time.perf_counter_ns()
    subprocess.run(["vmtouch", "-qe", path], check=True)
    t1 = time.perf_counter_ns()
    out = subprocess.run(["fincore", "-nb", "-o", "PAGES", path], check=True,
                         capture_output=True, text=True).stdout.strip()
    t2 = time.perf_counter_ns()
    print("%.3f\t%.3f\t%.3f\t%s" % ((t2 - t0) / 1e6, (t1 - t0) / 1e6, (t2 - t1) / 1e6, out))

def cmd_opentime(path, n):
    n = int(n)
    op, cl = [], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fd = os.open(path, os.O_RDONLY)
        t1 = time.perf_counter_ns()
        os.close(fd)
        t2 = time.perf_counter_ns()
        op.append((t1 - t0) / 1e3)
        cl.append((t2 - t1) / 1e3)
    op.sort()
    print("%.1f\t%.1f\t%.1f\t%.1f" % (statistics.median(op), op[int(0.9 * (n - 1))],
                                      statistics.mean(op), statistics.median(cl)))

def cmd_mkfiles(d, n, size):
    for i in range(int(n)):
        with open(os.path.join(d, "img%04d.raw" % i), "wb") as f:
            f.truncate(int(size))

def cmd_rss(pid):
    rss = hwm = "0"
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = line.split()[1]
            elif line.startswith("VmHWM:"):
                hwm = line.split()[1]
    print(rss, hwm)

# ------------------------------------------------------------------ report --
def fnum(x):
    if x != x:
        return "nan"
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x

def med(v):
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")

def cmd_report(tsv, csv_out, json_out, meta_json):
    meta = json.loads(meta_json)
    fio, ctl, opn, rss, notes, scale = [], [], [], [], [], []
    for line in open(tsv):
        f = line.rstrip("\n").split("\t")
        if f[0] == "fio":
            _, table, row, target, rep, iops, mbps, cpu, note = f
            fio.append(dict(table=table, row=row, target=target, rep=int(rep),
                            iops=float(iops), mbps=float(mbps),
                            cpu_s=(float(cpu) if cpu != "-" else None), note=note))
        elif f[0] == "ctl":
            _, level, method, rep, wall, dms, err, res = f
            ctl.append(dict(level=level, method=method, rep=int(rep), wall_ms=float(wall),
                            daemon_ms=dms, errno=err, result=res))
        elif f[0] == "ctlscale":
            _, procs, method, rep, wall, dms, err, res = f
            scale.append(dict(procs=int(procs), method=method, rep=int(rep), wall_ms=float(wall),
                              errno=err, result=res))
        elif f[0] == "open":
            _, what, rep, medu, p90, mean, close = f
            opn.append(dict(what=what, rep=int(rep), median_us=float(medu), p90_us=float(p90),
                            mean_us=float(mean), close_median_us=float(close)))
        elif f[0] == "rss":
            _, mode, stage, kb, hwm = f
            rss.append(dict(mode=mode, stage=stage, rss_kib=int(kb), hwm_kib=int(hwm)))
        elif f[0] == "note":
            notes.append(f[1])

    out = []
    p = out.append
    p("# migsafe bench  %s" % meta.get("date", ""))
    p("# kernel %s, %s CPUs, fio %s, image %s, runtime %ss, reps %s, QD16 engine %s, migsafe %s%s" % (
        meta["kernel"], meta["cpus"], meta["fio"], meta["size"], meta["runtime"], meta["reps"],
        meta["aio"], meta["migsafe"], (", --threads %s" % meta["threads"]) if meta.get("threads") else ""))
    base = meta.get("baseline")
    if base:
        p("# T-base targets: baseline %s (%s); migsafe %s" % (base["path"], base["version"], meta["migsafe_path"]))

    agg = []
    tables = []
    for r in fio:
        if r["table"] not in tables:
            tables.append(r["table"])
    for table in tables:
        rs = [r for r in fio if r["table"] == table]
        rows, targets = [], []
        for r in rs:
            if r["row"] not in rows:
                rows.append(r["row"])
            if r["target"] not in targets:
                targets.append(r["target"])
        p("")
        p("== %s: fio buffered I/O, median of %s (min-max); x native = median IOPS / native median IOPS ==" %
          (meta["tables"].get(table, table), meta["reps"]))
        if base:
            p("(x base = median IOPS of T / median IOPS of T-base, on T's line)")
        tw = 16 if base else 12  # "passthrough-base"
        p("%-22s %-*s %-28s %-10s %-9s %s%s" % ("row", tw, "target", "IOPS (min-max)", "MB/s", "x native",
                                               "x base    " if base else "", "daemon CPU s/run"))
        for row in rows:
            nat = med([r["iops"] for r in rs if r["row"] == row and r["target"] == "native"])
            for t in targets:
                v = [r for r in rs if r["row"] == row and r["target"] == t]
                if not v:
                    continue
                iops = [r["iops"] for r in v]
                good = [x for x in iops if x == x]
                mi = med(iops)
                mb = med([r["mbps"] for r in v])
                cpus = [r["cpu_s"] for r in v if r["cpu_s"] is not None]
                cpu = med(cpus) if cpus else None
                ratio = mi / nat if nat == nat and nat > 0 and mi == mi else float("nan")
                bm = med([r["iops"] for r in rs if r["row"] == row and r["target"] == t + "-base"])
                rbase = mi / bm if bm == bm and bm > 0 and mi == mi else float("nan")
                fails = len(iops) - len(good)
                rng = "(%s-%s)" % (fnum(min(good)), fnum(max(good))) if good else ""
                iops_s = ("FAILED x%d" % fails) if not good else "%s %s%s" % (
                    fnum(mi), rng, (" %d failed" % fails) if fails else "")
                xbase = ""
                if base:
                    xbase = "%-10s" % (("%.2f" % rbase) if rbase == rbase else "-")
                p("%-22s %-*s %-28s %-10s %-9s %s%s" % (
                    row, tw, t, iops_s, fnum(mb), ("%.2f" % ratio) if ratio == ratio else "-", xbase,
                    ("%.2f" % cpu) if cpu is not None else "-"))
                agg.append(dict(table=table, row=row, target=t, iops_median=mi, ratio_base=rbase,
                                iops_min=min(good) if good else None, iops_max=max(good) if good else None,
                                mbps_median=mb, ratio_native=ratio, daemon_cpu_s_median=cpu,
                                reps=len(iops), failed=fails))

    if ctl:
        p("")
        p("== control ops on a 100 GiB sparse image (wall ms: median (min-max) of %s) ==" % meta["reps"])
        p("%-10s %-37s %-26s %-10s %s" % ("cached", "method", "wall ms (min-max)", "daemon ms", "result"))
        levels, methods = [], []
        for c in ctl:
            if c["level"] not in levels:
                levels.append(c["level"])
            if c["method"] not in methods:
                methods.append(c["method"])
        for lv in levels:
            for m in methods:
                v = [c for c in ctl if c["level"] == lv and c["method"] == m]
                if not v:
                    continue
                w = [c["wall_ms"] for c in v]
                res = sorted(set(("ok" if c["errno"] == "-" else c["errno"]) for c in v))
                p("%-10s %-37s %-26s %-10s %s" % (lv, m, "%.2f (%.2f-%.2f)" % (med(w), min(w), max(w)),
                                                  ",".join(sorted(set(c["daemon_ms"] for c in v))),
                                                  ",".join(res)))
        bad = [c for c in ctl if c["errno"] != "-"]
        for c in bad[:6]:
            p("  ! %s %s rep%d: %s %s" % (c["level"], c["method"], c["rep"], c["errno"], c["result"][:300]))
    if scale:
        p("")
        p("== control ops vs processes on the host (wall ms: median (min-max)) ==")
        p("%-10s %-52s %-28s %s" % ("processes", "method", "wall ms (min-max)", "result"))
        methods = []
        for c in scale:
            if c["method"] not in methods:
                methods.append(c["method"])
        for m in methods:
            v = [c for c in scale if c["method"] == m]
            w = [c["wall_ms"] for c in v]
            procs = "%d" % med([c["procs"] for c in v])
            res = sorted(set(("ok" if c["errno"] == "-" else c["errno"]) + (
                " (" + c["result"] + ")" if c["result"].startswith(tuple("0123456789")) else "") for c in v))
            p("%-10s %-52s %-28s %s" % (procs, m, "%.2f (%.2f-%.2f) n=%d" % (med(w), min(w), max(w), len(w)),
                                        "; ".join(res)[:160]))
    if opn:
        p("")
        p("== open(2)+close latency of an uncached 100 GiB image, %s opens per rep, median of reps ==" % meta.get("opens", "?"))
        p("%-36s %-14s %-10s %-10s %s" % ("target", "open med us", "open p90", "open mean", "close med us"))
        whats = []
        for o in opn:
            if o["what"] not in whats:
                whats.append(o["what"])
        for wname in whats:
            v = [o for o in opn if o["what"] == wname]
            p("%-36s %-14.1f %-10.1f %-10.1f %.1f" % (wname, med([o["median_us"] for o in v]),
                                                       med([o["p90_us"] for o in v]),
                                                       med([o["mean_us"] for o in v]),
                                                       med([o["close_median_us"] for o in v])))
    if rss:
        p("")
        p("== migsafe daemon memory (1000 x 1 GiB sparse images in the backing dir) ==")
        p("%-12s %-44s %-12s %s" % ("data path", "stage", "VmRSS MiB", "VmHWM MiB"))
        for r in rss:
            p("%-12s %-44s %-12.1f %.1f" % (r["mode"], r["stage"], r["rss_kib"] / 1024, r["hwm_kib"] / 1024))

    # ------------------------------------------------------------ targets
    def a(table, row, target):
        for g in agg:
            if g["table"] == table and g["row"] == row and g["target"] == target:
                return g
        return None
    p("")
    p("== issue targets (SHORT = misses the target) ==")
    def verdict(ok):
        return "ok" if ok else "SHORT"
    lines = 0
    for g in agg:
        if g["table"] == "file" and g["target"] == "passthrough" and g["ratio_native"] == g["ratio_native"]:
            p("passthrough >= 0.98x native  %-22s %.2fx  %s" % (g["row"], g["ratio_native"], verdict(g["ratio_native"] >= 0.98)))
            lines += 1
    for table in tables:
        for row in ("randread-4k-qd16-hot", "randread-4k-qd16-cold", "randwrite-4k-hot", "randwrite-4k-cold"):
            r, m = a(table, row, "relay"), a(table, row, "mergerfs")
            if r and m and m["iops_median"] and m["iops_median"] == m["iops_median"]:
                x = r["iops_median"] / m["iops_median"]
                p("relay >= 1.2x mergerfs       %-22s %.2fx  (%s vs %s IOPS) %s" % (
                    row, x, fnum(r["iops_median"]), fnum(m["iops_median"]), verdict(x >= 1.2)))
                lines += 1
    for table in tables:
        for t in ("passthrough", "relay"):
            g = a(table, "randread-4k-qd1-cold", t)
            if g and g["ratio_native"] == g["ratio_native"]:
                p("cold randread QD1 >= 0.9x    %-22s %.2fx  %s" % ("%s/%s" % (table, t), g["ratio_native"], verdict(g["ratio_native"] >= 0.9)))
                lines += 1
    act = [c["wall_ms"] for c in ctl if c["method"].startswith("activate") and c["level"].startswith("none")]
    if act:
        ma = med(act)
        if ma == ma:
            p("activate 100 GiB uncached < 50 ms  median %.2f ms  %s" % (ma, verdict(ma < 50)))
        else:
            p("activate 100 GiB uncached < 50 ms  not measured: every activate failed (see control ops)")
        lines += 1
    if rss:
        mx = max(r["rss_kib"] for r in rss) / 1024
        p("RSS < 32 MiB                 max VmRSS %.1f MiB  %s" % (mx, verdict(mx < 32)))
        lines += 1
    if not lines:
        p("(no measured row maps to an issue target)")
    if base:
        # Before/after summary: the geometric mean of T / T-base over the
        # rows, and the row furthest below 1 (read it against the min-max
        # spread of that row's two targets: noise on a shared host).
        p("")
        p("== new vs baseline (T / T-base median IOPS over the rows) ==")
        p("%-10s %-14s %-6s %-10s %s" % ("table", "target", "rows", "geomean", "lowest row"))
        import math
        for table in tables:
            for t in sorted(set(g["target"] for g in agg if g["table"] == table)):
                v = [g for g in agg if g["table"] == table and g["target"] == t and g["ratio_base"] == g["ratio_base"]]
                if not v or t.endswith("-base"):
                    continue
                gm = math.exp(sum(math.log(g["ratio_base"]) for g in v) / len(v))
                lo = min(v, key=lambda g: g["ratio_base"])
                p("%-10s %-14s %-6d %-10s %.2fx %s" % (table, t, len(v), "%.3fx" % gm, lo["ratio_base"], lo["row"]))
    if any(r["row"] in ("seqwrite-1m-hot", "randwrite-4k-hot", "randrw-4k-hot") for r in fio):
        notes.append("hot write rows: pages cached by reads are large folios, and a 4k write dirties its whole "
                     "folio, so hot 4k-write rows run at writeback (disk) bandwidth for every target; cold write "
                     "rows (pages allocated by the writes themselves, one pass) show the CPU-bound data-path cost")
    if notes:
        p("")
        p("== notes ==")
        seen = set()
        for n in notes:
            if n not in seen:
                seen.add(n)
                p("- " + n)
    print("\n".join(out))

    if csv_out != "-":
        import csv
        with open(csv_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["table", "row", "target", "iops_median", "iops_min", "iops_max", "mbps_median",
                        "ratio_native", "daemon_cpu_s_median", "reps", "failed", "ratio_base"])
            for g in agg:
                w.writerow([g[k] for k in ("table", "row", "target", "iops_median", "iops_min", "iops_max",
                                           "mbps_median", "ratio_native", "daemon_cpu_s_median", "reps", "failed",
                                           "ratio_base")])
    if json_out != "-":
        def clean(o):
            if isinstance(o, float) and o != o:
                return None
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return o
        with open(json_out, "w") as f:
            json.dump(clean(dict(meta=meta, aggregated=agg, runs=fio, ctl=ctl, ctl_scale=scale, open=opn,
                                 rss=rss, notes=notes)),
                      f, indent=1)
            f.write("\n")

if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
PYEOF
# the real interpreter (not a pyenv shim): fast start, and $! is python itself
PY=$(python3 -c 'import sys; print(sys.executable)')
py() { "$PY" "$HELPER" "$@"; }

note() {
	log "   NOTE: $*"
	printf 'note\t%s\n' "$*" >>"$RESULTS"
}

cpu_ticks() { # utime+stime of a process (all threads), in clock ticks
	local s f
	[[ -n ${1:-} && -r /proc/$1/stat ]] || { echo -; return; }
	s=$(<"/proc/$1/stat")
	s=${s##*) }
	read -ra f <<<"$s"
	echo $((f[11] + f[12]))
}

# ---------------------------------------------------------------- mounts --
wait_mounted() { # path pid logfile what
	local m=$1 pid=$2 logf=$3 i
	for ((i = 0; i < 150; i++)); do
		if is_mounted "$m"; then return 0; fi
		if ! kill -0 "$pid" 2>/dev/null; then
			log "   $4 exited before mounting $m; its log:"
			sed 's/^/     | /' "$logf" >&2 || true
			return 1
		fi
		sleep 0.1
	done
	log "   $4 did not mount $m within 15 s; its log:"
	sed 's/^/     | /' "$logf" >&2 || true
	return 1
}

# start_migsafe NAME BACKING MNT ARGS... ; sets LAST_PID
start_migsafe() { start_migsafe_bin "$MIGSAFE" "$@"; }

# start_migsafe_bin BIN NAME BACKING MNT ARGS... : the same with binary BIN
start_migsafe_bin() {
	local bin=$1 name=$2 backing=$3 mnt=$4 pid
	shift 4
	mkdir -p "$mnt"
	local targs=()
	[[ -n $THREADS ]] && targs=(--threads "$THREADS")
	CLEAN_MNTS+=("$mnt")
	# The state file in the work dir (removed with it), not root's default
	# /run/migsafe-state: the bench leaves nothing behind.
	targs+=(--state-file "$WORK/state-$name.json")
	# The pid file names the process that serves requests (the mount's own
	# process is its keeper, which serves none): its CPU is the daemon's.
	targs+=(--pid-file "$WORK/pid-$name")
	RUST_LOG=${RUST_LOG:-warn} "$bin" mount "${targs[@]+"${targs[@]}"}" "$@" \
		"${EXTRA_MOUNT_ARGS[@]+"${EXTRA_MOUNT_ARGS[@]}"}" "$backing" "$mnt" \
		>"$WORK/log-$name" 2>&1 &
	pid=$!
	CLEAN_PIDS+=("$pid")
	LAST_PID=$pid
	log "   $bin mount $* ${EXTRA_MOUNT_ARGS[*]} $backing $mnt (pid $pid)"
	if ! wait_mounted "$mnt" "$pid" "$WORK/log-$name" "migsafe ($name)"; then
		stop_pid "$pid"
		return 1
	fi
	if [[ -s $WORK/pid-$name ]]; then
		LAST_PID=$(<"$WORK/pid-$name")
	fi
}

start_mergerfs() { # backing mnt ; sets LAST_PID
	local backing=$1 mnt=$2 pid
	mkdir -p "$mnt"
	CLEAN_MNTS+=("$mnt")
	mergerfs -f -o cache.files=off,fsname=bench-mergerfs "$backing" "$mnt" >"$WORK/log-mergerfs" 2>&1 &
	pid=$!
	CLEAN_PIDS+=("$pid")
	LAST_PID=$pid
	log "   mergerfs -o cache.files=off $backing $mnt (pid $pid)"
	wait_mounted "$mnt" "$pid" "$WORK/log-mergerfs" mergerfs || { stop_pid "$pid"; return 1; }
}

start_qsd() { # driver filename mountpoint-file ; sets LAST_PID
	local driver=$1 file=$2 mp=$3 pid
	: >"$mp"
	CLEAN_MNTS+=("$mp")
	qemu-storage-daemon --blockdev "driver=$driver,node-name=f,filename=$file" \
		--export "type=fuse,id=e,node-name=f,mountpoint=$mp,writable=on" >"$WORK/log-qsd-${mp##*/}" 2>&1 &
	pid=$!
	CLEAN_PIDS+=("$pid")
	LAST_PID=$pid
	log "   qemu-storage-daemon $driver $file -> fuse export $mp (pid $pid)"
	wait_mounted "$mp" "$pid" "$WORK/log-qsd-${mp##*/}" qemu-storage-daemon || { stop_pid "$pid"; return 1; }
}

hold() { # rw|ro FILE... : keep handles open in a background python process
	local mode=$1 ready pid i
	shift
	ready=$WORK/hold-ready.$RANDOM$RANDOM
	"$PY" "$HELPER" hold "$ready" "$mode" "$@" 2>"$ready.err" &
	pid=$!
	HOLDER_PIDS+=("$pid")
	for ((i = 0; i < 200; i++)); do
		[[ -s $ready ]] && return 0
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.05
	done
	log "   could not hold $* open: $(cat "$ready.err" 2>/dev/null)"
	return 1
}

release_holders() {
	local p
	for p in "${HOLDER_PIDS[@]+"${HOLDER_PIDS[@]}"}"; do stop_pid "$p"; done
	HOLDER_PIDS=()
}

evict() { # drop the page cache of a file or block device (fadvise DONTNEED)
	if [[ -f $1 ]] && have vmtouch; then
		vmtouch -qe "$1"
	else
		py evict "$1"
	fi
}

# ---------------------------------------------------------------- fio rows --
# QD16 engine: io_uring (buffered reads really run 16 deep, via io-wq),
# libaio otherwise (which is synchronous for buffered I/O).
AIO=libaio
if fio --name=probe --ioengine=io_uring --filename="$WORK/probe" --size=1M --rw=read \
	--output-format=terse >/dev/null 2>&1; then
	AIO=io_uring
fi
rm -f "$WORK/probe"

ALL_ROWS=()
for m in hot cold; do
	for b in seqread-1m seqwrite-1m randread-4k-qd1 randread-4k-qd16 randwrite-4k randwrite-4k-qd16 randrw-4k; do
		ALL_ROWS+=("$b-$m")
	done
done
ALL_ROWS+=(odirect-randread-4k)

row_selected() {
	local row=$1 item
	[[ -z $ROWS ]] && return 0
	local -a items
	IFS=, read -ra items <<<"$ROWS"
	for item in "${items[@]}"; do
		[[ $row == "$item" || $row == "$item-hot" || $row == "$item-cold" ]] && return 0
		[[ ($item == hot || $item == cold) && $row == *-"$item" ]] && return 0
		[[ $item == odirect && $row == odirect-* ]] && return 0
	done
	return 1
}
if [[ -n $ROWS ]]; then
	IFS=, read -ra _items <<<"$ROWS"
	for _i in "${_items[@]}"; do
		_ok=0
		for _r in "${ALL_ROWS[@]}"; do
			[[ $_r == "$_i" || $_r == "$_i-hot" || $_r == "$_i-cold" || $_i == hot || $_i == cold || $_i == odirect ]] && _ok=1
		done
		((_ok)) || die "unknown row in --rows: $_i"
	done
fi

row_args() { # sets ROW_MODE (hot|cold|direct) and ROW_ARGS
	local row=$1 base
	case $row in
	*-hot) ROW_MODE=hot; base=${row%-hot} ;;
	*-cold) ROW_MODE=cold; base=${row%-cold} ;;
	odirect-*) ROW_MODE=direct; base=${row#odirect-} ;;
	esac
	case $base in
	seqread-1m) ROW_ARGS=(--rw=read --bs=1M --ioengine=psync) ;;
	seqwrite-1m) ROW_ARGS=(--rw=write --bs=1M --ioengine=psync) ;;
	randread-4k-qd1 | randread-4k) ROW_ARGS=(--rw=randread --bs=4k --ioengine=psync) ;;
	randread-4k-qd16) ROW_ARGS=(--rw=randread --bs=4k --ioengine="$AIO" --iodepth=16) ;;
	randwrite-4k) ROW_ARGS=(--rw=randwrite --bs=4k --ioengine=psync) ;;
	randwrite-4k-qd16) ROW_ARGS=(--rw=randwrite --bs=4k --ioengine="$AIO" --iodepth=16) ;;
	randrw-4k) ROW_ARGS=(--rw=randrw --rwmixread=70 --bs=4k --ioengine=psync) ;;
	*) die "internal: row $row" ;;
	esac
	if [[ $ROW_MODE == direct ]]; then
		ROW_ARGS+=(--direct=1 --time_based --runtime="$RUNTIME")
	elif [[ $ROW_MODE == hot ]]; then
		ROW_ARGS+=(--direct=0 --time_based --runtime="$RUNTIME")
	else
		# cold: one pass over the image, capped at --runtime
		ROW_ARGS+=(--direct=0 --runtime="$RUNTIME")
	fi
}

# run_one TABLE ROW TARGET REP BACKING SIZE
run_one() {
	local table=$1 row=$2 target=$3 rep=$4 backing=$5 size=$6
	local file=${TARGET_FILE[$target]} pid=${DAEMON_PID[$target]:-}
	local out=$WORK/fio-$table-$row-$target-$rep.json c0 c1 cpu res iops mbps nt=""
	row_args "$row"
	sync "$backing"
	case $ROW_MODE in
	hot)
		py warm "$backing"
		# The cached path's one cache is the FUSE inode's: warm that.
		if [[ ${target%-base} == cached ]]; then py warm "$file"; fi
		;;
	cold)
		evict "$backing"
		if [[ ${target%-base} == cached ]]; then evict "$file"; fi
		local cs
		read -ra cs <<<"$(py cachestat "$backing")"
		if ((cs[0] * 100 > cs[3])); then
			nt="cold-miss"
			note "$table $row $target rep$rep: ${cs[0]} of ${cs[3]} pages still cached after eviction (dirty ${cs[1]}, writeback ${cs[2]})"
		fi
		;;
	esac
	c0=$(cpu_ticks "$pid")
	if fio --name="$row" --filename="$file" --size="$size" --invalidate=0 --fallocate=none \
		--allow_file_create=0 --norandommap --randrepeat=1 --numjobs=1 --group_reporting \
		"${ROW_ARGS[@]}" --output-format=json --output="$out" >"$out.log" 2>&1; then
		res=$(py fioparse "$out" 2>>"$out.log") || res="nan nan"
	else
		res="nan nan"
	fi
	c1=$(cpu_ticks "$pid")
	read -r iops mbps <<<"$res"
	if [[ $iops == nan ]]; then
		nt="fio-failed"
		note "$table $row $target rep$rep: fio failed: $(grep -hiE 'err|fail|invalid' "$out.log" "$out" 2>/dev/null | head -3 | tr '\n' ' ')"
	fi
	if [[ $c0 == - || $c1 == - ]]; then
		cpu=-
	else
		cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')
	fi
	if [[ $ROW_MODE == hot ]]; then
		# The cached path's one cache is the FUSE inode's (its O_DIRECT
		# writes drop the backing's pages): check that one.
		local cs what=backing probe=$backing
		if [[ ${target%-base} == cached ]]; then what="FUSE inode"; probe=$file; fi
		read -ra cs <<<"$(py cachestat "$probe")"
		if ((cs[0] * 100 < cs[3] * 95)); then
			note "$table $row $target rep$rep: hot row ended with only ${cs[0]} of ${cs[3]} $what pages cached (something dropped the cache)"
		fi
	fi
	printf 'fio\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$table" "$row" "$target" "$rep" "$iops" "$mbps" "$cpu" "${nt:--}" >>"$RESULTS"
	log "$(printf '   %-6s %-22s rep%-2s %-12s IOPS %-10s MB/s %-9s daemon CPU %s s' "$table" "$row" "$rep" "$target" "$iops" "$mbps" "$cpu")"
}

# run_table TABLE BACKING SIZE TARGET...
run_table() {
	local table=$1 backing=$2 size=$3
	shift 3
	local targets=("$@") n=$# row rep i
	for row in "${ALL_ROWS[@]}"; do
		row_selected "$row" || continue
		for ((rep = 1; rep <= REPS; rep++)); do
			for ((i = 0; i < n; i++)); do
				# rotate the order each repetition so no target always goes first
				run_one "$table" "$row" "${targets[(i + rep - 1) % n]}" "$rep" "$backing" "$size"
			done
		done
	done
}

target_wanted() { # name
	[[ $1 == native ]] && return 0
	[[ -z $TARGETS ]] && return 0
	[[ ,$TARGETS, == *,"$1",* ]]
}
if [[ -n $TARGETS ]]; then
	IFS=, read -ra _items <<<"$TARGETS"
	for _i in "${_items[@]}"; do
		case $_i in native | passthrough | relay | cached | writeback | mergerfs | qsd) ;; *) die "unknown target in --targets: $_i" ;; esac
	done
fi

STAGE_TARGETS=()  # targets mounted for the current stage, native first

# add_migsafe TARGET NAME BACKING MNT FILE ARGS... : mount BACKING on MNT
# with `migsafe mount ARGS` (the --baseline-bin binary for a TARGET ending
# in -base), hold MNT/FILE open as a VMM does, and append TARGET to
# STAGE_TARGETS; a failed mount or open is a note and skips the target.
add_migsafe() {
	local target=$1 name=$2 backing=$3 mnt=$4 file=$5 bin=$MIGSAFE
	shift 5
	[[ $target == *-base ]] && bin=$BASE_BIN
	if ! start_migsafe_bin "$bin" "$name" "$backing" "$mnt" "$@"; then
		note "$target: $bin mount $* failed (log above); target skipped"
		return 0
	fi
	DAEMON_PID[$target]=$LAST_PID
	TARGET_FILE[$target]=$mnt/$file
	if hold ro "$mnt/$file"; then
		STAGE_TARGETS+=("$target")
	else
		note "$target: could not open $file through the mount; target skipped"
	fi
}

make_image() { # path bytes
	log "== creating $(numfmt --to=iec "$2") image $1"
	fio --name=prefill --filename="$1" --size="$2" --rw=write --bs=1M --direct=1 \
		--ioengine=libaio --iodepth=8 --output-format=terse >/dev/null 2>"$WORK/prefill.err" ||
		die "prefill failed: $(cat "$WORK/prefill.err")"
	sync "$1"
}

# ================================================================ stages ==
stage_file() {
	local bdir=$WORK/backing img
	STAGE_TARGETS=(native)
	mkdir -p "$bdir"
	img=$bdir/bench.img
	[[ -f $img ]] || make_image "$img" "$SIZE_BYTES"
	TARGET_FILE[native]=$img
	log "== file-backed table: mounting targets"
	local t m
	for t in passthrough relay cached; do
		target_wanted "$t" || continue
		for m in "$t" ${BASE_BIN:+"$t-base"}; do
			add_migsafe "$m" "$m" "$bdir" "$WORK/mnt-$m" bench.img --io "$t"
		done
	done
	if target_wanted mergerfs; then
		if ! have mergerfs; then
			note "mergerfs not installed: peer skipped"
		elif start_mergerfs "$bdir" "$WORK/mnt-mergerfs"; then
			DAEMON_PID[mergerfs]=$LAST_PID
			TARGET_FILE[mergerfs]=$WORK/mnt-mergerfs/bench.img
			STAGE_TARGETS+=(mergerfs)
		else
			note "mergerfs mount failed: peer skipped"
		fi
	fi
	if target_wanted qsd; then
		if ! have qemu-storage-daemon; then
			note "qemu-storage-daemon not installed: peer skipped"
		elif start_qsd file "$img" "$WORK/qsd-file"; then
			DAEMON_PID[qsd]=$LAST_PID
			TARGET_FILE[qsd]=$WORK/qsd-file
			STAGE_TARGETS+=(qsd)
		else
			note "qemu-storage-daemon fuse export failed: peer skipped"
		fi
	fi
	log "== file-backed table: targets ${STAGE_TARGETS[*]}; warming the image"
	py warm "$img"
	run_table file "$img" "$SIZE_BYTES" "${STAGE_TARGETS[@]}"
	teardown
}

stage_blockdev() {
	local bdir=$WORK/backing img loop
	STAGE_TARGETS=(native)
	mkdir -p "$bdir" "$WORK/devbacking"
	img=$bdir/bench.img
	[[ -f $img ]] || make_image "$img" "$SIZE_BYTES"
	# direct-io loop: only the block device's page cache exists (like a SAN LUN)
	if loop=$(losetup --find --show --direct-io=on "$img" 2>/dev/null); then
		:
	else
		loop=$(losetup --find --show "$img") || die "losetup failed"
		note "loop device without direct-io: the image file's cache is dropped too for cold rows"
	fi
	CLEAN_LOOPS+=("$loop")
	log "== block-device table: $loop over $img"
	# a block device's cache goes when its last opener closes it: hold it open
	hold ro "$loop" || die "cannot hold $loop open"
	TARGET_FILE[native]=$loop
	local t m
	for t in cached relay; do
		target_wanted "$t" || continue
		for m in "$t" ${BASE_BIN:+"$t-base"}; do
			mkdir -p "$WORK/devbacking-$m"
			add_migsafe "$m" "dev-$m" "$WORK/devbacking-$m" "$WORK/mnt-dev-$m" disk \
				--device-io "$t" --device "disk=$loop"
		done
	done
	# the cached path with the kernel's writeback cache (a devices-only mount)
	if target_wanted writeback; then
		mkdir -p "$WORK/devbacking-writeback"
		add_migsafe writeback dev-writeback "$WORK/devbacking-writeback" \
			"$WORK/mnt-dev-writeback" disk --device-io cached --writeback on --device "disk=$loop"
	fi
	if target_wanted qsd && have qemu-storage-daemon; then
		if start_qsd host_device "$loop" "$WORK/qsd-dev"; then
			DAEMON_PID[qsd]=$LAST_PID
			TARGET_FILE[qsd]=$WORK/qsd-dev
			STAGE_TARGETS+=(qsd)
		else
			note "qemu-storage-daemon host_device export failed: peer skipped"
		fi
	fi
	log "== block-device table: targets ${STAGE_TARGETS[*]}; warming $loop"
	py warm "$loop"
	run_table blockdev "$loop" "$SIZE_BYTES" "${STAGE_TARGETS[@]}"
	teardown
}

stage_ctl() {
	local cdir=$WORK/ctl mnt=$WORK/mnt-ctl img rep lv avail_kb want line cs m
	mkdir -p "$cdir"
	img=$cdir/ctl.img
	truncate -s 100G "$img"
	log "== control ops: 100 GiB sparse image $img"
	start_migsafe ctl "$cdir" "$mnt" || { note "ctl: migsafe mount failed; stage skipped"; teardown; return 0; }
	local pid=$LAST_PID
	stat "$mnt/ctl.img" >/dev/null
	# the destination VMM holds its image open at activation time
	hold ro "$mnt/ctl.img" || note "ctl: could not hold ctl.img open through the mount"
	local levels=(0 $((1 << 30)) $((8 << 30)))
	avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
	for ((m = 1; m < ${#levels[@]}; m++)); do
		want=${levels[m]}
		# keep 2 GiB of headroom
		if ((want / 1024 + (2 << 20) > avail_kb)); then
			local scaled
			scaled=$(((avail_kb - (2 << 20)) * 1024 / 1048576 * 1048576))
			((scaled < (64 << 20))) && scaled=$((64 << 20))
			note "ctl: $(numfmt --to=iec "$want") cached needs more memory than available ($(numfmt --to=iec $((avail_kb * 1024))) MemAvailable); using $(numfmt --to=iec "$scaled")"
			levels[m]=$scaled
		fi
	done
	fill() { # bytes
		evict "$img"
		if (($1 > 0)); then
			dd if="$img" of=/dev/null bs=1M count=$(($1 >> 20)) status=none
		fi
	}
	for lv in "${levels[@]}"; do
		local label
		if ((lv == 0)); then label="none"; else label="$(numfmt --to=iec "$lv")"; fi
		for ((rep = 1; rep <= REPS; rep++)); do
			fill "$lv"
			read -ra cs <<<"$(py cachestat "$img")"
			log "   cached before activate: ${cs[0]} pages (level $label)"
			line=$(py ctltime "$mnt/.ctl/activate" ctl.img)
			printf 'ctl\t%s\t%s\t%s\t%s\n' "$label" "activate (echo img > .ctl/activate)" "$rep" "$line" >>"$RESULTS"
			log "   activate     $label rep$rep: $line"
			fill "$lv"
			if have vmtouch && have fincore; then
				local tot ev fc pages
				IFS=$'\t' read -r tot ev fc pages <<<"$(py mantime "$img")"
				printf 'ctl\t%s\t%s\t%s\t%s\t%s\t-\t%s\n' "$label" "vmtouch -e; fincore (by hand)" "$rep" "$tot" "-" \
					"vmtouch ${ev} ms fincore ${fc} ms pages=$pages" >>"$RESULTS"
				log "   vmtouch+fincore $label rep$rep: $tot ms (vmtouch $ev, fincore $fc, pages $pages)"
			fi
		done
	done
	release_holders
	# invalidate-on-open: open latency of an uncached image, on vs off, same mount
	local n=1000 setting
	printf 'note\tctl: open latency uses O_RDONLY opens with no other handle held; FUSE release is asynchronous, so an open may overlap the previous release\n' >>"$RESULTS"
	for ((rep = 1; rep <= REPS; rep++)); do
		evict "$img"
		line=$(py opentime "$img" "$n")
		printf 'open\t%s\t%s\t%s\n' "native (backing file)" "$rep" "$line" >>"$RESULTS"
		for setting in off on; do
			if ! echo "$setting" >"$mnt/.ctl/invalidate-on-open"; then
				note "ctl: writing '$setting' to .ctl/invalidate-on-open failed"
				continue
			fi
			evict "$img"
			line=$(py opentime "$mnt/ctl.img" "$n")
			printf 'open\t%s\t%s\t%s\n' "migsafe invalidate-on-open=$setting" "$rep" "$line" >>"$RESULTS"
			log "   open x$n invalidate-on-open=$setting rep$rep: $line (med p90 mean close, us)"
		done
	done
	echo on >"$mnt/.ctl/invalidate-on-open" || true
	local cpu
	cpu=$(cpu_ticks "$pid")
	log "   ctl daemon CPU total: $cpu ticks"
	teardown
}

stage_ctl_scale() {
	local sdir=$WORK/ctlscale mnt=$WORK/mnt-ctlscale rep i line n want
	mkdir -p "$sdir"
	log "== control ops vs process count: $IMAGES sparse 1 GiB images, $PROCS idle processes added"
	py mkfiles "$sdir" "$IMAGES" $((1 << 30))
	IDLE_PIDFILE=$WORK/idle.pids
	: >"$IDLE_PIDFILE"
	if ((PROCS > 0)); then
		py idle "$PROCS" "$IDLE_PIDFILE"
		log "   spawned $(wc -l <"$IDLE_PIDFILE") idle processes"
	fi
	start_migsafe ctlscale "$sdir" "$mnt" ||
		{ note "ctl-scale: migsafe mount failed; stage skipped"; stop_idle; teardown; return 0; }
	# every image known to the mount, as `*` reports the images it has seen
	ls -l "$mnt" >/dev/null
	n=$(py nprocs)
	log "   processes on the host: $n (load: $(cut -d' ' -f1-3 /proc/loadavg))"
	note "ctl-scale: $n processes on the host, loadavg $(cut -d' ' -f1-3 /proc/loadavg) at the start"
	one() { # method ctl image
		line=$(py ctltime "$mnt/.ctl/$2" "$3")
		printf 'ctlscale\t%s\t%s\t%s\t%s\n' "$n" "$1" "$rep" "$line" >>"$RESULTS"
		log "   $1 rep$rep: ${line:0:200}"
	}
	for ((rep = 1; rep <= REPS; rep++)); do
		for ((i = 0; i < 5; i++)); do
			one "activate one uncached image (none open)" activate img0000.raw
			one "inactivate one uncached image (none open)" inactivate img0000.raw
		done
		if hold ro "$mnt/img0001.raw"; then
			for ((i = 0; i < 5; i++)); do
				one "activate one image held open ro through the mount" activate img0001.raw
				one "inactivate one image held open ro through the mount" inactivate img0001.raw
			done
			release_holders
		else
			note "ctl-scale: could not hold img0001.raw open"
		fi
		# The destination VMM of a migration: the image open read-write
		# through the mount (passthrough: the daemon's registered backing
		# is writable whatever the handle; relay below: the daemon's own
		# writable fd), so the kernel's writable-open answer is always yes.
		if hold rw "$mnt/img0002.raw"; then
			for ((i = 0; i < 5; i++)); do
				one "activate one image held open rw through the mount" activate img0002.raw
				one "inactivate one image held open rw through the mount" inactivate img0002.raw
			done
			release_holders
		else
			note "ctl-scale: could not hold img0002.raw open read-write"
		fi
		for want in activate inactivate; do
			line=$(py ctlmany "$mnt/.ctl/$want" '*')
			printf 'ctlscale\t%s\t%s\t%s\t%s\n' "$n" "$want * ($IMAGES images, none open)" "$rep" "$line" >>"$RESULTS"
			log "   $want * rep$rep: $line"
		done
	done
	log "   ctl-scale daemon CPU total: $(cpu_ticks "$LAST_PID") ticks"
	teardown
	# The same held-open row on a relay mount (a writable handle holds a
	# writable backing fd of the daemon's).
	if start_migsafe ctlscale-relay "$sdir" "$mnt" --io relay; then
		if hold rw "$mnt/img0002.raw"; then
			for ((rep = 1; rep <= REPS; rep++)); do
				for ((i = 0; i < 5; i++)); do
					one "activate one image held open rw through a relay mount" activate img0002.raw
				done
			done
		else
			note "ctl-scale: could not hold img0002.raw open read-write (relay)"
		fi
		teardown
	else
		note "ctl-scale: relay mount failed; relay row skipped"
	fi
	stop_idle
}

stage_rss() {
	local rdir=$WORK/rss mnt mode pid i kb files=()
	mkdir -p "$rdir/backing"
	log "== memory: 1000 sparse images"
	py mkfiles "$rdir/backing" 1000 $((1 << 30))
	for mode in passthrough relay; do
		mnt=$WORK/mnt-rss-$mode
		start_migsafe "rss-$mode" "$rdir/backing" "$mnt" --io "$mode" ||
			{ note "rss: migsafe mount --io $mode failed"; teardown; continue; }
		pid=$LAST_PID
		sleep 0.5
		printf 'rss\t%s\t%s\t%s\n' "$mode" "after mount" "$(py rss "$pid" | tr ' ' '\t')" >>"$RESULTS"
		ls -l "$mnt" >/dev/null
		printf 'rss\t%s\t%s\t%s\n' "$mode" "after ls -l of 1000 images" "$(py rss "$pid" | tr ' ' '\t')" >>"$RESULTS"
		files=()
		for ((i = 0; i < 64; i++)); do files+=("$(printf '%s/img%04d.raw' "$mnt" "$i")"); done
		if hold rw "${files[@]}"; then
			sleep 0.3
			printf 'rss\t%s\t%s\t%s\n' "$mode" "64 handles open (O_RDWR, 64 images)" "$(py rss "$pid" | tr ' ' '\t')" >>"$RESULTS"
			release_holders
			sleep 0.5
			printf 'rss\t%s\t%s\t%s\n' "$mode" "after closing the 64 handles" "$(py rss "$pid" | tr ' ' '\t')" >>"$RESULTS"
		else
			note "rss: could not open 64 images through the $mode mount"
		fi
		kb=$(py rss "$pid")
		log "   $mode: VmRSS/VmHWM kB $kb"
		teardown
	done
}

# ================================================================== main ==
log "== work dir $WORK; migsafe $MIGSAFE; image $(numfmt --to=iec "$SIZE_BYTES"); runtime ${RUNTIME}s; reps $REPS; QD16 engine $AIO"
((DO_FILE)) && stage_file
((DO_BLOCKDEV)) && stage_blockdev
((DO_CTL)) && stage_ctl
((DO_CTL_SCALE)) && stage_ctl_scale
((DO_RSS)) && stage_rss

META=$(
	python3 - "$SIZE_BYTES" "$RUNTIME" "$REPS" "$AIO" "$THREADS" "$MIGSAFE" "$BASE_BIN" <<'PYEOF'
import json, os, subprocess, sys, time
size, runtime, reps, aio, threads, migsafe, base_bin = sys.argv[1:]
def run(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "?"
gib = int(size) / 2**30
print(json.dumps(dict(date=time.strftime("%Y-%m-%d %H:%M:%S %z"), kernel=os.uname().release,
    cpus=os.cpu_count(), fio=run("fio", "--version"), size="%.3g GiB" % gib, runtime=int(runtime),
    reps=int(reps), aio=aio, threads=threads, migsafe=run(migsafe, "--version"), opens=1000,
    migsafe_path=migsafe,
    baseline=dict(path=base_bin, version=run(base_bin, "--version")) if base_bin else None,
    tables={"file": "file-backed image (%.3g GiB) in a directory" % gib,
            "blockdev": "block device (loop, direct-io, %.3g GiB)" % gib})))
PYEOF
)
py report "$RESULTS" "${CSV_OUT:--}" "${JSON_OUT:--}" "$META"
[[ -n $CSV_OUT ]] && log "== CSV: $CSV_OUT"
[[ -n $JSON_OUT ]] && log "== JSON: $JSON_OUT"
exit 0
