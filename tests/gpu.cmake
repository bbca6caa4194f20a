# The GPU suite (ctest -L gpu): only in trees that build the CUDA backend (TSR_HAVE_CUDA).
# Every test exits 77 and prints "SKIP: no CUDA device: <reason>" where no GPU is visible
# (the only skip the suite allows); on a GPU machine each compares the CUDA backend with the
# CPU backend (see gpu_check.c and replica_check.c --device cuda). ops/gpu-check.sh runs them
# together with the GPU benchmarks.

# The device forward pass (worker/gpu.c) end to end on the host: gpu_check.c linked with
# kernels/cuda/hostsim.c, a host implementation of cuda_backend.h that runs numerics.h in the
# kernels' orders, against the CPU backend (both trees; no GPU needed). Checks gpu.c's
# buffers, step descriptor, block tables and order of operations; not the CUDA code itself.
add_executable(gpu_sim_check ${CMAKE_CURRENT_SOURCE_DIR}/gpu_check.c
               ${CMAKE_SOURCE_DIR}/worker/gpu.c ${CMAKE_SOURCE_DIR}/kernels/cuda/hostsim.c)
target_compile_definitions(gpu_sim_check PRIVATE TSR_HAVE_CUDA TSR_GPU_SIM)
target_link_libraries(gpu_sim_check PRIVATE tessera_core)
# Logit tolerance per model (gpu_check --tol): float models 0.05; where the CPU quantizes
# activations (Q8_0 / Q8_K before every quantized matmul) and the GPU's cuBLAS prefill rounds
# them to F16 instead, 0.5 (../shared/models README 8.3: a float32 reference and llama.cpp
# differ by up to 0.33 for the same reason; measured here through the simulator: <= 0.33).
function(tsr_gpu_tol rel out)
  if(rel MATCHES "(tiny-f16|^stories260K|4layer-draft|llama-2-tiny-random)\\.gguf$")
    set(${out} 0.05 PARENT_SCOPE)
  else()
    set(${out} 0.5 PARENT_SCOPE)
  endif()
endfunction()
set(TSR_GPU_MODELS stories260K.gguf derived/stories260K-q8_0.gguf
    derived/stories260K-4layer-draft.gguf random/llama-2-tiny-random.gguf)
file(GLOB _synth RELATIVE ${TSR_MODELS_DIR} CONFIGURE_DEPENDS ${TSR_MODELS_DIR}/synthetic/*.gguf)
list(APPEND TSR_GPU_MODELS ${_synth})
# The simulator runs the weight-type-independent orchestration; the per-type arithmetic is
# test_cuda_numerics' job. One model per matvec kind (float, Q8_0, Q8_1, Q8_K activations).
if(TSR_SANITIZE)
  set(TSR_GPU_SIM_MODELS stories260K.gguf derived/stories260K-q8_0.gguf)
else()
  set(TSR_GPU_SIM_MODELS stories260K.gguf synthetic/synth-tiny-f16.gguf
      synthetic/synth-tiny-q4_0.gguf synthetic/synth-tiny-q5_1.gguf
      synthetic/synth-tiny-q4_k_m.gguf)
endif()
foreach(rel ${TSR_GPU_SIM_MODELS})
  get_filename_component(stem ${rel} NAME_WE)
  string(REPLACE "-" "_" stem ${stem})
  tsr_gpu_tol(${rel} tol)
  add_test(NAME gpu_sim_${stem} COMMAND gpu_sim_check ${TSR_MODELS_DIR}/${rel} --tol ${tol})
  set_tests_properties(gpu_sim_${stem} PROPERTIES TIMEOUT 120)
endforeach()

if(NOT TSR_HAVE_CUDA)
  return()
endif()
add_executable(gpu_check ${CMAKE_CURRENT_SOURCE_DIR}/gpu_check.c)
target_link_libraries(gpu_check PRIVATE tessera_core)

set(TSR_GPU_SKIP "SKIP: no CUDA device")
# tsr_gpu_test(NAME COMMAND...)
function(tsr_gpu_test name)
  add_test(NAME gpu_${name} COMMAND ${ARGN})
  set_tests_properties(gpu_${name} PROPERTIES LABELS gpu SKIP_RETURN_CODE 77
                       SKIP_REGULAR_EXPRESSION "${TSR_GPU_SKIP}" TIMEOUT 300 RUN_SERIAL TRUE)
endfunction()

# Every model of ../shared/models (all weight types) on one GPU against the CPU.
foreach(rel ${TSR_GPU_MODELS})
  get_filename_component(stem ${rel} NAME_WE)
  string(REPLACE "-" "_" stem ${stem})
  tsr_gpu_tol(${rel} tol)
  tsr_gpu_test(logits_${stem} $<TARGET_FILE:gpu_check> ${TSR_MODELS_DIR}/${rel} --tol ${tol})
endforeach()
