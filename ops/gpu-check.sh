#!/usr/bin/env bash
# ops/gpu-check.sh — everything a GPU machine should run, in one go, printing figures:
#   1. build the release tree with the CUDA backend (TESSERA_CUDA=ON; build-gpu/);
#   2. the host-side CUDA checks (test_cuda_numerics, the simulator tests) and the GPU suite
#      (ctest -L gpu: logits of every model against the CPU, layouts, NCCL tp 2);
#   3. benchmarks on GPU 0: decode and prefill of the 1B-like Q4_0 and Q8_0 mkmodel shapes
#      and of Qwen2.5-Coder-0.5B (when ops/fetch-model.sh can provide it), against the GPU's
#      memory roofline (peak bandwidth / bytes read per token); tp 2 over NCCL when two GPUs
#      are visible (decode speed relative to one GPU).
# Usage: ops/gpu-check.sh [-j JOBS] [--skip-build] [--quick]   (--quick: 1 rep, short runs)
# Exit status: non-zero when the build or a test failed (benchmarks only print).
set -uo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
build=1
reps=3
plen=512
glen=128
while [ $# -gt 0 ]; do
  case "$1" in
    -j) jobs="$2"; shift 2 ;;
    --skip-build) build=0; shift ;;
    --quick) reps=1; plen=128; glen=32; shift ;;
    *) echo "usage: ops/gpu-check.sh [-j JOBS] [--skip-build] [--quick]" >&2; exit 2 ;;
  esac
done
B=build-gpu
rc=0
section() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

section "environment"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | head -9 || true
if [ "$build" = 1 ]; then
  section "build ($B, TESSERA_CUDA=ON)"
  t0=$(date +%s)
  cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DTESSERA_CUDA=ON >/dev/null || exit 1
  cmake --build "$B" -j "$jobs" 2>&1 | grep -E "warning|error" ; st=${PIPESTATUS[0]}
  [ "$st" = 0 ] || { echo "build failed"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
"$B/tests/gpu_check" --info || { echo "no GPU: the GPU suite would only skip"; exit 1; }
bw=$("$B/tests/gpu_check" --info | sed -n 's/^device 0: .*peak bandwidth \([0-9.]*\) GB\/s/\1/p')
ngpu=$("$B/tests/gpu_check" --info | grep -c '^device ')

section "host-side CUDA checks"
(cd "$B" && ctest -R 'test_cuda_numerics|gpu_sim_' --output-on-failure -j 2) || rc=1
section "GPU suite (ctest -L gpu)"
(cd "$B" && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  ctest -L gpu --output-on-failure -V 2>&1 | grep -E "PASS|FAIL|SKIP|Test +#|tests passed|replica_check") || rc=1

section "benchmarks (GPU 0; peak bandwidth ${bw} GB/s; medians of ${reps})"
models="$B/bench-models"
mkdir -p "$models"
vocab=../shared/models/vocab/ggml-vocab-llama-spm.gguf
for t in Q4_0 Q8_0; do
  f="$models/1b-$t.gguf"
  [ -f "$f" ] || "$B/tessera" mkmodel -o "$f" --vocab-from "$vocab" --n-layer 16 --n-embd 2048 \
    --n-head 32 --n-head-kv 8 --n-ff 8192 --type "$t" >/dev/null 2>&1
done
qwen=$(ops/fetch-model.sh qwen2.5-coder-0.5b-instruct 2>/dev/null | tail -1)
bench() { # NAME ARGS... -> one line of figures
  local name="$1"; shift
  local out
  out=$("$@" --json -p "$plen" -n "$glen" -r "$reps" 2>/dev/null) || { echo "$name: bench failed"; return; }
  BW="$bw" NAME="$name" /usr/bin/python3 -c '
import json, os, sys
j = json.loads(sys.stdin.read()); bw = float(os.environ["BW"]) * 1e9
roof = bw / j["bytes_per_token"] if bw > 0 else 0
d = j["decode_tokens_per_s"]
print("%-22s prefill %8.1f tok/s  decode %8.1f tok/s  bytes/token %7.1f MiB  GPU roofline %8.1f tok/s  achieved %.2f"
      % (os.environ["NAME"], j["prefill_tokens_per_s"], d, j["bytes_per_token"] / 1048576, roof,
         d / roof if roof else 0))' <<<"$out"
}
for t in Q4_0 Q8_0; do
  bench "1B-like $t" "$B/tessera" bench -m "$models/1b-$t.gguf" --device cuda
  bench "1B-like $t (CPU)" "$B/tessera" bench -m "$models/1b-$t.gguf" --device cpu
done
if [ -n "$qwen" ] && [ -f "$qwen" ]; then
  bench "Qwen2.5-Coder-0.5B" "$B/tessera" bench -m "$qwen" --device cuda
else
  echo "Qwen2.5-Coder-0.5B: not available here (ops/fetch-model.sh failed); skipped"
fi
if [ "$ngpu" -ge 2 ]; then
  for t in Q4_0 Q8_0; do
    bench "1B-like $t tp 2 (NCCL)" env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
      mpirun --bind-to none -np 2 "$B/tessera" bench -m "$models/1b-$t.gguf" --device cuda --tp 2
  done
else
  echo "tp 2 over NCCL: needs 2 GPUs, $ngpu visible; skipped"
fi
section "done: $([ $rc = 0 ] && echo all tests passed || echo SOME TESTS FAILED)"
exit $rc
