#!/usr/bin/env bash
# llama-build.sh — build llama.cpp's llama-bench from the llama-cpp-python 0.3.36 sdist
# (the very tree that made ../shared/models/expected/*) into a cache outside the repo, and
# print the path of the llama-bench binary as the last line. Reused when already built.
#
#   ops/bench/llama-build.sh [--cache DIR]      (default: $TSR_LLAMA_CACHE or
#                                                ~/.cache/tessera/llama.cpp)
# Why a separate script: compare.sh calls it, and it can run early in the background.
set -euo pipefail

VERSION=0.3.36
CACHE="${TSR_LLAMA_CACHE:-$HOME/.cache/tessera/llama.cpp}"
while [ $# -gt 0 ]; do
    case "$1" in
    --cache) CACHE="$2"; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "llama-build.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# AMX off: on Intel Xeons with AMX, GGML_NATIVE (-march=native) compiles ggml's AMX matmul
# in (GGML_AMX_* do not apply to a native build), and its tile configuration faults in this
# workplace's sandbox, so every prompt (-p > 0) of llama-bench segfaults in
# ggml_backend_amx_mul_mat; decode alone runs. -mno-amx-* win over -march=native in GCC, so
# the rest of the native ISA (AVX-512, VNNI, VBMI) stays on: the fastest llama.cpp that runs
# here. The flags are kept next to the build, and a build made with other flags is redone.
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NOAMX"
    "-DCMAKE_CXX_FLAGS=$NOAMX" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DBUILD_SHARED_LIBS=OFF)
BIN="$CACHE/build/bin/llama-bench"
STAMP="$CACHE/build/tessera-flags"
if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${FLAGS[*]}" ]; then
    echo "$BIN"
    exit 0
fi
rm -rf "$CACHE/build"
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo "llama-build.sh: fetching llama-cpp-python==$VERSION sdist from PyPI" >&2
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    if ! python3 -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$tmp" >&2; then
        echo "llama-build.sh: pip download failed; check the network or PyPI access" >&2
        rm -rf "$tmp"
        exit 1
    fi
    mv "$tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
    rm -rf "$tmp"
fi
SRC="$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$CACHE/src"
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src"
fi
JOBS="${TSR_LLAMA_JOBS:-2}"
echo "llama-build.sh: building llama-bench in $CACHE/build (-j$JOBS, a few minutes)" >&2
cmake -S "$SRC" -B "$CACHE/build" "${FLAGS[@]}" >&2
cmake --build "$CACHE/build" --target llama-bench -j "$JOBS" >&2
[ -x "$BIN" ] || { echo "llama-build.sh: build finished but $BIN is missing" >&2; exit 1; }
echo "${FLAGS[*]}" >"$STAMP"
echo "$BIN"
