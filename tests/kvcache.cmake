# KV cache types (kernels/kvcache.h, --kv-type). test_kvcache itself is registered by the
# test_*.c glob; the sanitizer tree runs a lean version of its model cases (TSR_KV_LEAN).
if(TSR_SANITIZE)
  target_compile_definitions(test_kvcache PRIVATE TSR_KV_LEAN=1)
endif()
set_tests_properties(test_kvcache PROPERTIES TIMEOUT 300)

# tp 2 x pp 2 with an f16 cache equals one process with an f16 cache (greedy ids identical;
# logits within 0.3: the f16 attention keeps llama.cpp's fp16 output accumulator, rounded
# at every position, so tp's re-associated all-reduce sums (last bits) flip some of those
# roundings: 0.115 measured on this Q8_0 file, 0 with pp alone); q8_0 across tp 2 (logits within 1e-3: tp's last-bit differences can flip
# an int8 rounding of a stored K or V block; 1.7e-4 measured). Release tree only (4 ASan ranks spend ~30 s in
# LeakSanitizer's exit scan; test_kvcache covers the kernels there).
if(NOT TSR_SANITIZE)
  add_test(NAME replica_kv_f16_tp2_pp2
           COMMAND ${TSR_MPIRUN} -np 4 $<TARGET_FILE:replica_check>
                   -m ${TSR_MODELS_DIR}/synthetic/synth-tiny-q8_0.gguf --tp 2 --pp 2 -n 16
                   --kv-type f16 --tol 0.3)
  set_tests_properties(replica_kv_f16_tp2_pp2 PROPERTIES ENVIRONMENT "${TSR_MPI_ENV}"
                       TIMEOUT 300 PROCESSORS 2 RUN_SERIAL TRUE)
  add_test(NAME replica_kv_q8_0_tp2_pp1
           COMMAND ${TSR_MPIRUN} -np 2 $<TARGET_FILE:replica_check>
                   -m ${TSR_MODELS_DIR}/synthetic/synth-tiny-f16.gguf --tp 2 --pp 1 -n 16
                   --kv-type q8_0 --tol 1e-3)
  set_tests_properties(replica_kv_q8_0_tp2_pp1 PROPERTIES ENVIRONMENT "${TSR_MPI_ENV}"
                       TIMEOUT 300 PROCESSORS 2 RUN_SERIAL TRUE)
endif()

# The draft model's cache follows --kv-type: speculation with an f16 cache gives the ids of
# plain generation with an f16 cache.
add_test(NAME spec_kv_f16_draft
         COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/spec_same.sh $<TARGET_FILE:tessera>
                 ${TSR_MODELS_DIR}/stories260K.gguf "Once upon a time" 48
                 --draft-model ${TSR_MODELS_DIR}/derived/stories260K-4layer-draft.gguf)
set_tests_properties(spec_kv_f16_draft PROPERTIES ENVIRONMENT "TSR_SPEC_COMMON=--kv-type f16"
                     TIMEOUT 120)

# Bad --kv-type values are usage errors naming the choices; q8_0 on heads of 8 values says
# which types fit.
add_test(NAME cli_kv_type_errors
         COMMAND sh -c "set -e; b=$<TARGET_FILE:tessera>; m=${TSR_MODELS_DIR}/stories260K.gguf; \
if $b generate -m $m -p hi -n 1 --kv-type q4 2>err.txt; then exit 1; fi; \
grep -q 'f32, f16 or q8_0' err.txt; \
if $b generate -m $m -p hi -n 1 --kv-type q8_0 2>err.txt; then exit 1; fi; \
grep -q 'use --kv-type f16 or f32' err.txt; \
$b generate -m $m -p 'Once upon a time' -n 4 --temperature 0 --kv-type f16 >/dev/null")
set_tests_properties(cli_kv_type_errors PROPERTIES TIMEOUT 60)

# The attention kernel's time per type and ISA at long context (ops/bench-kvtype.sh runs it).
add_executable(bench_kvcache ${CMAKE_CURRENT_SOURCE_DIR}/bench_kvcache.c)
target_link_libraries(bench_kvcache PRIVATE tessera_core)

# The real models with the default settings (f16 cache, repacking on; real_model_* run the
# f32 cache): the cases listed in TSR_REAL_EXACT_* run free-running and must give llama.cpp's
# ids exactly (their every op is bit-identical to ggml's; docs/architecture.md "Numerics"),
# the others teacher-forced within real_models_check's near-tie rule. Release tree only.
# Gemma 3 case 3 needs the prompt tokens' Q4_K order (llama.cpp's repacked GEMM; worker/model.h
# tsr_order_class): without it, free-running ids diverge at step 16 of 40.
set(TSR_REAL_EXACT_smollm2 all)
set(TSR_REAL_STEPS_smollm2 40)
set(TSR_REAL_EXACT_qwen2 all)
set(TSR_REAL_STEPS_qwen2 24)
set(TSR_REAL_EXACT_gemma3 all)
set(TSR_REAL_STEPS_gemma3 24)
if(NOT TSR_SANITIZE)
  foreach(short smollm2 qwen2 gemma3)
    add_test(NAME real_model_${short}_kv_f16
             COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_${short}} | tail -n 1); \
$<TARGET_FILE:real_models_check> --expected ${TSR_REAL_EXPECTED} --name ${TSR_REAL_${short}} \
-m \"$p\" -t 2 --steps ${TSR_REAL_STEPS_${short}} --kv-type f16 --exact ${TSR_REAL_EXACT_${short}}")
    set_tests_properties(real_model_${short}_kv_f16 PROPERTIES TIMEOUT 600 RUN_SERIAL TRUE)
  endforeach()
endif()
