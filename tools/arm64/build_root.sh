#!/usr/bin/env bash
# Builds (once) a Debian bookworm arm64 root to run fedge's device side under
# qemu-user emulation: the Raspberry Pi OS Bookworm userland (Debian bookworm,
# Python 3.11) on this x86_64 machine. Idempotent: a finished root is reused.
#
#   sudo tools/arm64/build_root.sh            # build or reuse; print the root's path
#   FEDGE_ARM64_ROOT=/some/dir FEDGE_ARM64_WHEELHOUSE=/other/dir tools/arm64/build_root.sh
#
# Also fills the rpi-bookworm wheelhouse the tests install from (`fedge wheelhouse
# --target rpi-bookworm --torch`: aarch64 wheels, torch a CPU build) unless it holds a
# torch wheel already. Needs root, a Debian mirror and PyPI at build time only, and
# the host packages debootstrap, qemu-user-static and binfmt-support (installed with
# apt-get when missing). Later runs (the tests) need no network.
set -euo pipefail

ROOT="${FEDGE_ARM64_ROOT:-/var/cache/fedge/arm64-bookworm}"
MIRROR="${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELS="${FEDGE_ARM64_WHEELHOUSE:-/var/cache/fedge/wheelhouse-rpi-bookworm}"
DONE="$ROOT/.fedge-root-ready"
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

die() { echo "build_root: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and binfmt_misc need it)"
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] \
  || die "host arch: expected x86_64 or aarch64, got $(uname -m)"

wheelhouse() {
  ls "$WHEELS"/torch-*.whl >/dev/null 2>&1 && return 0
  echo "build_root: fedge wheelhouse --target rpi-bookworm --torch --out $WHEELS" >&2
  (cd "$REPO" && PYTHONPATH="$REPO" "${PYTHON:-python3}" -m toolkit wheelhouse \
    --target rpi-bookworm --torch --out "$WHEELS" >&2) || die "fedge wheelhouse failed"
}

if [ -f "$DONE" ]; then
  "$HERE/binfmt.sh"
  wheelhouse
  echo "$ROOT"
  exit 0
fi

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ "${#need[@]}" -gt 0 ]; then
  echo "build_root: installing host packages: ${need[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
    >/dev/null || die "apt-get install ${need[*]} failed (no Debian mirror reachable?)"
fi
"$HERE/binfmt.sh"

# A half-built root (an interrupted run) is thrown away: debootstrap cannot resume.
if [ -e "$ROOT" ]; then
  rm -rf --one-file-system "$ROOT"
fi
mkdir -p "$(dirname "$ROOT")"

echo "build_root: debootstrap stage 1 (download) into $ROOT" >&2
debootstrap --arch=arm64 --foreign --variant=minbase \
  --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" \
  >"$ROOT.log" 2>&1 || die "debootstrap stage 1 failed: see $ROOT.log"
# The static qemu in the root lets it run even where the handler lacks the F flag.
cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
echo "build_root: debootstrap stage 2 (emulated, slow)" >&2
chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$ROOT.log" 2>&1 \
  || die "debootstrap stage 2 failed: see $ROOT.log and $ROOT/debootstrap/debootstrap.log"
chroot "$ROOT" /usr/bin/python3 -c 'import platform, venv; assert platform.machine() == "aarch64"' \
  || die "python3 in the root does not run as aarch64"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
# Name resolution for the tests' localhost broker, and a file chroot.sh --net binds over.
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$ROOT/etc/hosts"
touch "$ROOT/etc/resolv.conf"
date -u +%FT%TZ >"$DONE"
wheelhouse
echo "$ROOT"
