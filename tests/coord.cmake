# The coordinator, end to end (tests/python/test_coord.py): real processes (a coordinator,
# replicas that join it, an mpirun tp 2 replica, one launched from a cluster file), Debian's
# python3-grpcio as the client, every stream compared with single-process `tessera
# generate`. coord_basic runs in both trees (ctl, routing, drain, failover, coordinator
# restart); coord_cluster (three replicas, 48 streams, ranks and replicas killed) in the
# release tree only. Included from tests/CMakeLists.txt after serve.cmake.
set(TSR_COORD_TEST ${TSR_SYSTEM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_coord.py
    --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
    --proto ${CMAKE_SOURCE_DIR}/proto --mpirun ${MPIEXEC_EXECUTABLE})
add_test(NAME coord_basic COMMAND ${TSR_COORD_TEST} -k basic)
set_tests_properties(coord_basic PROPERTIES TIMEOUT 240 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")
if(NOT TSR_SANITIZE)
  add_test(NAME coord_cluster COMMAND ${TSR_COORD_TEST} -k cluster)
  set_tests_properties(coord_cluster PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE
                       ENVIRONMENT "${TSR_SERVE_ENV}")
endif()
# The coordinator's front doors with keys and TLS (tests/python/test_coord_front.py): ctl's
# client flags, a keyed + TLS replica serving through a keyed + TLS coordinator, grpcio with
# the test CA. The venv python (the openai client) sees Debian's python3-grpcio. Both trees:
# it is the request path.
add_test(NAME coord_front
         COMMAND ${TSR_VENV_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/python/test_coord_front.py
                 --tessera $<TARGET_FILE:tessera> --models ${TSR_MODELS_DIR}
                 --proto ${CMAKE_SOURCE_DIR}/proto)
set_tests_properties(coord_front PROPERTIES TIMEOUT 240 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SERVE_ENV}")
