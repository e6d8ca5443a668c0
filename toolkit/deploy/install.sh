#!/bin/sh
# Install the fedge device agent from a bundle made by `fedge bundle`: a venv with
# fedge[device] (and torch only if this device trains locally), the device's config,
# credentials and signed artifacts, and a systemd unit that runs `fedge device --config`
# and restarts it on failure.
#
#   sudo ./install.sh --fingerprint SHA256      # first install: `fedge bundle` prints it
#   sudo ./install.sh --trust signing.pub       # or with the operator's public key
#   sudo /opt/fedge/install.sh --bundle DIR     # later: the installed script and key
#   ... --wheelhouse /media/wh                  # offline: wheels from a folder
#   ./install.sh --prefix ~/fedge --no-systemd --trust signing.pub  # as a user
#
# Trust: the bundle is copied to a private folder, and before anything else in it is
# read, its SHA256SUMS must carry a valid signature (SHA256SUMS.sig) by a key this
# device already trusts: --trust FILE, the bundle's trust.pub if it has --fingerprint's
# sha256, or PREFIX/trust.pub, which an earlier install left. Then every file must
# match SHA256SUMS and no other file may be there. bundle.env is KEY=VALUE data (known
# keys, a plain charset), never sourced. Third-party wheels pinned in the bundle's
# requirements.lock are installed with pip --require-hashes. Nothing is started or
# replaced until `fedge device --check` has verified the config, the credentials, the
# manifest's signature and the artifacts. Needs OpenSSL 3 (Ed25519 verification).
set -eu

SRC=$(cd "$(dirname "$0")" && pwd)
BUNDLE=
PREFIX=/opt/fedge
PYTHON=${PYTHON:-python3}
OPENSSL=${OPENSSL:-openssl}
WHEELHOUSE=
ORT=
TORCH=
TRUST=
FINGERPRINT=
VERIFY_ONLY=
SYSTEMD=auto
ED25519_SPKI=302a300506032b6570032100  # DER prefix of an Ed25519 SubjectPublicKeyInfo

die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() {
  echo "usage: install.sh (--trust PUBKEY.pem | --fingerprint SHA256 | a PREFIX/trust.pub)"
  echo "                  [--bundle DIR] [--prefix DIR] [--python PY] [--wheelhouse DIR]"
  echo "                  [--onnxruntime SPEC] [--torch SPEC] [--no-systemd] [--verify-only]"
  echo "  --trust FILE        the operator's Ed25519 public key (PEM); the bundle must be"
  echo "                      signed with it"
  echo "  --fingerprint HEX   the sha256 of that key (64 hex digits, or its 16-digit key"
  echo "                      id); the bundle's trust.pub must have it"
  echo "  --bundle DIR        the unpacked bundle (default: the folder of this script)"
  echo "  --verify-only       check the bundle, install nothing"
  echo "  --onnxruntime SPEC  install this instead of onnxruntime (Jetson: NVIDIA's"
  echo "                      onnxruntime-gpu wheel file, for the CUDA/TensorRT providers)"
  echo "  --torch SPEC        install this torch (Jetson: NVIDIA's wheel file)"
}
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) need_arg "$@"; BUNDLE=$2; shift 2 ;;
    --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
    --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
    --wheelhouse) need_arg "$@"; WHEELHOUSE=$2; shift 2 ;;
    --onnxruntime) need_arg "$@"; ORT=$2; shift 2 ;;
    --torch) need_arg "$@"; TORCH=$2; shift 2 ;;
    --trust) need_arg "$@"; TRUST=$2; shift 2 ;;
    --fingerprint) need_arg "$@"; FINGERPRINT=$(printf %s "$2" | tr 'A-F' 'a-f'); shift 2 ;;
    --verify-only) VERIFY_ONLY=1; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done

# 0. What this device trusts, decided from the command line and PREFIX alone.
[ -z "$TRUST" ] || [ -z "$FINGERPRINT" ] || die "give --trust or --fingerprint, not both"
if [ -n "$FINGERPRINT" ] && ! printf %s "$FINGERPRINT" | grep -Eqx '[0-9a-f]{16}|[0-9a-f]{64}'
then die "--fingerprint $FINGERPRINT: expected 64 hex digits (or the 16-digit key id)"; fi
if [ -z "$TRUST$FINGERPRINT" ] && [ ! -f "$PREFIX/trust.pub" ]; then
  die "no key to verify this bundle with: give --trust PUBKEY.pem or --fingerprint SHA256" \
      "(fedge bundle prints it); nothing installed"
