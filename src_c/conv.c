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
 * sample filter tap (c, k) of output l sees (zero in the padding). W_g is the packed B of
 * rnn_gemm_packed (pack.c): the planner packs the filters once (rnnengine/ops/handlers.py,
 * pack_conv_filters), so a call streams panels it does not re-pack, as sgemm would. The
 * reference beside it is op_conv1d in graph.c (im2col + rnn_gemm_nt), which the tests
 * compare against on odd sizes.
 *
 * Packed filter layout (float32, rnn_conv1d_packed_floats of them): groups one after the
 * other; group g holds ceil(Mg/16) panels of (Cg*K) x 16 floats, filter g*Mg + m in panel
 * m / 16, lane m % 16, element [(panel * Cg*K + c*K + k) * 16 + lane] = W[g*Mg + m, c, k],
 * lanes past Mg zero. The kernels load panels aligned, so a buffer not 64-byte aligned is
 * computed by the plain reference kernel instead (same result, slower).
 *
 * Positions are done in blocks of RNN_CONV_BLOCK: the workspace holds one block's colT and
 * its product, whatever the length.
 */

#define PANELS(m) (((m) + RNN_PANEL - 1) / RNN_PANEL)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define INLINE __attribute__((always_inline)) static inline

/* C (R, Q panels) = A (R rows, K) @ Q panels from b (K x 16 each, `stride` floats apart).
 * Each sum over k runs as S interleaved partial sums (k = s, s + S, ...) added pairwise at
 * the end: R * Q * S independent accumulators keep the FMA pipes busy however few output
 * positions a streaming step has, and the sum of a long filter (the 256 taps of an STFT)
 * rounds like a blocked sum rather than a running one, closer to the exact value and to
 * onnxruntime's (a plain running sum drifted past the tolerance on silero-vad's 8 kHz model
 * with three streams). R, Q and S are constants at every call, so the loops unroll and the
 * accumulators stay in registers. */
AVX512 INLINE void block_avx512(const int R, const int Q, const int S, const float *A, int64_t lda,
                                const float *b, int64_t stride, int64_t K, float *C, int64_t ldc, int64_t w) {
    __m512 acc[4][4][8];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < Q; q++)
            for (int s = 0; s < S; s++) acc[r][q][s] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + S <= K; k += S)
        for (int s = 0; s < S; s++) {
            __m512 x[4];
            for (int r = 0; r < R; r++) x[r] = _mm512_set1_ps(A[r * lda + k + s]);
            for (int q = 0; q < Q; q++) {
                const __m512 u = _mm512_load_ps(b + q * stride + (k + s) * RNN_PANEL);
                for (int r = 0; r < R; r++) acc[r][q][s] = _mm512_fmadd_ps(x[r], u, acc[r][q][s]);
            }
        }
    for (int s = 0; k < K; k++, s++) { /* the last K % S taps, one to each partial sum */
        for (int q = 0; q < Q; q++) {
            const __m512 u = _mm512_load_ps(b + q * stride + k * RNN_PANEL);
            for (int r = 0; r < R; r++) acc[r][q][s] = _mm512_fmadd_ps(_mm512_set1_ps(A[r * lda + k]), u, acc[r][q][s]);
        }
    }
    for (int q = 0; q < Q; q++) {
        const int64_t wq = w - q * RNN_PANEL;
        const __mmask16 m = (__mmask16)(wq >= 16 ? 0xffff : ((1u << wq) - 1));
        for (int r = 0; r < R; r++) {
            __m512 c = acc[r][q][0];
            if (S == 2) c = _mm512_add_ps(c, acc[r][q][1]);
            if (S >= 4) c = _mm512_add_ps(_mm512_add_ps(c, acc[r][q][1]), _mm512_add_ps(acc[r][q][2], acc[r][q][3]));
            if (S == 8)
                c = _mm512_add_ps(c, _mm512_add_ps(_mm512_add_ps(acc[r][q][4], acc[r][q][5]),
                                                   _mm512_add_ps(acc[r][q][6], acc[r][q][7])));
            _mm512_mask_storeu_ps(C + r * ldc + q * RNN_PANEL, m, c);
        }
    }
}

/* C (M, N) = A (M, K) @ B^T, B packed (64-byte aligned): rows four at a time (then the one
 * to three left); per block of rows, panels (Q) and partial sums (S) for 8 to 16
 * accumulators: 4 rows x 2 panels x 2 sums, 3 x 1 x 4, 2 x 1 x 8, 1 x 2 x 8. */
