/* pack.c - weights packed once into 16-column panels, and the GEMM kernels that stream them. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNN_HAVE_AVX2_KERNEL 1
#endif

/*
 * Packed layout: B (N, K) row-major becomes ceil(N/16) panels; panel p holds, for every
 * k, the 16 values B[p*16 .. p*16+15][k] side by side (zero past N):
 *   data[(p*K + k)*16 + j] = B[p*16 + j][k]
 * so a kernel reads each panel once, front to back, whatever K is.
 */

void rnn_packed_free(rnn_packed *p) {
    free(p->data);
    p->data = NULL;
}

rnn_status rnn_packed_init(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb) {
    const int64_t P = (N + RNN_PANEL - 1) / RNN_PANEL;
    dst->N = N;
    dst->K = K;
    size_t bytes = sizeof(float) * (size_t)(P * K * RNN_PANEL);
    bytes = (bytes + 63) / 64 * 64; /* aligned_alloc wants a multiple of the alignment */
    dst->data = aligned_alloc(64, bytes ? bytes : 64);
    if (!dst->data) return RNN_STATUS_OUT_OF_MEMORY;
    for (int64_t p = 0; p < P; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < RNN_PANEL; j++) {
                int64_t n = p * RNN_PANEL + j;
                dst->data[(p * K + k) * RNN_PANEL + j] = n < N ? B[n * ldb + k] : 0.0f;
            }
    return RNN_STATUS_OK;
}

/* Reference kernel: C (M, N) (+)= A (M, K) @ B^T, B packed. Plain loops, any CPU. */
void rnn_gemm_packed_ref(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t m = 0; m < M; m++) {
        const float *a = A + m * lda;
        for (int64_t p = 0; p < P; p++) {
            float acc[RNN_PANEL] = {0};
            const float *panel = Bp->data + p * K * RNN_PANEL;
            for (int64_t k = 0; k < K; k++)
                for (int64_t j = 0; j < RNN_PANEL; j++) acc[j] += a[k] * panel[k * RNN_PANEL + j];
            float *c = C + m * ldc + p * RNN_PANEL;
            int64_t w = N - p * RNN_PANEL < RNN_PANEL ? N - p * RNN_PANEL : RNN_PANEL;
            for (int64_t j = 0; j < w; j++) c[j] = accumulate ? c[j] + acc[j] : acc[j];
        }
    }
}

#ifdef RNN_HAVE_AVX2_KERNEL
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline void store_panel(float *c, int64_t w, __m256 lo, __m256 hi, int accumulate) {
    if (w == RNN_PANEL) {
        if (accumulate) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + 8));
        }
        _mm256_storeu_ps(c, lo);
        _mm256_storeu_ps(c + 8, hi);
        return;
    }
    float tmp[RNN_PANEL];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    for (int64_t j = 0; j < w; j++) c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
}

/* One row of A: a matrix-vector product over four panels at once (8 accumulators hide
 * the FMA latency while the panels stream from memory). Each output is summed over k in
 * order, exactly as in gemm4_packed_avx2, so a row's result does not depend on which
 * other rows share its call (batched streams equal streams run alone, bit for bit). */
AVX2 static void gemv_packed_avx2(const float *a, const rnn_packed *Bp, float *c, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    int64_t p = 0;
    for (; p + 4 <= P; p += 4) {
        const float *b = Bp->data + p * stride;
        __m256 l0 = _mm256_setzero_ps(), h0 = _mm256_setzero_ps();
        __m256 l1 = _mm256_setzero_ps(), h1 = _mm256_setzero_ps();
        __m256 l2 = _mm256_setzero_ps(), h2 = _mm256_setzero_ps();
        __m256 l3 = _mm256_setzero_ps(), h3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++, b += RNN_PANEL) {
            __m256 x = _mm256_broadcast_ss(a + k);
            l0 = _mm256_fmadd_ps(x, _mm256_load_ps(b), l0);
            h0 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 8), h0);
            l1 = _mm256_fmadd_ps(x, _mm256_load_ps(b + stride), l1);
            h1 = _mm256_fmadd_ps(x, _mm256_load_ps(b + stride + 8), h1);
            l2 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 2 * stride), l2);
            h2 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 2 * stride + 8), h2);
            l3 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 3 * stride), l3);
            h3 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 3 * stride + 8), h3);
        }
        __m256 lo[4] = {l0, l1, l2, l3}, hi[4] = {h0, h1, h2, h3};
        for (int q = 0; q < 4; q++) {
            int64_t col = (p + q) * RNN_PANEL;
            store_panel(c + col, N - col < RNN_PANEL ? N - col : RNN_PANEL, lo[q], hi[q], accumulate);
        }
    }
    for (; p < P; p++) {
        const float *b = Bp->data + p * stride;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++, b += RNN_PANEL) {
            __m256 x = _mm256_broadcast_ss(a + k);
            lo = _mm256_fmadd_ps(x, _mm256_load_ps(b), lo);
            hi = _mm256_fmadd_ps(x, _mm256_load_ps(b + 8), hi);
        }
        int64_t col = p * RNN_PANEL;
        store_panel(c + col, N - col < RNN_PANEL ? N - col : RNN_PANEL, lo, hi, accumulate);
    }
}

