#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup functions run from traps
# qemu-migrate-e2e.sh - live-migrate a real QEMU VM between two QEMU processes
# on this machine, with its disk image on two migsafe mounts that stand for two
# hosts sharing one storage, and check that the destination reads what the
# source wrote (docs/DESIGN.md §3, "Standard flows").
#
# Two-host beds (docs/DESIGN.md §1):
#   --backing loop  one image file, two loop devices over it (two "hosts" on one
#                   SAN LUN, each with its own page cache); host A mounts
#                   `migsafe mount --device IMG=/dev/loopA`, host B the same
#                   with /dev/loopB.
#   --backing dir   one directory, two mergerfs cache.files=full mounts of it
#                   (two NFS clients that never revalidate); a migsafe
#                   `--io relay` mount over each.
#
# Flow: source QEMU (host A) writes 0x5a at [0,4M) and flushes; the destination
# QEMU (host B) starts with -incoming and late-block-activate, and a holder on
# host B reads the image so B's page cache holds the old blocks; the source then
# writes 0xa5 at [0,1M) and 0x3c at [8M,10M) (qcow2: new clusters, new L2
# entries), migrates over 127.0.0.1, `inactivate` on A, `activate` on B, `cont`
# on B, and B's `qemu-io read -P` verifies every pattern.
#
# Options:
#   --format raw|qcow2   image format (default raw)
#   --backing loop|dir   two-host bed (default loop)
#   --no-activate        negative control: skip `activate` on the destination
#                        and switch off QEMU's own invalidation there
#                        (file.drop-cache=off); the destination must then read
#                        stale data (exit 3)
#   --qemu-only          no control command at all: the migration relies on
#                        QEMU's own drop-cache on the destination, which reaches
#                        the FUSE page cache of the cached device path
#   --cancel             failed migration: the source is stopped and
#                        inactivated mid-migration, the migration is cancelled,
#                        the source re-activates, continues and must still read
#                        and write its data
#   --migsafe PATH       migsafe binary (default: $MIGSAFE or `migsafe` on PATH)
#   --io MODE            data path of the dir bed's migsafe mounts (default relay)
#   --device-io MODE     data path of the loop bed's devices (default cached)
#   --writeback MODE     the loop bed's mounts' --writeback (off, auto, on;
#                        default: migsafe's own default)
#   --direct             bed check without migsafe: QEMU opens the loop devices
#                        or mergerfs files itself; --no-activate then means the
#                        destination's file.drop-cache=off
#   --kill-daemons N     SIGKILL the serving process of host A N times while
#                        its guest disk writes and reads (each write read back
#                        after the restart), and once more between
#                        `inactivate` and the destination's `activate`; the
#                        source must stay fenced (a write through A: EROFS)
#
# Exit status: 0 all patterns verified (PASS), 3 a pattern check failed (STALE),
# 4 a migsafe control command failed, 5 an inactive image accepted a write,
# 2 (or other) infrastructure error. Needs root. Everything it creates (temp
# dir, loop devices, mounts, processes) is removed on exit, also on failure.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

FORMAT=raw
BACKING=loop
ACTIVATE=1
CANCEL=0
DIRECT=0
IO=relay
DEVICE_IO=cached
WRITEBACK=""
QEMU_ONLY=0
KILLS=0
MIGSAFE=${MIGSAFE:-migsafe}

usage() {
    sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

while (($#)); do
    case $1 in
    --format) FORMAT=${2:?}; shift 2 ;;
    --backing) BACKING=${2:?}; shift 2 ;;
    --no-activate) ACTIVATE=0; shift ;;
    --cancel) CANCEL=1; shift ;;
    --migsafe) MIGSAFE=${2:?}; shift 2 ;;
    --io) IO=${2:?}; shift 2 ;;
    --device-io) DEVICE_IO=${2:?}; shift 2 ;;
    --writeback) WRITEBACK=${2:?}; shift 2 ;;
    --qemu-only) QEMU_ONLY=1; ACTIVATE=0; shift ;;
    --direct) DIRECT=1; shift ;;
    --kill-daemons) KILLS=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
case $FORMAT in raw | qcow2) ;; *) usage ;; esac
case $BACKING in loop | dir) ;; *) usage ;; esac

trap_errors
require_root
require_tools qemu-system-x86_64 qemu-img python3 losetup mountpoint
if ((!DIRECT)); then
    MIGSAFE=$(command -v "$MIGSAFE") || die "migsafe binary not found (use --migsafe PATH)"