AVX512 static void conv_gemm_avx512(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                                    int64_t ldc) {
    const int64_t N = Bp->N, K = Bp->K, P = PANELS(N), stride = K * RNN_PANEL;
    const float *base = (const float *)Bp->data;
    for (int64_t m = 0; m < M;) {
        const int64_t R = M - m < 4 ? M - m : 4, qmax = R == 1 || R == 4 ? 2 : 1;
        for (int64_t p = 0; p < P;) {
            const int64_t q = P - p < qmax ? P - p : qmax;
            const float *a = A + m * lda, *b = base + p * stride;
            float *c = C + m * ldc + p * RNN_PANEL;
            const int64_t w = N - p * RNN_PANEL;
#define BLOCK(r, n, s) case r * 16 + n: block_avx512(r, n, s, a, lda, b, stride, K, c, ldc, w); break
            switch (R * 16 + q) {
                BLOCK(1, 1, 8); BLOCK(1, 2, 8);
                BLOCK(2, 1, 8);
                BLOCK(3, 1, 4);
                BLOCK(4, 1, 4); BLOCK(4, 2, 2);
            default: assert(!"conv_gemm_avx512: rows or panels out of range"); break;
            }
#undef BLOCK
            p += q;
        }
        m += R;
    }
}
#define RNN_HAVE_CONV_AVX512 1
#endif

/* C (R, N) = A (R, K) @ B^T, B packed: the kernel above where the CPU has AVX-512 and the
 * panels are 64-byte aligned (its aligned loads), else pack.c's (which takes the plain
 * reference kernel for panels not aligned). */
static void conv_gemm(int64_t R, const float *A, int64_t lda, const rnn_packed *Bp, float *C, int64_t ldc) {
#ifdef RNN_HAVE_CONV_AVX512
    if (rnn_kernel_level() == 2 && ((uintptr_t)Bp->data & 63) == 0) {
        conv_gemm_avx512(R, A, lda, Bp, C, ldc);
        return;
    }
#endif
    rnn_gemm_packed(R, A, lda, Bp, C, ldc, 0);
}

int64_t rnn_conv1d_packed_floats(int64_t M, int64_t Cg, int64_t K, int64_t G) {
    return G * PANELS(M / G) * RNN_PANEL * Cg * K;
}

int64_t rnn_conv1d_packed_work(int64_t Lout, int64_t Cg, int64_t K, int64_t Mg) {
    const int64_t lb = Lout < RNN_CONV_BLOCK ? Lout : RNN_CONV_BLOCK;
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
    const int64_t Cg = C / G, Mg = M / G, CK = Cg * K;
    const int64_t group_floats = PANELS(Mg) * RNN_PANEL * CK;
    float *colT = work;                                                       /* (lb, CK) */
    float *prod = work + (Lout < RNN_CONV_BLOCK ? Lout : RNN_CONV_BLOCK) * CK; /* (lb, Mg) */
    if (Mg == 0 || Lout == 0) return;
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            const float *xg = x + (n * C + g * Cg) * L;
            const rnn_packed wp = {Mg, CK, RNN_WEIGHTS_F32, (void *)(Wp + g * group_floats), NULL};
            for (int64_t l0 = 0; l0 < Lout; l0 += RNN_CONV_BLOCK) {
                const int64_t lb = Lout - l0 < RNN_CONV_BLOCK ? Lout - l0 : RNN_CONV_BLOCK;
                const float *A = colT;
                int64_t lda = CK;
                const int64_t first = l0 * stride - pad, last = (l0 + lb - 1) * stride - pad + K;
                if (Cg == 1 && dil == 1 && first >= 0 && last <= L) {
                    /* one channel, windows inside the input: row l of colT is the input from
                     * position l*stride - pad on, so the input itself is colT with row stride
                     * `stride` (the STFT conv of an audio front end: no copy) */
                    A = xg + first, lda = stride;
                } else {
                    rnn_im2col(xg, Cg, L, K, stride, dil, pad, l0, lb, colT);
                }
                if (CK == 0) memset(prod, 0, sizeof(float) * (size_t)(lb * Mg));
                else conv_gemm(lb, A, lda, &wp, prod, Mg);
                /* out[n, g*Mg + m, l0 + l] = act(prod[l][m] + bias), the transpose of prod, in
                 * one pass (the activation as op_unary / rnn_activation_apply: the NaN-keeping
                 * selects; no bias adds nothing, so -0 stays -0) */
                float *og = out + (n * M + g * Mg) * Lout + l0;
                for (int64_t l = 0; l < lb; l++) {
                    const float *pl = prod + l * Mg;
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
