/* stft.c - a Conv1d whose filters are a windowed DFT basis, computed by FFT (RNN_OP_STFT). */
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/*
 * Audio models compute their spectrogram as a Conv1d over the signal (one channel) whose
 * M = K + 2 filters of length K (a power of two) are a window times a DFT basis:
 *
 *   W[f, 0, n]     = w[n] cos(2 pi f n / K)          f = 0 .. K/2   (the real parts)
 *   W[F + f, 0, n] = sign w[n] sin(2 pi f n / K)     F = K/2 + 1    (the imaginary parts)
 *
 * (silero-vad: a periodic Hann window, sign -1). The planner recognises such filters
 * (rnnengine/ops/handlers.py, dft_basis: every stored value within float32 rounding of the
 * formula) and emits this op instead of CONV1D_PACKED. Per output position l, the frame
 * a[n] = w[n] x[l*stride + n - pad] (zero in the padding) goes through a real FFT:
 *
 *   X[f] = sum_n a[n] e^{-2 pi i f n / K},  out[f, l] = Re X[f],  out[F + f, l] = -sign Im X[f]
 *
 * computed as a complex FFT of half the length over z[m] = a[2m] + i a[2m+1] (radix 2 in
 * Stockham's self-sorting order: each stage reads one buffer and writes the other, so there
 * is no bit-reversed permutation, and every stage reads z[e] and z[e + h/2] for e < h/2, the
 * same contiguous pattern whatever its length, which the AVX-512 and AVX2 kernels run 16 and
 * 8 lanes wide, with the same bits as the plain loops)
 * and the split step
 *
 *   E = (Z[f] + conj Z[h-f]) / 2,  O = (Z[f] - conj Z[h-f]) / 2i,  X[f] = E + e^{-2 pi i f / K} O
 *
 * with h = K/2 and Z[h] = Z[0]. That is O(K log K) per position instead of O(K^2), and no
 * filter bytes to read (the direct product reads (K + 2) K floats per call, 264 KB for
 * silero-vad, mostly from outside the core's caches when the model runs among other work).
 * The result differs from the direct sum by rounding only: both are within float32 rounding
 * of the exact value (tests/test_stft.py measures it on odd cases and against onnxruntime).
 *
 * NaN and Inf: an FFT mixes every sample into every bin through sums and differences, so one
 * infinite sample makes NaN where the direct product gives +-Inf. A position whose samples or
 * results are not all finite is therefore computed again by the direct product over W, the
 * original filters (input 1), which is also the plain reference beside this kernel.
 *
 * table (input 2, float32, rnn_stft_table_floats(K)): w[K]; then per FFT stage t = 0 ..
 * log2(h) - 1 (s = 2^t interleaved sequences), the twiddle of each e < h/2 expanded:
 * h/2 values cos(2 pi (e - e mod s) / h), then h/2 of sin(...); then cos and sin of
 * 2 pi f / K for f = 0 .. h (the split step). Work: rnn_stft_work(K) floats.
 */

static int64_t log2_of(int64_t h) {
    int64_t t = 0;
    while (((int64_t)1 << t) < h) t++;
    return t;
}

int64_t rnn_stft_table_floats(int64_t K) {
    const int64_t h = K / 2;
    return K + log2_of(h) * h + 2 * (h + 1);
}

/* the complex buffers z and y (h + 16 floats apart: Z[h] = Z[0] is kept past the end) and the
 * result t (h + 1 complex) */
int64_t rnn_stft_work(int64_t K) { return 4 * (K / 2 + 16) + 2 * (K / 2 + 1); }

/* 1 when every one of the n floats is finite */
static int all_finite(const float *v, int64_t n) {
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= isfinite(v[i]) != 0;
    return ok;
}

/* out[m * Lout] for m < M: the direct product of frame position p0 with every filter (the
 * plain reference, and the path of a frame with NaN or Inf). */
