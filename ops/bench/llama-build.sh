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

BIN="$CACHE/build/bin/llama-bench"
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
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
cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$CACHE/build" --target llama-bench -j "$JOBS" >&2
[ -x "$BIN" ] || { echo "llama-build.sh: build finished but $BIN is missing" >&2; exit 1; }
echo "$BIN"
