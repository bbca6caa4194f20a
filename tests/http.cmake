# The HTTP front door, metrics, keys and TLS, end to end (tests/python/test_http.py): the
# official `openai` client from the test venv (${TSR_VENV_PYTHON}, built by ops/venv.sh
# from ops/requirements-test.txt; Debian's python3-grpcio is visible in it), promtool and a
# real Prometheus server (Debian's `prometheus`), openssl for a test CA, and a real instruct
# model for chat (smollm2-135m-instruct, ops/fetch-model.sh). Servers on 127.0.0.1
# ephemeral ports. The sanitizer tree runs it whole: it is the request path.
# Included from tests/CMakeLists.txt (after serve.cmake: TSR_SERVE_ENV).
set(TSR_HTTP_TEST_ARGS)
if(TSR_SANITIZE)
  # A 135M model at -O0 with ASan is minutes per answer: chat there runs on the tiny model
  # with --chat-template chatml (the same request path); release checks the real model.
  list(APPEND TSR_HTTP_TEST_ARGS --chat-tiny)
endif()
add_test(NAME serve_http
         COMMAND ${TSR_VENV_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_http.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --proto ${CMAKE_SOURCE_DIR}/proto --fetch-model ${TSR_FETCH_MODEL}
                 ${TSR_HTTP_TEST_ARGS})
set_tests_properties(serve_http PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")
