# Tests that read the real models (ops/fetch-model.sh NAME prints the cached GGUF's path;
# the test fails when it cannot): chat templates and end-of-generation sets (test_chat),
# the real vocabularies against llama.cpp's ids (test_vocab).
foreach(t test_chat test_vocab)
  target_compile_definitions(${t} PRIVATE TSR_FETCH_MODEL="${TSR_FETCH_MODEL}")
endforeach()
set_tests_properties(test_chat PROPERTIES TIMEOUT 120)