static void direct(const float *W, int64_t M, int64_t K, const float *x, int64_t L, int64_t p0, float *out,
                   int64_t Lout) {
    for (int64_t m = 0; m < M; m++) {
        float s = 0.0f;
        for (int64_t n = 0; n < K; n++) {
            const int64_t p = p0 + n;
            if (p >= 0 && p < L) s += W[m * K + n] * x[p];
        }
        out[m * Lout] = s;
    }
}

/* One Stockham stage over h complex points held as (xr, xi), s interleaved sequences: for
 * e < h/2 with q = e mod s, a = x[e], b = x[e + h/2]:
 *   y[2e - q] = a + b,   y[2e - q + s] = (a - b) e^{-2 pi i (e - q) / h}   (c, sn: its cos, sin) */
static void stage_ref(int64_t h, int64_t s, const float *xr, const float *xi, float *yr, float *yi, const float *c,
                      const float *sn) {
    const int64_t half = h / 2;
    for (int64_t e = 0; e < half; e++) {
        const int64_t at = 2 * e - (e & (s - 1));
        const float ar = xr[e], ai = xi[e], br = xr[e + half], bi = xi[e + half];
        const float dr = ar - br, di = ai - bi;
        yr[at] = ar + br, yi[at] = ai + bi;
        yr[at + s] = dr * c[e] + di * sn[e], yi[at + s] = di * c[e] - dr * sn[e];
    }
}

