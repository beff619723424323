/* conv.c - Conv1d through filters packed once into 16-filter panels (RNN_OP_CONV1D_PACKED). */
#include "internal.h"

#include <stdint.h>
#include <string.h>

/*
 * The product of a 1-D convolution, per batch row n and group g, is
 *
 *   out[n, g*Mg + m, l] = sum_{c, k} W[g*Mg + m, c, k] * x[n, g*Cg + c, l*stride + k*dil - pad]
 *
 * that is C (Lout, Mg) = colT (Lout, Cg*K) @ W_g (Mg, Cg*K)^T with colT[l][c*K + k] the input
 * sample filter tap (c, k) of output l sees (zero in the padding). The planner packs the
 * filters once (rnn_conv1d_pack below, called by rnnengine/ops/handlers.py
 * pack_conv_filters), so a call streams panels it does not re-pack, as sgemm would. The
 * reference beside it is op_conv1d in graph.c (im2col + rnn_gemm_nt), which the tests
 * compare against on odd sizes.
 *
 * Order of the sums: each output is one FMA chain over its Cg*K taps in order
 * (rnn_gemm_packed, pack.c: the same bits on AVX2 and AVX-512 and whatever the number of
 * rows), the order of onnxruntime's convolution when it has several positions (bit for bit
 * on an AVX2 EPYC). Except a call of 1-3 positions of a conv of RNN_CONV_SPLIT_TAPS = 64
 * taps or more (a streamed chunk of a frame or three: silero-vad's encoder), where
 * onnxruntime takes a matrix-vector kernel that splits its sums: there the taps are split
 * into RNN_CONV_PARTS = 4 parts of consecutive taps, part i the taps [b_i, b_{i+1}) with b_i
 * = i * Cg*K / 4, each a chain, added in order ((p0 + p1) + p2) + p3, then the bias
 * (rnn_conv1d_parts). Measured on silero-vad's encoder convs from the float64 answer, mean
 * error 0.44 / 0.35 / 0.19 e-6 against onnxruntime's 0.39 / 0.37 / 0.18 e-6 and one chain's
 * 0.65 / 0.44 / 0.23 e-6; on silero-vad's 16 kHz file fed 8 kHz audio, an ill-conditioned
 * graph, one chain put the LSTM state 9-14x the tolerance off the float64 answer (7x off
 * onnxruntime), where onnxruntime is 2-3x off and the parts 1.6-2.3x (0.8x off onnxruntime;
 * tests/test_silero.py). A stream fed 1-3 frames per call therefore rounds such a conv
 * (not a smaller one) unlike its whole run: within the tolerance, not bit for bit.
 *
 * Packed filter layout (float32, rnn_conv1d_packed_floats of them, written by
 * rnn_conv1d_pack for the parts the planned call sums in): groups one after the other, group_floats = P * 16 * Cg*K each with P =
 * ceil(Mg/16); within a group, the parts one after the other, part i at float P * 16 * b_i,
 * holding the P panels of the pack.c layout of those taps (one part: the pack.c layout of the
 * group), filter g*Mg + m in panel m / 16,
 * lane m % 16, element [P*16*b_i + (panel * (b_{i+1} - b_i) + k - b_i) * 16 + lane] =
 * W[g*Mg + m, k / K, k % K] for b_i <= k < b_{i+1}; lanes past Mg zero. Parts start 64 bytes
 * apart times a whole number, so they are aligned when the buffer is: the kernels load
 * panels aligned, and a buffer not 64-byte aligned is computed by the plain reference kernel
 * instead (the same parts and order, each product and sum rounded in two steps, slower).
 *
 * Positions are done in blocks of RNN_CONV_BLOCK: the workspace holds one block's colT and
 * its product, whatever the length.
 */

#define PANELS(m) (((m) + RNN_PANEL - 1) / RNN_PANEL)

int64_t rnn_conv1d_parts(int64_t CK, int64_t Lout) {
    return CK >= RNN_CONV_SPLIT_TAPS && Lout < 4 ? RNN_CONV_PARTS : 1;
}

/* the first tap of part i of an im2col row of CK taps in `parts` */
static int64_t part_start(int64_t CK, int64_t parts, int64_t i) { return i * CK / parts; }

void rnn_conv1d_pack(const float *W, int64_t M, int64_t Cg, int64_t K, int64_t G, int64_t parts, float *out) {
    const int64_t Mg = M / G, CK = Cg * K, P = PANELS(Mg);
    memset(out, 0, sizeof(float) * (size_t)rnn_conv1d_packed_floats(M, Cg, K, G));
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < parts; i++) {
            const int64_t b0 = part_start(CK, parts, i), b1 = part_start(CK, parts, i + 1), n = b1 - b0;
            float *part = out + g * P * RNN_PANEL * CK + P * RNN_PANEL * b0;
            for (int64_t m = 0; m < Mg; m++)
                for (int64_t k = b0; k < b1; k++)
                    part[((m / RNN_PANEL) * n + k - b0) * RNN_PANEL + m % RNN_PANEL] = W[(g * Mg + m) * CK + k];
        }
}

