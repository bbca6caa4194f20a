# Keep this file the last include of tests/CMakeLists.txt. `--device auto` is the default, so
# on a machine with a GPU every command a CPU test starts would run on CUDA and the CPU suite
# would silently check the GPU path against CPU expectations. Every test that is not in the
# GPU suite (label gpu) therefore runs with TESSERA_DEVICE=cpu, the default of --device when
# the flag is absent (worker/replica.c); tests that want the device pass --device cuda
# explicitly (gpu_sim_*, the gpu-labelled tests).
get_property(_tsr_all_tests DIRECTORY PROPERTY TESTS)
foreach(_t ${_tsr_all_tests})
  get_property(_labels TEST ${_t} PROPERTY LABELS)
  if(NOT "gpu" IN_LIST _labels)
    set_property(TEST ${_t} APPEND PROPERTY ENVIRONMENT "TESSERA_DEVICE=cpu")
  endif()
endforeach()
