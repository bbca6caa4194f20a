/*
 * internal.h — what backend.cu and kernels.cu share (CUDA C++ only): the device handle and
 * the error helpers that turn a failing call into a status naming the call and the device.
 */
#ifndef TSR_CUDA_INTERNAL_H
#define TSR_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>

#include "kernels/cuda/cuda_backend.h"

/* cuBLAS, loaded with dlopen when the first device opens: linking it would map ~540 MB of
 * libcublasLt into every tessera process (about 215 MB resident and 0.1 s at start), CPU
 * runs included. decltype keeps the signatures those of cublas_v2.h. */
typedef struct {
    decltype(&cublasCreate_v2) create;
    decltype(&cublasDestroy_v2) destroy;
    decltype(&cublasSetStream_v2) set_stream;
    decltype(&cublasSgemm_v2) sgemm;
    /* the C symbol (C++ also sees an inline overload taking a cudaDataType compute type) */
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                              const void *, const void *, cudaDataType, int, const void *,
                              cudaDataType, int, const void *, void *, cudaDataType, int,
                              cublasComputeType_t, cublasGemmAlgo_t);
    decltype(&cublasGetStatusName) status_name;
    decltype(&cublasGetStatusString) status_string;
} tsr_cublas_api;

/* The loaded API, or NULL with err ("dlopen libcublas.so.13: ...") when it is missing. */
const tsr_cublas_api *tsr_cublas(char *err, size_t err_len);

struct tsr_cuda_dev {
    int32_t ordinal;
    cudaStream_t stream;
    cublasHandle_t cublas;
    const tsr_cublas_api *blas;
    uint64_t n_bytes_cap, n_bytes_used;
    /* scratch, grown on demand (counted against the cap): quantized activations, the F16
     * activations and the F16 weight tile of the cuBLAS path */
    void *xq;
    size_t xq_bytes;
    void *xh;
    size_t xh_bytes;
    void *tile;
    size_t tile_bytes;
    void *att_part; /* split attention states */
    size_t att_part_bytes;
};

/* Bytes of the F16 weight tile of the cuBLAS path (rows per tile = this / (2 * n_in)). */
#define TSR_CUDA_TILE_BYTES ((size_t)64 << 20)

void tsr_cuda_errf(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int tsr_cuda_fail(const tsr_cuda_dev *d, cudaError_t e, const char *call, char *err,
                  size_t err_len);
/* Grow one scratch buffer to n_bytes (freeing the old one). */
int tsr_cuda_scratch(tsr_cuda_dev *d, void **buf, size_t *have, size_t n_bytes, const char *what,
                     char *err, size_t err_len);
/* Errors of the launch just queued (bad configuration; not those of the running kernel). */
int tsr_cuda_launched(tsr_cuda_dev *d, const char *kernel, char *err, size_t err_len);

#define TSR_CUDA_CHECK(d, call)                                                                    \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return tsr_cuda_fail((d), e_, #call, err, err_len);                 \
    } while (0)

#endif
