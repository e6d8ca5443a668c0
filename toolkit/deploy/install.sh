#!/bin/sh
# Install the fedge device agent from this bundle (made by `fedge bundle`):
# a venv with fedge[device] (and torch only if this device trains locally), the
# device's config, credentials and signed artifacts, and a systemd unit that runs
# `fedge device --config` and restarts it on failure.
#
#   sudo ./install.sh                          # online: wheels from PyPI
#   sudo ./install.sh --wheelhouse /media/wh   # offline: wheels from a folder
#   ./install.sh --prefix ~/fedge --no-systemd # as a user, run the agent yourself
#
# Nothing is started or replaced until every file of the bundle matches its
# SHA256SUMS and `fedge device --check` has verified the config, the credentials,
# the manifest's signature and the artifacts.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/fedge
PYTHON=${PYTHON:-python3}
WHEELHOUSE=
ORT=
TORCH=
SYSTEMD=auto

die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() {
  echo "usage: install.sh [--prefix DIR] [--python PY] [--wheelhouse DIR]"
  echo "                  [--onnxruntime SPEC] [--torch SPEC] [--no-systemd]"
  echo "  --onnxruntime SPEC  install this instead of onnxruntime (Jetson: NVIDIA's"
  echo "                      onnxruntime-gpu wheel file, for the CUDA/TensorRT providers)"
  echo "  --torch SPEC        install this torch (Jetson: NVIDIA's wheel file)"
}
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
    --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
    --wheelhouse) need_arg "$@"; WHEELHOUSE=$2; shift 2 ;;
    --onnxruntime) need_arg "$@"; ORT=$2; shift 2 ;;
    --torch) need_arg "$@"; TORCH=$2; shift 2 ;;
    --no-systemd) SYSTEMD=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done

# 1. The bundle is whole: every file as `fedge bundle` wrote it (before sourcing any).
(cd "$HERE" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1) \
  || die "bundle files do not match SHA256SUMS (damaged or modified); nothing installed"
. "$HERE/bundle.env"
[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such folder"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (use --python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "fedge needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"

# 2. A venv with fedge and what the device needs; offline when wheels are at hand.
mkdir -p "$PREFIX" "$PREFIX/var"
"$PYTHON" -m venv "$PREFIX/venv" \
  || die "cannot create a venv (Debian and Raspberry Pi OS: apt install python3-venv)"
PIP="$PREFIX/venv/bin/python -m pip --disable-pip-version-check --quiet"
set -- --find-links "$HERE/wheels"
OFFLINE=
if [ -n "$WHEELHOUSE" ]; then set -- "$@" --find-links "$WHEELHOUSE"; OFFLINE=1; fi
if ls "$HERE/wheels" | grep -qv '^fedge-'; then OFFLINE=1; fi
if [ -n "$OFFLINE" ]; then set -- "$@" --no-index; fi
REQS="$PREFIX/var/requirements.txt"
if [ -n "$ORT" ]; then
  sed "s|^onnxruntime.*|$ORT|" "$HERE/requirements.txt" > "$REQS"
else
  cp "$HERE/requirements.txt" "$REQS"
fi
$PIP install "$@" -r "$REQS" || die "installing the device requirements failed"
$PIP install "$@" --no-deps --force-reinstall "$HERE/wheels/fedge-$FEDGE_VERSION-py3-none-any.whl" \
  || die "installing fedge $FEDGE_VERSION failed"
if [ "$NEEDS_TORCH" = 1 ]; then
  if [ -n "$TORCH" ]; then
    $PIP install "$@" "$TORCH" || die "installing $TORCH failed"
  elif [ -n "$OFFLINE" ]; then
    $PIP install "$@" "$TORCH_SPEC" || die "installing $TORCH_SPEC failed"
  else  # PyPI's Linux torch is a CUDA build with GBs of NVIDIA packages
    $PIP install "$@" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
      "$TORCH_SPEC" || die "installing $TORCH_SPEC from $TORCH_INDEX failed"
  fi
fi

# 3. The config, checked in a staging folder before it replaces the running one.
rm -rf "$PREFIX/etc.new"
mkdir -p "$PREFIX/etc.new"
(cd "$HERE" && find . -path ./wheels -prune -o -type f -print | while read -r f; do
  mkdir -p "$PREFIX/etc.new/$(dirname "$f")" && cp -p "$f" "$PREFIX/etc.new/$f"; done)
find "$PREFIX/etc.new" -name '*.key' -exec chmod 600 {} +
# FEDGE_HOME as the unit sets it: the check refuses an export older than the one the
# device accepted (a rollback) and records the new one in the same ledger.
FEDGE_HOME="$PREFIX/var" "$PREFIX/venv/bin/fedge" device --config "$PREFIX/etc.new/device.toml" \
  --check \
  || { rm -rf "$PREFIX/etc.new"; die "the bundle's config did not pass fedge device --check"; }
rm -rf "$PREFIX/etc.old"
[ ! -d "$PREFIX/etc" ] || mv "$PREFIX/etc" "$PREFIX/etc.old"
mv "$PREFIX/etc.new" "$PREFIX/etc"
rm -rf "$PREFIX/etc.old"

# 4. The unit: run by a `fedge` system user when installed as a service, else by
#    whoever installs.
SERVICE=
if [ "$SYSTEMD" = auto ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then SERVICE=1; fi
if [ -n "$SERVICE" ]; then
  RUN_AS=fedge
  id -u fedge >/dev/null 2>&1 || useradd --system --home-dir "$PREFIX" --shell /usr/sbin/nologin fedge
  chown -R fedge "$PREFIX/etc" "$PREFIX/var"
else
  RUN_AS=$(id -un)
fi
UNIT="$PREFIX/etc/$UNIT_NAME.service"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@USER@|$RUN_AS|g" -e "s|@ID@|$DEVICE_ID|g" \
    -e "s|@JOB@|$JOB|g" "$HERE/fedge-device.service.in" > "$UNIT"
if [ -n "$SERVICE" ]; then
  cp "$UNIT" "/etc/systemd/system/$UNIT_NAME.service"
  systemctl daemon-reload
  systemctl enable --now "$UNIT_NAME.service"
  systemctl restart "$UNIT_NAME.service"
  echo "installed and started $UNIT_NAME.service (journalctl -u $UNIT_NAME -f)"
else
  echo "installed in $PREFIX; unit file: $UNIT"
  echo "run the agent: FEDGE_HOME=$PREFIX/var $PREFIX/venv/bin/fedge device --config $PREFIX/etc/device.toml"
fi
