# Distributed replica tests: each tp × pp layout against the single-process engine, in
# one mpirun job (tests/replica_check.c), oversubscribed on a small machine; refusals of
# impossible layouts; a killed rank ending the job. Included from tests/CMakeLists.txt.
add_executable(replica_check ${CMAKE_CURRENT_SOURCE_DIR}/replica_check.c)
target_link_libraries(replica_check PRIVATE tessera_core)

set(TSR_MPIRUN ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none)
set(TSR_MPI_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
if(TSR_SANITIZE)
  # Open MPI's own allocations at exit are not ours (see tests/lsan.supp).
  list(APPEND TSR_MPI_ENV
       "ASAN_OPTIONS=fast_unwind_on_malloc=0:detect_leaks=1"
       "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0")
endif()

# Synthetic models with awkward shapes, made by `tessera mkmodel` (stories260K vocabulary):
#  kv1: n_head_kv 1, n_ff 96 (3 Q8_0 blocks: not a multiple of 256), Q8_0, 3 layers;
#  q4k: n_head_kv 2, odd layer count 5, n_ff 320 (ffn_down falls back to Q8_0), Q4_K;
#  kv1-f32, odd-f16 (n_ff 300): float versions, where logits must agree within 1e-4.
# Quantized models: logits within 0.15 (0.3 for the structured ones, the tolerance
# ../shared/models README 8.4 suggests for quantized files) (activation re-quantization amplifies the rounding
# of re-associated sums, as ../shared/models README 8.3 explains; a wrong slice gives
# O(1) errors); random ones are checked teacher-forced (see replica_check.c); the
# structured synth-tiny models (large logit margins) are checked on their greedy paths.
set(TSR_SYN ${CMAKE_CURRENT_BINARY_DIR}/models)
set(TSR_VOCAB ${TSR_MODELS_DIR}/stories260K.gguf)
add_test(NAME replica_models
         COMMAND sh -c "mkdir -p ${TSR_SYN} && \
$<TARGET_FILE:tessera> mkmodel -o ${TSR_SYN}/kv1-q8_0.gguf --vocab-from ${TSR_VOCAB} \
  --n-layer 3 --n-embd 128 --n-head 4 --n-head-kv 1 --n-ff 96 --type Q8_0 --seed 11 && \
$<TARGET_FILE:tessera> mkmodel -o ${TSR_SYN}/q4k.gguf --vocab-from ${TSR_VOCAB} \
  --n-layer 5 --n-embd 512 --n-head 8 --n-head-kv 2 --n-ff 320 --type Q4_K --seed 12 && \
$<TARGET_FILE:tessera> mkmodel -o ${TSR_SYN}/kv1-f32.gguf --vocab-from ${TSR_VOCAB} \
  --n-layer 3 --n-embd 128 --n-head 4 --n-head-kv 1 --n-ff 96 --type F32 --seed 11 && \
$<TARGET_FILE:tessera> mkmodel -o ${TSR_SYN}/odd-f16.gguf --vocab-from ${TSR_VOCAB} \
  --n-layer 5 --n-embd 512 --n-head 8 --n-head-kv 2 --n-ff 300 --type F16 --seed 13")
set_tests_properties(replica_models PROPERTIES FIXTURES_SETUP replica_models)

# tsr_replica_test(NAME MODEL TP PP [extra replica_check args...])
function(tsr_replica_test name model tp pp)
  math(EXPR np "${tp} * ${pp}")
  add_test(NAME replica_${name}_tp${tp}_pp${pp}
           COMMAND ${TSR_MPIRUN} -np ${np} $<TARGET_FILE:replica_check> -m ${model}
                   --tp ${tp} --pp ${pp} ${ARGN})
  set_tests_properties(replica_${name}_tp${tp}_pp${pp} PROPERTIES
                       ENVIRONMENT "${TSR_MPI_ENV}" FIXTURES_REQUIRED replica_models
                       TIMEOUT 300 PROCESSORS 2)
endfunction()

set(TSR_STORIES ${TSR_MODELS_DIR}/stories260K.gguf)
foreach(layout "2;1" "1;2" "2;2" "1;3" "4;1" "1;5")
  list(GET layout 0 tp)
  list(GET layout 1 pp)
  tsr_replica_test(stories ${TSR_STORIES} ${tp} ${pp} --tol 1e-4)
endforeach()
tsr_replica_test(stories_layers ${TSR_STORIES} 1 2 --layers 0-0,1-4 --tol 1e-4)
tsr_replica_test(stories_refuse_tp3 ${TSR_STORIES} 3 1 --expect-refusal "not divisible by tp 3")
tsr_replica_test(stories_refuse_pp6 ${TSR_STORIES} 1 6 --expect-refusal "layers")
tsr_replica_test(stories_refuse_layers ${TSR_STORIES} 1 2 --layers 0-1,3-4 --expect-refusal "layer 2")

foreach(layout "2;1" "1;2" "2;2" "1;3")
  list(GET layout 0 tp)
  list(GET layout 1 pp)
  tsr_replica_test(kv1 ${TSR_SYN}/kv1-q8_0.gguf ${tp} ${pp} --teacher-force --tol 0.15)
  tsr_replica_test(kv1_f32 ${TSR_SYN}/kv1-f32.gguf ${tp} ${pp} --tol 1e-4)
endforeach()
tsr_replica_test(kv1_refuse_tp4 ${TSR_SYN}/kv1-q8_0.gguf 4 1 --expect-refusal "n_ff")
# The opt-in lanes order of Q8_0 (kernels/q80_lanes.h) on every rank and in the in-process
# reference: tp's row splits fall on its 16-row groups or inside them, the column-split
# matrices (attn_output, ffn_down) are repacked from their private copies; greedy decode
# and a 3-sequence batch step against the single process.
add_test(NAME replica_kv1_q80_lanes_tp2_pp2
         COMMAND ${TSR_MPIRUN} -x TSR_Q80_ORDER=lanes -np 4 $<TARGET_FILE:replica_check>
                 -m ${TSR_SYN}/kv1-q8_0.gguf --tp 2 --pp 2 --teacher-force --tol 0.15 --batch-step --expect-q80-lanes)
set_tests_properties(replica_kv1_q80_lanes_tp2_pp2 PROPERTIES
                     ENVIRONMENT "${TSR_MPI_ENV}" FIXTURES_REQUIRED replica_models
                     TIMEOUT 300 PROCESSORS 2)
foreach(layout "2;1" "1;2" "2;2" "1;3" "1;5")
  list(GET layout 0 tp)
  list(GET layout 1 pp)
  tsr_replica_test(q4k ${TSR_SYN}/q4k.gguf ${tp} ${pp} --teacher-force --tol 0.15)
  tsr_replica_test(odd_f16 ${TSR_SYN}/odd-f16.gguf ${tp} ${pp} --tol 1e-4)
endforeach()
tsr_replica_test(q4k_refuse_tp4 ${TSR_SYN}/q4k.gguf 4 1 --expect-refusal "Q4_K")

# Structured synthetic models (../shared/models/synthetic, README section 8): Q8_0, Q4_0
# and BF16 split at tp 2 (32-blocks); Q4_K_M only by pipeline (its Q4_K attn_output has
# 256-blocks: 2 heads x 64 columns would cut them, refused).
foreach(q q8_0 q4_0 bf16)
  tsr_replica_test(synth_${q} ${TSR_MODELS_DIR}/synthetic/synth-tiny-${q}.gguf 2 1 --tol 0.3 -n 8)
  tsr_replica_test(synth_${q} ${TSR_MODELS_DIR}/synthetic/synth-tiny-${q}.gguf 1 2 --tol 0.3 -n 8)
endforeach()
tsr_replica_test(synth_q4_k_m ${TSR_MODELS_DIR}/synthetic/synth-tiny-q4_k_m.gguf 1 2 --tol 0.02 -n 8)
tsr_replica_test(synth_q4_k_m_refuse ${TSR_MODELS_DIR}/synthetic/synth-tiny-q4_k_m.gguf 2 1
                 --expect-refusal "Q4_K")
tsr_replica_test(synth_f16 ${TSR_MODELS_DIR}/synthetic/synth-tiny-f16.gguf 2 2 --tol 1e-3 -n 8)

# A launcher/layout mismatch is refused on every rank, quickly.
add_test(NAME replica_mismatch
         COMMAND sh -c "! ${MPIEXEC_EXECUTABLE} --oversubscribe -np 3 $<TARGET_FILE:tessera> generate \
-m ${TSR_STORIES} -p hi --tp 2 --pp 2 2>&1 | tee /dev/stderr | grep -q 'has 3 ranks but --tp 2 --pp 2 needs 4' && exit 1 || exit 0")
set_tests_properties(replica_mismatch PROPERTIES ENVIRONMENT "${TSR_MPI_ENV}" TIMEOUT 60)

# kill -9 of one rank mid-generation: the job ends within 10 s naming the rank.
add_test(NAME replica_kill_rank
         COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/kill_rank.sh $<TARGET_FILE:tessera> ${TSR_SYN}/odd-f16.gguf)
set_tests_properties(replica_kill_rank PROPERTIES ENVIRONMENT "${TSR_MPI_ENV}"
                     FIXTURES_REQUIRED replica_models TIMEOUT 120 RUN_SERIAL TRUE)

# Speculative decoding is exact on every layout: 16 concurrent greedy requests with each
# drafter (4-layer draft: many rejections; Q8_0 copy: ~99% agreement; n-gram) and several
# k equal decoding without speculation, and KV blocks never exceed what tokens need.
add_executable(spec_check ${CMAKE_CURRENT_SOURCE_DIR}/spec_check.c)
target_link_libraries(spec_check PRIVATE tessera_core)
set(TSR_DRAFT4 ${TSR_MODELS_DIR}/derived/stories260K-4layer-draft.gguf)
set(TSR_DRAFTQ8 ${TSR_MODELS_DIR}/derived/stories260K-q8_0.gguf)
add_test(NAME spec_tp1_pp1
         COMMAND $<TARGET_FILE:spec_check> -m ${TSR_STORIES} --draft ${TSR_DRAFT4}
                 --draft ${TSR_DRAFTQ8} --ngram --k 1,2,3,4,5,6,7,8)
set_tests_properties(spec_tp1_pp1 PROPERTIES TIMEOUT 300)
foreach(layout "2;1" "1;2" "2;2")
  list(GET layout 0 tp)
  list(GET layout 1 pp)
  math(EXPR np "${tp} * ${pp}")
  add_test(NAME spec_tp${tp}_pp${pp}
           COMMAND ${TSR_MPIRUN} -np ${np} $<TARGET_FILE:spec_check> -m ${TSR_STORIES}
                   --tp ${tp} --pp ${pp} --draft ${TSR_DRAFT4} --draft ${TSR_DRAFTQ8} --ngram
                   --k 1,3,8)
  set_tests_properties(spec_tp${tp}_pp${pp} PROPERTIES ENVIRONMENT "${TSR_MPI_ENV}"
                       TIMEOUT 300 PROCESSORS 2)
endforeach()