/* X[f] for f = f0 .. h from Z (zr, zi: h + 1 values, Z[h] = Z[0]) into (tr, ti). */
static void split_ref(int64_t h, int64_t f0, const float *zr, const float *zi, const float *pc, const float *ps,
                      float *tr, float *ti) {
    for (int64_t f = f0; f <= h; f++) {
        const float ar = zr[f], ai = zi[f], br = zr[h - f], bi = zi[h - f];
        const float er = 0.5f * (ar + br), ei = 0.5f * (ai - bi);
        const float or_ = 0.5f * (ai + bi), oi = 0.5f * (br - ar);
        tr[f] = er + (pc[f] * or_ + ps[f] * oi), ti[f] = ei + (pc[f] * oi - ps[f] * or_);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define RNN_HAVE_STFT_AVX512 1

/* For a stage of s = 2^t < 16 sequences: the 32 results of 16 values of e (16/s whole
 * groups) interleave a + b and the rest in runs of s; result j comes from lane
 * (j / 2s) s + j mod s of the sums, or of the rest (+16) when (j / s) is odd. */
static const int RUNS[4][32] = {
    {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31},
    {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31},
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31},
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};

/* stage_ref, 16 values of e at a time (h/2 a multiple of 16) */
AVX512 static void stage_avx512(int64_t h, int t, const float *xr, const float *xi, float *yr, float *yi,
                                const float *c, const float *sn) {
    const int64_t half = h / 2, s = (int64_t)1 << t;
    __m512i lo = _mm512_setzero_si512(), hi = lo;
    if (t < 4) lo = _mm512_loadu_si512(RUNS[t]), hi = _mm512_loadu_si512(RUNS[t] + 16);
    for (int64_t e = 0; e < half; e += 16) {
        const __m512 ar = _mm512_loadu_ps(xr + e), ai = _mm512_loadu_ps(xi + e);
        const __m512 br = _mm512_loadu_ps(xr + e + half), bi = _mm512_loadu_ps(xi + e + half);
        const __m512 cc = _mm512_loadu_ps(c + e), ss = _mm512_loadu_ps(sn + e);
        const __m512 dr = _mm512_sub_ps(ar, br), di = _mm512_sub_ps(ai, bi);
        const __m512 sr = _mm512_add_ps(ar, br), si = _mm512_add_ps(ai, bi);
        const __m512 tr = _mm512_add_ps(_mm512_mul_ps(dr, cc), _mm512_mul_ps(di, ss));
        const __m512 ti = _mm512_sub_ps(_mm512_mul_ps(di, cc), _mm512_mul_ps(dr, ss));
        if (s >= 16) {
            const int64_t at = 2 * e - (e & (s - 1));
            _mm512_storeu_ps(yr + at, sr), _mm512_storeu_ps(yi + at, si);
            _mm512_storeu_ps(yr + at + s, tr), _mm512_storeu_ps(yi + at + s, ti);
        } else {
            _mm512_storeu_ps(yr + 2 * e, _mm512_permutex2var_ps(sr, lo, tr));
            _mm512_storeu_ps(yr + 2 * e + 16, _mm512_permutex2var_ps(sr, hi, tr));
            _mm512_storeu_ps(yi + 2 * e, _mm512_permutex2var_ps(si, lo, ti));
            _mm512_storeu_ps(yi + 2 * e + 16, _mm512_permutex2var_ps(si, hi, ti));
        }
    }
}

/* split_ref for f < h, 16 at a time (h a multiple of 16; Z[h - f] read as a reversed load
 * ending at Z[h] = Z[0]); f = h is left to split_ref. 1 when every result is finite. */
AVX512 static int split_avx512(int64_t h, const float *zr, const float *zi, const float *pc, const float *ps,
                               float *tr, float *ti) {
    static const int REVERSE[16] = {15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0};
    const __m512i rev = _mm512_loadu_si512(REVERSE);
    const __m512 half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
    __mmask16 ok = 0xffff;
    for (int64_t f = 0; f < h; f += 16) {
        const __m512 ar = _mm512_loadu_ps(zr + f), ai = _mm512_loadu_ps(zi + f);
        const __m512 br = _mm512_permutexvar_ps(rev, _mm512_loadu_ps(zr + h - f - 15));
        const __m512 bi = _mm512_permutexvar_ps(rev, _mm512_loadu_ps(zi + h - f - 15));
        const __m512 c = _mm512_loadu_ps(pc + f), s = _mm512_loadu_ps(ps + f);
        const __m512 er = _mm512_mul_ps(half, _mm512_add_ps(ar, br)), ei = _mm512_mul_ps(half, _mm512_sub_ps(ai, bi));
        const __m512 or_ = _mm512_mul_ps(half, _mm512_add_ps(ai, bi)), oi = _mm512_mul_ps(half, _mm512_sub_ps(br, ar));
        const __m512 xr = _mm512_add_ps(er, _mm512_add_ps(_mm512_mul_ps(c, or_), _mm512_mul_ps(s, oi)));
        const __m512 xi = _mm512_add_ps(ei, _mm512_sub_ps(_mm512_mul_ps(c, oi), _mm512_mul_ps(s, or_)));
        ok &= _mm512_cmp_ps_mask(_mm512_mul_ps(xr, zero), zero, _CMP_EQ_OQ); /* x * 0 == 0: finite */
        ok &= _mm512_cmp_ps_mask(_mm512_mul_ps(xi, zero), zero, _CMP_EQ_OQ);
        _mm512_storeu_ps(tr + f, xr), _mm512_storeu_ps(ti + f, xi);
    }
    return ok == 0xffff;
}

/* (xr, xi)[m] = w[2m] v[2m], w[2m+1] v[2m+1] for m < h (h a multiple of 16); 1 when every v
 * is finite */
AVX512 static int window_avx512(int64_t h, const float *w, const float *v, float *xr, float *xi) {
    static const int even[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const __m512i ie = _mm512_loadu_si512(even), io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 ok = 0xffff;
    for (int64_t m = 0; m < h; m += 16) {
        const __m512 v0 = _mm512_loadu_ps(v + 2 * m), v1 = _mm512_loadu_ps(v + 2 * m + 16);
        /* x * 0 is 0 for finite x, NaN for NaN and +-Inf */
        ok &= _mm512_cmp_ps_mask(_mm512_mul_ps(v0, zero), zero, _CMP_EQ_OQ);
        ok &= _mm512_cmp_ps_mask(_mm512_mul_ps(v1, zero), zero, _CMP_EQ_OQ);
        const __m512 p0 = _mm512_mul_ps(v0, _mm512_loadu_ps(w + 2 * m)), p1 = _mm512_mul_ps(v1, _mm512_loadu_ps(w + 2 * m + 16));
        _mm512_storeu_ps(xr + m, _mm512_permutex2var_ps(p0, ie, p1));
        _mm512_storeu_ps(xi + m, _mm512_permutex2var_ps(p0, io, p1));
    }
    return ok == 0xffff;
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
/* The same three steps 8 lanes wide for AVX2 CPUs (h a multiple of 16), with the same
 * operations in the same order as the reference (a multiply, then an add: no FMA), so the
 * three kernels give the same bits. */
#define AVX2S __attribute__((target("avx2")))

/* stage_ref, 8 values of e at a time: for s >= 8 the results are runs of 8; below, the 16
 * results of 8 values of e interleave the sums and the rest in runs of s (unpack by floats
 * for s = 1, by pairs for s = 2, halves for s = 4), then the 128-bit halves are put in order */
AVX2S static void stage_avx2(int64_t h, int t, const float *xr, const float *xi, float *yr, float *yi,
                             const float *c, const float *sn) {
    const int64_t half = h / 2, s = (int64_t)1 << t;
    for (int64_t e = 0; e < half; e += 8) {
        const __m256 ar = _mm256_loadu_ps(xr + e), ai = _mm256_loadu_ps(xi + e);
        const __m256 br = _mm256_loadu_ps(xr + e + half), bi = _mm256_loadu_ps(xi + e + half);
        const __m256 cc = _mm256_loadu_ps(c + e), ss = _mm256_loadu_ps(sn + e);
        const __m256 dr = _mm256_sub_ps(ar, br), di = _mm256_sub_ps(ai, bi);
        const __m256 sr = _mm256_add_ps(ar, br), si = _mm256_add_ps(ai, bi);
        const __m256 tr = _mm256_add_ps(_mm256_mul_ps(dr, cc), _mm256_mul_ps(di, ss));
        const __m256 ti = _mm256_sub_ps(_mm256_mul_ps(di, cc), _mm256_mul_ps(dr, ss));
        if (s >= 8) {
            const int64_t at = 2 * e - (e & (s - 1));
            _mm256_storeu_ps(yr + at, sr), _mm256_storeu_ps(yi + at, si);
            _mm256_storeu_ps(yr + at + s, tr), _mm256_storeu_ps(yi + at + s, ti);
            continue;
        }
        __m256 lr, hr, li, hi;
        if (s == 1) {
            lr = _mm256_unpacklo_ps(sr, tr), hr = _mm256_unpackhi_ps(sr, tr);
            li = _mm256_unpacklo_ps(si, ti), hi = _mm256_unpackhi_ps(si, ti);
        } else if (s == 2) {
            lr = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(sr), _mm256_castps_pd(tr)));
            hr = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(sr), _mm256_castps_pd(tr)));
            li = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(si), _mm256_castps_pd(ti)));
            hi = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(si), _mm256_castps_pd(ti)));
        } else { /* s == 4: the halves themselves are the runs */
            lr = sr, hr = tr, li = si, hi = ti;
        }
        _mm256_storeu_ps(yr + 2 * e, _mm256_permute2f128_ps(lr, hr, 0x20));
        _mm256_storeu_ps(yr + 2 * e + 8, _mm256_permute2f128_ps(lr, hr, 0x31));
        _mm256_storeu_ps(yi + 2 * e, _mm256_permute2f128_ps(li, hi, 0x20));
        _mm256_storeu_ps(yi + 2 * e + 8, _mm256_permute2f128_ps(li, hi, 0x31));
    }
}

