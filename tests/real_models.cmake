# Architectures (issue 8): qwen2, qwen3, gemma3 and llama (tied head, sliding window).
#
# Both trees: small synthetic files of each architecture (tessera mkmodel --arch, F32, so
# layouts must agree with one process within 1e-4) under tp 2 × pp 2, and speculative
# decoding with a draft model of another architecture; tests/test_arch.c (from the
# test_*.c glob) loads, runs, truncates and fuzzes them.
#
# Release tree only (a 0.5B model is slow under the sanitizers on a 2-core machine): the
# three real models, fetched by ops/fetch-model.sh (a fetch that fails fails the test):
# greedy ids against llama.cpp's (../shared/models/expected/real-models.json, README
# section 9.2; see tests/real_models_check.c for the near-tie rule), the layouts the issue
# names against one process, tp 4 on Qwen2.5 refused, and n-gram speculation.
add_executable(real_models_check ${CMAKE_CURRENT_SOURCE_DIR}/real_models_check.c)
target_link_libraries(real_models_check PRIVATE tessera_core)

set(TSR_ARCH_DIR ${CMAKE_CURRENT_BINARY_DIR}/models)
add_test(NAME arch_models
         COMMAND sh -c "mkdir -p ${TSR_ARCH_DIR} && \
$<TARGET_FILE:tessera> mkmodel --vocab-from ${TSR_MODELS_DIR}/stories260K.gguf --n-layer 3 --n-embd 64 --n-head 4 --n-head-kv 2 --n-ff 96 --type F32 --seed 21 --arch qwen2 -o ${TSR_ARCH_DIR}/arch-qwen2.gguf && \
$<TARGET_FILE:tessera> mkmodel --vocab-from ${TSR_MODELS_DIR}/stories260K.gguf --n-layer 3 --n-embd 64 --n-head 4 --n-head-kv 2 --n-ff 96 --type F32 --seed 22 --arch qwen3 -o ${TSR_ARCH_DIR}/arch-qwen3.gguf && \
$<TARGET_FILE:tessera> mkmodel --vocab-from ${TSR_MODELS_DIR}/stories260K.gguf --n-layer 7 --n-embd 64 --n-head 4 --n-head-kv 1 --n-ff 96 --type F32 --seed 23 --arch gemma3 --head-dim 32 --sliding-window 6 -o ${TSR_ARCH_DIR}/arch-gemma3.gguf && \
$<TARGET_FILE:tessera> mkmodel --vocab-from ${TSR_MODELS_DIR}/stories260K.gguf --n-layer 3 --n-embd 64 --n-head 4 --n-head-kv 2 --n-ff 96 --type F32 --seed 24 --sliding-window 5 --tied -o ${TSR_ARCH_DIR}/arch-mistral.gguf")
set_tests_properties(arch_models PROPERTIES FIXTURES_SETUP arch_models TIMEOUT 60)

# The sanitizer tree runs the two that cover every per-architecture step (biases; Q/K
# norms, post norms, GEGLU, windows); the release tree all four.
set(TSR_ARCH_LAYOUTS qwen2 gemma3)
if(NOT TSR_SANITIZE)
  list(APPEND TSR_ARCH_LAYOUTS qwen3 mistral)
endif()
foreach(arch ${TSR_ARCH_LAYOUTS})
  # --tol 1e-2: the default f16 KV keeps ggml's fp16 flash-attention accumulator, so the
  # last-bit differences of tp's split partial sums can flip an fp16 rounding (measured
  # 1.1e-4 on gemma3); the greedy ids must still be identical
  add_test(NAME replica_arch_${arch}_tp2_pp2
           COMMAND ${TSR_MPIRUN} -np 4 $<TARGET_FILE:replica_check>
                   -m ${TSR_ARCH_DIR}/arch-${arch}.gguf --tp 2 --pp 2 -n 24 --tol 1e-2)
  set_tests_properties(replica_arch_${arch}_tp2_pp2 PROPERTIES
                       ENVIRONMENT "${TSR_MPI_ENV}" FIXTURES_REQUIRED arch_models
                       TIMEOUT 300 PROCESSORS 2 RUN_SERIAL TRUE)
endforeach()
add_test(NAME spec_arch_cross_draft
         COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/spec_same.sh $<TARGET_FILE:tessera>
                 ${TSR_ARCH_DIR}/arch-gemma3.gguf "Once upon a time" 24
                 --draft-model ${TSR_ARCH_DIR}/arch-qwen3.gguf)
set_tests_properties(spec_arch_cross_draft PROPERTIES FIXTURES_REQUIRED arch_models TIMEOUT 120)

if(NOT TSR_SANITIZE)
  set(TSR_REAL_EXPECTED ${TSR_MODELS_DIR}/expected/real-models.json)
  # short name, fetch name, prompts for the layouts (ids; cases with clear top-2 margins,
  # since tensor parallelism re-associates sums and moves quantized logits by up to ~1).
  set(TSR_REAL_smollm2 smollm2-135m-instruct)
  set(TSR_REAL_qwen2 qwen2.5-coder-0.5b-instruct)
  set(TSR_REAL_gemma3 gemma-3-270m)
  foreach(short smollm2 qwen2 gemma3)
    add_test(NAME real_model_${short}
             COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_${short}} | tail -n 1); \
$<TARGET_FILE:real_models_check> --expected ${TSR_REAL_EXPECTED} --name ${TSR_REAL_${short}} \
-m \"$p\" -t 2 --steps 24")
    set_tests_properties(real_model_${short} PROPERTIES TIMEOUT 600 RUN_SERIAL TRUE)
  endforeach()

  # The opt-in lanes order of Q8_0 (kernels/q80_lanes.h: Qwen2.5's 13 and Gemma 3's 10 Q8_0
  # matrices) against the same llama.cpp references: other last bits, the same ids but
  # near-ties.
  foreach(short qwen2 gemma3)
    add_test(NAME real_model_${short}_q80_lanes
             COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_${short}} | tail -n 1); \