fi
command -v "$OPENSSL" >/dev/null 2>&1 || die "$OPENSSL not found (apt install openssl)"
case "$("$OPENSSL" version 2>/dev/null)" in
  "OpenSSL "[3-9]*) ;;
  *) die "verifying Ed25519 needs OpenSSL 3 or newer, $OPENSSL is" \
         "'$("$OPENSSL" version 2>&1 | head -n 1)' (set OPENSSL=/path/to/openssl3)" ;;
esac

# A private copy: what is verified is what gets used (nobody can swap a file between
# the check and its use).
if [ -n "$BUNDLE" ]; then
  [ -d "$BUNDLE" ] || die "--bundle $BUNDLE: no such folder"
  SRC=$(cd "$BUNDLE" && pwd)
elif [ ! -f "$SRC/SHA256SUMS" ]; then
  die "no bundle in $SRC: give --bundle DIR (an unpacked fedge bundle)"
fi
STAGE=$(mktemp -d "${TMPDIR:-/var/tmp}/fedge-install.XXXXXX") || die "cannot make a temp folder"
trap 'rm -rf "$STAGE"' EXIT
trap 'exit 1' HUP INT TERM
HERE=$STAGE/bundle
cp -R "$SRC" "$HERE" || die "cannot copy the bundle from $SRC"

ed25519_der() {  # $1: a PEM public key, $2: its DER, written only if it is an Ed25519 key
  "$OPENSSL" pkey -pubin -in "$1" -outform DER -out "$2" 2>/dev/null &&
    [ "$(wc -c < "$2")" -eq 44 ] &&
    [ "$(head -c 12 "$2" | od -An -tx1 | tr -d ' \n')" = "$ED25519_SPKI" ]
}
fingerprint() { tail -c 32 "$1" | sha256sum | cut -c1-64; }

# 1. The signature over SHA256SUMS, by the trusted key, before anything else is read.
KEY=$STAGE/trusted.der
if [ -n "$TRUST" ]; then
  ed25519_der "$TRUST" "$KEY" || die "--trust $TRUST: expected an Ed25519 public key (PEM)"
  HOW="--trust $TRUST"
elif [ -n "$FINGERPRINT" ]; then
  [ -f "$HERE/trust.pub" ] && ed25519_der "$HERE/trust.pub" "$KEY" \
    || die "the bundle has no Ed25519 trust.pub to match --fingerprint; nothing installed"
  case "$(fingerprint "$KEY")" in
    "$FINGERPRINT"*) ;;
    *) die "the bundle's trust.pub is key $(fingerprint "$KEY" | cut -c1-16), not the key" \
           "with fingerprint $FINGERPRINT; nothing installed" ;;
  esac
  HOW="--fingerprint"
else
  ed25519_der "$PREFIX/trust.pub" "$KEY" \
    || die "$PREFIX/trust.pub: expected an Ed25519 public key (PEM); give --trust"
  HOW="$PREFIX/trust.pub"
fi
KEY_ID=$(fingerprint "$KEY" | cut -c1-16)
[ -f "$HERE/SHA256SUMS" ] && [ -f "$HERE/SHA256SUMS.sig" ] \
  || die "the bundle has no SHA256SUMS and SHA256SUMS.sig (unsigned); nothing installed"
"$OPENSSL" pkeyutl -verify -pubin -keyform DER -inkey "$KEY" -rawin -in "$HERE/SHA256SUMS" \
    -sigfile "$HERE/SHA256SUMS.sig" >/dev/null 2>&1 \
  || die "SHA256SUMS is not signed by the trusted key $KEY_ID ($HOW): modified, or made" \
         "with another key; nothing installed"

