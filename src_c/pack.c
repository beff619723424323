/* pack.c - weights packed once into 16-column panels, and the GEMM kernels that stream them. */
#include "internal.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h> /* madvise */
#endif
#define RNN_HUGE_BYTES ((size_t)2 << 20)

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

#ifdef RNN_HAVE_AVX2_KERNEL
static void pack_panel_f32_avx2(const float *B, int64_t ldb, int64_t K, float *out);
#endif

void rnn_packed_free(rnn_packed *p) {
    free(p->data);
    free(p->scale);
    p->data = NULL;
    p->scale = NULL;
}

/* IEEE half from float, round to nearest even (portable; the AVX2 kernels read halves with
 * F16C, the reference kernel with rnn_half_to_float). */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0)); /* inf, nan */
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                               /* overflow */
    if (x < 0x38800000u) {                                                                  /* subnormal */
        if (x < 0x33000000u) return (uint16_t)sign;
        const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e, r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        return (uint16_t)(sign | (r + (rem > half || (rem == half && (r & 1)))));
    }
    const uint32_t r = x + 0xfffu + ((x >> 13) & 1u) - 0x38000000u; /* rebias, round to even */
    return (uint16_t)(sign | (r >> 13));
}

float rnn_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        if (m == 0) x = sign;
        else { /* subnormal: value m * 2^-24 */
            float f = (float)m * 5.9604644775390625e-8f;
            memcpy(&x, &f, 4);
            x |= sign;
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

rnn_status rnn_packed_init(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb) {
    return rnn_packed_init_dtype(dst, B, N, K, ldb, RNN_WEIGHTS_F32);
}

/* Allocates dst for B (N, K) in `dtype` (data, and the scales of int8), contents unset. */
static rnn_status packed_alloc(rnn_packed *dst, int64_t N, int64_t K, int32_t dtype) {
    const int64_t P = (N + RNN_PANEL - 1) / RNN_PANEL;
    static const size_t esize[3] = {4, 2, 1};
    dst->N = N;
    dst->K = K;
    dst->dtype = dtype;
    dst->scale = NULL;
    size_t bytes = esize[dtype] * (size_t)(P * K * RNN_PANEL);
#ifdef MADV_HUGEPAGE
    if (bytes >= RNN_HUGE_BYTES) {
        /* large panels on 2 MB pages where the kernel allows them (THP "madvise"): packing
         * 4 MB of LSTM 512 weights took 818 page faults (~1 ms) on 4 KB pages, and the
         * kernels' reads need fewer TLB entries. The alignment costs at most 2 MB. */
        bytes = (bytes + RNN_HUGE_BYTES - 1) / RNN_HUGE_BYTES * RNN_HUGE_BYTES;
        dst->data = aligned_alloc(RNN_HUGE_BYTES, bytes);
        if (!dst->data) return RNN_STATUS_OUT_OF_MEMORY;
        madvise(dst->data, bytes, MADV_HUGEPAGE); /* advice only: a refusal changes nothing */
    } else
#endif
    {
        bytes = (bytes + 63) / 64 * 64; /* aligned_alloc wants a multiple of the alignment */
        dst->data = aligned_alloc(64, bytes ? bytes : 64);
        if (!dst->data) return RNN_STATUS_OUT_OF_MEMORY;
    }
    if (dtype == RNN_WEIGHTS_I8) {
        dst->scale = calloc((size_t)(P * RNN_PANEL > 0 ? P * RNN_PANEL : 1), sizeof(float));
        if (!dst->scale) {
            rnn_packed_free(dst);
            return RNN_STATUS_OUT_OF_MEMORY;
        }
    }
    return RNN_STATUS_OK;
}

rnn_status rnn_packed_init_dtype(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb,
                                 int32_t dtype) {
    const int64_t P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const rnn_status st = packed_alloc(dst, N, K, dtype);
    if (st != RNN_STATUS_OK) return st;
    if (dtype == RNN_WEIGHTS_I8) {
        for (int64_t n = 0; n < N; n++) { /* symmetric, one scale per output column */
            float amax = 0.0f;
            int finite = 1;
            for (int64_t k = 0; k < K; k++) {
                const float v = fabsf(B[n * ldb + k]);
                amax = v > amax ? v : amax;
                finite &= v <= FLT_MAX; /* false for Inf and NaN */
            }
            /* A column holding NaN gives NaN whatever the input (as in float32), so its scale
             * is NaN and its codes 0. Inf has no int8 code: Model(weight_dtype="int8")
             * refuses such weights first; were one packed anyway, NaN beats a finite lie. */
            dst->scale[n] = !finite ? NAN : (amax > 0.0f ? amax / 127.0f : 1.0f);
        }
    }
    float *f = dst->data;
    uint16_t *h = dst->data;
    int8_t *q = dst->data;
    if (dtype == RNN_WEIGHTS_F32) { /* the same layout without a test per element */
#ifdef RNN_HAVE_AVX2_KERNEL
        const int avx2 = rnn_kernel_level() >= 1;
#endif
        for (int64_t p = 0; p < P; p++) {
            const int64_t n0 = p * RNN_PANEL, w = N - n0 < RNN_PANEL ? N - n0 : RNN_PANEL;
#ifdef RNN_HAVE_AVX2_KERNEL
            if (avx2 && w == RNN_PANEL) { /* 8 x 8 blocks transposed in registers */
                pack_panel_f32_avx2(B + n0 * ldb, ldb, K, f + p * K * RNN_PANEL);
                continue;
            }
#endif
            for (int64_t k = 0; k < K; k++) {
                float *o = f + (p * K + k) * RNN_PANEL;
                for (int64_t j = 0; j < w; j++) o[j] = B[(n0 + j) * ldb + k];
                for (int64_t j = w; j < RNN_PANEL; j++) o[j] = 0.0f;
            }
        }
        return RNN_STATUS_OK;
    }
    for (int64_t p = 0; p < P; p++) /* float16 / int8: rounded element by element */
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < RNN_PANEL; j++) {
                const int64_t n = p * RNN_PANEL + j, at = (p * K + k) * RNN_PANEL + j;
                const float v = n < N ? B[n * ldb + k] : 0.0f;
                if (dtype == RNN_WEIGHTS_F16) h[at] = float_to_half(v);
                else {
                    const float r = n < N && dst->scale[n] == dst->scale[n] ? nearbyintf(v / dst->scale[n]) : 0.0f;
                    q[at] = (int8_t)(r > 127.0f ? 127 : (r < -127.0f ? -127 : r));
                }
            }
    return RNN_STATUS_OK;
}