/* 1 when all 8 lanes are finite (x * 0 is 0 for finite x, NaN for NaN and +-Inf) */
AVX2S static inline int finite8(__m256 v) {
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(v, zero), zero, _CMP_EQ_OQ)) == 0xff;
}

/* split_ref for f < h, 8 at a time (Z[h - f] read as a reversed load ending at Z[h] = Z[0]);
 * f = h is left to split_ref. 1 when every result is finite. */
AVX2S static int split_avx2(int64_t h, const float *zr, const float *zi, const float *pc, const float *ps,
                            float *tr, float *ti) {
    const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256 half = _mm256_set1_ps(0.5f);
    int ok = 1;
    for (int64_t f = 0; f < h; f += 8) {
        const __m256 ar = _mm256_loadu_ps(zr + f), ai = _mm256_loadu_ps(zi + f);
        const __m256 br = _mm256_permutevar8x32_ps(_mm256_loadu_ps(zr + h - f - 7), rev);
        const __m256 bi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(zi + h - f - 7), rev);
        const __m256 c = _mm256_loadu_ps(pc + f), s = _mm256_loadu_ps(ps + f);
        const __m256 er = _mm256_mul_ps(half, _mm256_add_ps(ar, br)), ei = _mm256_mul_ps(half, _mm256_sub_ps(ai, bi));
        const __m256 or_ = _mm256_mul_ps(half, _mm256_add_ps(ai, bi)), oi = _mm256_mul_ps(half, _mm256_sub_ps(br, ar));
        const __m256 xr = _mm256_add_ps(er, _mm256_add_ps(_mm256_mul_ps(c, or_), _mm256_mul_ps(s, oi)));
        const __m256 xi = _mm256_add_ps(ei, _mm256_sub_ps(_mm256_mul_ps(c, oi), _mm256_mul_ps(s, or_)));
        ok &= finite8(xr) & finite8(xi);
        _mm256_storeu_ps(tr + f, xr), _mm256_storeu_ps(ti + f, xi);
    }
    return ok;
}

