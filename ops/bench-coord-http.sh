#!/usr/bin/env bash
# bench-coord-http.sh [MODEL] — HTTP (OpenAI /v1/completions with SSE) against gRPC
# (Generate) through the same coordinator (`coordinator --http`) and the same replica, with
# ops/loadgen.py: TTFT and inter-token latency p50 at concurrency 1 and 16. Each figure is
# the median of REPS runs (default 3; a shared machine is noisy). Runs under
# `flock /work/bench.lock` when that file exists. Needs build/tessera, /usr/bin/python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TSR_BENCH_LOCKED:-}" ] && [ -e /work/bench.lock ]; then
  TSR_BENCH_LOCKED=1 exec flock /work/bench.lock "$0" "$@"
fi
MODEL=${1:-../shared/models/stories260K.gguf}
REPS=${REPS:-3}
REQ=${REQ:-48}
TOK=${TOK:-64}
THREADS=${THREADS:-1}
T=build/tessera
LOG=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$LOG"; }
trap cleanup EXIT
addr() { # $1 log, $2 pattern before the address
  for _ in $(seq 600); do
    a=$(grep -o "$2 [^ ]*" "$1" 2>/dev/null | head -1 | awk '{print $NF}') && [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.05
  done
  echo "no '$2' in $1" >&2; cat "$1" >&2; exit 1
}
loadgen() { # protocol target concurrency -> "ttft_p50_ms itl_p50_ms tok_s"
  /usr/bin/python3 ops/loadgen.py --protocol "$1" --target "$2" -c "$3" -n "$REQ" \
    --max-tokens "$TOK" --ignore-eos 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
f = lambda p: (re.search(p, t).group(1) if re.search(p, t) else "nan")
print(f(r"TTFT: *p50 ([0-9.]+)"), f(r"inter-token: *p50 ([0-9.]+)"), f(r"throughput: *([0-9.]+)"))'
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
measure() { # protocol target concurrency
  local tt=() it=() tp=() x y z
  for _ in $(seq "$REPS"); do
    read -r x y z < <(loadgen "$1" "$2" "$3"); tt+=("$x"); it+=("$y"); tp+=("$z")
  done
  printf '%-5s via coordinator  c=%-3s TTFT p50 %8s ms   ITL p50 %7s ms   %8s tok/s\n' "$1" "$3" \
    "$(printf '%s\n' "${tt[@]}" | median)" "$(printf '%s\n' "${it[@]}" | median)" \
    "$(printf '%s\n' "${tp[@]}" | median)"
}
echo "model $(basename "$MODEL"), one replica (-t $THREADS), $REQ requests x $TOK tokens, medians of $REPS"
uptime
$T coordinator --listen 127.0.0.1:0 --http 127.0.0.1:0 2>"$LOG/c" & PIDS+=($!)
C=$(addr "$LOG/c" "coordinator: listening on")
H=$(addr "$LOG/c" "http listening on")
$T serve -m "$MODEL" -t "$THREADS" --listen 127.0.0.1:0 --join "$C" --name r1 2>"$LOG/r1" & PIDS+=($!)
addr "$LOG/r1" "joined coordinator" >/dev/null
for conc in 1 16; do
  measure grpc "$C" $conc
  measure http "$H" $conc
done
uptime