rnn_status rnn_packed_init_t(rnn_packed *dst, const float *M, int64_t rows, int64_t cols) {
    /* the panels of B = M^T (N = cols, K = rows): B[n][k] = M[k][n], so element j of panel p
     * at depth k is M[k][p*16 + j]: for each row of M, 16 consecutive floats per panel */
    const int64_t N = cols, K = rows, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const rnn_status st = packed_alloc(dst, N, K, RNN_WEIGHTS_F32);
    if (st != RNN_STATUS_OK) return st;
    float *f = dst->data;
    for (int64_t k = 0; k < K; k++)
        for (int64_t p = 0; p < P; p++) {
            const int64_t n0 = p * RNN_PANEL, w = N - n0 < RNN_PANEL ? N - n0 : RNN_PANEL;
            float *o = f + (p * K + k) * RNN_PANEL;
            memcpy(o, M + k * cols + n0, sizeof(float) * (size_t)w);
            for (int64_t j = w; j < RNN_PANEL; j++) o[j] = 0.0f;
        }
    return RNN_STATUS_OK;
}

rnn_status rnn_packed_init_stored(rnn_packed *dst, const void *Q, const float *scale, int64_t N, int64_t K,
                                  int64_t ldq, int32_t dtype) {
    if (!Q || (dtype != RNN_WEIGHTS_F16 && dtype != RNN_WEIGHTS_I8) || (dtype == RNN_WEIGHTS_I8) != !!scale)
        return RNN_STATUS_BAD_ARGUMENT;
    const int64_t P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const rnn_status st = packed_alloc(dst, N, K, dtype);
    if (st != RNN_STATUS_OK) return st;
    if (scale) memcpy(dst->scale, scale, sizeof(float) * (size_t)N); /* the padding columns keep 0 */
    const uint16_t *hs = Q;
    const int8_t *qs = Q;
    uint16_t *h = dst->data;
    int8_t *q = dst->data;
    /* the same panel layout as rnn_packed_init_dtype, element for element, no rounding */
    for (int64_t p = 0; p < P; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < RNN_PANEL; j++) {
                const int64_t n = p * RNN_PANEL + j, at = (p * K + k) * RNN_PANEL + j;
                if (dtype == RNN_WEIGHTS_F16) h[at] = n < N ? hs[n * ldq + k] : 0;
                else q[at] = n < N ? qs[n * ldq + k] : 0;
            }
    return RNN_STATUS_OK;
}

int64_t rnn_packed_unpack(const rnn_packed *p, void *out, float *scale) {
    static const size_t esize[3] = {4, 2, 1};
    const size_t es = esize[p->dtype];
    for (int64_t n = 0; n < p->N; n++)
        for (int64_t k = 0; k < p->K; k++) {
            const int64_t at = ((n / RNN_PANEL) * p->K + k) * RNN_PANEL + n % RNN_PANEL;
            memcpy((char *)out + (size_t)(n * p->K + k) * es, (const char *)p->data + (size_t)at * es, es);
        }
    if (scale && p->scale) memcpy(scale, p->scale, sizeof(float) * (size_t)p->N);
    return p->N * p->K;
}

/* The packed weight at (panel element `at`) as a float, in any storage. */
static inline float packed_at(const rnn_packed *Bp, int64_t at) {
    switch (Bp->dtype) {
    case RNN_WEIGHTS_F16: return rnn_half_to_float(((const uint16_t *)Bp->data)[at]);
    case RNN_WEIGHTS_I8: return (float)((const int8_t *)Bp->data)[at];
    default: return ((const float *)Bp->data)[at];
    }
}

/* Reference kernel: C (M, N) (+)= A (M, K) @ B^T, B packed in any storage. Plain loops, any
 * CPU. int8 sums a[k] * q[n][k] over k, then multiplies by scale[n]. */
