#!/usr/bin/env bash
# ops/gpu-stage.sh — stage into .gpu-carry/ (ignored by git) what ops/gpu-check.sh reads
# besides the repository, for a device machine where only the repository travels (64 MiB
# together with the paths a run carries; ../shared beside the checkout stays behind):
#   .gpu-carry/models/       the model files the GPU suite names (stories260K and its derived
#                            and random files, the synthetic F16 / Q4_K_M / Q4_0 files, the
#                            llama-spm vocabulary the 1B benchmark models are made from);
#   .gpu-carry/llama.cpp.tar.xz  the parts of llama.cpp llama-bench builds from with CUDA
#                            (ggml core, CPU and CUDA backends, src, common, vendor,
#                            tools/llama-bench with a tools/CMakeLists.txt naming only it).
# Then, on the device machine: run ops/gpu-check.sh with carry [".gpu-carry"]; it finds both
# there. What cannot be staged within the limit: the real models (SmolLM2, Qwen2.5, Gemma 3
# are 98-400 MB; gpu_logits_real_* and the Qwen2.5 benchmark then fail, said in its
# preflight), and the build's Debian dependencies (gRPC core, protobuf-c, cmocka, Open MPI,
# libmicrohttpd, cJSON, PCRE2, GnuTLS), which the device image lacks (README "GPUs").
# Usage: ops/gpu-stage.sh   (TESSERA_MODELS, LLAMA_SRC as for ops/gpu-check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=$(realpath "${TESSERA_MODELS:-../shared/models}")
SRC=${LLAMA_SRC:-/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp}
out=.gpu-carry
files=(stories260K.gguf derived/stories260K-q8_0.gguf derived/stories260K-4layer-draft.gguf
       random/llama-2-tiny-random.gguf synthetic/synth-tiny-f16.gguf
       synthetic/synth-tiny-q4_k_m.gguf synthetic/synth-tiny-q4_0.gguf
       vocab/ggml-vocab-llama-spm.gguf)
for f in "${files[@]}"; do
  [ -f "$MODELS/$f" ] || { echo "gpu-stage: $MODELS/$f is missing (set TESSERA_MODELS)" >&2; exit 1; }
done
[ -f "$SRC/CMakeLists.txt" ] || { echo "gpu-stage: no llama.cpp source at $SRC (set LLAMA_SRC)" >&2; exit 1; }
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu-carry/' .gitignore ||
  { echo "gpu-stage: .gpu-carry/ is not ignored by git" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/models"
for f in "${files[@]}"; do
  mkdir -p "$out/models/$(dirname "$f")"
  cp "$MODELS/$f" "$out/models/$f"
done
tmp=$(mktemp -d /tmp/tsr_gpu_stage.XXXXXX)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
l="$tmp/llama.cpp"
mkdir -p "$l/ggml/src" "$l/tools"
cp -r "$SRC"/{CMakeLists.txt,cmake,LICENSE,src,include,common,vendor} "$l/"
cp -r "$SRC"/ggml/{CMakeLists.txt,cmake,include} "$l/ggml/"
find "$SRC/ggml/src" -maxdepth 1 -type f -exec cp {} "$l/ggml/src/" \;
cp -r "$SRC"/ggml/src/{ggml-cpu,ggml-cuda} "$l/ggml/src/"
cp -r "$SRC/tools/llama-bench" "$l/tools/"
printf 'llama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' >"$l/tools/CMakeLists.txt"
tar -C "$tmp" -cJf "$out/llama.cpp.tar.xz" llama.cpp
du -sh "$out"/models "$out"/llama.cpp.tar.xz
repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$(( repo + $(du -sb "$out" | cut -f1) ))
echo "gpu-stage: repository + .gpu-carry = $(( total / 1048576 )) MiB of the 64 MiB a run carries"
[ "$total" -lt $(( 62 * 1048576 )) ] || { echo "gpu-stage: over the limit" >&2; exit 1; }
