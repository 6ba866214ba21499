#!/bin/sh
# Installs migsafe for operators: the binary where both a shell and mount(8)
# find it, and the systemd template unit.
#
# mount(8) runs fuse3's mount.fuse3 with PATH removed from the environment,
# so `mount -t fuse.migsafe` and fstab find `migsafe` only in the shell's
# default PATH; /usr/sbin is in it on every distribution (/usr/local/bin is
# not everywhere). Hence the default SBINDIR.
#
# Usage: scripts/install.sh [BINARY]     (default: target/release/migsafe)
# Environment:
#   DESTDIR  staging root (default: empty, i.e. this machine)
#   SBINDIR  where the binary goes (default: /usr/sbin)
#   UNITDIR  where the unit goes (default: /etc/systemd/system)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/release/migsafe}
destdir=${DESTDIR:-}
sbindir=${SBINDIR:-/usr/sbin}
unitdir=${UNITDIR:-/etc/systemd/system}

if [ ! -x "$bin" ]; then
	echo "scripts/install.sh: no binary at $bin; build it first with: cargo build --release" >&2
	exit 1
fi
case "$sbindir" in
/usr/sbin | /usr/bin | /sbin | /bin) ;;
*) echo "scripts/install.sh: warning: $sbindir is not on mount(8)'s helper PATH (/usr/sbin:/usr/bin:/sbin:/bin): mount -t fuse.migsafe and fstab will not find migsafe" >&2 ;;
esac

install -D -m 0755 "$bin" "$destdir$sbindir/migsafe"
# The unit names the binary by absolute path (systemd-analyze verify checks
# it exists): point it at where the binary now is.
install -d -m 0755 "$destdir$unitdir"
sed "s#/usr/sbin/migsafe#$sbindir/migsafe#g" "$here/examples/migsafe@.service" \
	>"$destdir$unitdir/migsafe@.service"
chmod 0644 "$destdir$unitdir/migsafe@.service"
install -d -m 0755 "$destdir/etc/migsafe"
# The unit's Documentation= points here.
install -D -m 0644 "$here/README.md" "$destdir/usr/share/doc/migsafe/README.md"

echo "installed $destdir$sbindir/migsafe"
echo "installed $destdir$unitdir/migsafe@.service (settings: /etc/migsafe/<instance>.conf)"
if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
	systemctl daemon-reload
fi
