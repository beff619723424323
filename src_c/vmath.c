/* vmath.c - float32 exp, sigmoid and tanh over arrays: AVX2+FMA kernels and a portable reference. */
#include "internal.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNN_HAVE_AVX2_VMATH 1
#endif

/*
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial of degree 7 (truncation error < 6e-9 relative); x is clamped to [-87, 89]
 * so 2^n stays a normal float or, past ~88.5, becomes +Inf. sigmoid(x) = 1 / (1 + exp(-x)).
 * tanh(x) = sign(x) m / (m + 2) with m = exp(2|x|) - 1 and |x| clamped to 9 (tanh(9) rounds
 * to 1 in float32), m computed without cancellation: 2^n * q + (2^n - 1), q = exp(r) - 1 by the same
 * polynomial without its constant term (so near 0, where n = 0, m is q itself). tanh is then
 * accurate relative to its value near 0 too: (e - 1) / (e + 1) with e = exp(2x), used until
 * 2026-12-02, lost the low bits of small results (tanh(2.68e-4) was 5e-5 off, relative; a
 * mutated Keras cell dividing by it was 5x the tolerance off onnxruntime).
 *
 * NaN in gives NaN out, as in onnxruntime: the clamps keep NaN (the portable code compares
 * with < and >, which are false for NaN; _mm256_max_ps / _mm256_min_ps return their second
 * operand when either is NaN, so x goes second), and the polynomial of a NaN is NaN.
 * +-Inf saturate like large finite values (sigmoid 1 / ~0, tanh +-1).
 *
 * Max error against float64 over 2M points of [-20, 20] (asserted in tests/test_kernels.py
 * for both kernels): sigmoid 1e-7 absolute, tanh 2e-7 absolute and 4 ulps (relative) for
 * |tanh| < 0.5.
 */

static const float LOG2E = 1.44269504088896341f;
static const float LN2_HI = 0.693359375f;     /* ln 2 = LN2_HI + LN2_LO, n * LN2_HI exact */
static const float LN2_LO = -2.12194440e-4f;
/* EXP_HI: at 89, n = 128 and 2^n has the all-ones exponent, so exp(+Inf) (and anything
 * past ~88.5) is +Inf: sigmoid(-Inf) is exactly 0 and sigmoid(+Inf) exactly 1. */
static const float EXP_LO = -87.0f, EXP_HI = 89.0f, TANH_MAX = 9.0f;
static const float C7 = 1.0f / 5040.0f, C6 = 1.0f / 720.0f, C5 = 1.0f / 120.0f, C4 = 1.0f / 24.0f,
                   C3 = 1.0f / 6.0f, C2 = 0.5f;

/* --- portable reference ---------------------------------------------------------------- */
/* x = n ln2 + r; returns p with exp(r) = p r + 1 (Horner to the r^1 term); n, r out */
static float exp_poly_ref(float x, float *n_out, float *r_out) {
    float n = nearbyintf(x * LOG2E);
    float r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    float p = C7;
    p = p * r + C6;
    p = p * r + C5;
    p = p * r + C4;
    p = p * r + C3;
    p = p * r + C2;
    p = p * r + 1.0f;
    *n_out = n;
    *r_out = r;
    return p;
}

static float pow2_ref(float n) { /* 2^n for integral n in [-126, 128] */
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return scale;
}

static float exp_ref(float x) {
    if (x != x) return x; /* NaN: the int conversion below would be undefined */
    x = x < EXP_LO ? EXP_LO : (x > EXP_HI ? EXP_HI : x);
    float n, r;
    const float poly = exp_poly_ref(x, &n, &r); /* n, r set before they are read */
    return (poly * r + 1.0f) * pow2_ref(n);
}

static void sigmoid_ref(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = 1.0f / (1.0f + exp_ref(-x[i]));
}

/* exp(x) - 1 for |x| <= 2 * TANH_MAX: 2^n * q + (2^n - 1), q = exp(r) - 1 (exact to a few
 * ulps relative, also where x is near 0 and n = 0) */
static float expm1_ref(float x) {
    float n, r;
    const float poly = exp_poly_ref(x, &n, &r); /* n, r set before they are read */
    const float q = poly * r, scale = pow2_ref(n);
    return scale * q + (scale - 1.0f);
}

