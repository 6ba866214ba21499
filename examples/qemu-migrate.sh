#!/usr/bin/env bash
# qemu-migrate.sh - live-migrate a plain QEMU VM between two hosts whose images
# live on shared storage seen through migsafe, safely with cache=writeback.
#
# This is the operator's version of DESIGN.md section 3, "Standard flows". It
# runs on an admin machine and reaches both hosts with ssh (a host named
# `localhost` is run locally). It assumes:
#   - migsafe is mounted at $MNT on both hosts over the same storage (an NFS
#     directory, or `--device NAME=/dev/mapper/LUN` for a SAN LUN);
#   - the source VM runs with its disk on the mount, e.g.
#       -drive file=$MNT/$IMAGE,format=qcow2,cache=writeback,if=virtio
#     and a QMP socket at $QMP (`-qmp unix:$QMP,server=on,wait=off`);
#   - socat is installed on both hosts (to talk to QMP).
# What it does:
#   destination: start QEMU with the same command line plus `-S -incoming defer`
#                (done by $DST_START, see below), migration capability
#                late-block-activate on, listen on $DST:$PORT;
#   source:      migrate; QEMU stops the guest, flushes (fdatasync reaches
#                migsafe as fsync) and releases its images;
#                `echo IMAGE > $MNT/.ctl/inactivate` (sync, drop, fence);
#   destination: `echo IMAGE > $MNT/.ctl/activate` (drop this host's cached
#                pages and verify none is left); only if that succeeds, `cont`.
# On any failure before `cont` on the destination it aborts: kills the
# destination QEMU, re-activates the image on the source and resumes the guest
# there (the guest is still intact on the source).
#
# Usage: SRC=host-a DST=host-b IMAGE=vm1.qcow2 DST_START='qemu-system-x86_64 ...' \
#        ./qemu-migrate.sh
set -euo pipefail

SRC=${SRC:?set SRC to the source host}
DST=${DST:?set DST to the destination host}
IMAGE=${IMAGE:?set IMAGE to the image path relative to the migsafe mount}
MNT=${MNT:-/run/migsafe}                 # migsafe mountpoint, same on both hosts
QMP=${QMP:-/run/qemu/vm1.qmp}            # QMP socket of the VM, same on both hosts
PORT=${PORT:-49152}                      # migration port on the destination
# The destination's QEMU command line: the source's, plus -S -incoming defer.
# It must daemonize (-daemonize) so ssh returns.
DST_START=${DST_START:?set DST_START to the destination QEMU command line}

# on HOST CMD...: run a shell command on a host
on() {
    local host=$1
    shift
    if [[ $host == localhost ]]; then
        bash -c "$*"
    else
        ssh -o BatchMode=yes "root@$host" "$*"
    fi
}

# qmp HOST JSON: one QMP command on a host, prints QEMU's reply
qmp() {
    local host=$1 cmd=$2
    on "$host" "printf '%s\n%s\n' '{\"execute\":\"qmp_capabilities\"}' '$cmd' |
        socat -t 30 - UNIX-CONNECT:$QMP | grep -v '\"event\"' | tail -n 1"
}

# ctl HOST COMMAND: echo IMAGE > MNT/.ctl/COMMAND on HOST; the write fails
# (and so does this function) if the command failed; the result is printed.
ctl() {
    on "$1" "exec 3<>'$MNT/.ctl/$2' && printf '%s\n' '$IMAGE' >&3; rc=\$?; cat <&3; exit \$rc"
}

migration_status() { qmp "$1" '{"execute":"query-migrate"}' | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p'; }

DST_STARTED=0
abort() {
    echo "ABORT: $*; the guest stays on $SRC" >&2
    if ((DST_STARTED)); then
        qmp "$DST" '{"execute":"quit"}' >/dev/null || true
    fi
    qmp "$SRC" '{"execute":"migrate_cancel"}' >/dev/null || true
    # The source may have handed over already: take the image back (re-reads it
    # from storage), then let QEMU re-activate and run the guest.
    ctl "$SRC" activate || echo "WARNING: re-activate on $SRC failed, check 'migsafe ctl $MNT status'" >&2
    qmp "$SRC" '{"execute":"cont"}'
    exit 1
}

echo "== destination $DST: start QEMU paused, waiting for the migration stream"
# If other processes on the destination may have read the image, drop what
# they cached now, before QEMU opens it.
ctl "$DST" inactivate || abort "inactivate on $DST failed"
on "$DST" "$DST_START" || abort "starting QEMU on $DST failed"
DST_STARTED=1
qmp "$DST" '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"late-block-activate","state":true}]}}'
qmp "$DST" "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:0.0.0.0:$PORT\"}}"

echo "== source $SRC: migrate"
qmp "$SRC" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:$DST:$PORT\"}}"
while :; do
    st=$(migration_status "$SRC")
    case $st in
    completed) break ;;
    failed | cancelled) abort "migration $st" ;;
    esac
    sleep 0.5
done
echo "   migration completed; the guest is paused on both hosts"

echo "== source $SRC: hand the image over (sync, drop cache, fence writes)"
ctl "$SRC" inactivate || abort "inactivate on $SRC failed"

echo "== destination $DST: take the image over (drop cache, verify it is gone)"
ctl "$DST" activate || abort "activate on $DST failed"

echo "== destination $DST: run the guest"
qmp "$DST" '{"execute":"cont"}'
DST_STARTED=0
echo "== source $SRC: quit the old QEMU"
qmp "$SRC" '{"execute":"quit"}' >/dev/null || true
echo "done: the VM runs on $DST"