void rnn_gemm_packed_ref(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t m = 0; m < M; m++) {
        const float *a = A + m * lda;
        for (int64_t p = 0; p < P; p++) {
            float acc[RNN_PANEL] = {0};
            for (int64_t k = 0; k < K; k++)
                for (int64_t j = 0; j < RNN_PANEL; j++) acc[j] += a[k] * packed_at(Bp, (p * K + k) * RNN_PANEL + j);
            float *c = C + m * ldc + p * RNN_PANEL;
            int64_t w = N - p * RNN_PANEL < RNN_PANEL ? N - p * RNN_PANEL : RNN_PANEL;
            for (int64_t j = 0; j < w; j++) {
                const float v = Bp->scale ? acc[j] * Bp->scale[p * RNN_PANEL + j] : acc[j];
                c[j] = accumulate ? c[j] + v : v;
            }
        }
    }
}

#ifdef RNN_HAVE_AVX2_KERNEL
#define AVX2 __attribute__((target("avx2,fma")))

/* One full panel of float32 weights: out[k*16 + j] = B[j*ldb + k] for j < 16 (rnn_packed_init's
 * layout, the same floats moved, no arithmetic), eight k at a time through 8 x 8 register
 * transposes; the scalar loop takes the last K % 8. out is 64-byte aligned (the panel
 * starts at a multiple of 16 floats of the aligned buffer). */
AVX2 static void pack_panel_f32_avx2(const float *B, int64_t ldb, int64_t K, float *out) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < 2; h++) {
            const float *b = B + (int64_t)h * 8 * ldb + k;
            const __m256 r0 = _mm256_loadu_ps(b), r1 = _mm256_loadu_ps(b + ldb), r2 = _mm256_loadu_ps(b + 2 * ldb),
                         r3 = _mm256_loadu_ps(b + 3 * ldb), r4 = _mm256_loadu_ps(b + 4 * ldb),
                         r5 = _mm256_loadu_ps(b + 5 * ldb), r6 = _mm256_loadu_ps(b + 6 * ldb),
                         r7 = _mm256_loadu_ps(b + 7 * ldb);
            /* rows r0..r7 (8 k each) -> columns: unpack pairs, then quads, then 128-bit halves */
            const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
            float *o = out + k * RNN_PANEL + h * 8;
            _mm256_store_ps(o + 0 * RNN_PANEL, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_store_ps(o + 1 * RNN_PANEL, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_store_ps(o + 2 * RNN_PANEL, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_store_ps(o + 3 * RNN_PANEL, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_store_ps(o + 4 * RNN_PANEL, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_store_ps(o + 5 * RNN_PANEL, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_store_ps(o + 6 * RNN_PANEL, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_store_ps(o + 7 * RNN_PANEL, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    for (; k < K; k++)
        for (int64_t j = 0; j < RNN_PANEL; j++) out[k * RNN_PANEL + j] = B[j * ldb + k];
}

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
        const float *b = (const float *)Bp->data + p * stride;
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
        const float *b = (const float *)Bp->data + p * stride;
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

/* Compact weights, one row of A (batch-1 steps): four panels at once as in gemv_packed_avx2,
 * each 16-wide panel row widened to float (F16C for halves, sign extension for int8) right
 * before its FMA, so the bytes streamed from memory are 2 or 4 times fewer. */
#define AVX2F16 __attribute__((target("avx2,fma,f16c")))

AVX2F16 static inline __m256 load8(const rnn_packed *Bp, int64_t at) {
    if (Bp->dtype == RNN_WEIGHTS_F16)
        return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)((const uint16_t *)Bp->data + at)));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)Bp->data + at))));
}

AVX2F16 static void gemv_compact_avx2(const float *a, const rnn_packed *Bp, float *c, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    int64_t p = 0;
    for (; p < P; p += 2) {
        const int two = p + 1 < P;
        __m256 l0 = _mm256_setzero_ps(), h0 = _mm256_setzero_ps();
        __m256 l1 = _mm256_setzero_ps(), h1 = _mm256_setzero_ps();
        int64_t at = p * stride;
        for (int64_t k = 0; k < K; k++, at += RNN_PANEL) {
            __m256 x = _mm256_broadcast_ss(a + k);
            l0 = _mm256_fmadd_ps(x, load8(Bp, at), l0);
            h0 = _mm256_fmadd_ps(x, load8(Bp, at + 8), h0);
            if (two) {
                l1 = _mm256_fmadd_ps(x, load8(Bp, at + stride), l1);
                h1 = _mm256_fmadd_ps(x, load8(Bp, at + stride + 8), h1);
            }
        }
        __m256 lo[2] = {l0, l1}, hi[2] = {h0, h1};
        for (int q = 0; q < 1 + two; q++) {
            const int64_t col = (p + q) * RNN_PANEL;
            if (Bp->scale) {
                lo[q] = _mm256_mul_ps(lo[q], _mm256_loadu_ps(Bp->scale + col));
                hi[q] = _mm256_mul_ps(hi[q], _mm256_loadu_ps(Bp->scale + col + 8));
            }
            store_panel(c + col, N - col < RNN_PANEL ? N - col : RNN_PANEL, lo[q], hi[q], accumulate);
        }
    }
}

/* Compact weights, several rows of A (small batches, and the input projection of a whole
 * sequence): panels outer, rows in groups of four (then two, then one) inner, so each 16-wide
 * panel row is widened once per k and used by every row of the group instead of being read
 * and widened once per row. Every output column of every row is the same chain as in
 * gemv_compact_avx2 (one FMA per k in order from zero, then the int8 scale, then the optional
 * accumulate), so a row gets the same bits whatever batch it is in, and a whole sequence the
 * bits of the same steps streamed. */
