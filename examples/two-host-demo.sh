#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup runs from a trap
# two-host-demo.sh - the stale read that migsafe prevents, on one machine.
#
# Two loop devices over one image file behave like two hosts on one SAN LUN:
# each block device has its own page cache. This demo mounts migsafe twice,
# `--device disk=/dev/loopA` as "host A" and `--device disk=/dev/loopB` as
# "host B", then:
#   1. host B reads block 0 (a VMM on the destination opening the image): B's
#      page cache now holds the old block;
#   2. host A writes new data to block 0 and hands the image over
#      (`echo disk > .ctl/inactivate`: sync, drop, stop writing);
#   3. host B reads block 0 without `activate`: the OLD data (stale read);
#   4. host B runs `echo disk > .ctl/activate` and reads again: the NEW data.
# Everything it creates (temp dir, loop devices, mounts, daemons) is removed on
# exit. Needs root. Uses `migsafe` from PATH, or $MIGSAFE.
# Exit status: 0 if the demo showed both the stale and the fresh read.
set -Eeuo pipefail

MIGSAFE=${MIGSAFE:-migsafe}
MIGSAFE=$(command -v "$MIGSAFE") || { echo "migsafe not found: put it on PATH or set MIGSAFE" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run as root: the demo attaches loop devices and mounts" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/migsafe-demo.XXXXXX")
PIDS=() MOUNTS=() LOOPS=()

cleanup() {
    local rc=$? p m i
    set +e
    exec 3<&- 2>/dev/null
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    for p in "${PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    for p in "${LOOPS[@]}"; do
        # A detach of a device still open is deferred (autoclear) and finishes
        # asynchronously after the last close: wait until it is really gone.
        for ((i = 0; i < 100; i++)); do
            [[ $(cat "/sys/block/${p#/dev/}/loop/backing_file" 2>/dev/null) == "$WORK"/* ]] || break
            losetup -d "$p" 2>/dev/null
            sleep 0.1
        done
    done
    rm -rf --one-file-system "$WORK"
    echo "cleaned up: mounts unmounted, loop devices detached, $WORK removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP # run the cleanup when interrupted too

say() { printf '\n== %s\n' "$*"; }

# block0 MOUNT: the first 24 bytes of the image's block 0, as text
block0() { dd if="$1/disk" bs=24 count=1 status=none | tr -c '[:print:]' '.'; }

# ctl MOUNT COMMAND: echo disk > MOUNT/.ctl/COMMAND, and print the result line
ctl() {
    local fd rc=0
    exec {fd}<>"$1/.ctl/$2"
    { printf 'disk\n' >&"$fd"; } 2>/dev/null || rc=$?
    echo "   echo disk > ${1##*/}/.ctl/$2  ->  $(cat <&"$fd")"
    exec {fd}>&-
    return "$rc"
}

say "setup: one image file, two loop devices, one migsafe mount per \"host\""
OLD=$(printf 'OLD DATA written at setup')
NEW=$(printf 'NEW DATA written by hostA')
{ printf '%s' "$OLD"; head -c $((4096 - ${#OLD})) /dev/zero; } >"$WORK/lun.img"
truncate -s 16M "$WORK/lun.img"
for h in A B; do
    dev=$(losetup --find --show "$WORK/lun.img")
    LOOPS+=("$dev")
    mkdir -p "$WORK/empty$h" "$WORK/host$h"
    "$MIGSAFE" mount --device "disk=$dev" "$WORK/empty$h" "$WORK/host$h" \
        </dev/null >"$WORK/migsafe-$h.log" 2>&1 &
    PIDS+=($!)
    MOUNTS+=("$WORK/host$h")
    for ((i = 0; ; i++)); do
        mountpoint -q "$WORK/host$h" && break
        kill -0 "$!" 2>/dev/null || { cat "$WORK/migsafe-$h.log" >&2; exit 1; }
        ((i < 300)) || { echo "host$h not mounted" >&2; exit 1; }
        sleep 0.05
    done
    echo "   host$h: $dev mounted by migsafe at $WORK/host$h (image: host$h/disk)"
done
A=$WORK/hostA B=$WORK/hostB

say "1. host B opens the image and reads block 0 (it stays open, like a VMM's)"
exec 3<"$B/disk"
echo "   hostB reads: '$(block0 "$B")'"

say "2. host A writes block 0, then hands over: inactivate (sync + drop + fence)"
{ printf '%s' "$NEW"; head -c $((4096 - ${#NEW})) /dev/zero; } |
    dd of="$A/disk" bs=4096 count=1 iflag=fullblock conv=notrunc status=none
ctl "$A" inactivate

say "3. host B reads block 0 WITHOUT activate"
got=$(block0 "$B")
if [[ $got == "${OLD:0:24}" ]]; then
    echo "   hostB reads: '$got'  <- STALE read: host B's page cache still holds the old block"
    stale=1
else
    echo "   hostB reads: '$got'  (expected the stale old block; this machine did not reproduce it)"
    stale=0
fi

say "4. host B activates the image (drop + verify nothing is cached), reads again"
ctl "$B" activate
got=$(block0 "$B")
if [[ $got == "${NEW:0:24}" ]]; then
    echo "   hostB reads: '$got'  <- FRESH read: host B sees what host A wrote"
    fresh=1
else
    echo "   hostB reads: '$got'  <- WRONG: still not the data host A wrote"
    fresh=0
fi

echo
if ((stale && fresh)); then
    echo "demo: without activate the stale read was seen; with activate the fresh data"
    exit 0
fi
echo "demo: FAILED (stale read seen: $stale, fresh read after activate: $fresh)"
exit 1
