/* vmath.c - vectorisable float32 exp, sigmoid and tanh over arrays, with stated error bounds. */
#include "internal.h"

#include <string.h>

/*
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial of degree 7 (truncation error < 6e-9 relative). The loops are plain C that
 * GCC vectorises (SSE2 baseline); target_clones adds an AVX2+FMA version chosen at load
 * time on CPUs that have it, so the package still runs on any x86-64 CPU.
 *
 * Max error against float64 over 2M points of [-20, 20] (asserted in tests/test_kernels.py):
 *   sigmoid 9e-8 absolute, tanh 1.4e-7 absolute (bounds tested: 1.2e-7 and 2e-7).
 */

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(RNN_NO_DISPATCH)
#define RNN_DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RNN_DISPATCH
#endif

static inline float exp_poly(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f; /* ln2 split: exact n*ln2_hi */
    const float round_magic = 12582912.0f;                       /* 1.5 * 2^23 */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * log2e + round_magic) - round_magic; /* round to nearest */
    float r = x - n * ln2_hi;
    r = r - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

RNN_DISPATCH
void rnn_vexp(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = exp_poly(x[i]);
}

RNN_DISPATCH
void rnn_vsigmoid(float *x, int64_t n) {
    /* 1 / (1 + exp(-x)); exp_poly clamps, so no overflow */
    for (int64_t i = 0; i < n; i++) x[i] = 1.0f / (1.0f + exp_poly(-x[i]));
}

RNN_DISPATCH
void rnn_vtanh(float *x, int64_t n) {
    /* tanh(x) = (e - 1) / (e + 1), e = exp(2x); |x| > 9 gives +-1 in float32 */
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        v = v < -9.0f ? -9.0f : (v > 9.0f ? 9.0f : v);
        float e = exp_poly(2.0f * v);
        x[i] = (e - 1.0f) / (e + 1.0f);
    }
}
