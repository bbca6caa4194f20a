/*
 * backend.cu — devices, memory and errors of the CUDA backend (cuda_backend.h): device
 * discovery that treats "no driver / no GPU" as zero devices, the per-rank device choice
 * from the launcher's local rank, allocations counted against the --gpu-memory cap, copies,
 * and the error wording (failing call, CUDA error name and text, device ordinal).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/internal.h"

void tsr_cuda_errf(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || err_len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

int tsr_cuda_fail(const tsr_cuda_dev *d, cudaError_t e, const char *call, char *err, size_t err_len)
{
    tsr_cuda_errf(err, err_len, "%s failed on CUDA device %d: %s (%s)", call, d ? d->ordinal : -1,
                  cudaGetErrorName(e), cudaGetErrorString(e));
    cudaGetLastError(); /* clear a non-sticky error so later calls are not blamed */
    if (e == cudaErrorMemoryAllocation) return TSR_CUDA_ENOMEM;
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice)
        return TSR_CUDA_ENODEV;
    return TSR_CUDA_ERR;
}

int tsr_cuda_launched(tsr_cuda_dev *d, const char *kernel, char *err, size_t err_len)
{
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return 0;
    tsr_cuda_errf(err, err_len, "launch of %s failed on CUDA device %d: %s (%s)", kernel,
                  d->ordinal, cudaGetErrorName(e), cudaGetErrorString(e));
    return TSR_CUDA_ERR;
}

static tsr_cublas_api g_blas;
static char g_blas_err[512];
static bool g_blas_ok;
static pthread_once_t g_blas_once = PTHREAD_ONCE_INIT;

static void blas_load(void)
{
    char lib[64];
    snprintf(lib, sizeof lib, "libcublas.so.%d", CUBLAS_VER_MAJOR);
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(g_blas_err, sizeof g_blas_err, "dlopen %s: %s (install cuBLAS)", lib, dlerror());
        return;
    }
    struct {
        const char *name;
        void **slot;
    } syms[] = {{"cublasCreate_v2", (void **)&g_blas.create},
                {"cublasDestroy_v2", (void **)&g_blas.destroy},
                {"cublasSetStream_v2", (void **)&g_blas.set_stream},
                {"cublasSgemm_v2", (void **)&g_blas.sgemm},
                {"cublasGemmEx", (void **)&g_blas.gemm_ex},
                {"cublasGetStatusName", (void **)&g_blas.status_name},
                {"cublasGetStatusString", (void **)&g_blas.status_string}};
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; ++i) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(g_blas_err, sizeof g_blas_err, "%s lacks %s", lib, syms[i].name);
            return;
        }
    }
    g_blas_ok = true;
}

const tsr_cublas_api *tsr_cublas(char *err, size_t err_len)
{
    pthread_once(&g_blas_once, blas_load);
    if (g_blas_ok) return &g_blas;
    tsr_cuda_errf(err, err_len, "%s", g_blas_err);
    return NULL;
}

extern "C" bool tsr_cuda_built(void)
{
    return true;
}

extern "C" int32_t tsr_cuda_device_count(char *why, size_t why_len)
{
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        tsr_cuda_errf(why, why_len, "cudaGetDeviceCount: %s (%s)", cudaGetErrorName(e),
                      cudaGetErrorString(e));
        cudaGetLastError();
        return 0;
    }
    if (n == 0) tsr_cuda_errf(why, why_len, "cudaGetDeviceCount: no CUDA device is visible");
    return n;
}

extern "C" int32_t tsr_cuda_pick_device(int32_t n_devices)
{
    if (n_devices < 1) return -1;
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                                       "MPI_LOCALRANKID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; ++i) {
        const char *v = getenv(vars[i]);
        if (v && *v) {
            char *end;
            long r = strtol(v, &end, 10);
            if (*end == '\0' && r >= 0) return (int32_t)(r % n_devices);
        }
    }
    return 0;
}

extern "C" int tsr_cuda_device_info_get(int32_t ordinal, tsr_cuda_device_info *out, char *err,
                                        size_t err_len)
{
    memset(out, 0, sizeof *out);
    cudaDeviceProp p;
    TSR_CUDA_CHECK(NULL, cudaGetDeviceProperties(&p, ordinal));
    out->ordinal = ordinal;
    snprintf(out->name, sizeof out->name, "%s", p.name);
    out->cc_major = p.major;
    out->cc_minor = p.minor;
    out->n_bytes_total = p.totalGlobalMem;
    int clock_khz = 0, bus_bits = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, ordinal) == cudaSuccess &&
        cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, ordinal) == cudaSuccess)
        out->mem_bw_gbps = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;
    cudaGetLastError();
    int cur = 0;
    TSR_CUDA_CHECK(NULL, cudaGetDevice(&cur));
    TSR_CUDA_CHECK(NULL, cudaSetDevice(ordinal));
    size_t fr = 0, tot = 0;
    const cudaError_t e = cudaMemGetInfo(&fr, &tot);
    cudaSetDevice(cur);
    if (e != cudaSuccess)
        return tsr_cuda_fail(NULL, e, "cudaMemGetInfo(&free, &total)", err, err_len);
    out->n_bytes_free = fr;
    return 0;
}

