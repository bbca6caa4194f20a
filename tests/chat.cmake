# Tests that read the real models (ops/fetch-model.sh NAME prints the cached GGUF's path;
# the test fails when it cannot): chat templates and end-of-generation sets (test_chat),
# the real vocabularies against llama.cpp's ids (test_vocab).
foreach(t test_chat test_vocab)
  target_compile_definitions(${t} PRIVATE TSR_FETCH_MODEL="${TSR_FETCH_MODEL}")
endforeach()
set_tests_properties(test_chat PROPERTIES TIMEOUT 120)

# tessera chat end to end (tests/python/test_chat_cli.py): -p, --json, stdin lines, an
# interactive session on a pseudo-terminal (Ctrl-C, /reset, /quit), errors, tp 2 and pp 2
# under mpirun; stories260K.
find_program(TSR_CHAT_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
set(TSR_CHAT_MPI --mpirun ${MPIEXEC_EXECUTABLE})
if(TSR_SANITIZE) # mpirun jobs take ~20 s each under the sanitizers: release tree only
  set(TSR_CHAT_MPI)
endif()
set(TSR_CHAT_ENV "OMPI_ALLOW_RUN_AS_ROOT=1" "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
if(TSR_SANITIZE) # Open MPI's own allocations are not ours (tests/lsan.supp)
  list(APPEND TSR_CHAT_ENV "ASAN_OPTIONS=fast_unwind_on_malloc=0:detect_leaks=1"
       "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0")
endif()
add_test(NAME chat_cli
         COMMAND ${TSR_CHAT_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_chat_cli.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --fetch-model ${TSR_FETCH_MODEL} ${TSR_CHAT_MPI})
set_tests_properties(chat_cli PROPERTIES TIMEOUT 120 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_CHAT_ENV}")

# GenerateRequest.messages and ModelInfo's chat fields over gRPC (Debian's python3-grpcio,
# servers on ephemeral ports).
add_test(NAME serve_chat
         COMMAND ${TSR_CHAT_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_serve_chat.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --proto ${CMAKE_SOURCE_DIR}/proto)
set_tests_properties(serve_chat PROPERTIES TIMEOUT 180 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_CHAT_ENV}")

# `tessera chat -p` on the real SmolLM2 and Qwen2.5 (ops/fetch-model.sh) against llama.cpp's
# chat cases (~25 s and ~10 s on 2 cores: release tree only).
if(NOT TSR_SANITIZE)
  foreach(m smollm2:smollm2-135m-instruct qwen25:qwen2.5-coder-0.5b-instruct)
    string(REPLACE ":" ";" m ${m})
    list(GET m 0 short)
    list(GET m 1 name)
    add_test(NAME chat_${short}
             COMMAND ${TSR_CHAT_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_chat_cli.py
                     --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                     --fetch-model ${TSR_FETCH_MODEL} --real ${name})
    set_tests_properties(chat_${short} PROPERTIES TIMEOUT 600 RUN_SERIAL TRUE)
  endforeach()
endif()
