#!/usr/bin/env bash
# Builds the Debian package target/debian/migsafe_VERSION_ARCH.deb with
# cargo-deb (scripts/install-deps.sh installs the pinned version): the
# release binary once, then the man pages and bash completion generated from
# its command line (migsafe generate-assets), then `cargo deb --no-build`.
# Extra arguments go to cargo deb (e.g. --deb-version 0.1.0-0test1 -o DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "scripts/package.sh: cargo-deb is missing: run scripts/install-deps.sh (or cargo install cargo-deb --locked --version 3.8.0)" >&2
  exit 1
fi
# Without dpkg-shlibdeps, cargo-deb's $auto finds no library dependencies
# and the package would not depend on libc6.
if ! command -v dpkg-shlibdeps >/dev/null; then
  echo "scripts/package.sh: dpkg-shlibdeps is missing: apt-get install dpkg-dev" >&2
  exit 1
fi
cargo build --release --locked --quiet
rm -rf target/assets
target/release/migsafe generate-assets target/assets
cargo deb --no-build --locked --strip "$@"
