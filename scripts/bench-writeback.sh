#!/usr/bin/env bash
# Write-back device rows that fio's table does not give, native and migsafe
# on the same loop device in one run, median of --reps, printed as ratios:
#
#   flush-after-256m   buffered random 4k writes of 256 MiB (the same
#                      offsets for both), then the time of one fsync;
#   inactivate-1g      1 GiB written buffered, then native fdatasync vs
#                      `migsafe ctl MNT inactivate disk` (write-back of
#                      every dirty page, device sync, fence).
#
# Native is the loop device itself (direct-io loop over an image file, the
# two-loop bed's LUN); migsafe is a devices-only mount of it with
# --writeback on and, for comparison, the same mount written through (the
# default). As root:
#
#   scripts/bench-writeback.sh [--reps N] [--migsafe PATH]
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=3
MIGSAFE=""
while [[ $# -gt 0 ]]; do
	case $1 in
	--reps) REPS=$2; shift 2 ;;
	--migsafe) MIGSAFE=$2; shift 2 ;;
	-h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "bench-writeback: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ $(id -u) -eq 0 ]] || { echo "bench-writeback: run as root (loop devices, mounts)" >&2; exit 2; }
if [[ -z $MIGSAFE ]]; then
	cargo build --release --quiet
	MIGSAFE=$PWD/target/release/migsafe
fi

WORK=$(mktemp -d /tmp/migsafe-bench-wb.XXXXXX)
LOOP=""
PIDS=()
MOUNTS=()
cleanup() {
	for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	if [[ -n $LOOP ]]; then losetup -d "$LOOP" 2>/dev/null || true; fi
	rm -rf "$WORK"
}
trap cleanup EXIT

truncate -s 1G "$WORK/lun.img"
LOOP=$(losetup --find --show --direct-io=on "$WORK/lun.img")
mount_one() { # name extra-args...
	local name=$1
	shift
	mkdir -p "$WORK/back-$name" "$WORK/mnt-$name"
	"$MIGSAFE" mount --daemon --pid-file "$WORK/$name.pid" --log-file "$WORK/$name.log" \
		--state-file none --device "disk=$LOOP" "$@" "$WORK/back-$name" "$WORK/mnt-$name"
	PIDS+=("$(cat "$WORK/$name.pid")")
	MOUNTS+=("$WORK/mnt-$name")
}
mount_one wb --writeback on
mount_one wt
# a block device's cache goes when its last opener closes it: hold it open
exec 9<"$LOOP"

/usr/bin/python3 - "$REPS" "$LOOP" "$MIGSAFE" "$WORK/mnt-wb" "$WORK/mnt-wt" <<'EOF'
import os, random, statistics, subprocess, sys, time

reps, loop, migsafe, mnt_wb, mnt_wt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
targets = {"native": (loop, None), "writeback": (mnt_wb + "/disk", mnt_wb), "writethrough": (mnt_wt + "/disk", mnt_wt)}
PAGE = 4096

def ctl(mnt, cmd):
    subprocess.run([migsafe, "ctl", mnt, cmd, "disk"], check=True, stdout=subprocess.DEVNULL)

def flush_after_256m(path, seed):
    rnd = random.Random(seed)
    buf = bytes([seed & 0xff]) * PAGE
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        t0 = time.monotonic()
        for _ in range((256 << 20) // PAGE):
            os.pwrite(fd, buf, rnd.randrange((1 << 30) // PAGE) * PAGE)
        t1 = time.monotonic()
        os.fsync(fd)
        t2 = time.monotonic()
    finally:
        os.close(fd)
    return t2 - t1, t1 - t0

def handover_1g(path, mnt, seed):
    buf = bytes([seed & 0xff]) * (1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        for i in range(1024):
            os.pwrite(fd, buf, i << 20)
        t0 = time.monotonic()
        if mnt is None:
            os.fdatasync(fd)
        else:
            ctl(mnt, "inactivate")
        t1 = time.monotonic()
    finally:
        os.close(fd)
    if mnt is not None:
        ctl(mnt, "activate")
    return t1 - t0

rows = {"flush-after-256m": {}, "write-256m": {}, "inactivate-1g": {}}
names = list(targets)
for rep in range(reps):
    for i in range(len(names)):
        name = names[(i + rep) % len(names)]
        path, mnt = targets[name]
        f, w = flush_after_256m(path, 17 + rep)
        rows["flush-after-256m"].setdefault(name, []).append(f)
        rows["write-256m"].setdefault(name, []).append(w)
        rows["inactivate-1g"].setdefault(name, []).append(handover_1g(path, mnt, 33 + rep))
print(f"# write-back device rows, median of {reps}, seconds (x native: native / target time, higher is faster)")
print(f"{'row':<18} " + " ".join(f"{n:>22}" for n in names))
for row, by in rows.items():
    nat = statistics.median(by["native"])
    cells = []
    for n in names:
        m = statistics.median(by[n])
        cells.append(f"{m:9.3f}s {nat / m if m else 0:6.2f}x" if n != "native" else f"{m:9.3f}s".rjust(16))
    print(f"{row:<18} " + " ".join(f"{c:>22}" for c in cells))
EOF
