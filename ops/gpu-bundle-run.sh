#!/usr/bin/env bash
# ops/gpu-bundle-run.sh — the GPU checks and benchmarks on a device machine from the
# prebuilt bundle of ops/gpu-bundle.sh (the device image lacks the build's Debian
# dependencies, so nothing is configured or built there except llama.cpp's llama-bench).
# Runs from the repository root with .gpu-carry/ carried (ops/gpu-stage.sh + gpu-bundle.sh):
#   1. environment (GPU, driver, where NCCL and cuBLAS are), the bundle installed without
#      overwriting a file of the image (missing libraries and Open MPI only);
#   2. llama.cpp's llama-bench built with CUDA in the background (for the comparison);
#   3. correctness: gpu_check (CUDA logits against the CPU backend, prefill through cuBLAS,
#      16+ greedy decode steps, a 5-token matvec prefill, KV copies) on the staged models
#      and on small models of every weight type and architecture made here with mkmodel,
#      each KV type; spec_check (speculation exact on the GPU); compute-sanitizer memcheck;
#      replica_check tp 2 x pp 2 under mpirun (ranks sharing the GPU: host round trip);
#      the gRPC server on the GPU (tests/python/test_serve.py, two of its cases);
#   4. benchmarks: tessera bench --device cuda on 1B-shaped Q4_0 / Q8_0 / Q4_K_M files
#      (decode against the GPU memory roofline), and llama-bench -ngl 99 on the same files.
# Every step has a timeout; past the budget (seconds, default 330) the rest is skipped and
# said so. Output: stdout and $OUT/gpu-run.log; one summary table at the end.
# Usage: ops/gpu-bundle-run.sh [BUDGET_S] [--only REGEX]   (REGEX: steps to run, by name)
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-330}
only=${3:-.}
[ "${2:-}" = "--only" ] || only=.
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-run.log") 2>&1
t_start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t_start) )); }
sumf="$OUT/summary.txt"
: >"$sumf"
row() { printf '%-44s %-10s %s\n' "$1" "$2" "$3" | tee -a "$sumf" >/dev/null; }
sec() { printf '\n== %s (%d s in)\n' "$1" "$(( $(date +%s) - t_start ))"; }
C=.gpu-carry
M=$C/models
W=/tmp/tsr-gpu
mkdir -p $W/m $W/checks

sec "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
nvcc --version 2>/dev/null | tail -1
head -2 /etc/os-release
nproc
export PATH=$PATH:/usr/local/cuda/bin
untar() { # DIR FILE.tar.xz: with xz, else Python's lzma (an image without xz-utils)
  if command -v xz >/dev/null; then tar -C "$1" -xJf "$2"
  else python3 -c 'import sys, tarfile; tarfile.open(sys.argv[2]).extractall(sys.argv[1])' "$1" "$2"; fi
}
untar $W $C/bundle.tar.xz || { echo "no bundle: run ops/gpu-bundle.sh here first"; exit 1; }
B=$W/bundle/bin
# Open MPI at its Debian paths, libraries the image lacks: never overwrite the image's files
# (only where something is missing: on a machine with the build's own packages, nothing)
if ldd $B/tessera | grep -q "not found" || ! command -v mpirun >/dev/null; then
  (cd $W/bundle/root && tar -cf - .) | tar -C / --skip-old-files -xf - 2>/dev/null
  cp -n $W/bundle/lib/* /usr/lib/x86_64-linux-gnu/ 2>/dev/null
  nccl=$(find /usr /opt /root -name 'libnccl.so.2' 2>/dev/null | head -1)
  cublas=$(find /usr/local /usr/lib /opt -name 'libcublas.so.13' 2>/dev/null | head -1)
  echo "NCCL: ${nccl:-not found}; cuBLAS: ${cublas:-not found}"
  for l in "$nccl" "$cublas"; do [ -n "$l" ] && dirname "$l"; done >/etc/ld.so.conf.d/zz-tessera-gpu.conf
  ldconfig
fi
missing=$(ldd $B/tessera | grep "not found")
[ -z "$missing" ] || echo "unresolved libraries: $missing"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_mtl=^ofi OMPI_MCA_btl_vader_single_copy_mechanism=none
info=$($B/gpu_check --info 2>&1)
echo "$info"
bw=$(printf '%s\n' "$info" | sed -n 's/^device 0: .*peak bandwidth \([0-9.]*\) GB\/s.*/\1/p')
row "GPU" "-" "$(printf '%s\n' "$info" | head -1)"

