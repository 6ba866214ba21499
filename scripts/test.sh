#!/usr/bin/env bash
# Runs the whole test suite (as root: tests mount FUSE filesystems, attach
# loop devices and start QEMU). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (tests mount filesystems and attach loop devices)" >&2
  exit 2
fi
cargo build --quiet
# tests/package.rs installs the .deb on this machine and purges it again.
pkg_before=$(dpkg-query -W -f '${Status}' migsafe 2>/dev/null || true)
# State files in root's default place (daemons started without --state-file).
state_before=$(ls /run/migsafe-state 2>/dev/null || true)
cargo test "$@"
state_after=$(ls /run/migsafe-state 2>/dev/null || true)
left_state=$(comm -13 <(echo "$state_before") <(echo "$state_after"))
pkg_after=$(dpkg-query -W -f '${Status}' migsafe 2>/dev/null || true)
if [ "$pkg_after" != "$pkg_before" ]; then
  echo "scripts/test.sh: tests left the migsafe package in state '$pkg_after' (was '$pkg_before')" >&2
  exit 1
fi
leftover=$(awk '$3 ~ /^fuse/ && $2 ~ /migsafe-test-/ {print $2}' /proc/mounts)
if [ -n "$leftover" ]; then
  echo "scripts/test.sh: tests left mounts behind: $leftover" >&2
  exit 1
fi
if [ -n "$left_state" ]; then
  echo "scripts/test.sh: tests left state files behind in /run/migsafe-state: $left_state" >&2
  exit 1
fi