int64_t rnn_conv1d_packed_floats(int64_t M, int64_t Cg, int64_t K, int64_t G) {
    return G * PANELS(M / G) * RNN_PANEL * Cg * K;
}

/* Batch rows whose positions one block takes together: with fewer than RNN_CONV_BLOCK
 * positions (a streamed chunk, a short sequence), as many whole rows as fit, so that each
 * panel of filters read serves many rows (a batch of streams: the session batcher); one row
 * for a single channel (its windows are read in place, one row at a time). */
static int64_t rows_together(int64_t N, int64_t Cg, int64_t Lout) {
    if (Cg == 1 || Lout <= 0 || Lout >= RNN_CONV_BLOCK) return 1;
    const int64_t nb = RNN_CONV_BLOCK / Lout;
    return nb < N ? nb : (N > 1 ? N : 1);
}

int64_t rnn_conv1d_packed_work(int64_t N, int64_t Lout, int64_t Cg, int64_t K, int64_t Mg) {
    const int64_t lb = (Lout < RNN_CONV_BLOCK ? Lout : RNN_CONV_BLOCK) * rows_together(N, Cg, Lout);
    return lb * (Cg * K + PANELS(Mg) * RNN_PANEL);
}

/* colT (lb, Cg*K) for outputs l0 .. l0+lb-1 of one group's input xg (Cg, L):
 * colT[l][c*K + k] = xg[c][(l0 + l)*stride + k*dil - pad], 0 in the padding. Also the
 * column buffer of the reference CONV1D (graph.c). */
void rnn_im2col(const float *xg, int64_t Cg, int64_t L, int64_t K, int64_t stride, int64_t dil, int64_t pad,
                int64_t l0, int64_t lb, float *colT) {
    const int64_t CK = Cg * K;
    for (int64_t l = 0; l < lb; l++) {
        float *row = colT + l * CK;
        const int64_t p0 = (l0 + l) * stride - pad; /* the input position of tap 0 */
        if (dil == 1 && p0 >= 0 && p0 <= L - K) { /* the whole window inside: K samples per channel */
            if (K >= 16)
                for (int64_t c = 0; c < Cg; c++) memcpy(row + c * K, xg + c * L + p0, sizeof(float) * (size_t)K);
            else if (K == 3) /* the most common kernel: unrolled */
                for (int64_t c = 0; c < Cg; c++) {
                    const float *s = xg + c * L + p0;
                    row[c * 3] = s[0], row[c * 3 + 1] = s[1], row[c * 3 + 2] = s[2];
                }
            else /* a few taps: a call per channel would cost more than the copy */
                for (int64_t c = 0; c < Cg; c++)
                    for (int64_t k = 0; k < K; k++) row[c * K + k] = xg[c * L + p0 + k];
            continue;
        }
        if (dil == 1) { /* taps lo .. hi-1 inside the input, the others in the padding */
            const int64_t lo = p0 >= 0 ? 0 : (-p0 < K ? -p0 : K);
            const int64_t hi = L - p0 >= K ? K : (L - p0 > lo ? L - p0 : lo);
            if (K == 3) { /* the most common kernel: each tap read from a position clamped into
                           * the input and kept or zeroed without a branch, where three loops of
                           * zero to three taps per channel cost more than the copy */
                const int64_t i0 = p0 < 0 ? 0 : (p0 >= L ? L - 1 : p0);
                const int64_t i1 = p0 + 1 < 0 ? 0 : (p0 + 1 >= L ? L - 1 : p0 + 1);
                const int64_t i2 = p0 + 2 < 0 ? 0 : (p0 + 2 >= L ? L - 1 : p0 + 2);
                const int k0 = lo <= 0 && 0 < hi, k1 = lo <= 1 && 1 < hi, k2 = lo <= 2 && 2 < hi;
                if (L > 0)
                    for (int64_t c = 0; c < Cg; c++) {
                        const float *s = xg + c * L;
                        const float v0 = s[i0], v1 = s[i1], v2 = s[i2];
                        row[c * 3] = k0 ? v0 : 0.0f, row[c * 3 + 1] = k1 ? v1 : 0.0f, row[c * 3 + 2] = k2 ? v2 : 0.0f;
                    }
                else
                    memset(row, 0, sizeof(float) * (size_t)(Cg * 3));
                continue;
            }
            for (int64_t c = 0; c < Cg; c++) {
                float *r = row + c * K;
                const float *s = xg + c * L; /* tap k reads s[p0 + k] */
                for (int64_t k = 0; k < lo; k++) r[k] = 0.0f;
                for (int64_t k = lo; k < hi; k++) r[k] = s[p0 + k];
                for (int64_t k = hi; k < K; k++) r[k] = 0.0f;
            }
            continue;
        }
        for (int64_t c = 0; c < Cg; c++)
            for (int64_t k = 0; k < K; k++) {
                const int64_t p = p0 + k * dil;
                row[c * K + k] = (p >= 0 && p < L) ? xg[c * L + p] : 0.0f;
            }
    }
}