# llama.cpp with CUDA, in the background on most cores while the checks use the GPU
llama=""
if [[ "bench" =~ $only ]] && [ -f $C/llama.cpp.tar.xz ]; then
  mkdir -p $W/llsrc && untar $W/llsrc $C/llama.cpp.tar.xz
  setsid bash -c "cmake -S $W/llsrc/llama.cpp -B $W/llb -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DGGML_CUDA_FA=OFF \
      -DBUILD_SHARED_LIBS=OFF >$W/llb.log 2>&1 && \
      nice -n 5 cmake --build $W/llb -j $(nproc) --target llama-bench >>$W/llb.log 2>&1" &
  llama_pid=$!
fi

# models: small ones of every type and architecture (mkmodel's own quantizer: the check is
# CUDA against the CPU on the same file), and the 1B-shaped benchmark files
V=$M/vocab/ggml-vocab-llama-spm.gguf
mk() { local o=$1; shift; [ -f "$o" ] || timeout 240 $B/tessera mkmodel -o "$o" --vocab-from $V "$@" >/dev/null 2>&1 || echo "mkmodel $o failed"; }
if [[ "bench" =~ $only ]]; then
  ( for t in Q4_0 Q8_0 Q4_K_M; do
      mk $W/m/1b-$t.gguf --n-layer 16 --n-embd 2048 --n-head 32 --n-head-kv 8 --n-ff 8192 --type $t
    done ) &
  mk_pid=$!
fi
sec "small models"
types="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K"
for t in $types; do mk $W/m/small-$t.gguf --n-head 4 --n-head-kv 2 --type $t --seed 7; done
for a in qwen2 qwen3 gemma3; do mk $W/m/arch-$a.gguf --arch $a --n-head 4 --n-head-kv 2 --type F16; done
mk $W/m/arch-mistral.gguf --n-head 4 --n-head-kv 2 --sliding-window 6 --type F16
mk $W/m/arch-gemma3-q4km.gguf --arch gemma3 --n-head 4 --n-head-kv 1 --type Q4_K_M --tied
ls $W/m | tr '\n' ' '; echo

# check NAME TIMEOUT CMD...: one row (PASS / FAIL rc / TIMEOUT / SKIP budget) and its
# max |diff| lines
check() {
  local name=$1 to=$2; shift 2
  [[ "$name" =~ $only ]] || return 0
  if [ "$(left)" -lt 15 ]; then row "$name" "SKIP" "budget"; return 0; fi
  [ "$to" -gt "$(left)" ] && to=$(left)
  local t0=$(date +%s%N) o st
  o=$(timeout "$to" "$@" 2>&1); st=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\n' "$o" >"$W/checks/$name.txt"
  local d
  d=$(printf '%s\n' "$o" | grep -iE "max \|diff\||near-tie|accept|PASS|FAIL|error" | head -6 | tr '\n' ';' | cut -c1-300)
  if [ $st = 0 ]; then row "$name" "PASS" "${ms} ms; $d"
  elif [ $st = 124 ]; then row "$name" "TIMEOUT" "${to} s; $(printf '%s\n' "$o" | tail -2 | tr '\n' ';')"
  else row "$name" "FAIL $st" "${ms} ms; $(printf '%s\n' "$o" | tail -4 | tr '\n' ';' | cut -c1-400)"; fi
}