static void tanh_ref(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i]) continue; /* NaN stays (the int conversion in expm1_ref would be undefined) */
        /* on |x|, then the sign of x: odd, as the AVX2 kernel */
        const float a = fabsf(x[i]) > TANH_MAX ? TANH_MAX : fabsf(x[i]);
        const float m = expm1_ref(2.0f * a);
        x[i] = copysignf(m / (m + 2.0f), x[i]);
    }
}

/* --- AVX2 + FMA ------------------------------------------------------------------------- */
#ifdef RNN_HAVE_AVX2_VMATH
#define AVX2 __attribute__((target("avx2,fma")))

/* x = n ln2 + r; returns p with exp(r) = p r + 1 (Horner to the r^1 term); n, r out */
AVX2 static inline __m256 exp_poly8(__m256 x, __m256 *n_out, __m256 *r_out) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(C7);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    *n_out = n;
    *r_out = r;
    return p;
}

AVX2 static inline __m256 pow2_8(__m256 n) { /* 2^n for integral n in [-126, 128] */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

AVX2 static inline __m256 exp8(__m256 x) {
    /* x second in max/min: a NaN x passes through (its conversion below gives a finite
     * 2^n, and p is NaN) */
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
    __m256 n, r;
    const __m256 poly = exp_poly8(x, &n, &r); /* n, r set before they are read */
    return _mm256_mul_ps(_mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f)), pow2_8(n));
}

AVX2 static inline __m256 sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* exp(x) - 1 for |x| <= 2 * TANH_MAX, as expm1_ref */
AVX2 static inline __m256 expm1_8(__m256 x) {
    __m256 n, r;
    const __m256 poly = exp_poly8(x, &n, &r); /* n, r set before they are read */
    const __m256 q = _mm256_mul_ps(poly, r), scale = pow2_8(n);
    return _mm256_fmadd_ps(scale, q, _mm256_sub_ps(scale, _mm256_set1_ps(1.0f)));
}

AVX2 static inline __m256 tanh8(__m256 x) {
    /* on |x|, then the sign of x: odd (tanh(-x) = -tanh(x) bit for bit, tanh(-0) = -0) */
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    __m256 a = _mm256_min_ps(_mm256_set1_ps(TANH_MAX), _mm256_xor_ps(x, sign)); /* NaN stays */
    __m256 m = expm1_8(_mm256_add_ps(a, a));
    return _mm256_or_ps(_mm256_div_ps(m, _mm256_add_ps(m, _mm256_set1_ps(2.0f))), sign);
}

/* The tail (n % 8 elements) goes through the same vector code via a small buffer, so
 * every element gets the same arithmetic whatever its position. */
#define APPLY8(name, fn)                                                   \
    AVX2 static void name(float *x, int64_t n) {                           \
        int64_t i = 0;                                                     \
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, fn(_mm256_loadu_ps(x + i))); \
        if (i < n) {                                                       \
            float tmp[8] = {0};                                            \
            memcpy(tmp, x + i, sizeof(float) * (size_t)(n - i));           \
            _mm256_storeu_ps(tmp, fn(_mm256_loadu_ps(tmp)));               \
            memcpy(x + i, tmp, sizeof(float) * (size_t)(n - i));           \
        }                                                                  \
    }
APPLY8(sigmoid_avx2, sigmoid8)
APPLY8(tanh_avx2, tanh8)
APPLY8(exp_avx2, exp8)
#endif

static void exp_ref_array(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = exp_ref(x[i]);
}

/* rnn_vexp, rnn_vsigmoid, rnn_vtanh: the AVX2 kernel where the CPU has it, else the reference */
#ifdef RNN_HAVE_AVX2_VMATH
#define DISPATCH(name, avx2, ref)                   \
    void name(float *x, int64_t n) {                \
        if (rnn_kernel_level() >= 1) avx2(x, n);    \
        else ref(x, n);                             \
    }
#else
#define DISPATCH(name, avx2, ref) \
    void name(float *x, int64_t n) { ref(x, n); }
#endif
DISPATCH(rnn_vexp, exp_avx2, exp_ref_array)
DISPATCH(rnn_vsigmoid, sigmoid_avx2, sigmoid_ref)
DISPATCH(rnn_vtanh, tanh_avx2, tanh_ref)
