#!/usr/bin/env bash
# shellcheck disable=SC2317 # on_exit and interrupted run from traps
# qemu-migrate.sh - live-migrate a plain QEMU VM between two hosts whose images
# live on shared storage seen through migsafe, safely with cache=writeback.
#
# This is the operator's version of the standard QEMU flow (README, "Live
# migration"). It runs on an admin machine and reaches both hosts with ssh (a
# host named `localhost` is run locally). It assumes:
#   - migsafe is mounted at $MNT on both hosts over the same storage (an NFS
#     directory, or `--device NAME=/dev/mapper/LUN` for a SAN LUN);
#   - the source VM runs with its disk on the mount, e.g.
#       -drive file=$MNT/$IMAGE,format=qcow2,cache=writeback,if=virtio
#     and a QMP socket at $QMP (`-qmp unix:$QMP,server=on,wait=off`);
#   - socat is installed on both hosts (to talk to QMP).
# What it does:
#   destination: `echo IMAGE > $MNT/.ctl/inactivate` (drop what other
#                processes there cached), start QEMU with the same command
#                line plus `-S -incoming defer` ($DST_START), migration
#                capability late-block-activate on, listen on $DST:$PORT;
#   source:      migrate (at most $MIGRATE_TIMEOUT seconds); QEMU stops the
#                guest, flushes (fdatasync reaches migsafe as fsync) and
#                releases its images; `echo IMAGE > $MNT/.ctl/inactivate`
#                (sync, drop, fence);
#   destination: `echo IMAGE > $MNT/.ctl/activate` (drop this host's cached
#                pages and verify none is left); only if that succeeds, `cont`;
#   source:      quit the old QEMU.
#
# Failures. Every ssh call that fails to connect (status 255) is tried
# $SSH_RETRIES times. If a step still fails before `cont` reached the
# destination (ssh, QMP error reply, migration failed or not completed in
# $MIGRATE_TIMEOUT s, inactivate or activate refused, Ctrl-C/SIGTERM), the
# script rolls back: it quits the destination QEMU (which never ran the guest),
# cancels the migration, re-activates the image on the source if it was handed
# over, inactivates it on the destination and resumes the guest on the source.
# Once `cont` has been sent to the destination it is never undone: the guest
# runs there (checked with query-status) and the source QEMU is quit. The last
# line says where the VM runs:
#   RESULT: the VM runs on HOST ...
# or, when that cannot be made true, what the operator must do by hand.
# Ctrl-C is honoured until `cont` is sent to the destination, and then ignored
# until the handover is complete.
#
# Exit status: 0 the VM runs on the destination; 1 the migration was aborted
# and the VM runs on the source; 3 the VM runs on neither host (the source
# could not be resumed: see the message); 4 it is unknown whether the
# destination runs the guest (it could not be reached after `cont`): do not
# resume the source before its QEMU is confirmed gone.
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
MIGRATE_TIMEOUT=${MIGRATE_TIMEOUT:-600}  # seconds the migration may take
SSH_RETRIES=${SSH_RETRIES:-3}            # tries of an ssh call that cannot connect
SSH_RETRY_DELAY=${SSH_RETRY_DELAY:-2}    # seconds between them

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }

# on HOST CMD...: run a shell command on a host. ssh's own failures (status
# 255: no connection) are retried; the command's status is returned.
on() {
    local host=$1 try rc
    shift
    if [[ $host == localhost ]]; then
        bash -c "$*"
        return
    fi
    for ((try = 1; ; try++)); do
        rc=0
        ssh -o BatchMode=yes -o ConnectTimeout=10 "root@$host" "$*" || rc=$?
        if ((rc != 255 || try >= SSH_RETRIES)); then
            return "$rc"
        fi
        warn "   ssh to $host failed (try $try of $SSH_RETRIES), retrying"
        sleep "$SSH_RETRY_DELAY"
    done
}

