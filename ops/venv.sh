#!/usr/bin/env bash
# The Python environment of the tests that need packages Debian does not ship (the `gguf`
# reference dequantizer, the `openai` client, ...): a virtual environment built from
# ops/requirements-test.txt, with Debian's site packages visible (python3-grpcio stays the
# one from Debian). Prints the environment's python as its last line.
#   ops/venv.sh            create or update $TESSERA_VENV (default: <repo>/build-venv)
# Idempotent: a venv whose stamp matches the requirements file is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TESSERA_VENV:-$PWD/build-venv}"
req="$PWD/ops/requirements-test.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/python"
  exit 0
fi
/usr/bin/python3 -m venv --system-site-packages "$venv" >&2 || {
  echo "venv: could not create $venv (apt-get install python3-venv)" >&2
  exit 1
}
if grep -qv '^\s*\(#\|$\)' "$req"; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2 || {
    echo "venv: pip install -r $req failed (is the package registry reachable?)" >&2
    exit 1
  }
fi
echo "$want" >"$stamp"
echo "$venv/bin/python"