sec "correctness: staged models (the ctest -L gpu list)"
check logits_stories260K 120 $B/gpu_check $M/stories260K.gguf --tol 0.05
check logits_stories260K_q8_0 120 $B/gpu_check $M/derived/stories260K-q8_0.gguf --tol 0.5
check logits_draft 120 $B/gpu_check $M/derived/stories260K-4layer-draft.gguf --tol 0.05
check logits_tiny_random 120 $B/gpu_check $M/random/llama-2-tiny-random.gguf --tol 0.05
check logits_synth_f16 120 $B/gpu_check $M/synthetic/synth-tiny-f16.gguf --tol 0.05
check logits_synth_q4_k_m 120 $B/gpu_check $M/synthetic/synth-tiny-q4_k_m.gguf --tol 0.5
check logits_synth_q4_0 120 $B/gpu_check $M/synthetic/synth-tiny-q4_0.gguf --tol 0.5
check logits_stories260K_long 120 $B/gpu_check $M/stories260K.gguf --tol 0.05 --decode 500
check logits_stories260K_kv_f16 120 $B/gpu_check $M/stories260K.gguf --tol 0.05 --decode 200 --kv-type f16
check logits_synth_q4_k_m_kv_f16 120 $B/gpu_check $M/synthetic/synth-tiny-q4_k_m.gguf --tol 0.5 --kv-type f16
check logits_synth_f16_kv_q8_0 120 $B/gpu_check $M/synthetic/synth-tiny-f16.gguf --tol 0.05 --decode 240 --kv-type q8_0
check logits_synth_q4_k_m_kv_q8_0 120 $B/gpu_check $M/synthetic/synth-tiny-q4_k_m.gguf --tol 0.5 --kv-type q8_0
prompt60=$(seq 1 60 | awk '{printf "%d ", ($1 * 37) % 31000 + 3}')
check logits_synth_f16_prompt60 120 $B/gpu_check $M/synthetic/synth-tiny-f16.gguf --tol 0.05 --prompt "$prompt60" --decode 40

sec "correctness: every weight type and architecture (mkmodel files)"
for t in $types; do
  tol=0.5; case $t in F32|F16|BF16) tol=0.05 ;; esac
  check "type_$t" 120 $B/gpu_check $W/m/small-$t.gguf --tol $tol --decode 24
done
for a in qwen2 qwen3 gemma3 mistral; do
  check "arch_$a" 120 $B/gpu_check $W/m/arch-$a.gguf --tol 0.05 --decode 24
done
check arch_gemma3_kv_q8_0 120 $B/gpu_check $W/m/arch-gemma3.gguf --tol 0.05 --decode 24 --kv-type q8_0
check arch_gemma3_q4km_tied 120 $B/gpu_check $W/m/arch-gemma3-q4km.gguf --tol 0.5 --decode 24
check arch_gemma3_q4km_tied_tol2 120 $B/gpu_check $W/m/arch-gemma3-q4km.gguf --tol 2 --decode 24

sec "speculation, sanitizer, mpirun"
check spec_stories 180 env TSR_CUDA_GEMM_MIN_TOKENS=65536 $B/spec_check -m $M/stories260K.gguf \
  --device cuda --draft $M/derived/stories260K-4layer-draft.gguf \
  --draft $M/derived/stories260K-q8_0.gguf --ngram --k 1,2,4,8
if command -v compute-sanitizer >/dev/null; then
  check memcheck_stories 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $B/gpu_check $M/stories260K.gguf --tol 0.05 --decode 20
  check memcheck_q4_k_m_kv_q8_0 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $B/gpu_check $W/m/small-Q4_K_M.gguf --tol 0.5 --decode 20 --kv-type q8_0
  check racecheck_stories 150 compute-sanitizer --tool racecheck --error-exitcode 3 \
    $B/gpu_check $M/stories260K.gguf --tol 0.05 --decode 4
fi
check mpi_tp2_pp2_shared_gpu 120 env TSR_NO_NCCL=1 mpirun --oversubscribe --bind-to none -np 4 \
  $B/replica_check -m $M/stories260K.gguf --tp 2 --pp 2 --device cuda --tol 0.05
check mpi_tp2_shared_gpu_q4km 120 env TSR_NO_NCCL=1 mpirun --oversubscribe --bind-to none -np 2 \
  $B/replica_check -m $M/synthetic/synth-tiny-q4_k_m.gguf --tp 2 --device cuda --tol 0.5 -n 8

# the gRPC server on the GPU, driven by the image's grpcio (stubs from the bundle's protoc)
for k in concurrent_greedy speculation; do
  check "serve_grpc_$k" 180 env TSR_NO_NCCL=1 TSR_CUDA_GEMM_MIN_TOKENS=65536 python3 \
    tests/python/test_serve.py --tessera $B/tessera --models $PWD/$M --proto $PWD/proto --mpirun mpirun -k $k
done