# qmp HOST JSON: one QMP command on a host; prints QEMU's reply. Fails if the
# host or QEMU cannot be reached or QEMU answers with an error.
qmp() {
    local host=$1 cmd=$2 reply
    # Lines without events: QEMU's greeting, qmp_capabilities' reply, then
    # the command's.
    reply=$(on "$host" "set -o pipefail; printf '%s\n%s\n' '{\"execute\":\"qmp_capabilities\"}' '$cmd' |
        socat -t 30 - 'UNIX-CONNECT:$QMP' | grep -v '\"event\"' | sed -n 3p") || {
        warn "   QMP $cmd on $host: no answer"
        return 1
    }
    if [[ $reply != *'"return"'* ]]; then
        warn "   QMP $cmd on $host failed: ${reply:-no reply}"
        return 1
    fi
    printf '%s\n' "$reply"
}

# ctl HOST COMMAND: echo IMAGE > MNT/.ctl/COMMAND on HOST; the write fails
# (and so does this function) if the command failed; the result is printed.
ctl() {
    on "$1" "exec 3<>'$MNT/.ctl/$2' && printf '%s\n' '$IMAGE' >&3; rc=\$?; cat <&3; exit \$rc"
}

migration_status() { # HOST: prints the status, fails if it cannot be read
    local reply
    reply=$(qmp "$1" '{"execute":"query-migrate"}') || return 1
    # Before any migration query-migrate returns {}.
    sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p' <<<"$reply" | grep . || echo none
}

vm_status() { # HOST: running, paused, postmigrate, ...; fails if unreachable
    local reply
    reply=$(qmp "$1" '{"execute":"query-status"}') || return 1
    sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p' <<<"$reply"
}

# stop_vm HOST: quit the QEMU on HOST and make sure it is gone (its QMP
# socket refuses connections); fails if that cannot be confirmed.
stop_vm() {
    local host=$1 i rc
    for ((i = 0; i < 10; i++)); do
        qmp "$host" '{"execute":"quit"}' >/dev/null 2>&1 || true
        rc=0
        on "$host" "socat -u OPEN:/dev/null 'UNIX-CONNECT:$QMP'" 2>/dev/null || rc=$?
        case $rc in
        0) sleep 0.5 ;;  # still answering
        255) ;;          # host unreachable: try again
        *) return 0 ;;   # nothing listens: QEMU is gone
        esac
    done
    return 1
}

DST_STARTED=0 # a destination QEMU may exist
SRC_HANDED=0  # inactivate was sent on the source: the image may be inactive there
CONT_SENT=0   # cont was sent to the destination: no way back
FINISHED=0

# rollback REASON: the guest goes back to (or stays on) the source.
rollback() {
    trap '' INT TERM
    set +e
    FINISHED=1
    warn "ABORT: $1; rolling back to $SRC"
    local dst_note="" st i
    if ((DST_STARTED)); then
        if stop_vm "$DST"; then
            dst_note="the destination QEMU on $DST was quit"
        else
            dst_note="the destination QEMU on $DST could not be confirmed gone; it is paused and never ran the guest: quit it there, never cont it"
        fi
        ctl "$DST" inactivate >/dev/null 2>&1 ||
            dst_note+="; the image could not be inactivated on $DST (run 'echo $IMAGE > $MNT/.ctl/inactivate' there)"
    fi
    qmp "$SRC" '{"execute":"migrate_cancel"}' >/dev/null
    for ((i = 0; i < 60; i++)); do
        st=$(migration_status "$SRC") || break
        [[ $st == cancelling || $st == active || $st == setup ]] || break
        sleep 0.5
    done
    if ((SRC_HANDED)); then
        # Take the image back: re-reads it from storage.
        if ! ctl "$SRC" activate; then
            say "RESULT: the VM runs on NEITHER host: activate on $SRC failed; the guest is paused on $SRC (${dst_note:-no destination QEMU}). Fix the cause, then on $SRC: echo $IMAGE > $MNT/.ctl/activate and QMP cont"
            exit 3
        fi
    fi
    qmp "$SRC" '{"execute":"cont"}' >/dev/null
    st=$(vm_status "$SRC")
    if [[ $st == running ]]; then
        say "RESULT: the VM runs on $SRC (source); migration aborted: $1${dst_note:+; $dst_note}"
        exit 1
    fi
    say "RESULT: the VM runs on NEITHER host: cont on $SRC failed (status ${st:-unknown}); the guest is intact on $SRC: resume it there with QMP cont${dst_note:+; $dst_note}"
    exit 3
}

