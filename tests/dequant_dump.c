/*
 * dequant_dump.c — writes every tensor of a GGUF file, dequantized by kernels/quant's
 * tsr_dequant_row, to stdout as little-endian float32, in the file's tensor order, for
 * tests/dequant_check.py to compare bit for bit with the `gguf` Python package's NumPy
 * dequantizer (an implementation independent of ggml's C code and of ours).
 *
 * usage: dequant_dump FILE.gguf > floats   (stderr: one line "name type n" per tensor)
 * Exits 1 on a file it cannot open or a tensor type it cannot dequantize.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/quant.h"
#include "shard/gguf.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: dequant_dump FILE.gguf\n");
        return 2;
    }
    char err[512];
    tsr_gguf *g;
    if (tsr_gguf_open(argv[1], &g, err, sizeof err) != 0) {
        fprintf(stderr, "dequant_dump: %s\n", err);
        return 1;
    }
    int rc = 0;
    float *buf = NULL;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        if (!tsr_type_supported(t->type)) {
            fprintf(stderr,
                    "dequant_dump: tensor '%s' has type %s, which kernels/quant cannot "
                    "dequantize\n",
                    t->name, tsr_type_name(t->type));
            rc = 1;
            goto done;
        }
        const int64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        float *nb = realloc(buf, sizeof(float) * (size_t)n);
        if (!nb) {
            fprintf(stderr, "dequant_dump: out of memory for '%s'\n", t->name);
            rc = 1;
            goto done;
        }
        buf = nb;
        tsr_dequant_row(t->type, t->data, buf, n);
        fprintf(stderr, "%s %s %" PRId64 "\n", t->name, tsr_type_name(t->type), n);
        if (fwrite(buf, sizeof(float), (size_t)n, stdout) != (size_t)n) {
            fprintf(stderr, "dequant_dump: write failed\n");
            rc = 1;
            goto done;
        }
    }
done:
    free(buf);
    tsr_gguf_close(g);
    return rc;
}