fi
[[ $BACKING == dir ]] && { command -v mergerfs >/dev/null || die "mergerfs is not installed"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/migsafe-qemu-e2e.XXXXXX")
trap_cleanup

# ---------------------------------------------------------------- helpers

cat >"$WORK/qmp.py" <<'PYEOF'
# Minimal QMP client: qmp.py SOCKET cmd NAME [JSON-ARGS] | hmp "CMDLINE" |
#                     wait-migration STATUS[,STATUS] TIMEOUT | status
import json, socket, sys, time

def connect(path, timeout=20):
    deadline = time.time() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.time() > deadline:
                sys.exit("qmp: cannot connect to %s" % path)
            time.sleep(0.05)

class QMP:
    def __init__(self, path):
        self.sock = connect(path)
        self.sock.settimeout(120)
        self.buf = b""
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                sys.exit("qmp: connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r:
                continue
            if "error" in r:
                sys.exit("qmp: %s failed: %s" % (name, r["error"].get("desc")))
            return r.get("return")

q = QMP(sys.argv[1])
op = sys.argv[2]
if op == "cmd":
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(q.cmd(sys.argv[3], args)))
elif op == "hmp":
    sys.stdout.write(q.cmd("human-monitor-command", {"command-line": sys.argv[3]}))
elif op == "wait-migration":
    want = sys.argv[3].split(",")
    deadline = time.time() + float(sys.argv[4])
    while True:
        st = q.cmd("query-migrate").get("status", "none")
        if st in want:
            print(st)
            break
        if st in ("failed", "cancelled"):
            sys.exit("qmp: migration %s" % st)
        if time.time() > deadline:
            sys.exit("qmp: migration still %s after %s s" % (st, sys.argv[4]))
        time.sleep(0.05)
elif op == "status":
    print(q.cmd("query-status")["status"])
else:
    sys.exit("qmp: unknown op " + op)
PYEOF

qmp() { python3 "$WORK/qmp.py" "$@"; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# qemu_io HOST CMD: runs `qemu-io d0 "CMD"` in QEMU's monitor; fails (status 1)
# if qemu-io reported a failed request or a pattern mismatch. qemu-io prints to
# QEMU's stdout (not into the monitor reply), so its output is taken from the
# log that QEMU's stdout goes to.
qemu_io() {
    local host=$1 cmd=$2 out before
    before=$(stat -c %s "$WORK/qemu-$host.log")
    qmp "$WORK/qmp-$host.sock" hmp "qemu-io d0 \"$cmd\"" >/dev/null
    out=$(tail -c +$((before + 1)) "$WORK/qemu-$host.log")
    log "    $host: qemu-io $cmd: $(echo "$out" | grep -v '^[0-9.]* [KMG]*i*B, ' | tr '\n' ' ')"
    if grep -qiE 'fail|error|mismatch|denied|read-only' <<<"$out"; then
        return 1
    fi
}

# ctl MOUNT COMMAND IMAGE: writes IMAGE to MOUNT/.ctl/COMMAND as a shell script
# would, reads the result back on the same open file, returns the write status.
ctl() {
    local mnt=$1 cmd=$2 img=$3 rc=0 out t0 t1
    t0=$(date +%s%N)
    out=$(ctl_request "$mnt" "$cmd" "$img") || rc=$?
    t1=$(date +%s%N)
    log "    ${mnt##*/}: echo $img > .ctl/$cmd -> status $rc ($(((t1 - t0) / 1000000)) ms) ${out//$'\n'/ }"
    return "$rc"
}

start_migsafe() { # host backing_dir mountpoint extra-args...
    spawn_migsafe "$@" --pid-file "$WORK/migsafe-$1.pid"
    wait_mounted "$3" "$!" "$3" "$WORK/migsafe-$1.log"
}

# kill_daemon HOST: SIGKILLs the process serving HOST's mount (the pid
# file's) and waits until its keeper's next one serves.
kill_daemon() {
    local host=$1 old new
    old=$(cat "$WORK/migsafe-$host.pid")
    kill -9 "$old"
    for _ in $(seq 200); do
        new=$(cat "$WORK/migsafe-$host.pid" 2>/dev/null || true)
        if [[ -n $new && $new != "$old" ]] && grep -q "pid $new)" "$WORK/migsafe-$host.log"; then
            log "    $host: serving process $old killed, $new serves"
            return 0
        fi
        sleep 0.05
    done
    die "host $host: no serving process 10 s after killing $old"
}

# start_qemu HOST IMAGE_PATH [incoming] : QEMU paused (-S), QMP on $WORK/qmp-HOST.sock
start_qemu() {
    local host=$1 path=$2 incoming=${3:-} drive extra=()
    drive="if=none,id=d0,file=$path,format=$FORMAT,cache=writeback,file.locking=off"
    # The negative control switches QEMU's own drop-cache off on the
    # destination too: with --direct it is the only cache control, and on the
    # cached device path it reaches the FUSE page cache.
    if ((!ACTIVATE && !QEMU_ONLY)) && [[ $host == B ]]; then
        drive+=",file.drop-cache=off"
    fi
    [[ -n $incoming ]] && extra=(-incoming defer)
    qemu-system-x86_64 -name "migsafe-e2e-$host" -accel tcg -nodefaults -display none \
        -S -M q35 -m 64 \
        -drive "$drive" -device virtio-blk-pci,drive=d0 \
        -qmp "unix:$WORK/qmp-$host.sock,server=on,wait=off" \
        "${extra[@]}" </dev/null >"$WORK/qemu-$host.log" 2>&1 &
    PIDS+=($!)
    eval "QEMU_PID_$host=$!"
    qmp "$WORK/qmp-$host.sock" status >/dev/null
}

# ---------------------------------------------------------------- the beds

case $FORMAT in raw) IMG=disk.img ;; qcow2) IMG=disk.qcow2 ;; esac
SIZE=16M # virtual disk size

