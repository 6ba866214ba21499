#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup functions run from traps
# soak.sh - handover soak on the two-host loop-device bed (docs/DESIGN.md §1).
#
# One image file, two loop devices over it ("host A" and "host B", each with its
# own page cache), a `migsafe mount --device disk=/dev/loopX` on each, and a
# holder process keeping the image open on both sides (as a VMM does: a block
# device's cache lives as long as the device is open). Each round:
#   1. the reader side, inactive, reads the whole image (like a destination VMM
#      opening it before the source stops), so its page cache holds old data;
#   2. the writer side writes the whole image with fio, a pattern unique to the
#      round and to each block's offset;
#   3. handover: `inactivate` on the writer, `activate` on the reader;
#   4. the reader verifies the pattern with fio --verify_only;
# then the sides swap roles. A verification failure is a stale read.
#
# After the normal rounds the default run does a negative control: a few rounds
# that verify *before* `activate` (activating only afterwards, so that side can
# write the next round). Those rounds must find stale reads, or the soak proves
# nothing.
#
# Options:
#   --rounds N          normal rounds (default 20; CI runs 200; 1000 for a full soak)
#   --nc-rounds N       negative-control rounds (default 3)
#   --size SIZE         image size (default 8M)
#   --no-activate       run the N rounds without activate before the verify
#                       (stale reads expected: exits 3 when it finds them)
#   --negative-control  run only the negative control; exit 0 if it finds stale reads
#   --migsafe PATH      migsafe binary (default: $MIGSAFE or `migsafe` on PATH)
#   --direct            bed check without migsafe: fio on the loop devices,
#                       handover by fsync + POSIX_FADV_DONTNEED from python3
#
# Prints `rounds=N stale_reads=K negative_control=found|NOT-found|skipped ...`.
# Exit status: 0 no stale read in normal rounds and (when run) the negative
# control found stale reads; 3 stale read in normal rounds (or in --no-activate
# rounds); 4 the negative control found no stale read; 2 infrastructure error.
# Needs root, fio, losetup. Removes everything it created on exit.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

ROUNDS=20
NC_ROUNDS=3
SIZE=8M
MODE=both # both | normal-only (--no-activate) | negative-only
NO_ACTIVATE=0
DIRECT=0
MIGSAFE=${MIGSAFE:-migsafe}

usage() {
    sed -n '3,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

while (($#)); do
    case $1 in
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --nc-rounds) NC_ROUNDS=${2:?}; shift 2 ;;
    --size) SIZE=${2:?}; shift 2 ;;
    --no-activate) NO_ACTIVATE=1; MODE=normal-only; shift ;;
    --negative-control) MODE=negative-only; shift ;;
    --migsafe) MIGSAFE=${2:?}; shift 2 ;;
    --direct) DIRECT=1; shift ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ $ROUNDS =~ ^[0-9]+$ && $NC_ROUNDS =~ ^[0-9]+$ ]] || usage

trap_errors
require_root
require_tools fio losetup mountpoint python3
if ((!DIRECT)); then
    MIGSAFE=$(command -v "$MIGSAFE") || die "migsafe binary not found (use --migsafe PATH)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/migsafe-soak.XXXXXX")
trap_cleanup

# ---------------------------------------------------------------- the bed

truncate -s "$SIZE" "$WORK/shared.img"
declare -A DEV MNT IMGPATH
for h in A B; do
    DEV[$h]=$(losetup --find --show "$WORK/shared.img")
    LOOPS+=("${DEV[$h]}")
done
if ((DIRECT)); then
    IMGPATH[A]=${DEV[A]} IMGPATH[B]=${DEV[B]}
else
    for h in A B; do
        MNT[$h]=$WORK/mnt-$h
        mkdir -p "$WORK/empty-$h"
        RUST_LOG=${RUST_LOG:-warn} spawn_migsafe "$h" "$WORK/empty-$h" "${MNT[$h]}" \
            --device "disk=${DEV[$h]}"
        wait_mounted "${MNT[$h]}" "$!" "host $h"
        IMGPATH[$h]=${MNT[$h]}/disk
    done
fi
# Holders: keep the image open on both hosts for the whole soak.
for h in A B; do
    sleep 1000000 3<"${IMGPATH[$h]}" &
    PIDS+=($!)
done
log "bed: ${DEV[A]} (A) and ${DEV[B]} (B) over one $SIZE image, $([[ $DIRECT == 1 ]] && echo direct || echo "migsafe mounts")"

# ---------------------------------------------------------------- handover

py_cache() { # fsync|drop PATH: the --direct stand-in for inactivate/activate
    python3 - "$1" "$2" <<'PYEOF'
import os, sys
fd = os.open(sys.argv[2], os.O_RDONLY)
if sys.argv[1] == "fsync":
    os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
PYEOF
}

