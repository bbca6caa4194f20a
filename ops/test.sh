#!/usr/bin/env bash
# The whole test suite: install what is missing, build the release and the sanitizer
# (ASan + UBSan) trees, and run every test under ctest in both.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install-deps.sh
ops/venv.sh >/dev/null
ops/build.sh release
ops/build.sh asan
echo "== ctest: release build"
(cd build && ctest --output-on-failure -j 2)
echo "== ctest: ASan + UBSan build"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2)
