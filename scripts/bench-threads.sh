#!/usr/bin/env bash
# scripts/bench-threads.sh - sweep `migsafe mount --threads N` for the relay
# data path on the rows where daemon threads matter (4k randread QD16 and 4k
# randwrite, hot), native and mergerfs alongside as references.
#
# usage: scripts/bench-threads.sh [--threads-list 1,2,4] [bench.sh options...]
# e.g.   scripts/bench-threads.sh --size 1G --runtime 5 --reps 3
# Every run of bench.sh mounts, measures and unmounts on its own; the runs
# are sequential (never two benchmarks at once).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIST=1,2,4
ROWS=randread-4k-qd16-hot,randwrite-4k-hot
TARGETS=relay,mergerfs
pass=()
while (($#)); do
	case $1 in
	--threads-list) LIST=$2; shift 2 ;;
	--threads-list=*) LIST=${1#*=}; shift ;;
	--rows) ROWS=$2; shift 2 ;;
	--rows=*) ROWS=${1#*=}; shift ;;
	--targets) TARGETS=$2; shift 2 ;;
	--targets=*) TARGETS=${1#*=}; shift ;;
	--threads | --threads=* | --csv | --csv=* | --json | --json=*)
		echo "bench-threads.sh: $1 is set per run by this script" >&2; exit 2 ;;
	-h | --help)
		sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
		exit 0 ;;
	*) pass+=("$1"); shift ;;
	esac
done

TMP=$(mktemp -d /tmp/bench-threads.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

IFS=, read -ra threads <<<"$LIST"
for n in "${threads[@]}"; do
	[[ $n =~ ^[0-9]+$ ]] || { echo "bench-threads.sh: bad thread count: $n" >&2; exit 2; }
	echo "== --threads $n" >&2
	"$SCRIPT_DIR/bench.sh" --rows "$ROWS" --targets "$TARGETS" --threads "$n" \
		--csv "$TMP/t$n.csv" "${pass[@]+"${pass[@]}"}" >"$TMP/t$n.txt" ||
		{ echo "bench.sh failed for --threads $n" >&2; exit 1; }
done 2>&1 | grep --line-buffered -v '^   ' >&2 || true
# (per-run progress lines are indented; only stage headers are echoed)
for n in "${threads[@]}"; do
	[[ -s $TMP/t$n.csv ]] || { echo "bench-threads.sh: no result for --threads $n" >&2; exit 1; }
done

python3 - "$TMP" "${threads[@]}" <<'PYEOF'
import csv, sys
tmp, threads = sys.argv[1], sys.argv[2:]
rows = {}
for n in threads:
    for r in csv.DictReader(open("%s/t%s.csv" % (tmp, n))):
        rows.setdefault((r["table"], r["row"], r["target"]), {})[n] = r
print("== relay thread sweep: median IOPS (x native) [daemon CPU s/run] per migsafe --threads N ==")
print("%-22s %-10s " % ("row", "target") + " ".join("%-30s" % ("threads=" + n) for n in threads))
def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")
for (table, row, target), per in rows.items():
    cells = []
    for n in threads:
        r = per.get(n)
        if not r:
            cells.append("%-30s" % "-")
            continue
        cpu = r["daemon_cpu_s_median"]
        cells.append("%-30s" % ("%.0f (%.2fx) [%s]" % (f(r["iops_median"]), f(r["ratio_native"]),
                                                     ("%.2f" % f(cpu)) if cpu not in ("", "None") else "-")))
    print("%-22s %-10s " % (row, target) + " ".join(cells))
PYEOF
