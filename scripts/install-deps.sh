#!/usr/bin/env bash
# Installs the Debian packages the tests, examples and benchmarks use.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/install-deps.sh: run as root (apt-get)" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# fuse3: /dev/fuse helpers and mount.fuse3; fio: verify workloads;
# qemu-system-x86 + qemu-utils: real VMM and image tools; mergerfs: the
# NFS-like two-client bed; vmtouch + util-linux (fincore, losetup): page-cache
# tools; e2fsprogs: small failing backing filesystems; shellcheck: scripts.
apt-get install -y -q --no-install-recommends \
  fuse3 fio qemu-system-x86 qemu-utils mergerfs vmtouch util-linux \
  e2fsprogs shellcheck python3 kmod procps
# Loop devices are the two-host test bed.
modprobe loop 2>/dev/null || true