if [[ $BACKING == loop ]]; then
    # One image file, two loop devices: each has its own page cache.
    if [[ $FORMAT == qcow2 ]]; then
        qemu-img create -q -f qcow2 "$WORK/shared.img" "$SIZE"
    fi
    truncate -s 32M "$WORK/shared.img" # room for qcow2 clusters on the "LUN"
    LOOP_A=$(losetup --find --show "$WORK/shared.img")
    LOOPS+=("$LOOP_A")
    LOOP_B=$(losetup --find --show "$WORK/shared.img")
    LOOPS+=("$LOOP_B")
    log "bed: loop devices $LOOP_A (host A) and $LOOP_B (host B) over one image"
    if ((DIRECT)); then
        PATH_A=$LOOP_A PATH_B=$LOOP_B
    else
        mkdir -p "$WORK/empty-A" "$WORK/empty-B"
        start_migsafe A "$WORK/empty-A" "$WORK/mnt-A" --device "$IMG=$LOOP_A" --device-io "$DEVICE_IO" \
            ${WRITEBACK:+--writeback "$WRITEBACK"}
        start_migsafe B "$WORK/empty-B" "$WORK/mnt-B" --device "$IMG=$LOOP_B" --device-io "$DEVICE_IO" \
            ${WRITEBACK:+--writeback "$WRITEBACK"}
        PATH_A=$WORK/mnt-A/$IMG PATH_B=$WORK/mnt-B/$IMG
    fi
else
    # One directory, two mergerfs cache.files=full mounts: two NFS-like clients.
    mkdir -p "$WORK/shared" "$WORK/lower-A" "$WORK/lower-B"
    # The host file is made 32 MiB up front (qcow2 allocates its new clusters
    # inside it): a file that grows makes FUSE (mergerfs) drop its cache on the
    # size change, which would hide the stale read of the negative control.
    if [[ $FORMAT == qcow2 ]]; then
        qemu-img create -q -f qcow2 "$WORK/shared/$IMG" "$SIZE"
    fi
    truncate -s 32M "$WORK/shared/$IMG"
    for h in A B; do
        mergerfs -o cache.files=full,fsname=migsafe-e2e-$h "$WORK/shared" "$WORK/lower-$h"
        LOWER_MOUNTS+=("$WORK/lower-$h")
    done
    log "bed: mergerfs cache.files=full mounts lower-A and lower-B over one directory"
    if ((DIRECT)); then
        PATH_A=$WORK/lower-A/$IMG PATH_B=$WORK/lower-B/$IMG
    else
        start_migsafe A "$WORK/lower-A" "$WORK/mnt-A" --io "$IO"
        start_migsafe B "$WORK/lower-B" "$WORK/mnt-B" --io "$IO"
        PATH_A=$WORK/mnt-A/$IMG PATH_B=$WORK/mnt-B/$IMG
    fi
