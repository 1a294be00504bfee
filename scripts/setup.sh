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
  command -v groff >/dev/null 2>&1 || missing+=(groff-base)  # tests/test_cli_docs.py renders the man pages
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
# llama.cpp's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp#20824) on the
# Sapphire Rapids CPUs these machines have, for every quantized model: build the peer without them.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [[ ",$extras," == *",bench,"* && $(uname -m) == x86_64 && -z "${CMAKE_ARGS:-}" ]]; then
  export CMAKE_ARGS="-DCMAKE_C_FLAGS=\"$no_amx\" -DCMAKE_CXX_FLAGS=\"$no_amx\""
fi
echo "setup: installing llmos${extras:+ with extras [$extras]} into .venv$note" >&2
# pip's own chatter (build-backend notices) goes to a log, shown only if the install fails.
log=.venv/pip-install.log
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
       .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: pip install failed (log above, also in $log)" >&2
  exit 1
fi
# pip may reuse a llama-cpp-python wheel it built earlier with AMX: check the one installed, rebuild once.
if [[ ",$extras," == *",bench,"* && $(uname -m) == x86_64 ]] &&
   .venv/bin/python -c 'import llama_cpp, sys; sys.exit("AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode())' 2>/dev/null; then
  version=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
  echo "setup: rebuilding llama-cpp-python $version without AMX (about 7 minutes)" >&2
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps \
       "llama-cpp-python==$version" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: rebuilding llama-cpp-python failed (log above, also in $log)" >&2
    exit 1
  fi
fi
# The native Q4_0 op (optional: prints one line and carries on when it cannot be built).
scripts/build_native.sh || echo "setup: native Q4_0 op not built; llmos uses onnxruntime's MatMulNBits for Q4_0" >&2