# 2. The bundle is whole: every file as `fedge bundle` wrote it, and nothing else.
LC_ALL=C grep -Evq '^[0-9a-f]{64}  [A-Za-z0-9._+-][A-Za-z0-9._/+-]*$' "$HERE/SHA256SUMS" \
  && die "SHA256SUMS: a line is not '<sha256>  <path>'; nothing installed"
ODD=$(cd "$HERE" && find . ! -type f ! -type d | head -n 1)
[ -z "$ODD" ] || die "bundle: $ODD is neither a file nor a folder; nothing installed"
cut -c67- "$HERE/SHA256SUMS" | LC_ALL=C sort > "$STAGE/listed"
(cd "$HERE" && find . -type f ! -path ./SHA256SUMS ! -path ./SHA256SUMS.sig) \
  | sed 's|^\./||' | LC_ALL=C sort > "$STAGE/present"
EXTRA=$(LC_ALL=C comm -13 "$STAGE/listed" "$STAGE/present" | head -n 1)
[ -z "$EXTRA" ] || die "bundle: $EXTRA is not listed in SHA256SUMS; nothing installed"
(cd "$HERE" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1) \
  || die "bundle files do not match SHA256SUMS (damaged or modified); nothing installed"
ed25519_der "$HERE/trust.pub" "$STAGE/bundle.der" && cmp -s "$STAGE/bundle.der" "$KEY" \
  || die "the bundle's trust.pub is not the key that signed it ($KEY_ID); nothing installed"

# 3. bundle.env is data: known keys, values in a plain charset; never sourced.
FEDGE_VERSION= DEVICE_ID= JOB= UNIT_NAME= NEEDS_TORCH= TORCH_SPEC= TORCH_INDEX=
TORCH_SPEC_AARCH64=
KEYS="FEDGE_VERSION DEVICE_ID JOB UNIT_NAME NEEDS_TORCH TORCH_SPEC TORCH_INDEX TORCH_SPEC_AARCH64"
SEEN=" "
N=0
while IFS= read -r line || [ -n "$line" ]; do
  N=$((N + 1))
  key=${line%%=*} val=${line#*=}
  [ "$key" != "$line" ] || die "bundle.env line $N: expected KEY=VALUE, got '$line'"
  case "$key" in
    *[!A-Z0-9_]*|'') die "bundle.env line $N: unknown key '$key'; valid keys: $KEYS" ;;
  esac
  case " $KEYS " in
    *" $key "*) ;;
    *) die "bundle.env line $N: unknown key '$key'; valid keys: $KEYS" ;;
  esac
  case "$key" in TORCH_INDEX) chars='A-Za-z0-9._:/=+-' ;; *) chars='A-Za-z0-9._=+-' ;; esac
  case "$val" in ''|*[!$chars]*) die "bundle.env line $N: $key: expected 1 or more" \
                                     "of [$chars], got '$val'" ;; esac
  case "$SEEN" in *" $key "*) die "bundle.env line $N: $key given twice" ;; esac
  SEEN="$SEEN$key "
  case "$key" in
    FEDGE_VERSION) FEDGE_VERSION=$val ;; DEVICE_ID) DEVICE_ID=$val ;; JOB) JOB=$val ;;
    UNIT_NAME) UNIT_NAME=$val ;; NEEDS_TORCH) NEEDS_TORCH=$val ;;
    TORCH_SPEC) TORCH_SPEC=$val ;; TORCH_INDEX) TORCH_INDEX=$val ;;
    TORCH_SPEC_AARCH64) TORCH_SPEC_AARCH64=$val ;;
  esac
done < "$HERE/bundle.env"
for key in $KEYS; do
  case "$SEEN" in *" $key "*) ;; *) die "bundle.env: $key is missing" ;; esac
done
case "$NEEDS_TORCH" in 0|1) ;; *) die "bundle.env: NEEDS_TORCH: expected 0 or 1" ;; esac
if [ -n "$VERIFY_ONLY" ]; then
  echo "bundle for $DEVICE_ID verified: signed by key $KEY_ID ($HOW), $(wc -l < "$STAGE/listed") files"
  exit 0
fi