extern "C" int tsr_cuda_open(int32_t ordinal, uint64_t n_bytes_cap, tsr_cuda_dev **out, char *err,
                             size_t err_len)
{
    *out = NULL;
    char why[256] = "";
    const int32_t n = tsr_cuda_device_count(why, sizeof why);
    if (ordinal < 0 || ordinal >= n) {
        if (n == 0)
            tsr_cuda_errf(err, err_len, "no CUDA device: %s (use --device cpu)", why);
        else
            tsr_cuda_errf(err, err_len, "CUDA device %d does not exist (%d visible)", ordinal, n);
        return TSR_CUDA_ENODEV;
    }
    tsr_cuda_dev *d = (tsr_cuda_dev *)calloc(1, sizeof *d);
    if (!d) {
        tsr_cuda_errf(err, err_len, "out of host memory");
        return TSR_CUDA_ENOMEM;
    }
    d->ordinal = ordinal;
    int rc = 0;
    cudaError_t e;
    cublasStatus_t cs;
    size_t fr = 0, tot = 0;
    if ((e = cudaSetDevice(ordinal)) != cudaSuccess) {
        rc = tsr_cuda_fail(d, e, "cudaSetDevice", err, err_len);
        goto fail;
    }
    if ((e = cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        rc = tsr_cuda_fail(d, e, "cudaStreamCreateWithFlags", err, err_len);
        goto fail;
    }
    if (!(d->blas = tsr_cublas(err, err_len))) {
        rc = TSR_CUDA_ERR;
        goto fail_stream;
    }
    if ((cs = d->blas->create(&d->cublas)) != CUBLAS_STATUS_SUCCESS) {
        tsr_cuda_errf(err, err_len, "cublasCreate failed on CUDA device %d: %s (%s)", ordinal,
                      d->blas->status_name(cs), d->blas->status_string(cs));
        rc = TSR_CUDA_ERR;
        goto fail_stream;
    }
    if ((cs = d->blas->set_stream(d->cublas, d->stream)) != CUBLAS_STATUS_SUCCESS) {
        tsr_cuda_errf(err, err_len, "cublasSetStream failed on CUDA device %d: %s", ordinal,
                      d->blas->status_name(cs));
        rc = TSR_CUDA_ERR;
        goto fail_cublas;
    }
    if ((e = cudaMemGetInfo(&fr, &tot)) != cudaSuccess) {
        rc = tsr_cuda_fail(d, e, "cudaMemGetInfo", err, err_len);
        goto fail_cublas;
    }
    if (n_bytes_cap == 0) {
        const uint64_t reserve = (uint64_t)512 << 20;
        n_bytes_cap = fr > reserve ? fr - reserve : 0;
    } else if (n_bytes_cap > fr) {
        tsr_cuda_errf(err, err_len,
                      "--gpu-memory %.2f GiB exceeds the %.2f GiB free on CUDA device %d "
                      "(%.2f GiB total)",
                      n_bytes_cap / 1073741824.0, fr / 1073741824.0, ordinal, tot / 1073741824.0);
        rc = TSR_CUDA_ENOMEM;
        goto fail_cublas;
    }
    d->n_bytes_cap = n_bytes_cap;
    *out = d;
    return 0;
fail_cublas:
    d->blas->destroy(d->cublas);
fail_stream:
    cudaStreamDestroy(d->stream);
fail:
    free(d);
    return rc;
}

extern "C" void tsr_cuda_close(tsr_cuda_dev *d)
{
    if (!d) return;
    cudaSetDevice(d->ordinal);
    cudaStreamSynchronize(d->stream);
    cudaFree(d->xq);
    cudaFree(d->xh);
    cudaFree(d->tile);
    cudaFree(d->att_part);
    d->blas->destroy(d->cublas);
    cudaStreamDestroy(d->stream);
    cudaGetLastError();
    free(d);
}

extern "C" int32_t tsr_cuda_ordinal(const tsr_cuda_dev *d)
{
    return d->ordinal;
}

extern "C" uint64_t tsr_cuda_n_bytes_used(const tsr_cuda_dev *d)
{
    return d->n_bytes_used;
}

extern "C" uint64_t tsr_cuda_n_bytes_cap(const tsr_cuda_dev *d)
{
    return d->n_bytes_cap;
}

extern "C" int tsr_cuda_activate(tsr_cuda_dev *d, char *err, size_t err_len)
{
    TSR_CUDA_CHECK(d, cudaSetDevice(d->ordinal));
    return 0;
}

extern "C" void *tsr_cuda_stream(tsr_cuda_dev *d)
{
    return (void *)d->stream;
}

extern "C" int tsr_cuda_alloc(tsr_cuda_dev *d, size_t n_bytes, const char *what, void **out,
                              char *err, size_t err_len)
{
    *out = NULL;
    if (n_bytes == 0) n_bytes = 1;
    if (d->n_bytes_used + n_bytes > d->n_bytes_cap) {
        tsr_cuda_errf(err, err_len,
                      "%s needs %.1f MiB of GPU memory on CUDA device %d, but %.1f MiB of the "
                      "%.1f MiB cap are in use (raise --gpu-memory, or spread the model over "
                      "more ranks: --tp / --pp)",
                      what, n_bytes / 1048576.0, d->ordinal, d->n_bytes_used / 1048576.0,
                      d->n_bytes_cap / 1048576.0);
        return TSR_CUDA_ENOMEM;
    }
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, n_bytes);
    if (e != cudaSuccess) {
        char call[160];
        snprintf(call, sizeof call, "cudaMalloc(%zu bytes for %s)", n_bytes, what);
        return tsr_cuda_fail(d, e, call, err, err_len);
    }
    d->n_bytes_used += n_bytes;
    *out = p;
    return 0;
}

