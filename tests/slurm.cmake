# Tessera under Slurm (tests/slurm_check.sh): a throwaway single-node cluster
# (ops/slurm/local-cluster.sh: munged + slurmctld + slurmd in a temporary directory), then
# `srun --mpi=pmix -n 2` with --tp 2 and --pp 2 and the example batch job
# ops/slurm/tessera-generate.sbatch must generate the ids of the single-process run, and a
# launcher/layout mismatch must fail with a message. Skipped (exit 77) without root or
# without the Slurm packages (ops/install-deps.sh installs them). ~10 s; the cluster is
# always stopped. srun passes this environment on to the ranks (ASan/LSan settings for
# the TSR_SANITIZE build). RUN_SERIAL: it needs both cores and its own daemons.
# Included from tests/CMakeLists.txt.
set(TSR_SLURM_ENV
    "OMPI_ALLOW_RUN_AS_ROOT=1" "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    "ASAN_OPTIONS=fast_unwind_on_malloc=0:detect_leaks=1"
    "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0")
add_test(NAME slurm_generate
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/slurm_check.sh $<TARGET_FILE:tessera>
                 ${TSR_MODELS_DIR}/stories260K.gguf)
set_tests_properties(slurm_generate PROPERTIES TIMEOUT 180 SKIP_RETURN_CODE 77 RUN_SERIAL TRUE
                     ENVIRONMENT "${TSR_SLURM_ENV}")
