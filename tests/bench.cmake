# Kernel micro-benchmarks: programs that print figures, not tests (no add_test). They land in
# build/tests/ with the tests; run them under `flock /work/bench.lock` and print `uptime` next
# to their figures (the machine is shared). bench_quant: the row kernels per type and ISA;
# bench_repack: the repacked GEMM / GEMV tiles against the file layout's rows; bench_q4k_gemm:
# a Q4_K and a Q4_0 prefill matmul in the two order classes; bench_batch: a decode step of
# many sequences against one (the ceiling of serving's c16/c1); bench_verify: the matmuls of a
# speculative verification step (1B Q8_0 shape, 1..8 tokens); bench_q80_gemv: the one-token
# Q8_0 GEMV against the row dots and a plain read; bench_gemv_stream: the one-token Q4_0 / Q4_K
# / Q6_K group GEMVs over a 1B layer's matrices (1 GiB, huge pages, engine claims) against a
# plain read of the same bytes in the same run; bench_tile: the VNNI Q8_0 register tile (the
# several-token matmul) against the bound of ggml's order, a bare loop of its three ops, in
# vpdpbusd per ns and cycles at the measured AVX-512 clock; bench_q8_layout: that matmul on a
# 16-row lane-transposed layout (VNNI and AMX kernels, a route the engine does not take)
# against the library's tile, checked bit for bit first. bench_kvcache (kvcache.cmake)
# and bench_head (real_models.cmake) sit with the tests of their module.
foreach(b bench_quant bench_repack bench_q4k_gemm bench_batch bench_verify bench_q80_gemv
    bench_gemv_stream bench_tile bench_q8_layout)
  add_executable(${b} ${CMAKE_CURRENT_SOURCE_DIR}/${b}.c)
  target_link_libraries(${b} PRIVATE tessera_core)
endforeach()
