#!/bin/bash
# Measures what a crash and an upgrade of the serving process cost a mount
# under load (not a test: it prints numbers). The mount serves --images
# images, --handles of them held open by a reader that reads 4 KiB through
# each in turn; the serving process is SIGKILLed (crash) and replaced by
# SIGUSR2 (upgrade) --reps times each. Printed per event: the time from the
# signal to the first answered request that needs the daemon (a lookup of
# a name never looked up before), and the longest stall the reader saw.
#
#   scripts/bench-restart.sh [--io relay|cached|passthrough] [--images N]
#                            [--handles N] [--reps N]
set -euo pipefail
IO=relay IMAGES=1000 HANDLES=64 REPS=5
while [[ $# -gt 0 ]]; do
	case $1 in
	--io) IO=$2; shift 2 ;;
	--images) IMAGES=$2; shift 2 ;;
	--handles) HANDLES=$2; shift 2 ;;
	--reps) REPS=$2; shift 2 ;;
	-h | --help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "bench-restart.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ $(id -u) == 0 ]] || { echo "bench-restart.sh: run as root" >&2; exit 2; }
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/migsafe
WORK=$(mktemp -d /tmp/migsafe-bench-restart.XXXXXX)
KEEPER=""
cleanup() {
	umount -l "$WORK/mnt" 2>/dev/null || true
	if [[ -n $KEEPER ]]; then kill "$KEEPER" 2>/dev/null || true; fi
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/back" "$WORK/mnt"
for i in $(seq 1 "$IMAGES"); do truncate -s 16M "$WORK/back/img$i.raw"; done
"$BIN" mount --io "$IO" --pid-file "$WORK/pid" --state-file "$WORK/state.json" \
	--log-file "$WORK/log" "$WORK/back" "$WORK/mnt" &
KEEPER=$!
for _ in $(seq 100); do
	[[ -s $WORK/pid && $(cat "$WORK/pid") != "$KEEPER" ]] && break
	sleep 0.1
done
/usr/bin/python3 - "$WORK" "$KEEPER" "$HANDLES" "$REPS" <<'EOF'
import os, signal, sys, threading, time
work, keeper, handles, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mnt = work + "/mnt"
fds = [os.open(f"{mnt}/img{i}.raw", os.O_RDWR) for i in range(1, handles + 1)]
stall = [0.0]
stop = False
def reader():
    i = 0
    while not stop:
        t = time.monotonic()
        os.pread(fds[i % len(fds)], 4096, (i * 4096) % (16 << 20))
        stall[0] = max(stall[0], time.monotonic() - t)
        i += 1
threading.Thread(target=reader, daemon=True).start()
def serving():
    return int(open(work + "/pid").read())
fresh = [0]
def first_answer(since):
    while True:
        fresh[0] += 1
        try:
            os.stat(f"{mnt}/never-{fresh[0]}")
        except FileNotFoundError:
            return time.monotonic() - since
def event(kind):
    time.sleep(0.5)
    stall[0] = 0.0
    old = serving()
    t = time.monotonic()
    if kind == "crash":
        os.kill(old, signal.SIGKILL)
    else:
        os.kill(keeper, signal.SIGUSR2)
    while serving() == old:
        time.sleep(0.001)
    took = first_answer(t)
    time.sleep(0.3)
    return took, stall[0]
for kind in ("crash", "upgrade"):
    rows = [event(kind) for _ in range(reps)]
    first = sorted(r[0] for r in rows)
    worst = sorted(r[1] for r in rows)
    print(f"{kind:8s} signal -> first answered lookup: median {first[len(first)//2]*1000:.0f} ms, "
          f"max {first[-1]*1000:.0f} ms; longest reader stall: median {worst[len(worst)//2]*1000:.0f} ms, "
          f"max {worst[-1]*1000:.0f} ms ({reps} runs)")
stop = True
EOF
echo "($IMAGES images, $HANDLES open handles, --io $IO; $(grep -c 'taking over' "$WORK/log") take-overs logged)"
