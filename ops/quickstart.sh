#!/usr/bin/env bash
# Quick start: install what is missing, build, and generate from a GGUF model
# (default: ../shared/models/stories260K.gguf). Extra arguments go to `tessera generate`.
#   ops/quickstart.sh                          # the embedded default
#   ops/quickstart.sh -m model.gguf -p "Hi"    # any llama GGUF
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install-deps.sh
ops/build.sh release
if [ $# -eq 0 ]; then
  set -- -m ../shared/models/stories260K.gguf -p "Once upon a time" -n 64 --temperature 0
fi
exec build/tessera generate "$@"
