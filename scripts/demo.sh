#!/usr/bin/env bash
# Fresh machine to a streamed answer through the service: set up, fetch + verify + import the default
# model, start llmosd on a private D-Bus bus, ask it a question with llmosctl, then stop both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v dbus-daemon >/dev/null 2>&1 || {
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dbus >/dev/null
}
.venv/bin/llmosctl model import --default

run=$(mktemp -d)
cleanup() {
  set +e  # always reach the end: a daemon stopped by SIGTERM makes `wait` return 143
  [[ -n "${daemon_pid:-}" ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  [[ -n "${bus_pid:-}" ]] && kill "$bus_pid" 2>/dev/null
  rm -rf "$run"
}
trap cleanup EXIT
cat >"$run/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$run/bus</listen>
  <policy context="default">
    <allow send_destination="*"/><allow receive_sender="*"/><allow own="*"/>
  </policy>
</busconfig>
CONF
dbus-daemon --config-file="$run/bus.conf" --nofork --print-address=1 >"$run/address" 2>/dev/null &
bus_pid=$!
for _ in $(seq 50); do [[ -s "$run/address" ]] && break; sleep 0.1; done
address=$(head -n1 "$run/address")
echo "demo: private bus at $address; starting llmosd" >&2
.venv/bin/llmosd --address "$address" 2>"$run/llmosd.log" &
daemon_pid=$!
for _ in $(seq 300); do grep -q serving "$run/llmosd.log" && break; sleep 0.1; done
grep -q serving "$run/llmosd.log" || { cat "$run/llmosd.log" >&2; exit 1; }
sed 's/^/llmosd: /' "$run/llmosd.log" >&2
.venv/bin/llmosctl status --address "$address"
.venv/bin/llmosctl generate --address "$address" \
  "${1:-Write a Python function that returns the square of a number.}"