/* (xr, xi)[m] = w[2m] v[2m], w[2m+1] v[2m+1] for m < h (h a multiple of 8): the products of 16
 * samples, their even and odd lanes gathered by a shuffle within each half and a reorder of
 * the 64-bit pairs. 1 when every v is finite. */
AVX2S static int window_avx2(int64_t h, const float *w, const float *v, float *xr, float *xi) {
    int ok = 1;
    for (int64_t m = 0; m < h; m += 8) {
        const __m256 v0 = _mm256_loadu_ps(v + 2 * m), v1 = _mm256_loadu_ps(v + 2 * m + 8);
        ok &= finite8(v0) & finite8(v1);
        const __m256 p0 = _mm256_mul_ps(v0, _mm256_loadu_ps(w + 2 * m)), p1 = _mm256_mul_ps(v1, _mm256_loadu_ps(w + 2 * m + 8));
        const __m256 ev = _mm256_shuffle_ps(p0, p1, _MM_SHUFFLE(2, 0, 2, 0)); /* p0 0 2 p1 0 2 | p0 4 6 p1 4 6 */
        const __m256 od = _mm256_shuffle_ps(p0, p1, _MM_SHUFFLE(3, 1, 3, 1));
        _mm256_storeu_ps(xr + m, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), _MM_SHUFFLE(3, 1, 2, 0))));
        _mm256_storeu_ps(xi + m, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), _MM_SHUFFLE(3, 1, 2, 0))));
    }
    return ok;
}
#define RNN_HAVE_STFT_AVX2 1
#endif

