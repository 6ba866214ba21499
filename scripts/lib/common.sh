# shellcheck shell=bash
# shellcheck disable=SC2317 # cleanup functions run from traps
# scripts/lib/common.sh - helpers shared by the two-host test drivers
# scripts/soak.sh and scripts/qemu-migrate-e2e.sh. It is sourced, not run:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# Sourcing it only defines functions and the (empty) cleanup arrays below; the
# script installs the traps itself (trap_errors, trap_cleanup) when it is ready.
#
# It provides:
#   log MSG... / die MSG...   timestamped message on stderr / and exit 2
#   trap_errors               ERR trap: log the failed command and exit 2
#   require_root              die unless run as root
#   require_tools TOOL...     die unless every TOOL is on PATH
#   stop_pid PID              TERM, wait up to 5 s, then KILL
#   spawn_migsafe HOST BACKING MOUNTPOINT [ARGS...]
#                             `$MIGSAFE mount ARGS BACKING MOUNTPOINT` in the
#                             background (its state file in $WORK),
#                             registered for the cleanup
#   wait_mounted MOUNTPOINT PID LABEL [LOG]
#                             wait until a daemon has mounted
#   ctl_request MOUNT COMMAND IMAGE
#                             `echo IMAGE > MOUNT/.ctl/COMMAND`, result read back
#   show_logs                 last 30 lines of each $WORK/*.log on stderr
#   trap_cleanup              EXIT trap running `cleanup`, INT/TERM/HUP -> exit 130
#   cleanup                   tears down everything registered below, removes
#                             $WORK and exits with the script's status
#
# The sourcing script sets WORK (its temp dir) and, before spawn_migsafe,
# MIGSAFE (the migsafe binary), and registers what it creates by appending to:
PIDS=()         # processes stopped first (TERM, then KILL), in this order
DAEMON_PIDS=()  # migsafe daemons: after their unmount, given 5 s to exit
MOUNTS=()       # migsafe mounts, unmounted before their daemons are reaped
LOWER_MOUNTS=() # mounts the migsafe mounts sit on, unmounted after the daemons
LOOPS=()        # loop devices over files in $WORK, detached last

log() { printf '[%(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

trap_errors() {
    trap 'rc=$?; log "ERROR: command failed (status $rc) at line $LINENO: $BASH_COMMAND"; exit 2' ERR
}

require_root() {
    [[ $(id -u) == 0 ]] || die "needs root (loop devices and mounts)"
}

require_tools() { # TOOL...
    local t
    for t; do
        command -v "$t" >/dev/null || die "$t is not installed"
    done
}

stop_pid() { # pid: TERM, wait up to 5 s, then KILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# spawn_migsafe HOST BACKING MOUNTPOINT [ARGS...]: creates MOUNTPOINT and starts
# `$MIGSAFE mount --state-file $WORK/state-HOST.json ARGS BACKING MOUNTPOINT`
# in the background (RUST_LOG defaults to info), its output in
# $WORK/migsafe-HOST.log; registers the daemon and the
# mount for the cleanup. The daemon's pid is left in $! for wait_mounted.
spawn_migsafe() {
    local host=$1 backing=$2 mnt=$3
    shift 3
    mkdir -p "$mnt"
    # The state file in $WORK, not root's default /run/migsafe-state: a run
    # leaves nothing behind.
    RUST_LOG=${RUST_LOG:-info} "${MIGSAFE:?}" mount --state-file "$WORK/state-$host.json" \
        "$@" "$backing" "$mnt" \
        </dev/null >"$WORK/migsafe-$host.log" 2>&1 &
    DAEMON_PIDS+=($!)
    MOUNTS+=("$mnt")
}

# wait_mounted MOUNTPOINT PID LABEL [LOG]: returns once MOUNTPOINT is mounted;
# dies ("migsafe for LABEL exited before mounting", after printing LOG if
# given) if PID exits first, or ("LABEL not mounted after 15 s") on timeout.
wait_mounted() {
    local i
    for ((i = 0; i < 300; i++)); do
        mountpoint -q "$1" && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            [[ -z ${4:-} ]] || cat "$4" >&2
            die "migsafe for $3 exited before mounting"
        fi
        sleep 0.05
    done
    die "$3 not mounted after 15 s"
}

# ctl_request MOUNT COMMAND IMAGE: writes IMAGE to MOUNT/.ctl/COMMAND as a shell
# script would, prints the result read back on the same open file, returns the
# status of the write. Meant for `out=$(ctl_request ...) || rc=$?`.
ctl_request() {
    local mnt=$1 cmd=$2 img=$3 fd rc=0
    exec {fd}<>"$mnt/.ctl/$cmd"
    { printf '%s\n' "$img" >&"$fd"; } 2>/dev/null || rc=$?
    cat <&"$fd" 2>/dev/null || true
    exec {fd}>&-
    return "$rc"
}

show_logs() {
    local f
    for f in "$WORK"/*.log; do
        [[ -s $f ]] || continue
        echo "----- ${f##*/} (last 30 lines) -----" >&2
        tail -n 30 "$f" >&2
    done
}

unmount_all() { # MOUNTPOINT...: those still mounted; lazily if busy
    local m
    for m; do
        mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
}

detach_loops() { # LOOP_DEVICE...: those still backed by a file in $WORK
    local p i
    for p; do
        # A detach of a device still open is deferred (autoclear) and finishes
        # asynchronously after the last close: wait until it is really gone.
        for ((i = 0; i < 100; i++)); do
            [[ $(cat "/sys/block/${p#/dev/}/loop/backing_file" 2>/dev/null) == "$WORK"/* ]] || break
            losetup -d "$p" 2>/dev/null
            sleep 0.1
        done
    done
}

# cleanup: the EXIT trap. Shows the logs unless the status is 0 or 3 (a result,
# not an infrastructure error), then stops PIDS, unmounts MOUNTS, reaps
# DAEMON_PIDS, unmounts LOWER_MOUNTS, detaches LOOPS and removes $WORK (unless
# something is still mounted under it); exits with the script's status.
cleanup() {
    local rc=$? p i
    trap - ERR
    set +e
    ((rc == 0 || rc == 3)) || show_logs
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    unmount_all "${MOUNTS[@]}"
    for p in "${DAEMON_PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        stop_pid "$p"
    done
    unmount_all "${LOWER_MOUNTS[@]}"
    detach_loops "${LOOPS[@]}"
    if findmnt -rn -o TARGET | grep -q "^$WORK/"; then
        echo "warning: mounts left under $WORK, not removing it" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    exit "$rc"
}

trap_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT TERM HUP # run the cleanup when interrupted too
}
