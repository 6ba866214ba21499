#!/usr/bin/env bash
# libvirt-hook.sh - optional libvirt QEMU hook for images on a migsafe mount.
# Install as /etc/libvirt/hooks/qemu (executable) on every host, or call it
# from an existing hook with the same arguments and the domain XML on stdin.
#
# libvirt runs the hook as: qemu DOMAIN OPERATION SUB-OPERATION EXTRA, with the
# domain XML on stdin. What this hook does with the domain's file disks under
# $MNT (default /run/migsafe):
#   migrate begin  (destination of a live migration, before QEMU starts):
#                  `inactivate` them here, dropping what other processes on
#                  this host cached, and remember that the start is incoming;
#   prepare begin  incoming migration: nothing more; any other start (boot,
#                  cold migration, HA restart): `activate` them, because this
#                  host takes them over; if that fails the start is refused;
#   stopped end    `flush` them (the guest's writes are on the storage);
#   release end    forget the incoming mark.
# libvirt has no hook between the end of a live migration and the resume on
# the destination, so the final `inactivate` on the source and `activate` on
# the destination of a live migration are done by virsh-migrate.sh
# (`virsh migrate --suspend`, handover, `virsh resume`).
# The hook never calls virsh (that would deadlock libvirt), prints nothing on
# stdout (for `migrate` libvirt would read it as new XML) and logs to syslog.
# When it refuses, the reason also goes to stderr: libvirt puts a failing
# hook's stderr into the error it reports (`virsh start` shows it).
set -euo pipefail

DOMAIN=${1:-}
OP=${2:-}
SUBOP=${3:-}
MNT=${MNT:-/run/migsafe}
STATE=/run/migsafe-hook
MARK=$STATE/$DOMAIN.incoming

log() { logger -t migsafe-hook -- "$DOMAIN $OP $SUBOP: $*" 2>/dev/null || true; }
# fail MSG: log MSG and put it where libvirt shows it.
fail() {
    log "$*"
    printf 'migsafe-hook: %s %s %s: %s\n' "$DOMAIN" "$OP" "$SUBOP" "$*" >&2
}

# The domain's file disks on the migsafe mount, relative to it, one per line.
images() {
    local xml=$1 f
    grep -o "<source file=['\"][^'\"]*['\"]" <<<"$xml" | sed "s/^<source file=['\"]//; s/['\"]\$//" |
        while IFS= read -r f; do
            [[ $f == "$MNT"/* ]] && printf '%s\n' "${f#"$MNT"/}"
        done || true
}

# ctl COMMAND LIST: one write of the image list to the control file; returns
# the write's status, logs the per-image result lines, and on failure says
# on stderr which images failed and why.
ctl() {
    local fd rc=0 out
    if ! { exec {fd}<>"$MNT/.ctl/$1"; } 2>/dev/null; then
        fail "$1: cannot open $MNT/.ctl/$1 (not a migsafe mount, or not root?)"
        return 1
    fi
    # bash's own "printf: write error" says nothing useful: the result lines do.
    { printf '%s\n' "$2" >&"$fd"; } 2>/dev/null || rc=$?
    out=$(cat <&"$fd" 2>/dev/null || true)
    exec {fd}>&-
    log "$1: status $rc: ${out//$'\n'/; }"
    if ((rc)); then
        # The lines of the images that failed (`image=... result=error ...`).
        fail "$1 failed: $(grep -v ' result=ok ' <<<"$out" | tr '\n' ' ')"
    fi
    return "$rc"
}

case "$OP/$SUBOP" in
migrate/begin | prepare/begin | stopped/end) ;;
release/end)
    rm -f "$MARK"
    exit 0
    ;;
*) exit 0 ;;
esac

mountpoint -q "$MNT" || exit 0
XML=$(cat)
LIST=$(images "$XML")
[[ -n $LIST ]] || exit 0

case "$OP/$SUBOP" in
migrate/begin)
    mkdir -p "$STATE"
    : >"$MARK"
    ctl inactivate "$LIST" || { fail "refusing the incoming migration"; exit 1; }
    ;;
prepare/begin)
    if [[ -e $MARK ]]; then
        log "incoming migration: images stay inactive until the handover"
    else
        ctl activate "$LIST" || { fail "refusing to start on possibly stale data"; exit 1; }
    fi
    ;;
stopped/end)
    ctl flush "$LIST" || log "flush failed"
    ;;
esac
exit 0
