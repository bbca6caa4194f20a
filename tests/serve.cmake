# gRPC serving, end to end (tests/python/test_serve.py): the client is Debian's
# python3-grpcio (so /usr/bin/python3, not whatever python3 is first on PATH), with stubs
# generated from proto/ at test time; servers on 127.0.0.1 ephemeral ports, one process and
# mpirun jobs (tp 2 x pp 2, and a killed rank). Included from tests/CMakeLists.txt.
find_program(TSR_SYSTEM_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT TSR_SYSTEM_PYTHON)
  message(WARNING "/usr/bin/python3 not found: the serve_grpc test will fail (ops/install-deps.sh)")
  set(TSR_SYSTEM_PYTHON /usr/bin/python3)
endif()
set(TSR_SERVE_ENV "OMPI_ALLOW_RUN_AS_ROOT=1" "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
if(TSR_SANITIZE)
  # Leaks are checked at the servers' clean exits (SIGTERM); Open MPI's own allocations are
  # not ours (see tests/lsan.supp).
  list(APPEND TSR_SERVE_ENV "ASAN_OPTIONS=fast_unwind_on_malloc=0:detect_leaks=1"
       "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0"
       "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
endif()
add_test(NAME serve_grpc
         COMMAND ${TSR_SYSTEM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_serve.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --proto ${CMAKE_SOURCE_DIR}/proto --mpirun ${MPIEXEC_EXECUTABLE})
set_tests_properties(serve_grpc PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")

# Serving robustness (tests/python/test_robust.py, issue 14): a cancel storm at random
# points of a call's life (the ASan tree runs it too: LeakSanitizer at the SIGTERM exit is
# what finds a leaked call), sizes from request fields.
set(TSR_ROBUST_ARGS --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                    --proto ${CMAKE_SOURCE_DIR}/proto)
if(TSR_SANITIZE)
  list(APPEND TSR_ROBUST_ARGS --sanitized)
endif()
add_test(NAME serve_robust
         COMMAND ${TSR_SYSTEM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_robust.py
                 ${TSR_ROBUST_ARGS})
set_tests_properties(serve_robust PROPERTIES TIMEOUT 240 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")

# Prefix caching (tests/python/test_prefix_cache.py, issue 12): 64 requests sharing prefixes
# of 0/16/100/300 tokens, with preemptions, equal to a cold server (--no-prefix-cache) bit
# for bit, hits in Admin.Status and /metrics, no block left referenced; the same on an
# mpirun tp 2 x pp 2 replica. The sanitizer tree runs a lean one-process case.
set(TSR_PREFIX_ARGS --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                    --proto ${CMAKE_SOURCE_DIR}/proto --mpirun ${MPIEXEC_EXECUTABLE})
if(TSR_SANITIZE)
  list(APPEND TSR_PREFIX_ARGS --lean)
endif()
add_test(NAME serve_prefix_cache
         COMMAND ${TSR_SYSTEM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_prefix_cache.py
                 ${TSR_PREFIX_ARGS})
set_tests_properties(serve_prefix_cache PROPERTIES TIMEOUT 240 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")
