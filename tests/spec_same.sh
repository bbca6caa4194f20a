#!/bin/sh
# spec_same.sh TESSERA MODEL PROMPT N SPEC_ARGS... — greedy generation with the given
# speculation flags must produce exactly the ids of generation without them (and the
# drafter must have proposed something, or the check proves nothing).
# TSR_SPEC_COMMON: flags for both runs (e.g. "--kv-type f16").
set -eu
bin=$1 model=$2 prompt=$3 n=$4
shift 4
common=${TSR_SPEC_COMMON:-}
# shellcheck disable=SC2086
plain=$("$bin" generate -m "$model" -p "$prompt" -n "$n" --temperature 0 --ignore-eos -t 2 --json $common)
# shellcheck disable=SC2086
spec=$("$bin" generate -m "$model" -p "$prompt" -n "$n" --temperature 0 --ignore-eos -t 2 --json $common "$@")
/usr/bin/python3 - "$plain" "$spec" "$*" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if a["ids"] != b["ids"]:
    sys.exit("speculation (%s) changed the greedy ids:\n expected %s\n got      %s"
             % (sys.argv[3], a["ids"], b["ids"]))
if not b.get("spec_drafted"):
    sys.exit("the drafter (%s) proposed nothing: the check would prove nothing" % sys.argv[3])
print("same %d greedy ids with %s (drafted %d, accepted %d)"
      % (len(b["ids"]), sys.argv[3], b["spec_drafted"], b["spec_accepted"]))
PY
