#!/usr/bin/env bash
# Runs a command inside the arm64 root, in a private mount namespace so that
# /proc, /sys, /dev (and any --bind dirs) are mounted for this command only and
# vanish with it: nothing is left mounted if the command or the caller dies.
#
#   tools/arm64/chroot.sh [--bind HOST_DIR:ROOT_DIR]... [--net] -- CMD ARGS...
#
# --net also binds the host's /etc/resolv.conf (only building needs the network).
# The network namespace is the host's, so 127.0.0.1 inside is the host's loopback.
set -euo pipefail
ROOT="${FEDGE_ARM64_ROOT:-/var/cache/fedge/arm64-bookworm}"
die() { echo "chroot.sh: $*" >&2; exit 1; }
binds=()
net=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) binds+=("$2"); shift 2 ;;
    --net) net=1; shift ;;
    --) shift; break ;;
    *) die "unknown option: $1 (expected --bind, --net or --)" ;;
  esac
done
[ $# -gt 0 ] || die "no command given after --"
[ -f "$ROOT/.fedge-root-ready" ] || die "no arm64 root at $ROOT: run tools/arm64/build_root.sh"
[ "$(id -u)" = 0 ] || die "must run as root (chroot and mounts need it)"
setup="mount -t proc proc '$ROOT/proc' && mount --rbind /sys '$ROOT/sys' && mount --rbind /dev '$ROOT/dev'"
# qemu-user 7.2 (bookworm's) shows the guest the host's x86 /proc/cpuinfo, and
# onnxruntime's CPU detection segfaults on it at import: show a Pi 4's instead.
if [ "$(uname -m)" != aarch64 ]; then
  setup="$setup && mount --bind '$(cd "$(dirname "$0")" && pwd)/cpuinfo-rpi4' '$ROOT/proc/cpuinfo'"
fi
for b in "${binds[@]}"; do
  src="${b%%:*}"; dst="$ROOT${b#*:}"
  [ -d "$src" ] || die "--bind source is not a directory: $src"
  mkdir -p "$dst"
  setup="$setup && mount --bind '$src' '$dst'"
done
if [ "$net" = 1 ]; then
  setup="$setup && mount --bind /etc/resolv.conf '$ROOT/etc/resolv.conf'"
fi
export ROOT
exec unshare --mount --propagation private -- sh -c "$setup && exec chroot \"\$ROOT\" \"\$@\"" sh "$@"