AVX2F16 static inline __attribute__((always_inline)) void compact_rows_avx2(
    int nr, const float *A, int64_t lda, const rnn_packed *Bp, int64_t at0, int64_t K, __m256 slo, __m256 shi,
    float *C, int64_t ldc, int64_t w, int accumulate) {
    __m256 lo[4], hi[4];
    for (int r = 0; r < nr; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    int64_t at = at0;
    for (int64_t k = 0; k < K; k++, at += RNN_PANEL) {
        const __m256 bl = load8(Bp, at), bh = load8(Bp, at + 8);
        for (int r = 0; r < nr; r++) {
            const __m256 x = _mm256_broadcast_ss(A + r * lda + k);
            lo[r] = _mm256_fmadd_ps(x, bl, lo[r]);
            hi[r] = _mm256_fmadd_ps(x, bh, hi[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        if (Bp->scale) lo[r] = _mm256_mul_ps(lo[r], slo), hi[r] = _mm256_mul_ps(hi[r], shi);
        store_panel(C + r * ldc, w, lo[r], hi[r], accumulate);
    }
}

AVX2F16 static void gemm_compact_avx2(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                                      int64_t ldc, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t p = 0; p < P; p++) {
        const int64_t col = p * RNN_PANEL, w = N - col < RNN_PANEL ? N - col : RNN_PANEL, at0 = p * K * RNN_PANEL;
        __m256 slo = _mm256_set1_ps(1.0f), shi = slo;
        if (Bp->scale) {
            slo = _mm256_loadu_ps(Bp->scale + col);
            shi = _mm256_loadu_ps(Bp->scale + col + 8);
        }
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) compact_rows_avx2(4, A + m * lda, lda, Bp, at0, K, slo, shi, C + m * ldc + col, ldc, w, accumulate);
        if (m + 2 <= M) {
            compact_rows_avx2(2, A + m * lda, lda, Bp, at0, K, slo, shi, C + m * ldc + col, ldc, w, accumulate);
            m += 2;
        }
        if (m < M) compact_rows_avx2(1, A + m * lda, lda, Bp, at0, K, slo, shi, C + m * ldc + col, ldc, w, accumulate);
    }
}

/* Compact weights, many rows (whole sequences, large batches): for each block of up to
 * RNN_WIDEN_ROWS rows, each panel is widened to float32 once, RNN_WIDEN_K values of k at a
 * time, into a buffer every group of four rows then reads as the float32 kernel reads its
 * panels, instead of widening every panel row once per group (which halves the rate: 18 vs
 * 37 GFLOP/s at 512 x 2048 x 512 on an AVX2 EPYC). Each output is still one FMA chain over k
 * in order from zero (a chunk continues from the partial sums the previous chunk left in
 * `part`, stored exactly as floats), then the int8 scale, then the optional accumulate: the
 * bits of gemv_compact_avx2 and compact_rows_avx2. The two buffers take 10 KB of stack (a
 * Python thread may have as little as 32 KB: 32 KB of buffers here crashed one). Measured
 * on the AVX2 EPYC, int8 / float16 GFLOP/s: 512 x 2048 x 512 35.9 / 36.2, 64 x 1024 x 1024
 * 34.8 / 35.8 (float32 36-38; 64 values of k at a time: 31-33). */
/* nr rows of A against a widened panel chunk of kn values of k: the chains continue from
 * part (when `more`) and end back in part. */
AVX2 static inline __attribute__((always_inline)) void wide_rows_avx2(int nr, const float *a, int64_t lda,
                                                                      const float *wide, int64_t kn, float *part,
                                                                      int more) {
    __m256 lo[4], hi[4];
    for (int r = 0; r < nr; r++) {
        lo[r] = more ? _mm256_load_ps(part + r * RNN_PANEL) : _mm256_setzero_ps();
        hi[r] = more ? _mm256_load_ps(part + r * RNN_PANEL + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kn; k++) {
        const __m256 bl = _mm256_load_ps(wide + k * RNN_PANEL), bh = _mm256_load_ps(wide + k * RNN_PANEL + 8);
        for (int r = 0; r < nr; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
            lo[r] = _mm256_fmadd_ps(x, bl, lo[r]);
            hi[r] = _mm256_fmadd_ps(x, bh, hi[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        _mm256_store_ps(part + r * RNN_PANEL, lo[r]);
        _mm256_store_ps(part + r * RNN_PANEL + 8, hi[r]);
    }
}

#define RNN_WIDEN_K 128
#define RNN_WIDEN_ROWS 32
AVX2F16 static void gemm_compact_wide_avx2(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                                           int64_t ldc, int accumulate) {
    float wide[RNN_WIDEN_K * RNN_PANEL] __attribute__((aligned(64)));
    float part[RNN_WIDEN_ROWS * RNN_PANEL] __attribute__((aligned(64)));
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += RNN_WIDEN_ROWS) {
        const int64_t mb = M - m0 < RNN_WIDEN_ROWS ? M - m0 : RNN_WIDEN_ROWS;
        const float *Ab = A + m0 * lda;
        for (int64_t p = 0; p < P; p++) {
            const int64_t col = p * RNN_PANEL, w = N - col < RNN_PANEL ? N - col : RNN_PANEL;
            for (int64_t k0 = 0; k0 < K; k0 += RNN_WIDEN_K) {
                const int64_t kn = K - k0 < RNN_WIDEN_K ? K - k0 : RNN_WIDEN_K;
                int64_t at = (p * K + k0) * RNN_PANEL;
                for (int64_t k = 0; k < kn; k++, at += RNN_PANEL) {
                    _mm256_store_ps(wide + k * RNN_PANEL, load8(Bp, at));
                    _mm256_store_ps(wide + k * RNN_PANEL + 8, load8(Bp, at + 8));
                }
                int64_t m = 0;
                for (; m + 4 <= mb; m += 4) wide_rows_avx2(4, Ab + m * lda + k0, lda, wide, kn, part + m * RNN_PANEL, k0 > 0);
                for (; m < mb; m++) wide_rows_avx2(1, Ab + m * lda + k0, lda, wide, kn, part + m * RNN_PANEL, k0 > 0);
            }
            __m256 slo = _mm256_set1_ps(1.0f), shi = slo;
            if (Bp->scale) {
                slo = _mm256_loadu_ps(Bp->scale + col);
                shi = _mm256_loadu_ps(Bp->scale + col + 8);
            }
            for (int64_t m = 0; m < mb; m++) {
                __m256 lo = K ? _mm256_load_ps(part + m * RNN_PANEL) : _mm256_setzero_ps();
                __m256 hi = K ? _mm256_load_ps(part + m * RNN_PANEL + 8) : _mm256_setzero_ps();
                if (Bp->scale) lo = _mm256_mul_ps(lo, slo), hi = _mm256_mul_ps(hi, shi);
                store_panel(C + (m0 + m) * ldc + col, w, lo, hi, accumulate);
            }
        }
    }
}

/* AVX-512F versions of the float32 kernels: a 16-column panel row is one zmm register, so a
 * product needs half the instructions of the AVX2 kernels. Every output still accumulates
 * a[k] * b[k] with one FMA per k in order, exactly as the AVX2 kernels do, so both give the
 * same bits (and rows stay independent of the batch they are in). */
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

AVX512 static inline void store16(float *c, int64_t w, __m512 v, int accumulate) {
    const __mmask16 m = (__mmask16)(w >= 16 ? 0xffff : ((1u << w) - 1));
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c));
    _mm512_mask_storeu_ps(c, m, v);
}

/* One row of A: eight panels at once (eight accumulators cover the FMA latency). */
AVX512 static void gemv_packed_avx512(const float *a, const rnn_packed *Bp, float *c, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    const float *base = (const float *)Bp->data;
    int64_t p = 0;
    for (; p + 8 <= P; p += 8) {
        const float *b = base + p * stride;
        __m512 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++, b += RNN_PANEL) {
            const __m512 x = _mm512_set1_ps(a[k]);
            for (int q = 0; q < 8; q++) acc[q] = _mm512_fmadd_ps(x, _mm512_load_ps(b + q * stride), acc[q]);
        }
        for (int q = 0; q < 8; q++) {
            const int64_t col = (p + q) * RNN_PANEL;
            store16(c + col, N - col, acc[q], accumulate);
        }
    }
    for (; p < P; p++) {
        const float *b = base + p * stride;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++, b += RNN_PANEL) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_load_ps(b), acc);
        store16(c + p * RNN_PANEL, N - p * RNN_PANEL, acc, accumulate);
    }
}