void rnn_conv1d_packed(const int64_t *ip, float alpha, const float *x, const float *Wp, const float *bias,
                       float *out, float *work) {
    const int64_t N = ip[0], C = ip[1], L = ip[2], M = ip[3], K = ip[4], Lout = ip[5];
    const int64_t stride = ip[6], dil = ip[7], pad = ip[8], G = ip[9], act = ip[10];
    const int64_t Cg = C / G, Mg = M / G, CK = Cg * K, together = rows_together(N, Cg, Lout);
    const int64_t parts = rnn_conv1d_parts(CK, Lout);
    const int64_t group_floats = PANELS(Mg) * RNN_PANEL * CK;
    float *colT = work;                                                                  /* (rows, CK) */
    float *prod = work + (Lout < RNN_CONV_BLOCK ? Lout : RNN_CONV_BLOCK) * together * CK; /* (rows, Mg) */
    if (Mg == 0 || Lout == 0) return;
    for (int64_t g = 0; g < G; g++) {
        const float *wg = Wp + g * group_floats;
        for (int64_t n0 = 0; n0 < N; n0 += together) {
            const int64_t nb = N - n0 < together ? N - n0 : together; /* batch rows n0 .. n0+nb-1 */
            for (int64_t l0 = 0; l0 < Lout; l0 += RNN_CONV_BLOCK) {
                const int64_t lb = Lout - l0 < RNN_CONV_BLOCK ? Lout - l0 : RNN_CONV_BLOCK, rows = nb * lb;
                const float *A = colT;
                int64_t lda = CK;
                const int64_t first = l0 * stride - pad, last = (l0 + lb - 1) * stride - pad + K;
                if (nb == 1 && Cg == 1 && dil == 1 && first >= 0 && last <= L) {
                    /* one channel, windows inside the input: row l of colT is the input from
                     * position l*stride - pad on, so the input itself is colT with row stride
                     * `stride` (the STFT conv of an audio front end: no copy) */
                    A = x + (n0 * C + g * Cg) * L + first, lda = stride;
                } else {
                    for (int64_t j = 0; j < nb; j++) /* row j's positions at colT rows j*lb .. */
                        rnn_im2col(x + ((n0 + j) * C + g * Cg) * L, Cg, L, K, stride, dil, pad, l0, lb,
                                   colT + j * lb * CK);
                }
                /* prod = the parts' products added in order (comment at the top) */
                int none = 1;
                for (int64_t i = 0; i < parts; i++) {
                    const int64_t b0 = part_start(CK, parts, i), taps = part_start(CK, parts, i + 1) - b0;
                    if (taps == 0) continue;
                    const rnn_packed part = {Mg, taps, RNN_WEIGHTS_F32, (void *)(wg + PANELS(Mg) * RNN_PANEL * b0), NULL};
                    rnn_gemm_packed(rows, A + b0, lda, &part, prod, Mg, !none);
                    none = 0;
                }
                if (none) memset(prod, 0, sizeof(float) * (size_t)(rows * Mg)); /* no taps */
                /* out[n0 + j, g*Mg + m, l0 + l] = act(prod[j*lb + l][m] + bias), the transpose
                 * of prod, in one pass (the activation as op_unary / rnn_activation_apply: the
                 * NaN-keeping selects; no bias adds nothing, so -0 stays -0) */
                for (int64_t j = 0; j < nb; j++) {
                    float *og = out + ((n0 + j) * M + g * Mg) * Lout + l0;
                    for (int64_t l = 0; l < lb; l++) {
                        const float *pl = prod + (j * lb + l) * Mg;
                        float *o = og + l;
                        for (int64_t m = 0; m < Mg; m++) {
                            float v = bias ? pl[m] + bias[g * Mg + m] : pl[m];
                            if (act == RNN_ACT_RELU) v = v < 0.0f ? 0.0f : v;
                            else if (act == RNN_ACT_LEAKY_RELU) v = v >= 0.0f ? v : alpha * v;
                            o[m * Lout] = v;
                        }
                    }
                }
            }
        }
    }
}
