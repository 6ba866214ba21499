#!/usr/bin/env bash
# Installs the Debian packages the tests, examples and benchmarks use.
# Safe to run again: a second run installs nothing new.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/install-deps.sh: run as root (apt-get)" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q

# QEMU: the machine image may ship a newer qemu-utils (from backports) than
# the distribution's qemu-system-x86, and the newer qemu-utils Breaks the
# older qemu-system-common, so a plain install of both fails. Pin both to the
# version of qemu-system-x86 that the distribution offers, downgrading
# qemu-utils if needed; on a machine where this already ran it is a no-op.
qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
  echo "scripts/install-deps.sh: apt offers no qemu-system-x86; check /etc/apt/sources.list" >&2
  exit 1
fi
if ! apt-cache madison qemu-utils | awk -F'|' '{gsub(/ /, "", $2); print $2}' \
  | grep -qxF "$qemu_version"; then
  echo "scripts/install-deps.sh: apt offers qemu-system-x86 $qemu_version but no qemu-utils of that version" >&2
  exit 1
fi

# fuse3: /dev/fuse helpers and mount.fuse3; fio: verify workloads;
# qemu-system-x86 + qemu-utils: real VMM and image tools; mergerfs: the
# NFS-like two-client bed; vmtouch + util-linux (fincore, losetup): page-cache
# tools; e2fsprogs: small failing backing filesystems; shellcheck: scripts;
# strace: holds a daemon's syscalls to widen race windows (tests/cached_tail.rs);
# python3-prometheus-client: the text parser that checks `migsafe ctl metrics`;
# socat: QMP from examples/qemu-migrate.sh; libvirt-daemon +
# libvirt-daemon-driver-qemu + libvirt-clients: a private libvirtd and virsh
# for the libvirt hook test (not libvirt-daemon-system: it pulls in systemd
# upgrades and the default network, and the test runs its own daemon).
# The package test (tests/package.rs): lintian checks the .deb, dpkg-dev's
# dpkg-shlibdeps gives cargo-deb the library dependencies, man-db renders
# the man pages, bash-completion runs the completion script.
apt-get install -y -q --no-install-recommends --allow-downgrades \
  "qemu-system-x86=$qemu_version" "qemu-utils=$qemu_version" \
  fuse3 fio mergerfs vmtouch util-linux \
  e2fsprogs strace shellcheck python3 python3-prometheus-client socat kmod procps \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
  lintian dpkg-dev man-db bash-completion
# cargo-deb builds the Debian package (scripts/package.sh). Pinned, built
# from crates.io with its own lock file (a few minutes on 2 cores, once:
# a second run finds it installed).
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
  cargo install cargo-deb --locked --version "$cargo_deb_version"
fi
# Loop devices are the two-host test bed.
modprobe loop 2>/dev/null || true
echo "scripts/install-deps.sh: QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), qemu-img $(qemu-img --version | head -1 | awk '{print $3}')"