fi
MNT_A=$WORK/mnt-A
MNT_B=$WORK/mnt-B
SOCK_A=$WORK/qmp-A.sock
SOCK_B=$WORK/qmp-B.sock
MODE=$([[ $DIRECT == 1 ]] && echo direct || echo migsafe)
log "test: format=$FORMAT backing=$BACKING mode=$MODE activate=$ACTIVATE cancel=$CANCEL"

# ---------------------------------------------------------------- the flow

# 1. Source VM on host A; the guest's disk gets its first data, flushed.
start_qemu A "$PATH_A"
qemu_io A "write -P 0x5a 0 4M" || die "source write failed"
qemu_io A "flush" || die "source flush failed"
qmp "$SOCK_A" cmd cont >/dev/null

# 2. Destination QEMU on host B: -incoming defer, late-block-activate, -S.
start_qemu B "$PATH_B" incoming
qmp "$SOCK_B" cmd migrate-set-capabilities \
    '{"capabilities":[{"capability":"late-block-activate","state":true}]}' >/dev/null
for attempt in 1 2 3 4 5; do
    PORT=$(free_port)
    if qmp "$SOCK_B" cmd migrate-incoming "{\"uri\":\"tcp:127.0.0.1:$PORT\"}" >/dev/null; then
        break
    fi
    ((attempt < 5)) || die "migrate-incoming failed"
done
log "destination listening on 127.0.0.1:$PORT"

# 3. Something on host B caches the image before the source's last writes: a
#    holder keeps it open (a block device's cache lives as long as it is open)
#    and a reader pulls the first 16 MiB (data, qcow2 header/L1/L2/refcounts).
sleep 1000000 3<"$PATH_B" &
PIDS=("$!" "${PIDS[@]}") # the cleanup stops the holder before the QEMUs
dd if="$PATH_B" of=/dev/null bs=1M count=16 status=none
log "host B cached the image (holder pid ${PIDS[0]})"

# 3b. Crashes of the source's serving process under the guest's disk I/O:
#     every write is read back by the next serving process.
for k in $(seq 1 "$KILLS"); do
    pattern=$(printf '0x%02x' $((0x10 + k)))
    at=$((4096 + k * 256))k
    qemu_io A "write -P $pattern $at 64k" || die "source write before crash $k failed"
    kill_daemon A
    qemu_io A "read -P $pattern $at 64k" || die "source read after crash $k failed"
    qemu_io A "flush" || die "source flush after crash $k failed"
done

# 4. The source guest keeps writing: in place, and (qcow2) into new clusters.
qemu_io A "write -P 0xa5 0 1M" || die "source write failed"
qemu_io A "write -P 0x3c 8M 2M" || die "source write failed"

CHECKS=()
FAILED=0
check() { # host cmd
    if qemu_io "$1" "$2"; then
        CHECKS+=("ok:$2")
    else
        CHECKS+=("FAILED:$2")
        FAILED=$((FAILED + 1))
    fi
}