sec "benchmarks (tessera bench --device cuda -p 512 -n 128 -r 3)"
[ -n "${mk_pid:-}" ] && wait $mk_pid
py() { python3 -c "$@"; }
for t in Q4_0 Q8_0 Q4_K_M; do
  f=$W/m/1b-$t.gguf
  [[ "bench_$t" =~ $only ]] || continue
  [ -f $f ] || { row "bench 1B $t" "MISSING" "mkmodel failed"; continue; }
  [ "$(left)" -lt 40 ] && { row "bench 1B $t" "SKIP" "budget"; continue; }
  j=$(timeout 120 $B/tessera bench -m $f --device cuda -p 512 -n 128 -r 3 --json 2>$W/checks/bench-$t.err)
  echo "$j" >"$W/checks/bench-$t.json"
  if [ -z "$j" ]; then row "bench 1B $t" "FAIL" "$(tail -2 $W/checks/bench-$t.err | tr '\n' ';')"; continue; fi
  row "bench 1B $t" "-" "$(py "import json,sys; j=json.loads(sys.argv[1]); bw=float(sys.argv[2] or 0); r=bw*1e9/j['bytes_per_token']; print('prefill %.0f tok/s, decode %.1f tok/s = %.2f of the %.0f tok/s roofline (%.0f GB/s peak, %.1f MiB/token)' % (j['prefill_tokens_per_s'], j['decode_tokens_per_s'], j['decode_tokens_per_s']/r, r, bw, j['bytes_per_token']/1048576))" "$j" "$bw")"
done
f=$W/m/1b-Q8_0.gguf
if [[ "verify" =~ $only ]] && [ -f $f ] && [ "$(left)" -gt 60 ]; then
  timeout 90 $B/tessera bench -m $f --device cuda -p 64 -n 32 -r 1 --verify-cost 2>&1 | tail -8 | tee $OUT/verify.txt
  row "verify cost 1B Q8_0 (GPU)" "-" "$(grep -iE 'k *= *[1248]' $OUT/verify.txt | tr '\n' ';' | cut -c1-200)"
fi

# where a decode step's time goes: every kernel's duration (Nsight Compute), one decode of
# a few tokens on the 1B Q8_0 file; compare their sum per token with the step's wall time
f=$W/m/1b-Q8_0.gguf
if [[ "ncu" =~ $only ]] && command -v ncu >/dev/null && [ -f $f ] && [ "$(left)" -gt 90 ]; then
  sec "ncu: kernel durations of a decode (1B Q8_0, 4 tokens)"
  timeout 120 ncu --print-summary per-kernel --metrics gpu__time_duration.sum -c 1200 \
    $B/tessera generate -m $f -p "Once upon a time" -n 4 --device cuda --temperature 0 \
    >$W/checks/ncu-decode.txt 2>&1
  echo "ncu rc $?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" $W/checks/ncu-decode.txt | paste - - |
    awk '{print}' | head -60
fi

if [ -n "${llama_pid:-}" ]; then
  sec "llama.cpp CUDA"
  while kill -0 $llama_pid 2>/dev/null && [ "$(left)" -gt 45 ]; do sleep 3; done
  if kill -0 $llama_pid 2>/dev/null; then
    kill -- -$llama_pid 2>/dev/null
    row "llama.cpp CUDA build" "NOT DONE" "stopped at the budget: $(grep -o '\[ *[0-9]*%\]' $W/llb.log | tail -1)"
  fi
  lb=$(find $W/llb -name llama-bench -type f -perm -u+x 2>/dev/null | head -1)
  if [ -n "$lb" ]; then
    for t in Q4_0 Q8_0 Q4_K_M; do
      f=$W/m/1b-$t.gguf
      [ -f $f ] && [ "$(left)" -gt 15 ] || continue
      lj=$(timeout 60 $lb -m $f -p 512 -n 128 -r 3 -ngl 99 -o json 2>/dev/null)
      echo "$lj" >"$W/checks/llama-$t.json"
      row "llama.cpp 1B $t" "-" "$(py "import json,sys; j=json.loads(sys.argv[1]); print(', '.join('%s %.1f tok/s' % ('prefill' if r['n_prompt'] else 'decode', r['avg_ts']) for r in j))" "$lj" 2>/dev/null)"
    done
  else
    row "llama.cpp CUDA build" "FAIL" "$(grep -m2 -i error $W/llb.log | tr '\n' ';' | cut -c1-300)"
  fi
fi

[ -n "${llama_pid:-}" ] && cp $W/llb.log $W/checks/ 2>/dev/null
tar -C $W -czf "$OUT/checks.tar.gz" checks
sec "summary ($(( $(date +%s) - t_start )) s of $budget)"
cat "$sumf"
