#!/usr/bin/env bash
# bench-kvtype.sh [THREADS] — KV cache types side by side (README "KV cache types"):
#   1. decode tokens/s and bytes per token (weights + KV) with `tessera bench` at context
#      lengths 128, 1024 and 4096, for --kv-type f32, f16 and q8_0, on SmolLM2-135M and
#      Qwen2.5-Coder-0.5B (ops/fetch-model.sh);
#   2. the attention kernel alone: one head over 4096 positions per type and ISA
#      (build/tests/bench_kvcache), alone and in a group of 7 query heads per KV head.
# Each bench figure is the median of REPS runs (default 3; REPS_LONG, default 1, at 4096:
# its prefill alone takes minutes); timings on a shared machine are noisy. Run it under
# `flock /work/bench.lock` on a shared machine. Needs build/.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
REPS=${REPS:-3}
REPS_LONG=${REPS_LONG:-1}
GEN=${GEN:-32}
CTXS=${CTXS:-"128 1024 4096"}
uptime
printf '%-28s %-5s %6s %12s %14s %12s\n' model kv ctx "decode tok/s" "bytes/token" "KV bytes/tok"
for name in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
  m=$(ops/fetch-model.sh "$name" | tail -n 1)
  for ctx in $CTXS; do
    for kv in f32 f16 q8_0; do
      r=$REPS
      [ "$ctx" -ge 4096 ] && r=$REPS_LONG
      j=$(build/tessera bench -m "$m" -t "$THREADS" -p "$ctx" -n "$GEN" -r "$r" \
            --kv-type "$kv" --json)
      /usr/bin/python3 - "$name" "$kv" "$ctx" "$j" <<'PY'
import json, sys
name, kv, ctx, j = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
print("%-28s %-5s %6s %12.2f %14.0f %12.0f" % (name, kv, ctx, j["decode_tokens_per_s"],
      j["bytes_per_token"], j["kv_bytes_per_token"]))
PY
    done
  done
done
build/tests/bench_kvcache -d 64 -n 4096
build/tests/bench_kvcache -d 64 -n 4096 -g 7 # Qwen2.5's GQA group: tsr_attn_group, as the engine
uptime
