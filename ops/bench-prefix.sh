#!/usr/bin/env bash
# bench-prefix.sh [MODEL...] — what the prefix cache saves: TTFT of requests that share a
# PREFIX-token prompt prefix (a system prompt; default 512) and add SUFFIX tokens of their
# own (default 32), on `tessera serve` with the prefix cache and with --no-prefix-cache
# (both servers up at once, runs interleaved), through ops/loadgen.py
# (--shared-prefix/--suffix: token-id prompts), concurrency 1 and 4.
# Each figure is the median of REPS runs (default 3) of REQ requests (default 24) generating
# TOK tokens (default 4); each run starts after one warm-up request, so the cached server
# has the prefix once (as a server that has seen the system prompt before). Prints one line
# per measurement, the ratio, and `uptime`. Wrap it in `flock /work/bench.lock` on a shared
# machine. Needs build/tessera and /usr/bin/python3 with grpcio.
#   ops/bench-prefix.sh ../shared/models/stories260K.gguf "$(ops/fetch-model.sh smollm2-135m-instruct | tail -n 1)"
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- ../shared/models/stories260K.gguf
REPS=${REPS:-3}
REQ=${REQ:-24}
TOK=${TOK:-4}
PREFIX=${PREFIX:-512}
SUFFIX=${SUFFIX:-32}
THREADS=${THREADS:-2}
T=build/tessera
. ops/bench/lib.sh # bench_tmp (LOG, PIDS), addr, median
bench_tmp
lg() { # target concurrency n -> "ttft_p50_ms ttft_p99_ms"
  /usr/bin/python3 ops/loadgen.py --target "$1" -c "$2" -n "$3" --max-tokens "$TOK" \
    --ignore-eos --shared-prefix "$PREFIX" --suffix "$SUFFIX" 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
m = re.search(r"TTFT: *p50 ([0-9.]+) ms, p99 ([0-9.]+)", t)
if not m or "0 failed" not in t:
    sys.exit("loadgen failed:\n" + t)
print(m.group(1), m.group(2))'
}
uptime
for MODEL in "$@"; do
  echo "== $(basename "$MODEL"): shared prefix $PREFIX + suffix $SUFFIX tokens, $TOK generated, -t $THREADS"
  # Both servers up at once, runs interleaved, so that load from elsewhere hits both alike.
  $T serve -m "$MODEL" -t "$THREADS" --listen 127.0.0.1:0 -c 2048 2>"$LOG/a" & PIDS+=($!)
  $T serve -m "$MODEL" -t "$THREADS" --listen 127.0.0.1:0 -c 2048 --no-prefix-cache \
    2>"$LOG/b" & PIDS+=($!)
  declare -A ADDR=([cache]=$(addr "$LOG/a" "serve: listening on") [no-cache]=$(addr "$LOG/b" "serve: listening on"))
  for c in 1 4; do
    declare -A P50=() P99=()
    for _ in $(seq "$REPS"); do
      for mode in cache no-cache; do
        lg "${ADDR[$mode]}" 1 1 >/dev/null # warm-up: the prefix is computed (and cached) once
        read -r a b < <(lg "${ADDR[$mode]}" "$c" "$REQ")
        P50[$mode]+="$a "
        P99[$mode]+="$b "
      done
    done
    for mode in cache no-cache; do
      m=$(printf '%s\n' ${P50[$mode]} | median)
      P50[$mode,m]=$m
      printf '%-9s c=%-2s TTFT p50 %9s ms  p99 %9s ms  (medians of %d runs of %d requests)\n' \
        "$mode" "$c" "$m" "$(printf '%s\n' ${P99[$mode]} | median)" "$REPS" "$REQ"
    done
    python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print('c=%s  TTFT p50 --no-prefix-cache / prefix cache: %.1fx' % (sys.argv[3], b / a))" \
      "${P50[cache,m]}" "${P50[no-cache,m]}" "$c"
    unset P50 P99
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  unset ADDR
done
uptime