if ((CANCEL)); then
    # 5c. A migration that fails: slow migration, the source reaches its
    #     switchover step (guest stopped, image inactivated), then the
    #     migration is cancelled and the source takes over again.
    qmp "$SOCK_A" cmd migrate-set-parameters '{"max-bandwidth":4096}' >/dev/null
    qmp "$SOCK_A" cmd migrate "{\"uri\":\"tcp:127.0.0.1:$PORT\"}" >/dev/null
    qmp "$SOCK_A" wait-migration active 30 >/dev/null
    qmp "$SOCK_A" cmd stop >/dev/null # stop flushes the guest's writes
    FENCE=n/a
    if ((!DIRECT)); then
        ctl "$MNT_A" inactivate "$IMG" || { log "inactivate on source failed"; exit 4; }
        # An inactive image must refuse writes that reach the daemon (EROFS),
        # and the region must keep 0x5a. Passthrough writes bypass the daemon:
        # `status` then reports the fencing as partial and the probe is skipped.
        fencing=$(python3 -c 'import json,sys
st = json.load(open(sys.argv[1]))
print(next((i.get("fencing", "?") for i in st.get("images", []) if i.get("path") == sys.argv[2]), "?"))' \
            "$MNT_A/.ctl/status" "$IMG")
        if [[ $fencing == partial ]]; then
            FENCE=partial
            log "fencing of $IMG on host A is partial (passthrough): write probe skipped"
        elif qemu_io A "write -P 0xee 2M 64k"; then
            FENCE=FAILED
            log "source wrote to an inactive image (status says fencing=$fencing)"
        else
            FENCE=full
        fi
    fi
    sleep 0.5
    st=$(qmp "$SOCK_A" cmd query-migrate)
    [[ $st == *'"active"'* ]] || die "migration not active before cancel: $st"
    qmp "$SOCK_A" cmd migrate_cancel >/dev/null
    qmp "$SOCK_A" wait-migration cancelled 30 >/dev/null
    log "migration cancelled"
    if ((!DIRECT)); then
        ctl "$MNT_A" activate "$IMG" || { log "re-activate on source failed"; exit 4; }
    fi
    qmp "$SOCK_A" cmd cont >/dev/null
    [[ $(qmp "$SOCK_A" status) == running ]] || die "source not running after cont"
    check A "read -P 0xa5 0 1M"
    check A "read -P 0x5a 1M 3M"
    check A "read -P 0x3c 8M 2M"
    check A "write -P 0x77 12M 1M"
    check A "flush"
    check A "read -P 0x77 12M 1M"
    HOST=A
else
    # 5. Live migration; at its end the source QEMU stops the guest, flushes
    #    (fdatasync -> FUSE fsync) and inactivates its images.
    qmp "$SOCK_A" cmd migrate "{\"uri\":\"tcp:127.0.0.1:$PORT\"}" >/dev/null
    qmp "$SOCK_A" wait-migration completed 120 >/dev/null
    qmp "$SOCK_B" wait-migration completed 30 >/dev/null
    log "migration completed; source is $(qmp "$SOCK_A" status), destination is $(qmp "$SOCK_B" status)"
    # 6. Handover of the image: inactivate on the source, activate on the
    #    destination, and only if that worked, run the guest there.
    if ((QEMU_ONLY)); then
        log "no control commands: relying on QEMU's own drop-cache on the destination"
    elif ((!DIRECT)); then
        ctl "$MNT_A" inactivate "$IMG" || { log "inactivate on source failed"; exit 4; }
        if ((KILLS)); then
            kill_daemon A
            if dd if=/dev/zero of="$MNT_A/$IMG" bs=4k count=1 seek=1024 conv=notrunc,fsync status=none 2>"$WORK/dd.err"; then
                log "the source's image took a write after a crash of its daemon: not fenced"
                exit 5
            fi
            grep -q "Read-only file system" "$WORK/dd.err" || die "write after the crash: $(cat "$WORK/dd.err")"
            log "    A: still fenced after the crash (EROFS)"
        fi
        if ((ACTIVATE)); then
            ctl "$MNT_B" activate "$IMG" || { log "activate on destination failed"; exit 4; }
        else
            log "negative control: NOT activating on the destination"
        fi
    fi
    qmp "$SOCK_B" cmd cont >/dev/null
    [[ $(qmp "$SOCK_B" status) == running ]] || die "destination not running after cont"
    # 7. The destination must see every byte the source wrote.
    check B "read -P 0xa5 0 1M"
    check B "read -P 0x5a 1M 3M"
    check B "read -P 0x3c 8M 2M"
    check B "read -P 0 10M 6M"
    HOST=B
fi

# The data path(s) QEMU's image used, from the mount's status.
DATA_PATH=n/a
if ((!DIRECT)); then
    mnt=$MNT_B
    ((CANCEL)) && mnt=$MNT_A
    DATA_PATH=$(python3 -c 'import json,sys
st = json.load(open(sys.argv[1]))
paths = {h.get("data_path", "?") for i in st.get("images", []) if i.get("path") == sys.argv[2]
         for h in i.get("open_handles", [])}
print(",".join(sorted(paths)) or "none")' "$mnt/.ctl/status" "$IMG") || DATA_PATH=unknown
fi
SUMMARY="data_path=$DATA_PATH format=$FORMAT backing=$BACKING mode=$MODE activate=$ACTIVATE qemu_only=$QEMU_ONLY cancel=$CANCEL${FENCE:+ fencing=$FENCE}"
for c in "${CHECKS[@]}"; do echo "check host=$HOST ${c%%:*} ${c#*:}"; done
if ((FAILED)); then
    echo "RESULT: STALE ($FAILED of ${#CHECKS[@]} checks failed) $SUMMARY"
    exit 3
fi
if [[ ${FENCE:-ok} == FAILED ]]; then
    echo "RESULT: FENCING FAILED (inactive image accepted a write) $SUMMARY"
    exit 5
fi
echo "RESULT: PASS (${#CHECKS[@]} checks) $SUMMARY"
exit 0
