/*
 * rope.h — rotary position embedding in two halves: the cos/sin table of a batch's
 * positions (once per forward pass and rope setting), then the rotation of any number of
 * heads from it (Q and K of every layer).
 *
 * Why: tsr_rope_ext (kernels/ops.h) takes cosf/sinf of every (token, pair) for Q and again
 * for K in every layer, and rotates one pair at a time through libm's fmaf; in a decode
 * step of 16 sequences that was ~2% of the step. The table holds exactly the values
 * tsr_rope_ext computes (ggml's running-product angles, the same float operations in the
 * same order), and the rotation does exactly its two FMAs per pair (vfmadd is fmaf), so
 * results are bit-identical to tsr_rope_ext and so to llama.cpp (tests/test_rope.c checks
 * every bit against tsr_rope_ext on both pairings).
 */
#ifndef TSR_ROPE_H
#define TSR_ROPE_H

#include <stdint.h>

/* cs: [n_tok][n_rot] floats, caller-owned; row t gets cos of pairs 0..n_rot/2 then their sin,
 * for position pos[t] (n_rot even, > 0; freq_factors: n_rot/2 values or NULL). */
void tsr_rope_table(float *cs, const int32_t *pos, int n_tok, int n_rot, float freq_base,
                    float freq_scale, const float *freq_factors);

/* Rotate the first n_rot values of each head of x ([n_tok][n_head][head_dim], in place) by
 * the table rows cs[0..n_tok) (tsr_rope_table): NEOX pairs (i, i + n_rot/2) when neox,
 * else NORM pairs (2i, 2i+1). Bit-identical to tsr_rope_ext with the same arguments. */
void tsr_rope_apply(float *x, const float *cs, int n_tok, int n_head, int head_dim, int n_rot,
                    int neox);

#endif