/* Four rows of A against one panel: 8 accumulators, each panel load feeds 4 rows. */
AVX2 static void gemm4_panel_avx2(const float *A, int64_t lda, const float *b, int64_t K, float *c,
                                  int64_t ldc, int64_t w, int accumulate) {
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    __m256 l0 = _mm256_setzero_ps(), h0 = _mm256_setzero_ps();
    __m256 l1 = _mm256_setzero_ps(), h1 = _mm256_setzero_ps();
    __m256 l2 = _mm256_setzero_ps(), h2 = _mm256_setzero_ps();
    __m256 l3 = _mm256_setzero_ps(), h3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++, b += RNN_PANEL) {
        __m256 bl = _mm256_load_ps(b), bh = _mm256_load_ps(b + 8);
        __m256 x;
        x = _mm256_broadcast_ss(a0 + k);
        l0 = _mm256_fmadd_ps(x, bl, l0);
        h0 = _mm256_fmadd_ps(x, bh, h0);
        x = _mm256_broadcast_ss(a1 + k);
        l1 = _mm256_fmadd_ps(x, bl, l1);
        h1 = _mm256_fmadd_ps(x, bh, h1);
        x = _mm256_broadcast_ss(a2 + k);
        l2 = _mm256_fmadd_ps(x, bl, l2);
        h2 = _mm256_fmadd_ps(x, bh, h2);
        x = _mm256_broadcast_ss(a3 + k);
        l3 = _mm256_fmadd_ps(x, bl, l3);
        h3 = _mm256_fmadd_ps(x, bh, h3);
    }
    store_panel(c, w, l0, h0, accumulate);
    store_panel(c + ldc, w, l1, h1, accumulate);
    store_panel(c + 2 * ldc, w, l2, h2, accumulate);
    store_panel(c + 3 * ldc, w, l3, h3, accumulate);
}

/* One row of A against one panel (the leftover rows of a batch). */
AVX2 static void gemm1_panel_avx2(const float *a, const float *b, int64_t K, float *c, int64_t w,
                                  int accumulate) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++, b += RNN_PANEL) {
        __m256 x = _mm256_broadcast_ss(a + k);
        lo = _mm256_fmadd_ps(x, _mm256_load_ps(b), lo);
        hi = _mm256_fmadd_ps(x, _mm256_load_ps(b + 8), hi);
    }
    store_panel(c, w, lo, hi, accumulate);
}

/* Panels outer, rows inner: a panel (K x 16 floats) is read from memory once and reused
 * from L1 by every group of rows. */
AVX2 static void gemm_packed_avx2(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp,
                                  float *C, int64_t ldc, int accumulate) {
    if (M == 1) {
        gemv_packed_avx2(A, Bp, C, accumulate);
        return;
    }
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t p = 0; p < P; p++) {
        const float *b = Bp->data + p * K * RNN_PANEL;
        const int64_t col = p * RNN_PANEL, w = N - col < RNN_PANEL ? N - col : RNN_PANEL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) gemm4_panel_avx2(A + m * lda, lda, b, K, C + m * ldc + col, ldc, w, accumulate);
        for (; m < M; m++) gemm1_panel_avx2(A + m * lda, b, K, C + m * ldc + col, w, accumulate);
    }
}
#endif

static int g_kernel = -1; /* -1 unknown, 0 reference, 1 AVX2+FMA */

int rnn_kernel_level(void) {
    if (g_kernel < 0) {
#ifdef RNN_HAVE_AVX2_KERNEL
        __builtin_cpu_init();
        g_kernel = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
        g_kernel = 0;
#endif
    }
    return g_kernel;
}

void rnn_set_kernel_level(int level) { g_kernel = level > 0 && rnn_kernel_level_max() > 0 ? 1 : 0; }

int rnn_kernel_level_max(void) {
#ifdef RNN_HAVE_AVX2_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

void rnn_gemm_packed(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                     int64_t ldc, int accumulate) {
    if (M <= 0 || Bp->N <= 0) return;
#ifdef RNN_HAVE_AVX2_KERNEL
    if (rnn_kernel_level() == 1) {
        gemm_packed_avx2(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
#endif
    rnn_gemm_packed_ref(M, A, lda, Bp, C, ldc, accumulate);
}