on_exit() {
    local rc=$?
    ((FINISHED)) && exit "$rc"
    # Any step failing under set -e lands here.
    if ((CONT_SENT)); then
        finish_on_dst
    fi
    rollback "a step failed (status $rc)"
}

interrupted() {
    if ((CONT_SENT)); then
        warn "   $1 ignored: the handover to $DST is being completed"
        return
    fi
    rollback "interrupted by $1"
}

# finish_on_dst: cont was sent (or tried) on the destination; the guest must
# run there. The source is quit only once the destination runs.
finish_on_dst() {
    trap '' INT TERM
    set +e
    FINISHED=1
    local st i
    for ((i = 0; i < 3; i++)); do
        st=$(vm_status "$DST") || st=unreachable
        [[ $st == running ]] && break
        [[ $st == unreachable ]] && continue
        qmp "$DST" '{"execute":"cont"}' >/dev/null
    done
    case $st in
    running) ;;
    unreachable)
        say "RESULT: UNKNOWN: cont was sent to $DST but it cannot be reached; the guest runs on $DST or nowhere. Do NOT resume $SRC before the QEMU on $DST is confirmed gone (its image there is active)"
        exit 4
        ;;
    *)
        # Reachable and not running: it never ran the guest, go back.
        FINISHED=0
        CONT_SENT=0
        rollback "cont on $DST failed (status $st)"
        ;;
    esac
    local src_note=""
    say "== source $SRC: quit the old QEMU"
    if ! stop_vm "$SRC"; then
        src_note="; the old QEMU on $SRC could not be quit: it is paused with its image inactive, quit it there and never cont it"
    fi
    say "RESULT: the VM runs on $DST (destination)$src_note"
    exit 0
}

trap on_exit EXIT
trap 'interrupted SIGINT' INT
trap 'interrupted SIGTERM' TERM

say "== destination $DST: start QEMU paused, waiting for the migration stream"
# If other processes on the destination may have read the image, drop what
# they cached now, before QEMU opens it.
ctl "$DST" inactivate || rollback "inactivate on $DST failed"
DST_STARTED=1
on "$DST" "$DST_START" || rollback "starting QEMU on $DST failed"
qmp "$DST" '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"late-block-activate","state":true}]}}' >/dev/null ||
    rollback "enabling late-block-activate on $DST failed"
qmp "$DST" "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:0.0.0.0:$PORT\"}}" >/dev/null ||
    rollback "migrate-incoming on $DST failed"

say "== source $SRC: migrate"
if ! qmp "$SRC" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:$DST:$PORT\"}}" >/dev/null; then
    # The command may have reached QEMU although its answer did not reach us.
    st=$(migration_status "$SRC") || rollback "migrate on $SRC failed"
    [[ $st == none || $st == failed || $st == cancelled ]] && rollback "migrate on $SRC failed"
fi
deadline=$((SECONDS + MIGRATE_TIMEOUT))
while :; do
    st=$(migration_status "$SRC") || rollback "cannot query the migration on $SRC"
    case $st in
    completed) break ;;
    failed | cancelled | none) rollback "migration $st" ;;
    esac
    ((SECONDS < deadline)) || rollback "migration still $st after $MIGRATE_TIMEOUT s"
    sleep 0.5
done
# The destination must have loaded the whole state before it may run.
while :; do
    st=$(migration_status "$DST") || rollback "cannot query the migration on $DST"
    case $st in
    completed) break ;;
    failed | cancelled) rollback "incoming migration $st on $DST" ;;
    esac
    ((SECONDS < deadline)) || rollback "incoming migration still $st after $MIGRATE_TIMEOUT s"
    sleep 0.2
done
say "   migration completed; the guest is paused on both hosts"

say "== source $SRC: hand the image over (sync, drop cache, fence writes)"
SRC_HANDED=1
ctl "$SRC" inactivate || rollback "inactivate on $SRC failed"

say "== destination $DST: take the image over (drop cache, verify it is gone)"
ctl "$DST" activate || rollback "activate on $DST failed"

say "== destination $DST: run the guest"
trap '' INT TERM
CONT_SENT=1
qmp "$DST" '{"execute":"cont"}' >/dev/null || true
finish_on_dst