/* Rows of A in groups of eight (then four, then one) against two panels at a time. */
AVX512 static void gemm_packed_avx512(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp,
                                      float *C, int64_t ldc, int accumulate) {
    if (M == 1) {
        gemv_packed_avx512(A, Bp, C, accumulate);
        return;
    }
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    const float *base = (const float *)Bp->data;
    for (int64_t p = 0; p < P; p += 2) {
        const int two = p + 1 < P;
        const float *b0 = base + p * stride, *b1 = two ? b0 + stride : b0;
        const int64_t col = p * RNN_PANEL;
        const int64_t w0 = N - col, w1 = N - col - RNN_PANEL;
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) {
            /* eight rows x two panels: sixteen accumulators; per k two panel loads and
             * eight broadcasts feed sixteen FMAs */
            __m512 c0[8], c1[8];
            for (int r = 0; r < 8; r++) c0[r] = c1[r] = _mm512_setzero_ps();
            const float *a = A + m * lda;
            for (int64_t k = 0; k < K; k++) {
                const __m512 u = _mm512_load_ps(b0 + k * RNN_PANEL), v = _mm512_load_ps(b1 + k * RNN_PANEL);
                for (int r = 0; r < 8; r++) {
                    const __m512 x = _mm512_set1_ps(a[r * lda + k]);
                    c0[r] = _mm512_fmadd_ps(x, u, c0[r]);
                    c1[r] = _mm512_fmadd_ps(x, v, c1[r]);
                }
            }
            for (int r = 0; r < 8; r++) {
                float *cr = C + (m + r) * ldc + col;
                store16(cr, w0, c0[r], accumulate);
                if (two) store16(cr + RNN_PANEL, w1, c1[r], accumulate);
            }
        }
        for (; m + 4 <= M; m += 4) {
            const float *a0 = A + m * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
            __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps(),
                   c11 = _mm512_setzero_ps(), c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps(),
                   c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const __m512 u = _mm512_load_ps(b0 + k * RNN_PANEL), v = _mm512_load_ps(b1 + k * RNN_PANEL);
                __m512 x = _mm512_set1_ps(a0[k]);
                c00 = _mm512_fmadd_ps(x, u, c00);
                c01 = _mm512_fmadd_ps(x, v, c01);
                x = _mm512_set1_ps(a1[k]);
                c10 = _mm512_fmadd_ps(x, u, c10);
                c11 = _mm512_fmadd_ps(x, v, c11);
                x = _mm512_set1_ps(a2[k]);
                c20 = _mm512_fmadd_ps(x, u, c20);
                c21 = _mm512_fmadd_ps(x, v, c21);
                x = _mm512_set1_ps(a3[k]);
                c30 = _mm512_fmadd_ps(x, u, c30);
                c31 = _mm512_fmadd_ps(x, v, c31);
            }
            float *cr = C + m * ldc + col;
            store16(cr, w0, c00, accumulate);
            store16(cr + ldc, w0, c10, accumulate);
            store16(cr + 2 * ldc, w0, c20, accumulate);
            store16(cr + 3 * ldc, w0, c30, accumulate);
            if (two) {
                store16(cr + RNN_PANEL, w1, c01, accumulate);
                store16(cr + ldc + RNN_PANEL, w1, c11, accumulate);
                store16(cr + 2 * ldc + RNN_PANEL, w1, c21, accumulate);
                store16(cr + 3 * ldc + RNN_PANEL, w1, c31, accumulate);
            }
        }
        for (; m < M; m++) {
            const float *a = A + m * lda;
            __m512 u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const __m512 x = _mm512_set1_ps(a[k]);
                u0 = _mm512_fmadd_ps(x, _mm512_load_ps(b0 + k * RNN_PANEL), u0);
                u1 = _mm512_fmadd_ps(x, _mm512_load_ps(b1 + k * RNN_PANEL), u1);
            }
            store16(C + m * ldc + col, w0, u0, accumulate);
            if (two) store16(C + m * ldc + col + RNN_PANEL, w1, u1, accumulate);
        }
    }
}

