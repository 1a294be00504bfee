#!/usr/bin/env bash
# Build llmos's native op library (llmos/native/*.cc: one op per GGUF weight type) for this CPU, into
# llmos/native/build/.
# Optional: when it cannot be built (no x86-64 AVX2, no compiler, no headers), it prints one line and
# exits 0, and llmos imports every weight type for onnxruntime's MatMulNBits instead. Idempotent: skips when
# the library was built from the same source, headers and flags. Called by scripts/setup.sh.
#
# Headers: Debian trixie's libonnxruntime-dev (onnxruntime 1.21 C/C++ API headers, ORT_API_VERSION 21),
# fetched with `apt-get download` from the Debian mirror this machine's apt already uses, through a
# private apt state (its own sources list naming trixie, lists and cache under the build directory: the
# system's apt configuration is only read, never changed), checked against the sha256 pinned here and
# unpacked with dpkg-deb into the build directory. The library is
# compiled header-only (ORT_API_MANUAL_INIT, no link to libonnxruntime); newer onnxruntime releases
# (the .venv has 1.32) load it through their stable C API.
set -uo pipefail
cd "$(dirname "$0")/.."
srcs=(llmos/native/*.cc)
headers_own=(llmos/native/*.h)
out=llmos/native/build
lib=$out/libllmos_gguf_ops.so
deb_name=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
deb_sha256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
deb_version=1.21.0+dfsg-1

skip() {
  echo "setup: native GGUF ops not built ($1); llmos uses onnxruntime's MatMulNBits" >&2
  exit 0
}

# The package from trixie, by name and version, with apt's own client: a private sources list gets the
# URI of the Debian archive the system's apt sources name (deb822 or one-line form), suite trixie.
fetch_deb() {
  local dest=$1 apt=$out/apt uri
  command -v apt-get >/dev/null 2>&1 || return 1
  uri=$(grep -hs -m1 -E '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources | awk '{print $2}')
  [[ -n "$uri" ]] || uri=$(grep -hs -m1 -E '^deb .*debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}')
  [[ -n "$uri" ]] || return 1
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" >"$apt/trixie.sources"
  local opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$(realpath "$apt")"
    -o "Dir::State::Lists=$(realpath "$apt/lists")" -o "Dir::Cache=$(realpath "$apt/cache")"
    -o "Acquire::Languages=none" -q=2)
  local log
  log=$(realpath "$out")/apt.log
  apt-get "${opts[@]}" update >"$log" 2>&1 || return 1
  (cd "$out" && apt-get "${opts[@]}" download "libonnxruntime-dev=$deb_version" >>"$log" 2>&1) || return 1
  [[ -f "$dest" ]]
}

[[ $(uname -m) == x86_64 ]] || skip "not an x86-64 machine"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has() { [[ " $flags " == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl && has avx512_vnni; then
  isa="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni"
elif has avx2 && has fma && has f16c; then
  isa="-mavx2 -mfma -mf16c"
  has avx_vnni && isa="$isa -mavxvnni"
else
  skip "this CPU has no AVX2"
fi
cxx=$(command -v g++ || command -v c++ || true)
[[ -n "$cxx" ]] || skip "no C++ compiler (apt-get install g++)"
cxxflags="-std=c++17 -O3 -fPIC -shared -fvisibility=hidden $isa"

stamp=$( { cat "${srcs[@]}" "${headers_own[@]}" | sha256sum | cut -d' ' -f1; echo "$deb_sha256 $cxx $cxxflags"; } | sha256sum | cut -d' ' -f1)
if [[ -f $lib && "$(cat "$lib.stamp" 2>/dev/null)" == "$stamp" ]]; then
  exit 0  # built from this source with these flags already
fi

mkdir -p "$out"
headers=$out/onnxruntime-dev/usr/include/onnxruntime
if [[ ! -f $headers/onnxruntime_cxx_api.h ]]; then
  command -v dpkg-deb >/dev/null 2>&1 || skip "no dpkg-deb to unpack the headers"
  deb=$out/$deb_name
  if [[ ! -f $deb ]] || ! echo "$deb_sha256  $deb" | sha256sum -c --status; then
    echo "setup: fetching onnxruntime's C API headers ($deb_name, 85 KB)" >&2
    fetch_deb "$deb" || skip "could not download $deb_name with apt-get"
    echo "$deb_sha256  $deb" | sha256sum -c --status || { rm -f "$deb"; skip "$deb_name failed its sha256 check"; }
  fi
  rm -rf "$out/onnxruntime-dev"
  dpkg-deb -x "$deb" "$out/onnxruntime-dev" || skip "could not unpack $deb_name"
fi

echo "setup: building the native GGUF ops ($isa)" >&2
# shellcheck disable=SC2086
if ! "$cxx" $cxxflags -I"$headers" -Illmos/native "${srcs[@]}" -o "$lib.tmp" 2>"$out/build.log"; then
  rm -f "$lib.tmp"
  skip "compiling failed, see $out/build.log"
fi
# the check that matters: onnxruntime accepts it
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c 'import sys, onnxruntime as o; o.SessionOptions().register_custom_ops_library(sys.argv[1])' "$lib.tmp" 2>>"$out/build.log"; then
  rm -f "$lib.tmp"
  skip "onnxruntime refused the library, see $out/build.log"
fi
mv "$lib.tmp" "$lib"
echo "$stamp" >"$lib.stamp"
