# Real models (issue 8): SmolLM2 (llama, tied head), Qwen2.5-Coder (qwen2), Gemma 3
# (gemma3), fetched by ops/fetch-model.sh (a fetch that fails fails the test). Greedy ids
# against llama.cpp's (../shared/models/expected/real-models.json, README section 9.2) and
# the distributed layouts against one process. Release tree only: a 0.5B model is slow
# under the sanitizers on a 2-core machine; the sanitizer tree runs the architecture
# fuzz tests on small synthetic files instead (below). Included from tests/CMakeLists.txt.
add_executable(real_models_check ${CMAKE_CURRENT_SOURCE_DIR}/real_models_check.c)
target_link_libraries(real_models_check PRIVATE tessera_core)

set(TSR_REAL_EXPECTED ${TSR_MODELS_DIR}/expected/real-models.json)
if(NOT TSR_SANITIZE)
  foreach(pair "smollm2:smollm2-135m-instruct" "qwen2:qwen2.5-coder-0.5b-instruct"
               "gemma3:gemma-3-270m")
    string(REPLACE ":" ";" parts ${pair})
    list(GET parts 0 short)
    list(GET parts 1 fetch_name)
    add_test(NAME real_model_${short}
             COMMAND sh -c "set -e; p=$(${TSR_FETCH_MODEL} ${fetch_name} | tail -n 1); \
$<TARGET_FILE:real_models_check> --expected ${TSR_REAL_EXPECTED} --name ${fetch_name} -m \"$p\" -t 2")
    set_tests_properties(real_model_${short} PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE)
  endforeach()
endif()