void rnn_stft(const int64_t *ip, const float *x, const float *W, const float *table, float *out, float *work) {
    const int64_t N = ip[0], L = ip[1], Lout = ip[2], K = ip[3], stride = ip[4], pad = ip[5], sign = ip[6];
    const int64_t h = K / 2, F = h + 1, M = 2 * F, stages = log2_of(h);
    const float *w = table, *tw = table + K, *pc = tw + stages * h, *ps = pc + (h + 1);
    const int64_t B = h + 16; /* each buffer's floats: Z[h] = Z[0] fits past the end */
    float *zr = work, *zi = zr + B, *yr = zi + B, *yi = yr + B, *tr = yi + B, *ti = tr + F;
#ifdef RNN_HAVE_STFT_AVX512
    const int wide = rnn_kernel_level() == 2 && h >= 32; /* (h/2 a multiple of 16) */
#else
    const int wide = 0;
#endif
#ifdef RNN_HAVE_STFT_AVX2
    const int wide2 = !wide && rnn_kernel_level() >= 1 && h >= 16; /* (h/2 a multiple of 8) */
#else
    const int wide2 = 0;
#endif
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * L;
        for (int64_t l = 0; l < Lout; l++) {
            const int64_t p0 = l * stride - pad;
            float *o = out + n * M * Lout + l; /* out[n, m, l] = o[m * Lout] */
            int finite = 1;
            if (p0 >= 0 && p0 <= L - K) { /* z[m] = a[2m] + i a[2m+1], a the windowed frame */
                const float *v = xn + p0;
#ifdef RNN_HAVE_STFT_AVX512
                if (wide) finite = window_avx512(h, w, v, zr, zi);
                else
#endif
#ifdef RNN_HAVE_STFT_AVX2
                if (wide2) finite = window_avx2(h, w, v, zr, zi);
                else
#endif
                {
                    finite = all_finite(v, K);
                    for (int64_t m = 0; m < h; m++) zr[m] = w[2 * m] * v[2 * m], zi[m] = w[2 * m + 1] * v[2 * m + 1];
                }
            } else { /* a frame reaching into the padding (zeros) */
                for (int64_t j = 0; j < K; j++) {
                    const int64_t p = p0 + j;
                    const int inside = p >= 0 && p < L;
                    if (inside) finite &= isfinite(xn[p]) != 0;
                    (j & 1 ? zi : zr)[j / 2] = inside ? w[j] * xn[p] : 0.0f;
                }
            }
            if (finite) {
                float *ar = zr, *ai = zi, *br = yr, *bi = yi;
                for (int64_t t = 0; t < stages; t++) {
                    const float *c = tw + 2 * t * (h / 2), *sn = c + h / 2;
#ifdef RNN_HAVE_STFT_AVX512
                    if (wide) stage_avx512(h, (int)t, ar, ai, br, bi, c, sn);
                    else
#endif
#ifdef RNN_HAVE_STFT_AVX2
                    if (wide2) stage_avx2(h, (int)t, ar, ai, br, bi, c, sn);
                    else
#endif
                        stage_ref(h, (int64_t)1 << t, ar, ai, br, bi, c, sn);
                    float *u = ar; ar = br; br = u;
                    u = ai; ai = bi; bi = u;
                }
                ar[h] = ar[0], ai[h] = ai[0];
#ifdef RNN_HAVE_STFT_AVX512
                if (wide) {
                    finite = split_avx512(h, ar, ai, pc, ps, tr, ti);
                    split_ref(h, h, ar, ai, pc, ps, tr, ti);
                    finite &= isfinite(tr[h]) && isfinite(ti[h]);
                } else
#endif
#ifdef RNN_HAVE_STFT_AVX2
                if (wide2) {
                    finite = split_avx2(h, ar, ai, pc, ps, tr, ti);
                    split_ref(h, h, ar, ai, pc, ps, tr, ti);
                    finite &= isfinite(tr[h]) && isfinite(ti[h]);
                } else
#endif
                {
                    split_ref(h, 0, ar, ai, pc, ps, tr, ti);
                    finite = all_finite(tr, F) & all_finite(ti, F);
                }
                const float neg = sign > 0 ? -1.0f : 1.0f;
                for (int64_t f = 0; f < F; f++) o[f * Lout] = tr[f];
                for (int64_t f = 0; f < F; f++) o[(F + f) * Lout] = neg * ti[f];
            }
            if (!finite) direct(W, M, K, xn, L, p0, o, Lout); /* NaN / Inf as the direct product has them */
        }
    }
}
