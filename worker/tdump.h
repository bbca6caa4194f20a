/* tdump.h — debugging aid: dumps named activations of one forward call as raw float32
 * files, to compare Tessera with llama.cpp tensor by tensor (llama.cpp's eval callback
 * writes the same tensors). Off unless TSR_DUMP_DIR is set; when off, each dump point in
 * worker/model.c costs one load of a global flag.
 *
 *   TSR_DUMP_DIR=dir   write dir/NAME-LAYER.f32 ([n_tokens][width] floats, row-major;
 *                      LAYER is the global layer index, -1 for the head)
 *   TSR_DUMP_CALL=k    which forward call of the process to dump (default 0: the first,
 *                      i.e. the prompt's prefill when it fits one batch; k = 1.. are the
 *                      following calls, e.g. decode steps)
 *
 * Names: inp, attn_norm, q_mm, k_mm, v_mm (projections, before bias), Qcur, Kcur, Vcur
 * (after bias / norm / rope), kqv_out, attn_out, ffn_inp, ffn_norm, ffn_gate, ffn_up,
 * ffn_act, ffn_out, l_out, result_norm, result_output. A single-process aid: under tensor
 * parallelism each rank would write its own slice to the same names. Not thread-safe with
 * several models in one process (one global call counter). */
#ifndef TSR_TDUMP_H
#define TSR_TDUMP_H

#include <stdbool.h>
#include <stddef.h>

/* true while the current forward call is the one to dump. */
extern bool tsr_tdump_active;

/* Called once at the start of every forward call: advances the call counter and sets
 * tsr_tdump_active (reads the environment on the first call only). */
void tsr_tdump_begin_call(void);

/* Writes n floats of x to TSR_DUMP_DIR/NAME-LAYER.f32; prints a warning to stderr when the
 * file cannot be written (a debugging aid never fails the forward pass). */
void tsr_tdump_write(const char *name, int layer, const float *x, size_t n);

#define TSR_TDUMP(name, layer, x, n)                                                               \
    do {                                                                                           \
        if (tsr_tdump_active) tsr_tdump_write((name), (layer), (x), (n));                          \
    } while (0)

#endif