/* gemm_compact_avx2 with a 16-column panel row in one zmm register (widened by one
 * instruction pair), eight rows x two panels at a time as gemm_packed_avx512 does. Per output
 * lane the arithmetic is gemv_compact_avx2's exactly (FMA chain over k from zero, times the
 * scale, plus C when accumulating), so this gives the same bits as the batch-1 kernel. */
#define AVX512F16 __attribute__((target("avx512f,avx2,fma,f16c")))

AVX512F16 static inline __m512 load16(const rnn_packed *Bp, int64_t at) {
    if (Bp->dtype == RNN_WEIGHTS_F16)
        return _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)((const uint16_t *)Bp->data + at)));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)((const int8_t *)Bp->data + at))));
}

AVX512F16 static inline void store16_scaled(float *c, int64_t w, __m512 v, const float *scale, int accumulate) {
    const __mmask16 m = (__mmask16)(w >= 16 ? 0xffff : ((1u << w) - 1));
    /* the explicit-rounding forms are never fused into one FMA by the compiler (GCC contracts
     * a plain multiply and add), so the scale and the sum round separately, as in the AVX2
     * kernels that the batch-1 step runs */
    if (scale) v = _mm512_mul_round_ps(v, _mm512_loadu_ps(scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (accumulate) v = _mm512_add_round_ps(v, _mm512_maskz_loadu_ps(m, c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_storeu_ps(c, m, v);
}

/* One row of A (batch-1 steps and sequences): eight panels at once, as gemv_packed_avx512
 * does for float32 (eight accumulators cover the FMA latency, and a widened panel row is one
 * register instead of two). Per lane the same chain as gemv_compact_avx2, so the same bits. */
AVX512F16 static void gemv_compact_avx512(const float *a, const rnn_packed *Bp, float *c, int accumulate) {
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    int64_t p = 0;
    for (; p + 8 <= P; p += 8) {
        const int64_t b = p * stride;
        __m512 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const __m512 x = _mm512_set1_ps(a[k]);
            for (int q = 0; q < 8; q++) acc[q] = _mm512_fmadd_ps(x, load16(Bp, b + q * stride + k * RNN_PANEL), acc[q]);
        }
        for (int q = 0; q < 8; q++) {
            const int64_t col = (p + q) * RNN_PANEL;
            store16_scaled(c + col, N - col, acc[q], Bp->scale ? Bp->scale + col : NULL, accumulate);
        }
    }
    for (; p < P; p++) {
        const int64_t b = p * stride, col = p * RNN_PANEL;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), load16(Bp, b + k * RNN_PANEL), acc);
        store16_scaled(c + col, N - col, acc, Bp->scale ? Bp->scale + col : NULL, accumulate);
    }
}

/* nr rows (1..8, a constant where called, so the loops unroll) against panels b0 and b1. */
AVX512F16 static inline __attribute__((always_inline)) void compact_rows_avx512(
    int nr, const float *a, int64_t lda, const rnn_packed *Bp, int64_t b0, int64_t b1, int two, int64_t K,
    float *C, int64_t ldc, int64_t w0, int64_t w1, const float *s0, const float *s1, int accumulate) {
    __m512 c0[8], c1[8];
    for (int r = 0; r < nr; r++) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 u = load16(Bp, b0 + k * RNN_PANEL), v = load16(Bp, b1 + k * RNN_PANEL);
        for (int r = 0; r < nr; r++) {
            const __m512 x = _mm512_set1_ps(a[r * lda + k]);
            c0[r] = _mm512_fmadd_ps(x, u, c0[r]);
            c1[r] = _mm512_fmadd_ps(x, v, c1[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        store16_scaled(C + r * ldc, w0, c0[r], s0, accumulate);
        if (two) store16_scaled(C + r * ldc + RNN_PANEL, w1, c1[r], s1, accumulate);
    }
}

AVX512F16 static void gemm_compact_avx512(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp,
                                          float *C, int64_t ldc, int accumulate) {
    if (M == 1) {
        gemv_compact_avx512(A, Bp, C, accumulate);
        return;
    }
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    const int64_t stride = K * RNN_PANEL;
    for (int64_t p = 0; p < P; p += 2) {
        const int two = p + 1 < P;
        const int64_t b0 = p * stride, b1 = two ? b0 + stride : b0;
        const int64_t col = p * RNN_PANEL, w0 = N - col, w1 = N - col - RNN_PANEL;
        const float *s0 = Bp->scale ? Bp->scale + col : NULL, *s1 = Bp->scale ? Bp->scale + col + RNN_PANEL : NULL;
        /* groups of 8, then one group of 4, 2 and 1 as needed: each pair of panel rows is
         * read and widened once per group */
        int64_t m = 0;
        for (; m + 8 <= M; m += 8)
            compact_rows_avx512(8, A + m * lda, lda, Bp, b0, b1, two, K, C + m * ldc + col, ldc, w0, w1, s0, s1, accumulate);
        if (m + 4 <= M) {
            compact_rows_avx512(4, A + m * lda, lda, Bp, b0, b1, two, K, C + m * ldc + col, ldc, w0, w1, s0, s1, accumulate);
            m += 4;
        }
        if (m + 2 <= M) {
            compact_rows_avx512(2, A + m * lda, lda, Bp, b0, b1, two, K, C + m * ldc + col, ldc, w0, w1, s0, s1, accumulate);
            m += 2;
        }
        if (m < M)
            compact_rows_avx512(1, A + m * lda, lda, Bp, b0, b1, two, K, C + m * ldc + col, ldc, w0, w1, s0, s1, accumulate);
    }
}

/* Panels outer, rows inner: a panel (K x 16 floats) is read from memory once and reused
 * from L1 by every group of rows. */
AVX2 static void gemm_packed_avx2(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp,
                                  float *C, int64_t ldc, int accumulate) {
    if (Bp->dtype != RNN_WEIGHTS_F32) {
        if (M == 1) gemv_compact_avx2(A, Bp, C, accumulate);
        else if (M < 8) gemm_compact_avx2(M, A, lda, Bp, C, ldc, accumulate);
        else gemm_compact_wide_avx2(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
    if (M < 4) { /* 1-3 rows (a streamed conv's frames, a small batch): a row at a time over
                  * four panels, 8 accumulators, where the panel-outer loop below would give a
                  * row 2 (latency-bound); the same chains, so the same bits */
        for (int64_t m = 0; m < M; m++) gemv_packed_avx2(A + m * lda, Bp, C + m * ldc, accumulate);
        return;
    }
    const int64_t N = Bp->N, K = Bp->K, P = (N + RNN_PANEL - 1) / RNN_PANEL;
    for (int64_t p = 0; p < P; p++) {
        const float *b = (const float *)Bp->data + p * K * RNN_PANEL;
        const int64_t col = p * RNN_PANEL, w = N - col < RNN_PANEL ? N - col : RNN_PANEL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) gemm4_panel_avx2(A + m * lda, lda, b, K, C + m * ldc + col, ldc, w, accumulate);
        for (; m < M; m++) gemm1_panel_avx2(A + m * lda, b, K, C + m * ldc + col, w, accumulate);
    }
}
#endif

static int g_kernel = -1; /* -1 unknown, 0 reference, 1 AVX2+FMA(+F16C), 2 AVX-512F for float32 */

int rnn_kernel_level_max(void) {
#ifdef RNN_HAVE_AVX2_KERNEL
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
    return 0;
#endif
}

int rnn_kernel_level(void) {
    if (g_kernel < 0) g_kernel = rnn_kernel_level_max();
    return g_kernel;
}

void rnn_set_kernel_level(int level) {
    const int top = rnn_kernel_level_max();
    g_kernel = level < 0 ? 0 : (level > top ? top : level);
}

/* Rows of A per block of a product with many rows. The kernels stream every panel of B past
 * the rows of a call, reusing each panel from L1 for all of them; rows up to ~512 KB (held in
 * L2 while B goes by) keep the many-row rate at the few-row rate, where a whole sequence's
 * rows fall out of the caches. Blocking rows changes no sum (each output is its own chain
 * over k). Measured 2026-12-02 on a shared 2-core AMD EPYC (AVX2), one thread, GFLOP/s of
 * packed vs OpenBLAS sgemm in one run: M x N x K 4096 x 1024 x 512: 26.9 vs 35.1 unblocked,
 * 36.1-37.8 vs 35.3-35.8 in blocks of 64-256 rows (16 rows: 36.1, 8: 37.3); 2048 x 2048 x
 * 2048: 28.7 (8 rows), 34.3 (32), 36.3 (64), 37.1 (256) vs 36.0-37.1; 1024 x 4096 x 512: 26.9
 * (8), 36.4 (64), 37.3 (256) vs 33.4-34.5; and 64 x 1024 x 256 37.5 vs 21.5, 4096 x 96 x 192
 * 35.4 vs 20.0 (OpenBLAS's small and narrow products). */
static int64_t row_block(int64_t K) {
    const int64_t r = 131072 / (K > 0 ? K : 1);
    return r < 32 ? 32 : (r > 256 ? 256 : r);
}

static void gemm_packed_block(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                              int64_t ldc, int accumulate);

void rnn_gemm_packed(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                     int64_t ldc, int accumulate) {
    if (M <= 0 || Bp->N <= 0) return;
    if (((uintptr_t)Bp->data & (Bp->dtype == RNN_WEIGHTS_F32 ? 63 : 15)) != 0) {
        /* the kernels load panels aligned (float32: 64 bytes; the compact kernels' rows of 16
         * halves or int8 codes: 16 bytes, which every panel of a split view keeps): panels
         * placed elsewhere (a graph's packed MatMul or conv weights inside a weight file) go
         * through the reference */
        rnn_gemm_packed_ref(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
    const int64_t rb = row_block(Bp->K);
    for (int64_t m = 0; m < M; m += rb)
        gemm_packed_block(M - m < rb ? M - m : rb, A + m * lda, lda, Bp, C + m * ldc, ldc, accumulate);
}

static void gemm_packed_block(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                              int64_t ldc, int accumulate) {
#ifdef RNN_HAVE_AVX2_KERNEL
    const int level = rnn_kernel_level();
    if (level == 2 && Bp->dtype == RNN_WEIGHTS_F32) {
        gemm_packed_avx512(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
    if (level == 2) { /* compact weights */
        gemm_compact_avx512(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
    if (level >= 1) {
        gemm_packed_avx2(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
#endif
    rnn_gemm_packed_ref(M, A, lda, Bp, C, ldc, accumulate);
}

/* ---- the same products split over threads (pool.c) ---- */

/* Products below this many multiply-adds stay on one thread (see rnn_threads_set_min_macs).
 * benchmarks/bench_threads.py (every product split, one step per call, I = H) puts the cost
 * of one split at 0.2-0.5 us when the worker is awake (LSTM/GRU/RNN H=32: 0.5-0.9 us per
 * step with two products), and a split saves at most half of the product's time, ~1 us per
 * 32K multiply-adds at the one-core rate of the packed kernels (LSTM H=64, 2 x 16K: 2.1 us
 * a step). 2^17 (an LSTM H=181 or GRU H=209 recurrent product, ~4 us) keeps the split's
 * gain several times its cost; above it, calls are still timed both ways as they run
 * (pool.c, rnn_par_begin) and split only while that is faster. Measured on 2026-12-01
 * on a shared 2-core machine with a load average of 12: no size gained then (0.46-0.79x,
 * the other core being busy), which is what the per-product timing is for. */
#define RNN_PAR_MIN_MACS_DEFAULT ((int64_t)1 << 17)
static int64_t g_par_min_macs = RNN_PAR_MIN_MACS_DEFAULT;

int64_t rnn_threads_min_macs(void) { return g_par_min_macs; }

int64_t rnn_threads_set_min_macs(int64_t n) {
    g_par_min_macs = n < 0 ? RNN_PAR_MIN_MACS_DEFAULT : n;
    return g_par_min_macs;
}

typedef struct {
    int64_t M, lda, ldc, per; /* per: panels per chunk */
    const float *A;
    const rnn_packed *Bp;
    float *C;
    int accumulate;
} par_gemm;

/* Chunk c: panels [c*per, c*per + per) of B, i.e. columns [16*c*per, ...) of C, through the
 * one-thread kernel on a view of those panels (same layout, so the same sums). */
static void par_gemm_chunk(void *arg, int64_t c) {
    const par_gemm *g = arg;
    const rnn_packed *Bp = g->Bp;
    static const size_t esize[3] = {4, 2, 1};
    const int64_t p0 = c * g->per, col = p0 * RNN_PANEL;
    rnn_packed view = *Bp;
    view.N = Bp->N - col < g->per * RNN_PANEL ? Bp->N - col : g->per * RNN_PANEL;
    view.data = (char *)Bp->data + (size_t)(p0 * Bp->K * RNN_PANEL) * esize[Bp->dtype];
    view.scale = Bp->scale ? Bp->scale + col : NULL;
    rnn_gemm_packed(g->M, g->A, g->lda, &view, g->C + col, g->ldc, g->accumulate);
}

void rnn_gemm_packed_par(rnn_par *par, int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate) {
    const int64_t P = (Bp->N + RNN_PANEL - 1) / RNN_PANEL, n = rnn_par_threads(par);
    if (n <= 1 || M <= 0 || P < 2 || M * Bp->N * Bp->K < g_par_min_macs) {
        rnn_gemm_packed(M, A, lda, Bp, C, ldc, accumulate);
        return;
    }
    /* about four chunks per thread (a late thread's share is taken by the others), in
     * groups of 8 panels once large (the AVX-512 matrix-vector kernel's stride) */
    int64_t per = (P + 4 * n - 1) / (4 * n);
    if (per > 8) per = (per + 7) / 8 * 8;
    par_gemm g = {M, lda, ldc, per, A, Bp, C, accumulate};
    rnn_par_run(par, (P + per - 1) / per, par_gemm_chunk, &g);
}
