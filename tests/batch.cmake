# `tessera batch` end to end (tests/python/test_batch.py): a JSONL file of completions and
# plain prompts, greedy and seeded, with 10 malformed lines; every good line must equal
# `tessera generate --json` for the same body; kill -9 + rerun, SIGTERM (exit 3) + rerun,
# 3 shards + --merge, duplicate ids refused, progress on a pseudo-terminal and in a log.
# Release: 300 lines, plus `mpirun -np 2 ... --tp 2 --ordered` (~25 s). Sanitizers: 60
# lines on one process (the parsers, resume and signal paths under ASan/UBSan, ~15 s).
# The Slurm side (sbatch preemption and requeue, a COORDINATOR job through a cluster whose
# coordinator dies mid-run, array job + merge) is slurm_batch (tests/slurm_batch_check.sh),
# release only. Included from tests/CMakeLists.txt.
set(TSR_BATCH_ENV "OMPI_ALLOW_RUN_AS_ROOT=1" "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
if(TSR_SANITIZE)
  list(APPEND TSR_BATCH_ENV "ASAN_OPTIONS=fast_unwind_on_malloc=0:detect_leaks=1"
       "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0"
       "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
  set(TSR_BATCH_ARGS --lines 60 --no-mpi)
else()
  set(TSR_BATCH_ARGS --lines 300)
endif()
add_test(NAME batch_e2e
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/python/test_batch.py run
                 --tessera $<TARGET_FILE:tessera> --model ${TSR_MODELS_DIR}/stories260K.gguf
                 --mpirun ${MPIEXEC_EXECUTABLE} ${TSR_BATCH_ARGS})
set_tests_properties(batch_e2e PROPERTIES TIMEOUT 300 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_BATCH_ENV}")
if(NOT TSR_SANITIZE)
  add_test(NAME slurm_batch
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/slurm_batch_check.sh $<TARGET_FILE:tessera>
                   ${TSR_MODELS_DIR}/stories260K.gguf)
  set_tests_properties(slurm_batch PROPERTIES TIMEOUT 240 SKIP_RETURN_CODE 77 RUN_SERIAL TRUE
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()

# `tessera batch --coordinator` (tests/python/test_batch_coord.py): a coordinator and two
# stories260K replicas; a 100-line mixed file (chat, sampling, malformed lines) equal to
# local-mode batch as sets of lines (--ordered too; logprobs lines without -m), a replica
# kill -9 mid-run (release), the coordinator killed mid-run (exit 3) and the rerun
# completing. Release ~25 s;
# sanitizers: --lean (50 lines; the coordinator kill on 16 short lines), the client's completion-queue and
# retry paths under ASan/UBSan.
if(TSR_SANITIZE)
  set(TSR_BATCH_COORD_ARGS --lean)
else()
  set(TSR_BATCH_COORD_ARGS)
endif()
add_test(NAME batch_coord
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/python/test_batch_coord.py
                 --tessera $<TARGET_FILE:tessera> --model ${TSR_MODELS_DIR}/stories260K.gguf
                 ${TSR_BATCH_COORD_ARGS})
set_tests_properties(batch_coord PROPERTIES TIMEOUT 240 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_BATCH_ENV}")
