#!/usr/bin/env bash
# bench-coord.sh [MODEL] — the coordinator's cost and scaling, with ops/loadgen.py:
#   1. TTFT direct to one replica vs through the coordinator, concurrency 1 and 16;
#   2. throughput of two 1-thread replicas behind the coordinator vs one, concurrency 16.
# Each figure is the median of REPS runs (default 3; timings on a shared machine are noisy).
# Prints one line per measurement. Needs build/tessera and /usr/bin/python3 with grpcio.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/models/stories260K.gguf}
REPS=${REPS:-3}
REQ=${REQ:-64}
TOK=${TOK:-64}
T=build/tessera
. ops/bench/lib.sh # bench_tmp (LOG, PIDS), addr, median
bench_tmp
loadgen() { # target concurrency -> "ttft_p50_ms tok_s"
  /usr/bin/python3 ops/loadgen.py --target "$1" -c "$2" -n "$REQ" --max-tokens "$TOK" \
    --ignore-eos 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
tps = re.search(r"throughput: *([0-9.]+)", t); ttft = re.search(r"TTFT: *p50 ([0-9.]+)", t)
print(ttft.group(1) if ttft else "nan", tps.group(1) if tps else "nan")'
}
measure() { # label target concurrency
  local tt=() tp=()
  for _ in $(seq "$REPS"); do read -r a b < <(loadgen "$2" "$3"); tt+=("$a"); tp+=("$b"); done
  printf '%-40s c=%-3s TTFT p50 %8s ms   %8s tok/s   (median of %d)\n' "$1" "$3" \
    "$(printf '%s\n' "${tt[@]}" | median)" "$(printf '%s\n' "${tp[@]}" | median)" "$REPS"
}
$T coordinator --listen 127.0.0.1:0 2>"$LOG/c" & PIDS+=($!)
C=$(addr "$LOG/c")
$T serve -m "$MODEL" -t 1 --listen 127.0.0.1:0 --join "$C" --name r1 2>"$LOG/r1" & PIDS+=($!)
R1=$(addr "$LOG/r1")
sleep 1
for c in 1 16; do
  measure "direct to one replica" "$R1" $c
  measure "through the coordinator, one replica" "$C" $c
done
$T serve -m "$MODEL" -t 1 --listen 127.0.0.1:0 --join "$C" --name r2 2>"$LOG/r2" & PIDS+=($!)
addr "$LOG/r2" >/dev/null
sleep 1
measure "through the coordinator, two replicas" "$C" 16
