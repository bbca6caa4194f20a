#!/bin/sh
# tests/gpu_ranks.sh GPU_CHECK N_GPUS COMMAND... — run COMMAND (an mpirun job of GPU ranks)
# when N_GPUS CUDA devices are visible; otherwise print gpu_check's "SKIP: no CUDA device: ..."
# line and exit 77 (ctest's SKIP_RETURN_CODE of the GPU suite).
gpu_check="$1"; need="$2"; shift 2
"$gpu_check" --need-gpus "$need" || exit $?
exec "$@"
