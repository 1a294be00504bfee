#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine: system packages, the .venv, llmos and its extras.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [[ ",$extras," == *",bench,"* ]]; then  # llama-cpp-python (the peer) compiles from source
  for tool in gcc g++ cmake make; do
    command -v "$tool" >/dev/null 2>&1 || { missing+=(build-essential cmake); break; }
  done
fi
if [[ ",$extras," == *",test,"* ]]; then  # tests/test_packaging.py drives the real system tools
  [[ -f /usr/share/dbus-1/system.conf ]] && command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus)
  for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null 2>&1 || { missing+=(systemd); break; }
  done
  command -v gdbus >/dev/null 2>&1 || missing+=(libglib2.0-bin)
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  command -v pkcheck >/dev/null 2>&1 || missing+=(polkitd)  # polkitd, pkaction, pkcheck
fi
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
spec="."
[[ -n "$extras" ]] && spec=".[${extras}]"
note=""
[[ ",$extras," == *",bench,"* ]] && note=" (the first time, llama-cpp-python compiles for about 7 minutes)"
echo "setup: installing llmos${extras:+ with extras [$extras]} into .venv$note" >&2
# pip's own chatter (build-backend notices) goes to a log, shown only if the install fails.
log=.venv/pip-install.log
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
       .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: pip install failed (log above, also in $log)" >&2
  exit 1
fi
