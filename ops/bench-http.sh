#!/usr/bin/env bash
# bench-http.sh [--coordinator] [MODEL] — HTTP streaming (OpenAI /v1/completions with SSE)
# against gRPC (Generate) on the same server, with ops/loadgen.py: TTFT and inter-token
# latency p50 at concurrency 1 and 16, and the HTTP / gRPC ratio of each (the aim: HTTP adds
# at most 10%). Direct: one `tessera serve --http` (its gRPC and HTTP ports); with
# --coordinator: a `coordinator --http` over one replica (ops/bench-coord-http.sh). Runs are
# interleaved (rep 1: gRPC, HTTP; rep 2: HTTP, gRPC; ...) so that drifting load on a shared
# machine hits both alike; each figure is the median of REPS runs (default 3). Runs under
# `flock /work/bench.lock` when that file exists. Needs build/tessera, /usr/bin/python3.
# Environment: REPS, REQ1 / REQ16 (requests at c=1 / c=16; default 16 / 64), TOK (tokens per
# request, default 64), THREADS (per replica, default 1). Prints the medians of each
# protocol, their ratio, and the median of the per-rep ratios (each HTTP run against the
# gRPC run next to it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TSR_BENCH_LOCKED:-}" ] && [ -e /work/bench.lock ]; then
  TSR_BENCH_LOCKED=1 exec flock /work/bench.lock "$0" "$@"
fi
VIA=direct
if [ "${1:-}" = "--coordinator" ]; then VIA=coordinator; shift; fi
MODEL=${1:-../shared/models/stories260K.gguf}
REPS=${REPS:-3}
REQ1=${REQ1:-16}
REQ16=${REQ16:-64}
TOK=${TOK:-64}
THREADS=${THREADS:-1}
T=build/tessera
. ops/bench/lib.sh # bench_tmp (LOG, PIDS), addr, median
bench_tmp
loadgen() { # protocol target concurrency requests -> "ttft_p50_ms itl_p50_ms tok_s"
  /usr/bin/python3 ops/loadgen.py --protocol "$1" --target "$2" -c "$3" -n "$4" \
    --max-tokens "$TOK" --ignore-eos 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
f = lambda p: (re.search(p, t).group(1) if re.search(p, t) else "nan")
print(f(r"TTFT: *p50 ([0-9.]+)"), f(r"inter-token: *p50 ([0-9.]+)"), f(r"throughput: *([0-9.]+)"))'
}
echo "model $(basename "$MODEL"), $VIA, -t $THREADS, $TOK tokens per request, c=1: $REQ1 requests, c=16: $REQ16, medians of $REPS interleaved runs"
uptime
if [ "$VIA" = coordinator ]; then
  $T coordinator --listen 127.0.0.1:0 --http 127.0.0.1:0 2>"$LOG/c" & PIDS+=($!)
  G=$(addr "$LOG/c" "coordinator: listening on")
  H=$(addr "$LOG/c" "http listening on")
  $T serve -m "$MODEL" -t "$THREADS" --listen 127.0.0.1:0 --join "$G" --name r1 2>"$LOG/r1" & PIDS+=($!)
  addr "$LOG/r1" "joined coordinator" >/dev/null
else
  $T serve -m "$MODEL" -t "$THREADS" --listen 127.0.0.1:0 --http 127.0.0.1:0 2>"$LOG/s" & PIDS+=($!)
  G=$(addr "$LOG/s" "serve: listening on")
  H=$(addr "$LOG/s" "http listening on")
fi
loadgen grpc "$G" 1 2 >/dev/null; loadgen http "$H" 1 2 >/dev/null # warm up
for conc in 1 16; do
  n=$REQ1; [ "$conc" = 16 ] && n=$REQ16
  gt=(); gi=(); gp=(); ht=(); hi=(); hp=()
  for r in $(seq "$REPS"); do
    order="grpc http"; [ $((r % 2)) = 0 ] && order="http grpc"
    for proto in $order; do
      if [ "$proto" = grpc ]; then
        read -r x y z < <(loadgen grpc "$G" "$conc" "$n"); gt+=("$x"); gi+=("$y"); gp+=("$z")
      else
        read -r x y z < <(loadgen http "$H" "$conc" "$n"); ht+=("$x"); hi+=("$y"); hp+=("$z")
      fi
    done
  done
  mg=$(printf '%s\n' "${gt[@]}" | median); mgi=$(printf '%s\n' "${gi[@]}" | median)
  mh=$(printf '%s\n' "${ht[@]}" | median); mhi=$(printf '%s\n' "${hi[@]}" | median)
  printf '%-11s c=%-3s gRPC TTFT p50 %8s ms  ITL p50 %7s ms  %8s tok/s   (runs: TTFT %s; ITL %s)\n' \
    "$VIA" "$conc" "$mg" "$mgi" "$(printf '%s\n' "${gp[@]}" | median)" "${gt[*]}" "${gi[*]}"
  printf '%-11s c=%-3s HTTP TTFT p50 %8s ms  ITL p50 %7s ms  %8s tok/s   (runs: TTFT %s; ITL %s)\n' \
    "$VIA" "$conc" "$mh" "$mhi" "$(printf '%s\n' "${hp[@]}" | median)" "${ht[*]}" "${hi[*]}"
  # Paired: rep r's HTTP run against its neighbouring gRPC run, then the median of the
  # ratios (drifting load cancels better than in the ratio of the medians).
  rt=(); ri=()
  for i in "${!gt[@]}"; do
    rt+=("$(awk -v a="${ht[$i]}" -v b="${gt[$i]}" 'BEGIN { printf "%.4f", a / b }')")
    ri+=("$(awk -v a="${hi[$i]}" -v b="${gi[$i]}" 'BEGIN { printf "%.4f", a / b }')")
  done
  awk -v a="$mh" -v b="$mg" -v c="$mhi" -v d="$mgi" -v v="$VIA" -v k="$conc" \
    -v pt="$(printf '%s\n' "${rt[@]}" | median)" -v pi="$(printf '%s\n' "${ri[@]}" | median)" 'BEGIN {
    printf "%-11s c=%-3s HTTP / gRPC: TTFT %+.1f%%, ITL %+.1f%% (medians); paired runs: TTFT %+.1f%%, ITL %+.1f%%\n",
      v, k, (a / b - 1) * 100, (c / d - 1) * 100, (pt - 1) * 100, (pi - 1) * 100 }'
done
uptime