extern "C" void tsr_cuda_free(tsr_cuda_dev *d, void *p, size_t n_bytes)
{
    if (!p) return;
    cudaFree(p);
    cudaGetLastError();
    if (n_bytes == 0) n_bytes = 1;
    d->n_bytes_used = d->n_bytes_used >= n_bytes ? d->n_bytes_used - n_bytes : 0;
}

int tsr_cuda_scratch(tsr_cuda_dev *d, void **buf, size_t *have, size_t n_bytes, const char *what,
                     char *err, size_t err_len)
{
    if (*have >= n_bytes) return 0;
    if (*buf) {
        /* the old buffer may still be read by queued kernels */
        TSR_CUDA_CHECK(d, cudaStreamSynchronize(d->stream));
        tsr_cuda_free(d, *buf, *have);
        *buf = NULL;
        *have = 0;
    }
    const int rc = tsr_cuda_alloc(d, n_bytes, what, buf, err, err_len);
    if (rc == 0) *have = n_bytes;
    return rc;
}

extern "C" int tsr_cuda_upload(tsr_cuda_dev *d, void *dst, const void *src_host, size_t n_bytes,
                               char *err, size_t err_len)
{
    if (n_bytes == 0) return 0;
    TSR_CUDA_CHECK(d, cudaMemcpyAsync(dst, src_host, n_bytes, cudaMemcpyHostToDevice, d->stream));
    TSR_CUDA_CHECK(d, cudaStreamSynchronize(d->stream));
    return 0;
}

extern "C" int tsr_cuda_download(tsr_cuda_dev *d, void *dst_host, const void *src, size_t n_bytes,
                                 char *err, size_t err_len)
{
    if (n_bytes == 0) return tsr_cuda_sync(d, err, err_len);
    TSR_CUDA_CHECK(d, cudaMemcpyAsync(dst_host, src, n_bytes, cudaMemcpyDeviceToHost, d->stream));
    TSR_CUDA_CHECK(d, cudaStreamSynchronize(d->stream));
    return 0;
}

extern "C" int tsr_cuda_copy(tsr_cuda_dev *d, void *dst, const void *src, size_t n_bytes, char *err,
                             size_t err_len)
{
    if (n_bytes == 0) return 0;
    TSR_CUDA_CHECK(d, cudaMemcpyAsync(dst, src, n_bytes, cudaMemcpyDeviceToDevice, d->stream));
    return 0;
}

extern "C" int tsr_cuda_sync(tsr_cuda_dev *d, char *err, size_t err_len)
{
    TSR_CUDA_CHECK(d, cudaStreamSynchronize(d->stream));
    return 0;
}

extern "C" int tsr_cuda_copy_2d(tsr_cuda_dev *d, void *dst, size_t dst_pitch, const void *src,
                                size_t src_pitch, size_t width_bytes, size_t rows, char *err,
                                size_t err_len)
{
    if (width_bytes == 0 || rows == 0) return 0;
    TSR_CUDA_CHECK(d, cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width_bytes, rows,
                                        cudaMemcpyDeviceToDevice, d->stream));
    return 0;
}

extern "C" bool tsr_cuda_host_addressable(void)
{
    return false;
}
