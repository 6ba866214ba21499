#!/usr/bin/env bash
# virsh-migrate.sh - live-migrate a libvirt domain whose disk images live on a
# migsafe mount, with a safe handover of the host page cache.
#
# Run it on the source host:
#   virsh-migrate.sh DOMAIN DEST_HOST [IMAGE...]
# IMAGE paths are relative to the migsafe mount ($MNT, default /run/migsafe,
# the same path on both hosts); without them, every file disk of the domain
# under $MNT is handed over.
#
# Steps (docs/DESIGN.md §3, "Standard flows"):
#   1. destination: `inactivate` the images, dropping whatever other processes
#      there may have cached, before QEMU opens them;
#   2. `virsh migrate --live --suspend`: the domain arrives paused on the
#      destination (libvirt turns on QEMU's late-block-activate for incoming
#      migrations when QEMU supports it, so the destination's QEMU activates
#      its images only at resume); the source QEMU flushed and exited;
#   3. source: `inactivate` the images (sync; a sync error stops everything);
#   4. destination: `activate` the images (drop the destination's cached pages
#      and verify none is left);
#   5. only if all of that succeeded: `virsh resume` on the destination.
# If step 3 or 4 fails the domain stays paused on the destination and the
# script says what to do; nothing is resumed on stale data. It creates no files.
#
# Environment: MNT (migsafe mountpoint), DST_URI (default
# qemu+ssh://root@DEST_HOST/system), VIRSH_MIGRATE_OPTS (extra options for
# `virsh migrate`, e.g. "--persistent --undefinesource").
set -euo pipefail

if (($# < 2)); then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
fi
DOMAIN=$1
DST=$2
shift 2
MNT=${MNT:-/run/migsafe}
DST_URI=${DST_URI:-qemu+ssh://root@$DST/system}
read -r -a EXTRA <<<"${VIRSH_MIGRATE_OPTS:-}"

IMAGES=("$@")
if ((${#IMAGES[@]} == 0)); then
    # Every file-backed disk of the domain that lives on the migsafe mount.
    while read -r type device _target source; do
        [[ $type == file && $device == disk && $source == "$MNT"/* ]] || continue
        IMAGES+=("${source#"$MNT"/}")
    done < <(virsh domblklist "$DOMAIN" --details | tail -n +3)
fi
((${#IMAGES[@]})) || { echo "no disk of $DOMAIN is on $MNT" >&2; exit 2; }
LIST=$(printf '%s\n' "${IMAGES[@]}")

# ctl_local COMMAND / ctl_remote COMMAND: write the image list to the control
# file in one write, ending in a newline as every request must; the write (and so the function) fails if any image failed;
# the per-image result lines are printed.
ctl_local() {
    local fd rc=0
    exec {fd}<>"$MNT/.ctl/$1"
    printf '%s\n' "$LIST" >&"$fd" || rc=$?
    cat <&"$fd"
    exec {fd}>&-
    return "$rc"
}
ctl_remote() {
    # shellcheck disable=SC2029 # expanded here on purpose
    printf '%s\n' "$LIST" | ssh -o BatchMode=yes "root@$DST" \
        "exec 3<>'$MNT/.ctl/$1' && cat >&3; rc=\$?; cat <&3; exit \$rc"
}

echo "== $DST: inactivate ${IMAGES[*]} (drop what others cached there)"
ctl_remote inactivate || { echo "inactivate on $DST failed; nothing was migrated" >&2; exit 1; }

echo "== migrate $DOMAIN to $DST_URI, paused on arrival"
# virsh's stderr is shown as it comes and kept, to explain known refusals.
if ! { err=$(virsh migrate --live --suspend --verbose "${EXTRA[@]}" "$DOMAIN" "$DST_URI" 2>&1 1>&3 |
    tee /dev/stderr); } 3>&1; then
    echo "migration failed; $DOMAIN still runs here, its images stay active here" >&2
    if [[ $err == *"without shared storage is unsafe"* ]]; then
        cat >&2 <<EOF
libvirt does not know that $MNT (a fuse.migsafe mount) is shared storage:
it counts no FUSE filesystem but GlusterFS and Quobyte as shared. migsafe's
handover (this script's inactivate/activate) is what makes the page cache
safe. Either:
  - libvirt 9.0 (Debian 12) has no setting for it: add --unsafe,
        VIRSH_MIGRATE_OPTS="--unsafe" $0 $DOMAIN $DST ...
    It skips only libvirt's pre-migration disk check (shared storage, cache
    mode), for every disk of the domain: each must be on $MNT.
  - a later libvirt whose qemu.conf documents shared_filesystems: declare the
    mount shared in /etc/libvirt/qemu.conf on both hosts, restart libvirtd
    (or virtqemud) and run this script again:
        shared_filesystems = [ "$MNT" ]
With --unsafe libvirt still treats the images as local storage after the
migration and gives them back to root on this host while $DST runs the
domain: keep it from relabelling them (<seclabel model='dac' relabel='no'/>
in each disk's <source>, images owned by libvirt-qemu; see README).
EOF
    fi
    exit 1
fi

echo "== here: inactivate (sync, drop, fence)"
if ! ctl_local inactivate; then
    echo "SYNC FAILED on the source: the storage may lack the guest's last writes." >&2
    echo "$DOMAIN stays paused on $DST. Do not resume it before checking the storage." >&2
    exit 1
fi

echo "== $DST: activate (drop cache there, verify nothing is left)"
if ! ctl_remote activate; then
    echo "activate on $DST failed (see the result above: resident pages and holders)." >&2
    echo "$DOMAIN stays paused on $DST. Stop what holds the image there, then run" >&2
    echo "  ssh root@$DST migsafe ctl $MNT activate ${IMAGES[*]} && virsh -c $DST_URI resume $DOMAIN" >&2
    exit 1
fi

echo "== resume $DOMAIN on $DST"
virsh -c "$DST_URI" resume "$DOMAIN"
echo "done"
