#!/usr/bin/env bash
# Makes sure this x86_64 kernel runs aarch64 ELF binaries through qemu-user:
# binfmt_misc mounted and the qemu-aarch64 handler registered and enabled.
# Idempotent; a one-line error on stderr and exit 1 when it cannot be done.
set -euo pipefail
die() { echo "binfmt: $*" >&2; exit 1; }
B=/proc/sys/fs/binfmt_misc
[ "$(uname -m)" = aarch64 ] && exit 0   # native arm64 host: nothing to emulate
if [ ! -e "$B/register" ]; then
  mount -t binfmt_misc binfmt_misc "$B" 2>/dev/null \
    || die "cannot mount binfmt_misc at $B (needs root and a kernel with binfmt_misc)"
fi
if [ ! -e "$B/qemu-aarch64" ]; then
  command -v update-binfmts >/dev/null || die "update-binfmts missing: apt-get install binfmt-support"
  [ -e /usr/share/binfmts/qemu-aarch64 ] || die "no qemu-aarch64 handler: apt-get install qemu-user-static"
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || die "update-binfmts --enable qemu-aarch64 failed"
fi
grep -qx enabled "$B/qemu-aarch64" || echo 1 >"$B/qemu-aarch64" \
  || die "cannot enable the qemu-aarch64 handler"