$<TARGET_FILE:real_models_check> --expected ${TSR_REAL_EXPECTED} --name ${TSR_REAL_${short}} \
-m \"$p\" -t 2 --steps 24")
    set_tests_properties(real_model_${short}_q80_lanes PROPERTIES TIMEOUT 600 RUN_SERIAL TRUE
                         ENVIRONMENT "TSR_Q80_ORDER=lanes")
  endforeach()

  # tsr_real_layout(SHORT TP PP TOL PROMPT_IDS)
  function(tsr_real_layout short tp pp tol prompts)
    math(EXPR np "${tp} * ${pp}")
    add_test(NAME replica_real_${short}_tp${tp}_pp${pp}
             COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_${short}} | tail -n 1); \
${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none -np ${np} $<TARGET_FILE:replica_check> \
-m \"$p\" --tp ${tp} --pp ${pp} -n 8 --tol ${tol} --prompt-ids '${prompts}'")
    set_tests_properties(replica_real_${short}_tp${tp}_pp${pp} PROPERTIES
                         ENVIRONMENT "${TSR_MPI_ENV}" TIMEOUT 300 PROCESSORS 2 RUN_SERIAL TRUE)
  endfunction()
  set(TSR_QWEN_PROMPTS "750,3974,6860,10939,1648;785,3974,13876,38835")
  set(TSR_GEMMA_PROMPTS "2,236770,236764,236743,236778,236764,236743,236800,236764,236743,236812,236764,236743,236810,236764")
  foreach(layout "2;1" "1;2" "2;2")
    list(GET layout 0 tp)
    list(GET layout 1 pp)
    tsr_real_layout(qwen2 ${tp} ${pp} 1.0 ${TSR_QWEN_PROMPTS})
    tsr_real_layout(gemma3 ${tp} ${pp} 2.0 ${TSR_GEMMA_PROMPTS})
  endforeach()
  tsr_real_layout(smollm2 1 3 1e-4 "504,3575,282,4649,314;1604,3987,46477,24,94,727")
  # Gemma 3's Q4_K, Q6_K and Q5_0 matrices on tp 2 x pp 2 with repacking on and off, byte for
  # byte: prompt tokens of the order class 1 (the Q4_K GEMM order) from the lanes layouts of
  # AVX-512 VNNI CPUs (kernels/q4k_lanes.h, kernels/q6k_lanes.h, kernels/q50_lanes.h), from the
  # repacked groups (TSR_Q4K_LANES=0 TSR_Q6K_LANES=0 TSR_Q50_LANES=0) and from the file layout,
  # on every rank and stage (greedy decode and a 3-sequence batch step). --tol
  # 4: the batch step's built-in prompts are arbitrary ids, where tp's re-associated sums move
  # Gemma's logits by up to ~2 against one process; the byte comparison is the point here.
  set(d ${CMAKE_CURRENT_BINARY_DIR}/repack-onoff-gemma3)
  add_test(NAME replica_repack_onoff_real_gemma3_tp2_pp2
           COMMAND sh -c "set -e; mkdir -p ${d}; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_gemma3} | tail -n 1); for mode in TSR_REPACK_ALL=1 TSR_NO_REPACK=1 TSR_Q4K_LANES=0; do q6=1; test $mode != TSR_Q4K_LANES=0 || q6=0; ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none -x $mode -x TSR_Q6K_LANES=$q6 -x TSR_Q50_LANES=$q6 -np 4 $<TARGET_FILE:replica_check> -m \"$p\" --tp 2 --pp 2 -n 8 --tol 4.0 --batch-step --prompt-ids '${TSR_GEMMA_PROMPTS}' --dump ${d}/$mode.bin; done; cmp ${d}/TSR_REPACK_ALL=1.bin ${d}/TSR_NO_REPACK=1.bin; cmp ${d}/TSR_REPACK_ALL=1.bin ${d}/TSR_Q4K_LANES=0.bin; echo repack on/off/Q4_K, Q6_K and Q5_0 groups: logits identical")
  set_tests_properties(replica_repack_onoff_real_gemma3_tp2_pp2 PROPERTIES
                       ENVIRONMENT "${TSR_MPI_ENV}" TIMEOUT 300 PROCESSORS 2 RUN_SERIAL TRUE)
  add_test(NAME replica_real_qwen2_tp4_refused
           COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_qwen2} | tail -n 1); \
${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none -np 4 $<TARGET_FILE:replica_check> \
-m \"$p\" --tp 4 --expect-refusal 'n_head 14 is not divisible by tp 4'")
  set_tests_properties(replica_real_qwen2_tp4_refused PROPERTIES
                       ENVIRONMENT "${TSR_MPI_ENV}" TIMEOUT 120 RUN_SERIAL TRUE)
  add_test(NAME spec_real_gemma3_ngram
           COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${TSR_REAL_gemma3} | tail -n 1); \
sh ${CMAKE_CURRENT_SOURCE_DIR}/spec_same.sh $<TARGET_FILE:tessera> \"$p\" '1, 2, 3, 4, 5,' 24 --spec ngram")
  set_tests_properties(spec_real_gemma3_ngram PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE)
endif()

# Benchmark (not a test): the output head's share of a decode step.
add_executable(bench_head ${CMAKE_CURRENT_SOURCE_DIR}/bench_head.c)
target_link_libraries(bench_head PRIVATE tessera_core)
