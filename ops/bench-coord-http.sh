#!/usr/bin/env bash
# bench-coord-http.sh [MODEL] — HTTP streaming against gRPC through the same coordinator
# (`coordinator --http`) and the same replica: ops/bench-http.sh --coordinator (see there:
# TTFT and inter-token latency p50 at concurrency 1 and 16, medians of interleaved runs).
exec "$(dirname "$0")/bench-http.sh" --coordinator "$@"
