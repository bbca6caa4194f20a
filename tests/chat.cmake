# Tests that read the real models (ops/fetch-model.sh NAME prints the cached GGUF's path;
# the test fails when it cannot): chat templates and end-of-generation sets (test_chat),
# the real vocabularies against llama.cpp's ids (test_vocab).
foreach(t test_chat test_vocab)
  target_compile_definitions(${t} PRIVATE TSR_FETCH_MODEL="${TSR_FETCH_MODEL}")
endforeach()
set_tests_properties(test_chat PROPERTIES TIMEOUT 120)

# tessera chat end to end (tests/python/test_chat_cli.py): -p, --json, stdin lines, an
# interactive session on a pseudo-terminal (Ctrl-C, /reset, /quit), errors; stories260K.
find_program(TSR_CHAT_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
add_test(NAME chat_cli
         COMMAND ${TSR_CHAT_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_chat_cli.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --fetch-model ${TSR_FETCH_MODEL})
set_tests_properties(chat_cli PROPERTIES TIMEOUT 120)

# GenerateRequest.messages and ModelInfo's chat fields over gRPC (Debian's python3-grpcio,
# servers on ephemeral ports).
add_test(NAME serve_chat
         COMMAND ${TSR_CHAT_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_serve_chat.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --proto ${CMAKE_SOURCE_DIR}/proto)
set_tests_properties(serve_chat PROPERTIES TIMEOUT 180 RUN_SERIAL TRUE)