ctl() { # HOST COMMAND: echo disk > MNT/.ctl/COMMAND, result read back
    local h=$1 cmd=$2 rc=0 out
    if ((DIRECT)); then
        case $cmd in inactivate) py_cache fsync "${IMGPATH[$h]}" ;; activate) py_cache drop "${IMGPATH[$h]}" ;; esac
        return 0
    fi
    out=$(ctl_request "${MNT[$h]}" "$cmd" disk) || rc=$?
    if ((rc != 0)); then
        log "host $h: echo disk > .ctl/$cmd failed (status $rc): $out"
    fi
    return "$rc"
}

FIO=(fio --name=soak --ioengine=psync --direct=0 --invalidate=0 --fallocate=none
    --size="$SIZE" --bs=4k --rw=randwrite --verify=pattern --verify_state_save=0 --minimal)

# round_pattern N: a 32-bit tag unique to the round, followed by the block offset
round_pattern() { printf '0x%08x%%o' $((0x5a000000 + $1)); }

# one_round N WRITER READER ACTIVATE_BEFORE_VERIFY -> sets STALE=0|1
one_round() {
    local n=$1 w=$2 r=$3 act=$4 pat out rc=0
    pat=$(round_pattern "$n")
    # 1. the inactive reader caches what is there now
    dd if="${IMGPATH[$r]}" of=/dev/null bs=1M status=none
    # 2. the writer writes the round's pattern everywhere
    "${FIO[@]}" --filename="${IMGPATH[$w]}" --verify_pattern="$pat" --do_verify=0 \
        >"$WORK/fio-write.log" 2>&1 || { cat "$WORK/fio-write.log" >&2; die "round $n: fio write on $w failed"; }
    # 3. handover
    ctl "$w" inactivate || die "round $n: inactivate on $w failed"
    if ((act)); then
        ctl "$r" activate || die "round $n: activate on $r failed"
    fi
    # 4. the reader verifies
    "${FIO[@]}" --filename="${IMGPATH[$r]}" --verify_pattern="$pat" --verify_only \
        >"$WORK/fio-verify.log" 2>&1 || rc=$?
    STALE=0
    if ((rc != 0)); then
        if grep -qE 'verify failed|bad pattern|bad magic|verify: bad' "$WORK/fio-verify.log"; then
            STALE=1
            out=$(grep -m1 -E 'verify failed' "$WORK/fio-verify.log" || true)
            log "round $n: STALE read on host $r after handover from $w: $out"
        else
            cat "$WORK/fio-verify.log" >&2
            die "round $n: fio verify on $r failed (status $rc) without a verify error"
        fi
    fi
    # a side that skipped activate takes it now, so it may write next round
    if ((!act)); then
        ctl "$r" activate || die "round $n: late activate on $r failed"
    fi
}

run_rounds() { # COUNT ACTIVATE FIRST_ROUND_NO -> sets FOUND
    local count=$1 act=$2 n=$3 i w=A r=B
    FOUND=0
    for ((i = 0; i < count; i++, n++)); do
        one_round "$n" "$w" "$r" "$act"
        FOUND=$((FOUND + STALE))
        if (((i + 1) % 50 == 0)); then log "$((i + 1))/$count rounds, stale reads so far: $FOUND"; fi
        local t=$w
        w=$r r=$t
    done
    NEXT_ROUND=$n
}

T0=$(date +%s%N)
NEXT_ROUND=1
STALE_READS=0
NC_RESULT=skipped
NC_FOUND=0
RUN_ROUNDS=0
if [[ $MODE != negative-only ]]; then
    act=$((NO_ACTIVATE ? 0 : 1))
    run_rounds "$ROUNDS" "$act" "$NEXT_ROUND"
    STALE_READS=$FOUND
    RUN_ROUNDS=$ROUNDS
fi
T1=$(date +%s%N)
if [[ $MODE != normal-only ]]; then
    run_rounds "$NC_ROUNDS" 0 "$NEXT_ROUND"
    NC_FOUND=$FOUND
    if ((NC_FOUND > 0)); then NC_RESULT=found; else NC_RESULT=NOT-found; fi
fi
T2=$(date +%s%N)

echo "rounds=$RUN_ROUNDS stale_reads=$STALE_READS activate=$([[ $MODE == negative-only ]] && echo n/a || echo $((NO_ACTIVATE ? 0 : 1))) negative_control=$NC_RESULT negative_control_stale_reads=$NC_FOUND/$([[ $NC_RESULT == skipped ]] && echo 0 || echo "$NC_ROUNDS") size=$SIZE mode=$([[ $DIRECT == 1 ]] && echo direct || echo migsafe) seconds=$(((T1 - T0) / 1000000000)).$(((T1 - T0) / 10000000 % 100)) nc_seconds=$(((T2 - T1) / 1000000000)).$(((T2 - T1) / 10000000 % 100))"

if ((STALE_READS > 0)); then
    ((NO_ACTIVATE)) && echo "RESULT: STALE (without activate, as expected of the negative control)" || echo "RESULT: FAIL: stale reads after handover"
    exit 3
fi
if [[ $NC_RESULT == NOT-found ]]; then
    echo "RESULT: FAIL: the negative control found no stale read, the soak proves nothing"
    exit 4
fi
echo "RESULT: PASS"
exit 0