[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such folder"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (use --python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "fedge needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"

# 4. A venv with fedge and what the device needs: wheels only (no build scripts), by
#    hash when the bundle pins them, offline when wheels are at hand.
mkdir -p "$PREFIX" "$PREFIX/var"
"$PYTHON" -m venv "$PREFIX/venv" \
  || die "cannot create a venv (Debian and Raspberry Pi OS: apt install python3-venv)"
PIP="$PREFIX/venv/bin/python -m pip --disable-pip-version-check --quiet"
set -- --only-binary=:all: --find-links "$HERE/wheels"
OFFLINE=
if [ -n "$WHEELHOUSE" ]; then set -- "$@" --find-links "$WHEELHOUSE"; OFFLINE=1; fi
if ls "$HERE/wheels" | grep -qv '^fedge-'; then OFFLINE=1; fi
if [ -n "$OFFLINE" ]; then set -- "$@" --no-index; fi
REQS="$PREFIX/var/requirements.txt"
if [ -f "$HERE/requirements.lock" ]; then
  if [ -n "$ORT" ]; then  # the operator's onnxruntime replaces the pinned one
    grep -v '^onnxruntime==' "$HERE/requirements.lock" > "$REQS" || true
  else
    cp "$HERE/requirements.lock" "$REQS"
  fi
  $PIP install "$@" --require-hashes -r "$REQS" \
    || die "installing the pinned device requirements (pip --require-hashes) failed"
  [ -z "$ORT" ] || $PIP install "$@" "$ORT" || die "installing $ORT failed"
else
  echo "install.sh: warning: the bundle pins no wheel hashes (made without --wheels or" \
       "--pin-wheels); third-party wheels are installed unchecked" >&2
  if [ -n "$ORT" ]; then
    sed "s|^onnxruntime.*|$ORT|" "$HERE/requirements.txt" > "$REQS"
  else
    cp "$HERE/requirements.txt" "$REQS"
  fi
  $PIP install "$@" -r "$REQS" || die "installing the device requirements failed"
fi
$PIP install "$@" --no-deps --force-reinstall "$HERE/wheels/fedge-$FEDGE_VERSION-py3-none-any.whl" \
  || die "installing fedge $FEDGE_VERSION failed"
if [ "$NEEDS_TORCH" = 1 ]; then
  if [ -n "$TORCH" ]; then
    $PIP install "$@" "$TORCH" || die "installing $TORCH failed"
  elif grep -q '^torch==' "$REQS"; then
    :  # pinned, and installed with the rest
  elif [ "$(uname -m)" = aarch64 ]; then  # PyPI's aarch64 torch <= 2.10 is a CPU build
    $PIP install "$@" "$TORCH_SPEC_AARCH64" || die "installing $TORCH_SPEC_AARCH64 failed"
  elif [ -n "$OFFLINE" ]; then
    $PIP install "$@" "$TORCH_SPEC" || die "installing $TORCH_SPEC failed"
  else  # PyPI's x86_64 torch is a CUDA build with GBs of NVIDIA packages
    $PIP install "$@" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
      "$TORCH_SPEC" || die "installing $TORCH_SPEC from $TORCH_INDEX failed"
  fi
  # A CUDA build is GBs a CPU device cannot use: refuse it rather than ship it.
  # (the code in a variable: dash misparses quoted parentheses inside $( ))
  CUDA_PY='import importlib.metadata as m
names = [d.metadata["Name"] for d in m.distributions()]
print(" ".join(sorted(n for n in names if n.lower().startswith(
    ("nvidia-", "nvidia_", "cuda-", "cuda_", "triton")))))'
  CUDA=$("$PREFIX/venv/bin/python" -c "$CUDA_PY")
  [ -z "$CUDA" ] || [ -n "$TORCH" ] \
    || die "torch came with CUDA packages ($CUDA); expected a CPU build (give --torch SPEC)"
fi

# 5. The config, checked in a staging folder before it replaces the running one.
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
# What the next install verifies with: this key and this script, owned by whoever
# installs (root for a service), outside the folders the agent may write.
for f in trust.pub install.sh; do
  cp "$HERE/$f" "$PREFIX/$f.new" && mv -f "$PREFIX/$f.new" "$PREFIX/$f"
done
chmod 755 "$PREFIX/install.sh"

# 6. The unit: run by a `fedge` system user when installed as a service, else by
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
