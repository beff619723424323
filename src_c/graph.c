/* graph.c - the graph executor: a flat program of planned instructions over tensors. */
#include "internal.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/*
 * Parameters of each op, as the planner (rnnengine/graph.py) lays them out in iparams
 * (int64) and fparams (float). nd = number of dimensions, strides count elements.
 *
 *   COPY      ip: esize, nd, src_off, dst_off, shape[nd], src_stride[nd], dst_stride[nd]
 *             dst[dst_off + sum i*dst_stride] = src[src_off + sum i*src_stride]
 *   BINARY    ip: kind (0 add 1 sub 2 mul 3 div 4 pow 5 max 6 min), nd, shape[nd],
 *                 a_stride[nd], b_stride[nd]       out (contiguous, shape) = a (op) b
 *   UNARY     ip: kind, n   fp: alpha, beta        out[i] = f(in[i])
 *   MATMUL    ip: M, N, K                          out (M, N) = A (M, K) @ B (N, K)^T + bias (N),
 *             in: A, Bp (B packed in panels of 16 rows, pack.c's layout), bias or -1
 *   SOFTMAX   ip: outer, n, inner, log             over the middle axis of (outer, n, inner)
 *   GATHER    ip: esize, outer, n, inner, n_idx    out (outer, n_idx, inner) = data (outer, n, inner)[:, idx]
 *   CONV1D    ip: N, C, L, M, K, Lout, stride, dilation, pad_left, group
 *             out (N, M, Lout) = conv(x (N, C, L), W (M, C/group, K)) + bias (M)
 *   CONV1D_PACKED  ip: as CONV1D, then act (-1 none, RNN_ACT_RELU, RNN_ACT_LEAKY_RELU)
 *             fp: alpha (LeakyRelu)   in: x, Wp (the filters packed as conv.c describes), bias
 *             out = act(conv + bias), the same result as CONV1D followed by UNARY act
 *   STFT      ip: N, L, Lout, K, stride, pad_left, sign   in: x (N, 1, L), W (K + 2, 1, K), table
 *             out (N, K + 2, Lout) = CONV1D of x with W, W a windowed DFT basis (sign: of its
 *             sine rows), computed by FFT from the window and twiddles in table (stft.c)
 *   PAD       ip: esize, nd, out_shape[nd], in_stride[nd], map_start[nd], fill, maps...
 *             out[o] = in[sum map_d[o_d] * in_stride[d]], or the fill element when any
 *             map_d[o_d] < 0 (fill holds its esize bytes as its low bytes: float32 by its bit
 *             pattern, integers and bool by value); map_start indexes this ip
 *   REDUCE    ip: kind (0 sum 1 mean 2 max 3 min 4 prod), nd, in_shape[nd], out_stride[nd], out_n, count
 *             out_stride is 0 along reduced axes
 *   CAST      ip: from (rnn_dtype), to (rnn_dtype), n      out[i] = (to) in[i], as onnxruntime on x86-64:
 *             float -> int truncates toward 0; NaN, +-inf and out-of-range floats give the
 *             type's minimum (the "integer indefinite" value); int64 -> int32 and any int ->
 *             uint8 keep the low bits; anything -> bool is (x != 0), so NaN -> true
 *   TOPK      ip: dtype, outer, n, inner, k, largest   out: values, indices (int64); ties keep
 *             the lower index first, as ONNX says
 *   SCATTER   ip: esize, nd, data_shape[nd], idx_shape[nd], axis
 *             out = data; out[i with axis index idx[i]] = updates[i] for every i of idx
 *   TBINARY   ip: dtype, kind, nd, shape[nd], a_stride[nd], b_stride[nd]   out (contiguous, shape)
 *             kind 0 add 1 sub 2 mul 3 div (integers: truncated toward 0) 5 max 6 min
 *             7 mod (integers; result has the divisor's sign) 8 fmod (the dividend's sign)
 *             10 equal 11 less 12 less-or-equal 13 greater 14 greater-or-equal 15 and 16 or
 *             17 xor (10..17 write bool). Integer + - * wrap around; division or mod by
 *             zero and INT_MIN / -1 stop with an error.
 *   TUNARY    ip: dtype, kind (0 neg 1 abs: integers; 2 not: bool), n
 *   WHERE     ip: esize, nd, shape[nd], c_stride[nd], x_stride[nd], y_stride[nd]
 *             in: cond (bool), x, y   out (contiguous, shape) = cond ? x : y
 *   TREDUCE   ip: dtype, then as REDUCE (int64/int32; mean truncates toward 0)
 *   ARGMAX    ip: dtype, outer, n, inner, is_min, select_last   out (outer, inner) int64
 *             best starts at position 0 and moves on a strictly greater (ArgMin: smaller)
 *             value, or greater-or-equal with select_last: onnxruntime's NaN behaviour
 *   CUMSUM    ip: dtype, outer, n, inner, exclusive, reverse    running sum along n
 *   REVSEQ    ip: esize, T, B, inner, time_major   in: x (T, B, inner) if time_major else
 *             (B, T, inner), lens (int64, B)   out[t, b] = x[len_b - 1 - t, b] for t < len_b,
 *             else x[t, b]
 *   LAYERNORM ip: outer, n   fp: epsilon   in: x (outer, n), scale (n) | -1, bias (n) | -1
 *             out: y (outer, n), mean (outer) | -1, inv_std (outer) | -1. Per row: mean
 *             rounded to float32, var = mean((x - mean)^2) in double (two passes, the ONNX
 *             function's definition), inv_std = 1 / sqrt(var + epsilon); y = (x - mean)
 *             inv_std scale + bias, rounded once. n >= 1 (onnxruntime refuses an empty row)
 *   POOL1D    ip: rows, L, Lout, K, stride, dilation, off, lo, hi, kind, cnt_lo, cnt_hi
 *             in: x (rows, L)   out: y (rows, Lout). Tap k of output j is position
 *             p = j*stride + k*dilation - off; only taps with lo <= p < hi (0 <= lo <= hi <= L)
 *             are read. kind 0 (max): the largest, a NaN among them gives NaN, no tap -inf;
 *             kind 1 (average, padding excluded): their float32 sum (in tap order) divided by
 *             their number; kind 2 (average, padding counted): that sum divided by the number
 *             of taps with cnt_lo <= p < cnt_hi (the padded input's extent)
 *   BMATMUL   ip: nd, M, N, K, batch[nd], a_stride[nd], b_stride[nd]   in: A, B   out: Y
 *             for each batch index i (odometer over batch[nd]): Y[i] (M, N, contiguous, the
 *             i-th block of Y) = A[sum i*a_stride] (M, K) @ B[sum i*b_stride] (K, N), each
 *             operand's matrix contiguous at that element offset; a stride 0 broadcasts
 *   RECURRENT ip: T, B, layout, D, H, has_c, state_id, init_mode, started_id
 *             in: X, lens (int32) | -1, initial_h | -1, initial_c | -1; out: Y, Y_h | -1, Y_c | -1
 *             init_mode 0: zero state; 1: the state tensor already holds it (a stream);
 *             2: copied from initial_h / initial_c. The final state stays in the state tensor.
 *             started_id: -1, or (a stream with sequence_lens) a float32 tensor of B flags
 *             the stream keeps, 1 for a row that has had a step: such a row's Y_h / Y_c at
 *             length 0 is its state carried on (its sequence ended in an earlier call), a
 *             row that never had one gives 0 as in a whole run (its sequence is empty).
 */

#define MAX_ND 8

static rnn_status fail(char *err, size_t errlen, rnn_status st, const char *msg) {
    if (err && errlen) snprintf(err, errlen, "%s", msg);
    return st;
}

/* ---- COPY ---------------------------------------------------------------------------- */

static void op_copy(const int64_t *ip, const char *src, char *dst) {
    const int64_t es = ip[0], nd = ip[1];
    const int64_t *shape = ip + 4, *ss = ip + 4 + nd, *ds = ip + 4 + 2 * nd;
    src += ip[2] * es;
    dst += ip[3] * es;
    int64_t total = 1;
    for (int64_t d = 0; d < nd; d++) total *= shape[d];
    if (total == 0) return;
    if (nd == 0) { memmove(dst, src, (size_t)es); return; }
    /* innermost dimension as a run; odometer over the rest */
    const int64_t inner = shape[nd - 1], sin = ss[nd - 1], din = ds[nd - 1];
    int64_t idx[MAX_ND] = {0};
    int64_t so = 0, doff = 0;
    for (int64_t done = 0; done < total; done += inner) {
        if (sin == 1 && din == 1) { /* memmove: a stream state copied onto itself (a Loop's state reshaped) */
            memmove(dst + doff * es, src + so * es, (size_t)(inner * es));
        } else if (es == 4) {
            const float *s = (const float *)src + so;
            float *o = (float *)dst + doff;
            for (int64_t i = 0; i < inner; i++) o[i * din] = s[i * sin];
        } else {
            for (int64_t i = 0; i < inner; i++)
                memcpy(dst + (doff + i * din) * es, src + (so + i * sin) * es, (size_t)es);
        }
        for (int64_t d = nd - 2; d >= 0; d--) {
            idx[d]++;
            so += ss[d];
            doff += ds[d];
            if (idx[d] < shape[d]) break;
            so -= ss[d] * shape[d];
            doff -= ds[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/* ---- BINARY -------------------------------------------------------------------------- */

static inline float binop(int64_t kind, float a, float b) {
    switch (kind) {
    case RNN_BIN_ADD: return a + b;
    case RNN_BIN_SUB: return a - b;
    case RNN_BIN_MUL: return a * b;
    case RNN_BIN_DIV: return a / b;
    case RNN_BIN_POW: return powf(a, b);
    case RNN_BIN_MAX: return a != a ? a : (a > b ? a : b); /* NaN in either operand gives NaN, as onnxruntime */
    default: return a != a ? a : (a < b ? a : b);
    }
}

static void op_binary(const int64_t *ip, const float *a, const float *b, float *out) {
    const int64_t kind = ip[0], nd = ip[1];
    const int64_t *shape = ip + 2, *as = ip + 2 + nd, *bs = ip + 2 + 2 * nd;
    int64_t total = 1;
    for (int64_t d = 0; d < nd; d++) total *= shape[d];
    if (total == 0) return;
    if (nd == 0) { out[0] = binop(kind, a[0], b[0]); return; }
    const int64_t inner = shape[nd - 1], sa = as[nd - 1], sb = bs[nd - 1];
    int64_t idx[MAX_ND] = {0};
    int64_t ao = 0, bo = 0;
    for (int64_t o = 0; o < total; o += inner) {
        const float *pa = a + ao, *pb = b + bo;
        float *po = out + o;
        if (kind == RNN_BIN_ADD && sa == 1 && sb == 1) {
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] + pb[i];
        } else if (kind == RNN_BIN_MUL && sa == 1 && sb == 1) {
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] * pb[i];
        } else if (kind == RNN_BIN_ADD && sa == 1 && sb == 0) {
            const float v = pb[0];
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] + v;
        } else if (kind == RNN_BIN_MUL && sa == 1 && sb == 0) {
            const float v = pb[0];
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] * v;
        } else if (kind == RNN_BIN_MAX && sa == 1 && sb == 1) { /* branch-free selects: vectorised */
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] != pa[i] ? pa[i] : (pa[i] > pb[i] ? pa[i] : pb[i]);
        } else if (kind == RNN_BIN_MIN && sa == 1 && sb == 1) {
            for (int64_t i = 0; i < inner; i++) po[i] = pa[i] != pa[i] ? pa[i] : (pa[i] < pb[i] ? pa[i] : pb[i]);
        } else {
            for (int64_t i = 0; i < inner; i++) po[i] = binop(kind, pa[i * sa], pb[i * sb]);
        }
        for (int64_t d = nd - 2; d >= 0; d--) {
            idx[d]++;
            ao += as[d];
            bo += bs[d];
            if (idx[d] < shape[d]) break;
            ao -= as[d] * shape[d];
            bo -= bs[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/* ---- UNARY --------------------------------------------------------------------------- */

static void op_unary(const int64_t *ip, const float *fp, const float *in, float *out) {
    const int64_t kind = ip[0], n = ip[1];
    if (kind == RNN_ACT_RELU) { /* max(x, 0) that keeps NaN, as onnxruntime */
        for (int64_t i = 0; i < n; i++) out[i] = in[i] < 0.0f ? 0.0f : in[i];
        return;
    }
    if ((kind == RNN_ACT_TANH || kind == RNN_ACT_SIGMOID) && out != in) {
        /* The vector tanh / sigmoid saturate NaN to a number; NaN in gives NaN out, as in
         * onnxruntime: blocks small enough that in and out are still in cache when the NaNs
         * are put back. (out == in, never planned, takes the loop below: scalar.) */
        const rnn_activation act = {(int32_t)kind, fp[0], fp[1]};
        for (int64_t s = 0; s < n; s += 4096) {
            const int64_t m = n - s < 4096 ? n - s : 4096;
            const float *x = in + s;
            float *y = out + s;
            memcpy(y, x, sizeof(float) * (size_t)m);
            int32_t nan = 0;
            for (int64_t i = 0; i < m; i++) nan |= (int32_t)(x[i] != x[i]); /* vectorised scan */
            rnn_activation_apply(&act, y, m);
            if (nan)
                for (int64_t i = 0; i < m; i++) y[i] = x[i] != x[i] ? x[i] : y[i];
        }
        return;
    }
    if (out != in) memcpy(out, in, sizeof(float) * (size_t)n);
    if (kind == RNN_ACT_TANH || kind == RNN_ACT_SIGMOID) {
        for (int64_t i = 0; i < n; i++)
            out[i] = kind == RNN_ACT_TANH ? tanhf(out[i]) : 1.0f / (1.0f + expf(-out[i]));
        return;
    }
    if (kind == RNN_ACT_THRESHOLDED_RELU) {
        /* the ThresholdedRelu op: x if x > alpha else 0, so NaN gives 0 as in onnxruntime's op
         * (its LSTM/GRU activation of the same name keeps NaN, and so does the cells' one) */
        for (int64_t i = 0; i < n; i++) out[i] = out[i] > fp[0] ? out[i] : 0.0f;
        return;
    }
    if (kind < RNN_ACT_COUNT) {
        rnn_activation act = {(int32_t)kind, fp[0], fp[1]};
        rnn_activation_apply(&act, out, n);
        return;
    }
    if (kind == RNN_UNARY_SQRT) { /* a loop of its own: vectorised (sqrtf without errno) */
        for (int64_t i = 0; i < n; i++) out[i] = sqrtf(out[i]);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        const float x = out[i];
        switch (kind) {
        case RNN_UNARY_SQRT: out[i] = sqrtf(x); break;
        case RNN_UNARY_EXP: out[i] = expf(x); break;
        case RNN_UNARY_LOG: out[i] = logf(x); break;
        case RNN_UNARY_NEG: out[i] = -x; break;
        case RNN_UNARY_ABS: out[i] = fabsf(x); break;
        case RNN_UNARY_CLIP: { /* min(max(x, lo), hi): hi wins when lo > hi, as onnxruntime; NaN stays */
            const float t = x < fp[0] ? fp[0] : x;
            out[i] = t > fp[1] ? fp[1] : t;
            break;
        }
        case RNN_UNARY_RECIPROCAL: out[i] = 1.0f / x; break;
        case RNN_UNARY_ERF: out[i] = erff(x); break;
        case RNN_UNARY_FLOOR: out[i] = floorf(x); break;
        case RNN_UNARY_CEIL: out[i] = ceilf(x); break;
        default: assert(!"unknown unary kind"); break;
        }
    }
}

/* ---- SOFTMAX ------------------------------------------------------------------------- */

static void op_softmax(const int64_t *ip, const float *in, float *out) {
    const int64_t outer = ip[0], n = ip[1], inner = ip[2], logsm = ip[3];
    for (int64_t o = 0; o < outer; o++) {
        for (int64_t j = 0; j < inner; j++) {
            const float *x = in + o * n * inner + j;
            float *y = out + o * n * inner + j;
            float mx = -INFINITY;
            for (int64_t i = 0; i < n; i++) mx = x[i * inner] > mx ? x[i * inner] : mx;
            double sum = 0.0;
            for (int64_t i = 0; i < n; i++) sum += exp((double)x[i * inner] - mx);
            if (logsm) { /* x - max - log(sum) in double: lse rounded to float first lost the
                          * small part beside a large max (1e6 + 1.3 -> 1e6 + 1.25) */
                const double l = log(sum);
                for (int64_t i = 0; i < n; i++) y[i * inner] = (float)(((double)x[i * inner] - mx) - l);
            } else {
                const double inv = 1.0 / sum;
                for (int64_t i = 0; i < n; i++) y[i * inner] = (float)(exp((double)x[i * inner] - mx) * inv);
            }
        }
    }
}

/* ---- LAYERNORM ------------------------------------------------------------------------ */

/* As the ONNX function defines it at stash_type 1: Mean is a float32 value (the sum taken in
 * double and rounded once; a sum beyond float32's range gives +-inf, as float32 arithmetic
 * does), D = X - Mean, Var = mean(D^2) in a second pass (in double; D^2 or the sum beyond
 * float32's range gives Var = inf, so InvStdDev 0 and Y = B, as onnxruntime and the ONNX
 * reference give), InvStdDev = 1 / sqrt(Var + epsilon), Y = D InvStdDev Scale + B rounded once.
 * Equal to onnxruntime 1.32 within float32 tolerance also on rows 1e5 times their spread
 * from zero (tests/test_layernorm.py), where a float32 sum for the mean (onnx.reference's)
 * is not. A NaN anywhere in a row makes Y and InvStdDev NaN (an infinity too; Mean is then +-inf
 * as in the ONNX reference, where onnxruntime gives NaN). */
static void op_layernorm(const int64_t *ip, float eps, const float *x, const float *scale, const float *bias,
                         float *y, float *mean_out, float *inv_out) {
    const int64_t outer = ip[0], n = ip[1];
    for (int64_t o = 0; o < outer; o++) {
        const float *xr = x + o * n;
        float *yr = y + o * n;
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += xr[i];
        const float mean = fabs(sum) > FLT_MAX ? (float)(sum > 0 ? INFINITY : -INFINITY) : (float)(sum / (double)n);
        double ss = 0.0;
        int over = 0;
        for (int64_t i = 0; i < n; i++) {
            const double d = (double)xr[i] - mean, dd = d * d;
            over |= dd > FLT_MAX;
            ss += dd;
        }
        const double var = isnan(ss) ? ss : over || ss > FLT_MAX ? INFINITY : ss / (double)n;
        const double inv = 1.0 / sqrt(var + (double)eps);
        for (int64_t i = 0; i < n; i++) {
            double v = ((double)xr[i] - mean) * inv;
            if (scale) v *= scale[i];
            if (bias) v += bias[i];
            yr[i] = (float)v;
        }
        if (mean_out) mean_out[o] = mean;
        if (inv_out) inv_out[o] = (float)inv;
    }
}

/* ---- POOL1D ------------------------------------------------------------------------- */

/* The taps k in [0, K) of a window starting at p0 whose positions p0 + k*d lie in [a, b)
 * (the verifier bounds every operand by 2^60, so nothing here overflows). */
static void taps_within(int64_t p0, int64_t d, int64_t K, int64_t a, int64_t b, int64_t *k0, int64_t *k1) {
    int64_t lo = a > p0 ? (a - p0 + d - 1) / d : 0, hi = b > p0 ? (b - p0 + d - 1) / d : 0;
    *k0 = lo < K ? lo : K;
    *k1 = hi < K ? hi : K;
    if (*k1 < *k0) *k1 = *k0;
}

/* A naive loop over windows and their input taps: pooling is a few operations per output,
 * bound by reading x. Max keeps a NaN (as PyTorch and the ONNX reference do; onnxruntime 1.32's
 * MaxPool skips NaN and never goes below -FLT_MAX, README "Accuracy"); average sums in tap
 * order and divides once, onnxruntime's rounding. */
static void op_pool1d(const int64_t *ip, const float *x, float *y) {
    const int64_t rows = ip[0], L = ip[1], Lout = ip[2], K = ip[3], s = ip[4], d = ip[5], off = ip[6];
    const int64_t lo = ip[7], hi = ip[8], kind = ip[9], cnt_lo = ip[10], cnt_hi = ip[11];
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * L;
        float *yr = y + r * Lout;
        for (int64_t j = 0; j < Lout; j++) {
            const int64_t p0 = j * s - off;
            int64_t k0, k1; /* only the taps that read [lo, hi): a kernel of 1e11 with one input tap is one step */
            taps_within(p0, d, K, lo, hi, &k0, &k1);
            if (kind == 0) {
                float m = -INFINITY;
                for (int64_t k = k0; k < k1; k++) {
                    const float v = xr[p0 + k * d];
                    if (v > m || v != v) m = v; /* once NaN, neither test moves m */
                }
                yr[j] = m;
            } else {
                float sum = 0.0f;
                for (int64_t k = k0; k < k1; k++) sum += xr[p0 + k * d];
                int64_t c0, c1;
                if (kind == 2) taps_within(p0, d, K, cnt_lo, cnt_hi, &c0, &c1);
                yr[j] = sum / (float)(kind == 1 ? k1 - k0 : c1 - c0);
            }
        }
    }
}

/* Steps the multi-index idx of a row-major walk over shape (nd) by one element, keeping the
 * element offsets off[k] of k strided operands (strides st[k][nd], 0 where broadcast). */
static inline void odo_next(int64_t nd, const int64_t *shape, int64_t *idx, int k,
                            const int64_t *const *st, int64_t *off) {
    for (int64_t d = nd - 1; d >= 0; d--) {
        idx[d]++;
        for (int j = 0; j < k; j++) off[j] += st[j][d];
        if (idx[d] < shape[d]) return;
        for (int j = 0; j < k; j++) off[j] -= st[j][d] * shape[d];
        idx[d] = 0;
    }
}

/* ---- BMATMUL ------------------------------------------------------------------------ */

/* One product per batch index, through BLAS (rnn_gemm_nn; a naive loop without it): each
 * matrix's result depends on its own operands only, so a batch row gets the same bits whatever
 * the other rows (a thread split included). */
static void op_bmatmul(const int64_t *ip, const float *A, const float *B, float *Y) {
    const int64_t nd = ip[0], M = ip[1], N = ip[2], K = ip[3];
    const int64_t *shape = ip + 4, *as = ip + 4 + nd, *bs = ip + 4 + 2 * nd;
    if (M == 0 || N == 0) return; /* an empty result: no product to walk (the batch may be huge) */
    int64_t total = 1;
    for (int64_t d = 0; d < nd; d++) total *= shape[d];
    int64_t idx[MAX_ND] = {0}, off[2] = {0, 0};
    const int64_t *const st[2] = {as, bs};
    for (int64_t i = 0; i < total; i++) {
        rnn_gemm_nn(M, N, K, 1.0f, A + off[0], K, B + off[1], N, 0.0f, Y + i * M * N, N);
        odo_next(nd, shape, idx, 2, st, off);
    }
}

/* ---- GATHER -------------------------------------------------------------------------- */

static rnn_status op_gather(const int64_t *ip, const char *data, const int64_t *idx, char *out,
                            char *err, size_t errlen) {
    const int64_t es = ip[0], outer = ip[1], n = ip[2], inner = ip[3], n_idx = ip[4];
    for (int64_t k = 0; k < n_idx; k++) {
        if (idx[k] < -n || idx[k] >= n) {
            char msg[160];
            snprintf(msg, sizeof msg, "Gather: index %lld at position %lld is outside [-%lld, %lld)",
                     (long long)idx[k], (long long)k, (long long)n, (long long)n);
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
        }
    }
    const size_t row = (size_t)(inner * es);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t k = 0; k < n_idx; k++) {
            const int64_t j = idx[k] < 0 ? idx[k] + n : idx[k];
            memcpy(out + (o * n_idx + k) * (int64_t)row, data + (o * n + j) * (int64_t)row, row);
        }
    return RNN_STATUS_OK;
}

/* ---- CONV1D -------------------------------------------------------------------------- */

static void op_conv1d(const int64_t *ip, const float *x, const float *W, const float *bias,
                      float *out, float *work) {
    const int64_t N = ip[0], C = ip[1], L = ip[2], M = ip[3], K = ip[4], Lout = ip[5];
    const int64_t stride = ip[6], dil = ip[7], pad = ip[8], G = ip[9];
    const int64_t Cg = C / G, Mg = M / G, CK = Cg * K;
    float *colT = work; /* (Lout, Cg*K): colT[l][c*K + k] = x[c][l*stride + k*dil - pad] */
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const float *xg = x + (n * C + g * Cg) * L;
            rnn_im2col(xg, Cg, L, K, stride, dil, pad, 0, Lout, colT);
            float *og = out + (n * M + g * Mg) * Lout;
            /* og (Mg, Lout) = W_g (Mg, CK) @ colT (Lout, CK)^T */
            rnn_gemm_nt(Mg, Lout, CK, 1.0f, W + g * Mg * CK, CK, colT, CK, 0.0f, og, Lout, 1);
            if (bias)
                for (int64_t m = 0; m < Mg; m++)
                    for (int64_t l = 0; l < Lout; l++) og[m * Lout + l] += bias[g * Mg + m];
        }
    }
}

/* ---- PAD ----------------------------------------------------------------------------- */

static void op_pad(const int64_t *ip, const char *in, char *out) {
    const int64_t es = ip[0], nd = ip[1];
    const int64_t *oshape = ip + 2, *istr = ip + 2 + nd, *mstart = ip + 2 + 2 * nd;
    int64_t total = 1;
    for (int64_t d = 0; d < nd; d++) total *= oshape[d];
    int64_t idx[MAX_ND] = {0};
    /* the fill element, from the low bytes of its int64 (on any byte order) */
    const int64_t fw = ip[2 + 3 * nd];
    const uint8_t f1 = (uint8_t)fw;
    const uint16_t f2 = (uint16_t)fw;
    const uint32_t f4 = (uint32_t)fw;
    const void *fill = es == 1 ? (const void *)&f1 : es == 2 ? (const void *)&f2 : es == 4 ? (const void *)&f4 : (const void *)&fw;
    if (nd == 0 || total == 0) {
        if (total) memcpy(out, in, (size_t)es);
        return;
    }
    /* rows along the innermost axis: the outer axes give a row's base offset (or put the
     * whole row in the padding), the innermost axis' map its elements */
    const int64_t inner = oshape[nd - 1], *imap = ip + mstart[nd - 1], istep = istr[nd - 1];
    for (int64_t o = 0; o < total; o += inner) {
        int64_t off = 0, outside = 0;
        for (int64_t d = 0; d < nd - 1; d++) {
            const int64_t m = ip[mstart[d] + idx[d]];
            if (m < 0) { outside = 1; break; }
            off += m * istr[d];
        }
        if (es == 4) {
            const uint32_t *src = (const uint32_t *)(const void *)in + off;
            uint32_t *dst = (uint32_t *)(void *)out + o;
            for (int64_t i = 0; i < inner; i++) dst[i] = (outside || imap[i] < 0) ? f4 : src[imap[i] * istep];
        } else {
            for (int64_t i = 0; i < inner; i++)
                memcpy(out + (o + i) * es, (outside || imap[i] < 0) ? fill : in + (off + imap[i] * istep) * es, (size_t)es);
        }
        for (int64_t d = nd - 2; d >= 0; d--) {
            if (++idx[d] < oshape[d]) break;
            idx[d] = 0;
        }
    }
}

/* ---- REDUCE -------------------------------------------------------------------------- */

static void op_reduce(const int64_t *ip, const float *in, float *out) {
    const int64_t kind = ip[0], nd = ip[1];
    const int64_t *ishape = ip + 2, *ostr = ip + 2 + nd;
    const int64_t out_n = ip[2 + 2 * nd], count = ip[3 + 2 * nd];
    const float init = kind == RNN_REDUCE_MAX ? -INFINITY
                     : (kind == RNN_REDUCE_MIN ? INFINITY : (kind == RNN_REDUCE_PROD ? 1.0f : 0.0f));
    for (int64_t i = 0; i < out_n; i++) out[i] = init;
    int64_t total = 1;
    for (int64_t d = 0; d < nd; d++) total *= ishape[d];
    int64_t idx[MAX_ND] = {0};
    int64_t oo = 0;
    if ((kind == RNN_REDUCE_MAX || kind == RNN_REDUCE_MIN) && nd > 0 && ostr[nd - 1] == 0 && ishape[nd - 1] > 0) {
        /* max / min over the innermost axis: rows of L into one output each; the running
         * max / min ignores NaN (branch-free), a NaN seen makes the result NaN */
        const int64_t L = ishape[nd - 1];
        for (int64_t r = 0; r < total; r += L) {
            const float *row = in + r;
            float m = out[oo];
            int nan = m != m;
            if (kind == RNN_REDUCE_MAX)
                for (int64_t i = 0; i < L; i++) { m = row[i] > m ? row[i] : m; nan |= row[i] != row[i]; }
            else
                for (int64_t i = 0; i < L; i++) { m = row[i] < m ? row[i] : m; nan |= row[i] != row[i]; }
            out[oo] = nan ? NAN : m;
            for (int64_t d = nd - 2; d >= 0; d--) {
                oo += ostr[d];
                if (++idx[d] < ishape[d]) break;
                oo -= ostr[d] * ishape[d];
                idx[d] = 0;
            }
        }
        return;
    }
    if ((kind == RNN_REDUCE_SUM || kind == RNN_REDUCE_MEAN) && nd > 0) {
        /* a sum / mean over the innermost axes (the reduced ones a suffix of the shape: a mean
         * over features, GlobalAveragePool, LayerNormalization spelled out): each output is a
         * contiguous block of G elements, summed in double and rounded once. A float32
         * running sum of n values errs by up to ~n ulps of the largest partial sum; a variance
         * computed from such a mean (x - mean over offset data) magnifies that error. */
        int64_t k = nd, G = 1, ok = 1;
        while (k > 0 && ostr[k - 1] == 0) G *= ishape[--k];
        for (int64_t d = 0; d < k; d++) ok &= ostr[d] != 0 || ishape[d] <= 1;
        if (ok && k < nd && G > 0 && out_n * G == total) {
            for (int64_t g = 0; g < out_n; g++) {
                const float *row = in + g * G;
                double s = 0.0;
                for (int64_t i = 0; i < G; i++) s += row[i];
                out[g] = (float)(kind == RNN_REDUCE_MEAN && count > 0 ? s / (double)count : s);
            }
            return;
        }
    }
    for (int64_t i = 0; i < total; i++) {
        const float v = in[i];
        switch (kind) {
        /* NaN wins, as in NumPy and PyTorch (onnxruntime 1.32's ReduceMax/Min give NaN only
         * for some positions of the NaN in the row: tests/test_nan.py) */
        case RNN_REDUCE_MAX: out[oo] = (v > out[oo] || v != v) ? v : out[oo]; break;
        case RNN_REDUCE_MIN: out[oo] = (v < out[oo] || v != v) ? v : out[oo]; break;
        case RNN_REDUCE_PROD: out[oo] *= v; break;
        default: out[oo] += v; break;
        }
        for (int64_t d = nd - 1; d >= 0; d--) {
            oo += ostr[d];
            if (++idx[d] < ishape[d]) break;
            oo -= ostr[d] * ishape[d];
            idx[d] = 0;
        }
    }
    if (kind == RNN_REDUCE_MEAN && count > 0)
        for (int64_t i = 0; i < out_n; i++) out[i] /= (float)count;
}

/* ---- CAST ---------------------------------------------------------------------------- */

/* float -> int as static_cast on x86-64 (what onnxruntime does): truncation toward 0, and
 * the type's minimum for NaN, infinities and values out of range. */
static int64_t f32_to_i64(float v) {
    if (!(v >= -9223372036854775808.0f && v < 9223372036854775808.0f)) return INT64_MIN;
    return (int64_t)v;
}
static int32_t f32_to_i32(float v) {
    if (!(v >= -2147483648.0f && v < 2147483648.0f)) return INT32_MIN;
    return (int32_t)v;
}

static void op_cast(const int64_t *ip, const void *in, void *out) {
    const int64_t from = ip[0], to = ip[1], n = ip[2];
    for (int64_t i = 0; i < n; i++) {
        /* the value as the widest exact type of its kind */
        int64_t iv = 0;
        float fv = 0.0f;
        switch (from) {
        case RNN_DT_F32: fv = ((const float *)in)[i]; break;
        case RNN_DT_I64: iv = ((const int64_t *)in)[i]; break;
        case RNN_DT_I32: iv = ((const int32_t *)in)[i]; break;
        default: iv = ((const uint8_t *)in)[i]; break;
        }
        if (from == RNN_DT_F32) {
            switch (to) {
            case RNN_DT_F32: ((float *)out)[i] = fv; break;
            case RNN_DT_I64: ((int64_t *)out)[i] = f32_to_i64(fv); break;
            case RNN_DT_I32: ((int32_t *)out)[i] = f32_to_i32(fv); break;
            case RNN_DT_U8: ((uint8_t *)out)[i] = (uint8_t)(uint32_t)f32_to_i32(fv); break;
            default: ((uint8_t *)out)[i] = fv != 0.0f; break; /* NaN -> true */
            }
        } else {
            switch (to) {
            case RNN_DT_F32: ((float *)out)[i] = (float)iv; break; /* one rounding, to nearest */
            case RNN_DT_I64: ((int64_t *)out)[i] = iv; break;
            case RNN_DT_I32: ((int32_t *)out)[i] = (int32_t)(uint32_t)(uint64_t)iv; break; /* low 32 bits */
            case RNN_DT_U8: ((uint8_t *)out)[i] = (uint8_t)(uint64_t)iv; break;
            default: ((uint8_t *)out)[i] = iv != 0; break;
            }
        }
    }
}

/* ---- TOPK ---------------------------------------------------------------------------- */

/* -1, 0, 1 as element i of x is smaller than, equal to or larger than element j, in its own
 * type (int64 beyond 2^53 compares exactly); NaN is larger than any number, equal to NaN. */
static int compare_elems(int64_t dt, const void *x, int64_t i, int64_t j) {
    switch (dt) {
    case RNN_DT_F32: {
        const float u = ((const float *)x)[i], v = ((const float *)x)[j];
        if (u != u || v != v) return (u != u) - (v != v);
        return (u > v) - (u < v);
    }
    case RNN_DT_I64: {
        const int64_t u = ((const int64_t *)x)[i], v = ((const int64_t *)x)[j];
        return (u > v) - (u < v);
    }
    case RNN_DT_I32: {
        const int32_t u = ((const int32_t *)x)[i], v = ((const int32_t *)x)[j];
        return (u > v) - (u < v);
    }
    default: {
        const uint8_t u = ((const uint8_t *)x)[i], v = ((const uint8_t *)x)[j];
        return (u > v) - (u < v);
    }
    }
}

static rnn_status op_topk(const int64_t *ip, const void *x, void *vals, int64_t *idx, int64_t *scratch,
                          char *err, size_t errlen) {
    const int64_t dt = ip[0], outer = ip[1], n = ip[2], inner = ip[3], k = ip[4], largest = ip[5];
    if (k < 0 || k > n) return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, "TopK: k is out of range");
    for (int64_t o = 0; o < outer; o++)
        for (int64_t j = 0; j < inner; j++) {
            /* stable insertion sort of the n positions by value (n is small: a batch); NaN
             * counts as larger than every number, as onnxruntime */
            int64_t *order = scratch;
            for (int64_t i = 0; i < n; i++) {
                const int64_t vi = (o * n + i) * inner + j;
                int64_t p = i;
                while (p > 0) {
                    const int c = compare_elems(dt, x, (o * n + order[p - 1]) * inner + j, vi);
                    if (largest ? (c >= 0) : (c <= 0)) break;
                    order[p] = order[p - 1];
                    p--;
                }
                order[p] = i;
            }
            for (int64_t r = 0; r < k; r++) {
                const int64_t src = (o * n + order[r]) * inner + j, dst = (o * k + r) * inner + j;
                idx[dst] = order[r];
                if (dt == RNN_DT_F32) ((float *)vals)[dst] = ((const float *)x)[src];
                else if (dt == RNN_DT_I64) ((int64_t *)vals)[dst] = ((const int64_t *)x)[src];
                else if (dt == RNN_DT_I32) ((int32_t *)vals)[dst] = ((const int32_t *)x)[src];
                else ((uint8_t *)vals)[dst] = ((const uint8_t *)x)[src];
            }
        }
    return RNN_STATUS_OK;
}

/* ---- SCATTER (ScatterElements, no reduction) ------------------------------------------ */

static rnn_status op_scatter(const int64_t *ip, const char *data, const int64_t *idx, const char *upd,
                             char *out, char *err, size_t errlen) {
    const int64_t es = ip[0], nd = ip[1], axis = ip[2 + 2 * nd];
    const int64_t *dshape = ip + 2, *ishape = ip + 2 + nd;
    int64_t dn = 1, in = 1, dstr[MAX_ND];
    for (int64_t d = nd - 1; d >= 0; d--) {
        dstr[d] = dn;
        dn *= dshape[d];
    }
    for (int64_t d = 0; d < nd; d++) in *= ishape[d];
    memcpy(out, data, (size_t)(dn * es));
    int64_t pos[MAX_ND] = {0};
    for (int64_t i = 0; i < in; i++) {
        int64_t j = idx[i];
        const int64_t n = dshape[axis];
        if (j < -n || j >= n) {
            char msg[160];
            snprintf(msg, sizeof msg, "ScatterElements: index %lld is outside [-%lld, %lld)", (long long)j,
                     (long long)n, (long long)n);
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
        }
        if (j < 0) j += n;
        int64_t off = 0;
        for (int64_t d = 0; d < nd; d++) off += (d == axis ? j : pos[d]) * dstr[d];
        memcpy(out + off * es, upd + i * es, (size_t)es);
        for (int64_t d = nd - 1; d >= 0; d--) {
            if (++pos[d] < ishape[d]) break;
            pos[d] = 0;
        }
    }
    return RNN_STATUS_OK;
}

/* ---- typed ops: integers and bools ---------------------------------------------------- */

static int64_t dtype_size(int64_t dt) {
    switch (dt) {
    case RNN_DT_F32: return 4;
    case RNN_DT_I64: return 8;
    case RNN_DT_I32: return 4;
    case RNN_DT_U8: return 1;
    case RNN_DT_BOOL: return 1;
    default: return 0;
    }
}

/* x (kind) y over one integer type T (unsigned twin U, minimum TMIN): returns 0, or 1 for a
 * division by zero, 2 for TMIN / -1. + - * wrap around (two's complement). */
#define DEFINE_INT_BINOP(NAME, T, U, TMIN)                                                   \
    static int NAME(int64_t kind, T x, T y, T *r) {                                         \
        switch (kind) {                                                                      \
        case RNN_BIN_ADD: *r = (T)((U)x + (U)y); return 0;                                  \
        case RNN_BIN_SUB: *r = (T)((U)x - (U)y); return 0;                                  \
        case RNN_BIN_MUL: *r = (T)((U)x * (U)y); return 0;                                  \
        case RNN_BIN_DIV:                                                                    \
            if (y == 0) return 1;                                                            \
            if (x == TMIN && y == -1) return 2;                                              \
            *r = x / y; /* C division truncates toward 0, as ONNX integer Div */             \
            return 0;                                                                        \
        case RNN_BIN_MAX: *r = x > y ? x : y; return 0;                                      \
        case RNN_BIN_MIN: *r = x < y ? x : y; return 0;                                      \
        case RNN_BIN_MOD:                                                                    \
        case RNN_BIN_FMOD: {                                                                 \
            if (y == 0) return 1;                                                            \
            T m = y == -1 ? 0 : x % y; /* the dividend's sign (TMIN % -1 is 0, not a trap) */ \
            if (kind == RNN_BIN_MOD && m != 0 && ((m < 0) != (y < 0))) m += y; /* the divisor's sign */ \
            *r = m;                                                                          \
            return 0;                                                                        \
        }                                                                                    \
        default: return 3;                                                                   \
        }                                                                                    \
    }
DEFINE_INT_BINOP(binop_i64, int64_t, uint64_t, INT64_MIN)
DEFINE_INT_BINOP(binop_i32, int32_t, uint32_t, INT32_MIN)

static float binop_f32(int64_t kind, float x, float y) {
    switch (kind) {
    case RNN_BIN_FMOD: return fmodf(x, y); /* Mod with fmod=1: std::fmod, as onnxruntime */
    default: return binop(kind, x, y);
    }
}

/* comparison / logic kind (RNN_BIN_EQUAL..RNN_BIN_XOR) of two values */
#define CMP_KIND(kind, x, y)                                                                 \
    ((kind) == RNN_BIN_EQUAL ? (x) == (y) : (kind) == RNN_BIN_LESS ? (x) < (y)               \
     : (kind) == RNN_BIN_LESS_EQUAL ? (x) <= (y) : (kind) == RNN_BIN_GREATER ? (x) > (y)     \
     : (kind) == RNN_BIN_GREATER_EQUAL ? (x) >= (y)                                          \
     : (kind) == RNN_BIN_AND ? ((x) != 0) & ((y) != 0)                                       \
     : (kind) == RNN_BIN_OR ? ((x) != 0) | ((y) != 0)                                        \
     : ((x) != 0) ^ ((y) != 0))

static rnn_status op_tbinary(const int64_t *ip, const void *a, const void *b, void *out, char *err,
                             size_t errlen) {
    const int64_t dt = ip[0], kind = ip[1], nd = ip[2];
    const int64_t *shape = ip + 3;
    const int64_t *st[2] = {ip + 3 + nd, ip + 3 + 2 * nd};
    int64_t total = 1, idx[MAX_ND] = {0}, off[2] = {0, 0};
    for (int64_t d = 0; d < nd; d++) total *= shape[d];
    for (int64_t o = 0; o < total; o++, odo_next(nd, shape, idx, 2, st, off)) {
        const int64_t i = off[0], j = off[1];
        int bad = 0;
        if (kind >= RNN_BIN_EQUAL) {
            int c;
            switch (dt) {
            case RNN_DT_F32: c = CMP_KIND(kind, ((const float *)a)[i], ((const float *)b)[j]); break;
            case RNN_DT_I64: c = CMP_KIND(kind, ((const int64_t *)a)[i], ((const int64_t *)b)[j]); break;
            case RNN_DT_I32: c = CMP_KIND(kind, ((const int32_t *)a)[i], ((const int32_t *)b)[j]); break;
            default: c = CMP_KIND(kind, ((const uint8_t *)a)[i], ((const uint8_t *)b)[j]); break;
            }
            ((uint8_t *)out)[o] = (uint8_t)(c != 0);
            continue;
        }
        switch (dt) {
        case RNN_DT_F32: ((float *)out)[o] = binop_f32(kind, ((const float *)a)[i], ((const float *)b)[j]); break;
        case RNN_DT_I64: bad = binop_i64(kind, ((const int64_t *)a)[i], ((const int64_t *)b)[j], (int64_t *)out + o); break;
        case RNN_DT_I32: bad = binop_i32(kind, ((const int32_t *)a)[i], ((const int32_t *)b)[j], (int32_t *)out + o); break;
        default: bad = 3; break;
        }
        if (bad) {
            static const char *const what[] = {"", "an integer division or modulo by zero",
                                               "an integer division overflows (the minimum / -1)",
                                               "an operation this element type does not have"};
            char msg[160];
            snprintf(msg, sizeof msg, "%s at element %lld", what[bad], (long long)o);
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
        }
    }
    return RNN_STATUS_OK;
}

static void op_tunary(const int64_t *ip, const void *in, void *out) {
    const int64_t dt = ip[0], kind = ip[1], n = ip[2];
    for (int64_t i = 0; i < n; i++) {
        if (dt == RNN_DT_I64) {
            const int64_t x = ((const int64_t *)in)[i];
            const uint64_t neg = (uint64_t)0 - (uint64_t)x; /* wraps: -INT64_MIN is INT64_MIN */
            ((int64_t *)out)[i] = (kind == RNN_TUNARY_NEG || x < 0) ? (int64_t)neg : x;
        } else if (dt == RNN_DT_I32) {
            const int32_t x = ((const int32_t *)in)[i];
            const uint32_t neg = (uint32_t)0 - (uint32_t)x;
            ((int32_t *)out)[i] = (kind == RNN_TUNARY_NEG || x < 0) ? (int32_t)neg : x;
        } else {
            ((uint8_t *)out)[i] = ((const uint8_t *)in)[i] == 0; /* Not */
        }
    }
}

static void op_where(const int64_t *ip, const uint8_t *cond, const char *x, const char *y, char *out) {
    const int64_t es = ip[0], nd = ip[1];
    const int64_t *shape = ip + 2;
    const int64_t *st[3] = {ip + 2 + nd, ip + 2 + 2 * nd, ip + 2 + 3 * nd};
    int64_t total = 1, idx[MAX_ND] = {0}, off[3] = {0, 0, 0};
    for (int64_t d = 0; d < nd; d++) total *= shape[d];
    for (int64_t o = 0; o < total; o++, odo_next(nd, shape, idx, 3, st, off)) {
        const char *src = cond[off[0]] ? x + off[1] * es : y + off[2] * es;
        switch (es) {
        case 8: memcpy(out + o * 8, src, 8); break;
        case 4: memcpy(out + o * 4, src, 4); break;
        default: memcpy(out + o * es, src, (size_t)es); break;
        }
    }
}

/* ip as REDUCE after the dtype; one integer type T with unsigned twin U */
/* Integer reductions; 1 when a sum or product overflows T (onnxruntime saturates some and
 * computes a mean exactly: an overflow is refused rather than wrapped). */
#define DEFINE_INT_REDUCE(NAME, T, U, TMIN, TMAX)                                            \
    static int NAME(const int64_t *ip, const T *in, T *out) {                                \
        const int64_t kind = ip[0], nd = ip[1];                                              \
        const int64_t *ishape = ip + 2, *ostr = ip + 2 + nd;                                 \
        const int64_t out_n = ip[2 + 2 * nd], count = ip[3 + 2 * nd];                        \
        const T init = kind == RNN_REDUCE_MAX ? TMIN                                         \
                     : (kind == RNN_REDUCE_MIN ? TMAX : (kind == RNN_REDUCE_PROD ? 1 : 0));  \
        for (int64_t i = 0; i < out_n; i++) out[i] = init;                                   \
        int64_t total = 1, idx[MAX_ND] = {0}, oo = 0;                                        \
        for (int64_t d = 0; d < nd; d++) total *= ishape[d];                                 \
        for (int64_t i = 0; i < total; i++) {                                                \
            const T v = in[i];                                                               \
            switch (kind) {                                                                  \
            case RNN_REDUCE_MAX: out[oo] = v > out[oo] ? v : out[oo]; break;                 \
            case RNN_REDUCE_MIN: out[oo] = v < out[oo] ? v : out[oo]; break;                 \
            case RNN_REDUCE_PROD:                                                            \
                if (__builtin_mul_overflow(out[oo], v, &out[oo])) return 1;                  \
                break;                                                                       \
            default:                                                                         \
                if (__builtin_add_overflow(out[oo], v, &out[oo])) return 1;                  \
                break;                                                                       \
            }                                                                                \
            for (int64_t d = nd - 1; d >= 0; d--) {                                          \
                oo += ostr[d];                                                               \
                if (++idx[d] < ishape[d]) break;                                             \
                oo -= ostr[d] * ishape[d];                                                   \
                idx[d] = 0;                                                                  \
            }                                                                                \
        }                                                                                    \
        if (kind == RNN_REDUCE_MEAN && count > 0)                                            \
            for (int64_t i = 0; i < out_n; i++) out[i] = (T)(out[i] / (T)count);             \
        return 0;                                                                            \
    }
DEFINE_INT_REDUCE(reduce_i64, int64_t, uint64_t, INT64_MIN, INT64_MAX)
DEFINE_INT_REDUCE(reduce_i32, int32_t, uint32_t, INT32_MIN, INT32_MAX)

/* x (outer, n, inner) -> out (outer, inner) int64; n >= 1 */
#define ARG_SCAN(T)                                                                          \
    do {                                                                                     \
        const T *xv = (const T *)x;                                                          \
        for (int64_t o = 0; o < outer; o++)                                                  \
            for (int64_t j = 0; j < inner; j++) {                                            \
                const T *p = xv + o * n * inner + j;                                         \
                T best = p[0];                                                               \
                int64_t at = 0;                                                              \
                for (int64_t i = 1; i < n; i++) {                                            \
                    const T v = p[i * inner];                                                \
                    const int better = is_min ? (last ? v <= best : v < best)                \
                                              : (last ? v >= best : v > best);               \
                    if (better) { best = v; at = i; }                                        \
                }                                                                            \
                out[o * inner + j] = at;                                                     \
            }                                                                                \
    } while (0)

static void op_argmax(const int64_t *ip, const void *x, int64_t *out) {
    const int64_t dt = ip[0], outer = ip[1], n = ip[2], inner = ip[3], is_min = ip[4], last = ip[5];
    switch (dt) {
    case RNN_DT_F32: ARG_SCAN(float); break;
    case RNN_DT_I64: ARG_SCAN(int64_t); break;
    case RNN_DT_I32: ARG_SCAN(int32_t); break;
    default: ARG_SCAN(uint8_t); break;
    }
}

/* x (outer, n, inner): out[i] = sum of x[k] over k < i (exclusive) or k <= i, or over k > i
 * / k >= i when reverse; sums in the element type (integers wrap), in order from the start. */
#define CUM_SCAN(T, ADD)                                                                     \
    do {                                                                                     \
        const T *xv = (const T *)x;                                                          \
        T *ov = (T *)out;                                                                    \
        for (int64_t o = 0; o < outer; o++)                                                  \
            for (int64_t j = 0; j < inner; j++) {                                            \
                T acc = 0;                                                                   \
                for (int64_t s = 0; s < n; s++) {                                            \
                    const int64_t i = reverse ? n - 1 - s : s;                               \
                    const int64_t at = (o * n + i) * inner + j;                              \
                    const T v = xv[at];                                                      \
                    if (exclusive) { ov[at] = acc; acc = ADD(acc, v); }                      \
                    else { acc = ADD(acc, v); ov[at] = acc; }                                \
                }                                                                            \
            }                                                                                \
    } while (0)
#define ADD_F(a, b) ((a) + (b))
#define ADD_I64(a, b) ((int64_t)((uint64_t)(a) + (uint64_t)(b)))
#define ADD_I32(a, b) ((int32_t)((uint32_t)(a) + (uint32_t)(b)))

static void op_cumsum(const int64_t *ip, const void *x, void *out) {
    const int64_t dt = ip[0], outer = ip[1], n = ip[2], inner = ip[3], exclusive = ip[4], reverse = ip[5];
    switch (dt) {
    case RNN_DT_F32: CUM_SCAN(float, ADD_F); break;
    case RNN_DT_I64: CUM_SCAN(int64_t, ADD_I64); break;
    default: CUM_SCAN(int32_t, ADD_I32); break;
    }
}

static rnn_status op_revseq(const int64_t *ip, const char *x, const int64_t *lens, char *out, char *err,
                            size_t errlen) {
    const int64_t es = ip[0], T = ip[1], B = ip[2], inner = ip[3], time_major = ip[4];
    for (int64_t b = 0; b < B; b++)
        if (lens[b] < 0 || lens[b] > T) {
            char msg[160];
            snprintf(msg, sizeof msg, "sequence_lens[%lld] = %lld lies outside [0, T = %lld]", (long long)b,
                     (long long)lens[b], (long long)T);
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
        }
    const size_t row = (size_t)(inner * es);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const int64_t src = t < lens[b] ? lens[b] - 1 - t : t;
            const int64_t so = time_major ? src * B + b : b * T + src;
            const int64_t dof = time_major ? t * B + b : b * T + t;
            memcpy(out + dof * (int64_t)row, x + so * (int64_t)row, row);
        }
    return RNN_STATUS_OK;
}

/* Checks what a typed instruction is given before it runs: its dtype and kind codes, rank,
 * sizes, and that the planner laid out as many parameters as the op reads (nip). Returns a
 * message naming what is wrong, or NULL. */
static const char *check_typed(int64_t op, const int64_t *ip, int64_t nip) {
    if (nip < 2) return "too few parameters";
    const int64_t dt = ip[0];
    if (op != RNN_OP_WHERE && op != RNN_OP_REVSEQ && dtype_size(dt) == 0) return "unknown element type code";
    switch (op) {
    case RNN_OP_TBINARY: {
        if (nip < 3) return "too few parameters";
        const int64_t kind = ip[1], nd = ip[2];
        if (nd < 0 || nd > MAX_ND || nip != 3 + 3 * nd) return "rank or parameter count does not fit";
        const int is_int = dt == RNN_DT_I64 || dt == RNN_DT_I32;
        const int is_byte = dt == RNN_DT_U8 || dt == RNN_DT_BOOL;
        const int ok = (kind >= RNN_BIN_EQUAL && kind <= RNN_BIN_GREATER_EQUAL) ||
                       (kind >= RNN_BIN_AND && kind <= RNN_BIN_XOR && is_byte) ||
                       (is_int && ((kind >= RNN_BIN_ADD && kind <= RNN_BIN_DIV) ||
                                   (kind >= RNN_BIN_MAX && kind <= RNN_BIN_FMOD))) ||
                       (dt == RNN_DT_F32 && kind == RNN_BIN_FMOD);
        if (!ok) return "an operation this element type does not have";
        for (int64_t d = 0; d < nd; d++)
            if (ip[3 + d] < 0) return "a negative dimension";
        return NULL;
    }
    case RNN_OP_TUNARY: {
        const int64_t kind = ip[1];
        const int is_int = dt == RNN_DT_I64 || dt == RNN_DT_I32;
        if (nip != 3 || ip[2] < 0) return "parameter count or size does not fit";
        if (!(((kind == RNN_TUNARY_NEG || kind == RNN_TUNARY_ABS) && is_int) ||
              (kind == RNN_TUNARY_NOT && dt == RNN_DT_BOOL)))
            return "an operation this element type does not have";
        return NULL;
    }
    case RNN_OP_WHERE: {
        const int64_t nd = ip[1];
        if (!(dt == 1 || dt == 2 || dt == 4 || dt == 8)) return "element size must be 1, 2, 4 or 8 bytes";
        if (nd < 0 || nd > MAX_ND || nip != 2 + 4 * nd) return "rank or parameter count does not fit";
        return NULL;
    }
    case RNN_OP_TREDUCE: {
        if (nip < 3) return "too few parameters";
        const int64_t kind = ip[1], nd = ip[2];
        if (dt != RNN_DT_I64 && dt != RNN_DT_I32) return "integer reductions take int64 or int32";
        if (kind < RNN_REDUCE_SUM || kind > RNN_REDUCE_PROD) return "unknown reduction";
        if (nd < 0 || nd > MAX_ND || nip != 5 + 2 * nd) return "rank or parameter count does not fit";
        return NULL;
    }
    case RNN_OP_ARGMAX:
    case RNN_OP_CUMSUM:
        if (nip != 6 || ip[1] < 0 || ip[2] < 0 || ip[3] < 0) return "parameter count or sizes do not fit";
        if (op == RNN_OP_ARGMAX && ip[2] < 1) return "an empty axis has no arg max / min";
        if (op == RNN_OP_CUMSUM && !(dt == RNN_DT_F32 || dt == RNN_DT_I64 || dt == RNN_DT_I32))
            return "CumSum takes float32, int64 or int32";
        return NULL;
    case RNN_OP_REVSEQ:
        if (nip != 5 || dt <= 0 || ip[1] < 0 || ip[2] < 0 || ip[3] < 0) return "parameter count or sizes do not fit";
        return NULL;
    case RNN_OP_CAST:
        if (nip != 3 || dtype_size(ip[1]) == 0 || ip[2] < 0) return "parameter count or element type code does not fit";
        return NULL;
    default: return NULL;
    }
}

/* ---- RECURRENT ----------------------------------------------------------------------- */

static rnn_status op_recurrent(const int64_t *ip, const rnn_stack *stack, void *const *tensors,
                               const int64_t *ins, const int64_t *outs, float *work, char *err,
                               size_t errlen, int32_t threads) {
    const int64_t T = ip[0], B = ip[1], layout = ip[2], D = ip[3], H = ip[4], has_c = ip[5];
    const int64_t init_mode = ip[7];
    float *state = tensors[ip[6]];
    float *started = ip[8] >= 0 ? tensors[ip[8]] : NULL;
    const float *X = tensors[ins[0]];
    const int32_t *lens = ins[1] >= 0 ? tensors[ins[1]] : NULL;
    float *Y = tensors[outs[0]];
    const int64_t block = D * B * H; /* one of h, c in the state: (D, B, H) */
    if (lens)
        for (int64_t b = 0; b < B; b++)
            if (lens[b] < 0 || lens[b] > T) {
                char msg[160];
                snprintf(msg, sizeof msg, "sequence_lens[%lld] = %d lies outside [0, T = %lld]",
                         (long long)b, (int)lens[b], (long long)T);
                return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
            }
    if (init_mode == 0) {
        memset(state, 0, sizeof(float) * (size_t)(block * (has_c ? 2 : 1)));
    } else if (init_mode == 2) {
        if (ins[2] >= 0) memcpy(state, tensors[ins[2]], sizeof(float) * (size_t)block);
        else memset(state, 0, sizeof(float) * (size_t)block);
        if (has_c) {
            if (ins[3] >= 0) memcpy(state + block, tensors[ins[3]], sizeof(float) * (size_t)block);
            else memset(state + block, 0, sizeof(float) * (size_t)block);
        }
    }
    /* Y (T, D, B, H) for layout 0, (B, T, D, H) for layout 1 */
    const int64_t ys_t = layout ? D * H : D * B * H, ys_b = layout ? T * D * H : H, ys_d = layout ? H : B * H;
    rnn_status st = rnn_stack_forward_threads(stack, X, T, B, (int32_t)layout, lens, Y, ys_t, ys_b, ys_d, state,
                                              work, threads);
    if (st != RNN_STATUS_OK) return fail(err, errlen, st, "recurrent layer: the stack refused its inputs");
    /* Y_h, Y_c: (D, B, H) for layout 0, (B, D, H) for layout 1. Rows of length 0 give 0, as
     * onnxruntime does for an empty sequence, except in a stream for a row that has had a step
     * in an earlier call (started): its sequence ended there, and its state carries on. */
    for (int64_t k = 0; k < (has_c ? 2 : 1); k++) {
        if (outs[1 + k] < 0) continue;
        float *dst = tensors[outs[1 + k]];
        const float *src = state + k * block;
        for (int64_t d = 0; d < D; d++)
            for (int64_t b = 0; b < B; b++) {
                float *o = dst + (layout ? (b * D + d) * H : (d * B + b) * H);
                const int carried = started ? started[b] != 0.0f : init_mode == 1;
                if (lens && lens[b] == 0 && !carried) memset(o, 0, sizeof(float) * (size_t)H);
                else memcpy(o, src + (d * B + b) * H, sizeof(float) * (size_t)H);
            }
    }
    if (started && lens)
        for (int64_t b = 0; b < B; b++)
            if (lens[b] > 0) started[b] = 1.0f;
    return RNN_STATUS_OK;
}

/* ---- the interpreter ----------------------------------------------------------------- */

rnn_status rnn_graph_run(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                         const float *fparams, void *const *tensors, rnn_stack *const *stacks,
                         float *work, char *err, size_t errlen, int64_t *failed) {
    return rnn_graph_run_threads(program, n_instr, iparams, fparams, tensors, stacks, work, err, errlen, failed, 1);
}

rnn_status rnn_graph_run_threads(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                                 const float *fparams, void *const *tensors, rnn_stack *const *stacks,
                                 float *work, char *err, size_t errlen, int64_t *failed, int32_t threads) {
    if (failed) *failed = -1;
    if (!program || !tensors || n_instr < 0) return RNN_STATUS_BAD_ARGUMENT;
    for (int64_t k = 0; k < n_instr; k++) {
        const int64_t *in = program + k * RNN_INSTR_WORDS;
        const int64_t op = in[0];
        const int64_t *ins = in + 1, *outs = in + 5;
        const int64_t *ip = iparams + in[9];
        const float *fp = fparams + in[11];
#define T_(i) (tensors[(i)])
        rnn_status st = RNN_STATUS_OK;
        if (op == RNN_OP_CAST || (op >= RNN_OP_TBINARY && op <= RNN_OP_REVSEQ)) {
            const char *bad = check_typed(op, ip, in[10]);
            if (bad) {
                char msg[200];
                if (failed) *failed = k;
                snprintf(msg, sizeof msg, "instruction %lld (op %lld): %s", (long long)k, (long long)op, bad);
                return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
            }
        }
        switch (op) {
        case RNN_OP_COPY: op_copy(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_BINARY: op_binary(ip, T_(ins[0]), T_(ins[1]), T_(outs[0])); break;
        case RNN_OP_UNARY: op_unary(ip, fp, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_MATMUL: {
            const int64_t M = ip[0], N = ip[1], K = ip[2];
            float *C = T_(outs[0]);
            if (M == 0 || N == 0) break;
            if (ins[2] >= 0) {
                const float *bias = T_(ins[2]);
                for (int64_t m = 0; m < M; m++) memcpy(C + m * N, bias, sizeof(float) * (size_t)N);
            }
            if (K == 0) {
                if (ins[2] < 0) memset(C, 0, sizeof(float) * (size_t)(M * N));
                break;
            }
            /* C (M, N) = A (M, K) @ B^T (+ C when there is a bias), B (N, K) packed into panels
             * at plan time (pack.c's layout): every row of C is its own chain over k, so a row
             * has the same bits whatever other rows share the call (a stream's batch, the
             * session batcher's joined sessions, a whole sequence's time steps). */
            const rnn_packed bp = {N, K, RNN_WEIGHTS_F32, (void *)T_(ins[1]), NULL};
            rnn_gemm_packed(M, T_(ins[0]), K, &bp, C, N, ins[2] >= 0);
            break;
        }
        case RNN_OP_SOFTMAX: op_softmax(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_GATHER: st = op_gather(ip, T_(ins[0]), T_(ins[1]), T_(outs[0]), err, errlen); break;
        case RNN_OP_CONV1D:
            op_conv1d(ip, T_(ins[0]), T_(ins[1]), ins[2] >= 0 ? T_(ins[2]) : NULL, T_(outs[0]), work);
            break;
        case RNN_OP_CONV1D_PACKED:
            rnn_conv1d_packed(ip, fp[0], T_(ins[0]), T_(ins[1]), ins[2] >= 0 ? T_(ins[2]) : NULL, T_(outs[0]), work);
            break;
        case RNN_OP_STFT: rnn_stft(ip, T_(ins[0]), T_(ins[1]), T_(ins[2]), T_(outs[0]), work); break;
        case RNN_OP_LAYERNORM:
            op_layernorm(ip, fp[0], T_(ins[0]), ins[1] >= 0 ? T_(ins[1]) : NULL, ins[2] >= 0 ? T_(ins[2]) : NULL,
                         T_(outs[0]), outs[1] >= 0 ? T_(outs[1]) : NULL, outs[2] >= 0 ? T_(outs[2]) : NULL);
            break;
        case RNN_OP_POOL1D: op_pool1d(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_BMATMUL: op_bmatmul(ip, T_(ins[0]), T_(ins[1]), T_(outs[0])); break;
        case RNN_OP_PAD: op_pad(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_REDUCE: op_reduce(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_CAST: op_cast(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_TOPK:
            st = op_topk(ip, T_(ins[0]), T_(outs[0]), T_(outs[1]), (int64_t *)work, err, errlen);
            break;
        case RNN_OP_SCATTER:
            st = op_scatter(ip, T_(ins[0]), T_(ins[1]), T_(ins[2]), T_(outs[0]), err, errlen);
            break;
        case RNN_OP_TBINARY: st = op_tbinary(ip, T_(ins[0]), T_(ins[1]), T_(outs[0]), err, errlen); break;
        case RNN_OP_TUNARY: op_tunary(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_WHERE: op_where(ip, T_(ins[0]), T_(ins[1]), T_(ins[2]), T_(outs[0])); break;
        case RNN_OP_TREDUCE:
            if (ip[0] == RNN_DT_I64 ? reduce_i64(ip + 1, T_(ins[0]), T_(outs[0]))
                                    : reduce_i32(ip + 1, T_(ins[0]), T_(outs[0])))
                st = fail(err, errlen, RNN_STATUS_BAD_ARGUMENT,
                          "integer reduction overflows its type (onnxruntime saturates or widens; refused)");
            break;
        case RNN_OP_ARGMAX: op_argmax(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_CUMSUM: op_cumsum(ip, T_(ins[0]), T_(outs[0])); break;
        case RNN_OP_REVSEQ: st = op_revseq(ip, T_(ins[0]), T_(ins[1]), T_(outs[0]), err, errlen); break;
        case RNN_OP_RECURRENT:
            st = op_recurrent(ip, stacks[in[8]], tensors, ins, outs, work, err, errlen, threads);
            break;
        default:
            if (failed) *failed = k;
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, "unknown instruction");
        }
#undef T_
        if (st != RNN_STATUS_OK) {
            if (failed) *failed = k;
            return st;
        }
    }
    return RNN_STATUS_OK;
}

/* ---- the verifier ---------------------------------------------------------------------- */
/*
 * rnn_graph_verify checks a whole program once, when it is created, against the tensors it
 * names: every read and write of every instruction stays inside its buffer, every operand
 * has an element type the op computes on, every parameter slice lies inside iparams /
 * fparams and is as long as the op reads. All arithmetic on the sizes it is given is
 * overflow-checked. Values that are data (Gather / Scatter indices, sequence lengths,
 * integer divisors) are checked by the ops themselves when they run.
 */

/* Largest |offset| arithmetic the kernels may do (element offsets and stride * size). */
#define SPAN_LIMIT ((int64_t)1 << 62)

/* a * b into *r; 0 when the exact product does not fit in int64 (CERT INT32-C). */
static int mul_ok(int64_t a, int64_t b, int64_t *r) {
    if (a > 0 ? (b > 0 ? a > INT64_MAX / b : b < INT64_MIN / a)
              : (b > 0 ? a < INT64_MIN / b : (a != 0 && b < INT64_MAX / a)))
        return 0;
    *r = a * b;
    return 1;
}

static int add_ok(int64_t a, int64_t b, int64_t *r) {
    if ((b > 0 && a > INT64_MAX - b) || (b < 0 && a < INT64_MIN - b)) return 0;
    *r = a + b;
    return 1;
}

static const char *const OP_NAMES[] = {"COPY",   "BINARY", "UNARY",   "MATMUL",  "SOFTMAX", "GATHER", "CONV1D",
                                       "PAD",    "REDUCE", "CAST",    "RECURRENT", "TOPK",  "SCATTER",
                                       "TBINARY", "TUNARY", "WHERE",  "TREDUCE", "ARGMAX",  "CUMSUM", "REVSEQ",
                                       "CONV1D_PACKED", "STFT", "LAYERNORM", "POOL1D", "BMATMUL"};
#define N_OPS ((int64_t)(sizeof OP_NAMES / sizeof OP_NAMES[0]))

/* Element size of a tensor table code: an rnn_dtype, or RNN_DT_OTHER + n for another type
 * of n bytes (which only ops that move elements, not compute on them, may touch). */
static int64_t code_size(int64_t dt) {
    if (dt > RNN_DT_OTHER && dt <= RNN_DT_OTHER + 16) return dt - RNN_DT_OTHER;
    return dtype_size(dt);
}

static const char *code_name(int64_t dt) {
    switch (dt) {
    case RNN_DT_F32: return "float32";
    case RNN_DT_I64: return "int64";
    case RNN_DT_I32: return "int32";
    case RNN_DT_U8: return "uint8";
    case RNN_DT_BOOL: return "bool";
    default: return code_size(dt) ? "a type the executor does not compute on" : "an unknown type";
    }
}

/* masks of element types an operand may have */
#define M_F32 (1u << RNN_DT_F32)
#define M_I64 (1u << RNN_DT_I64)
#define M_I32 (1u << RNN_DT_I32)
#define M_U8 (1u << RNN_DT_U8)
#define M_BOOL (1u << RNN_DT_BOOL)
#define M_BYTE (M_U8 | M_BOOL)
#define M_TYPED (M_F32 | M_I64 | M_I32 | M_BYTE)
#define M_ANY 0xffffffffu /* any element type: checked by size where it matters */

static unsigned mask_of(int64_t dt) { return dt >= 0 && dt <= RNN_DT_BOOL ? 1u << dt : (dt > RNN_DT_OTHER ? 1u << 31 : 0); }

/* the operand mask of a typed op's element type: bool and uint8 alike */
static unsigned tmask(int64_t dt) { return dt == RNN_DT_U8 || dt == RNN_DT_BOOL ? M_BYTE : mask_of(dt); }

static const char *mask_name(unsigned m) {
    switch (m) {
    case M_F32: return "float32";
    case M_I64: return "int64";
    case M_I32: return "int32";
    case M_BYTE: case M_BOOL: return "bool";
    case M_I64 | M_I32: return "int64 or int32";
    default: return "another type";
    }
}

/* same element type, bool and uint8 counting as one (one byte each, as the ops read them) */
static int same_type(int64_t a, int64_t b) {
    return a == b || ((a == RNN_DT_U8 || a == RNN_DT_BOOL) && (b == RNN_DT_U8 || b == RNN_DT_BOOL));
}

typedef struct {
    const int64_t *in; /* the instruction's words */
    const int64_t *ip; /* its int parameters */
    int64_t nip, nfp;
    const int64_t *tdt, *tcount; /* the tensor table */
    const uint8_t *twritable;    /* 0: a constant or input no instruction may write (NULL: all writable) */
    int64_t nt;
    rnn_stack *const *stacks;
    const int64_t *stack_shape; /* per stack: layers, D, H, has_c of its last layer */
    int64_t ns, work;
    char msg[200]; /* the reason, when a check fails */
} vctx;

static int bad(vctx *v, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->msg, sizeof v->msg, fmt, ap);
    va_end(ap);
    return 1;
}

/* instruction slots: 0..3 inputs, 4..6 outputs */
typedef struct {
    int64_t id, dt, n; /* tensor id (-1: none), element type code, element count */
} operand;

/* Operand in slot s named name: a tensor id in range of a type in mask; absent (-1) only
 * when optional. */
static int get(vctx *v, int s, const char *name, int required, unsigned mask, operand *o) {
    const int64_t id = v->in[s < 4 ? 1 + s : 5 + (s - 4)];
    o->id = id, o->dt = -1, o->n = 0;
    if (id == -1) return required ? bad(v, "%s is missing", name) : 0;
    if (id < 0 || id >= v->nt)
        return bad(v, "%s names tensor %lld, the program has tensors 0..%lld", name, (long long)id, (long long)v->nt - 1);
    o->dt = v->tdt[id], o->n = v->tcount[id];
    if (code_size(o->dt) == 0)
        return bad(v, "%s is tensor %lld of unknown element type code %lld", name, (long long)id, (long long)o->dt);
    if (o->n < 0 || o->n > SPAN_LIMIT)
        return bad(v, "%s is tensor %lld of %lld elements", name, (long long)id, (long long)o->n);
    if (!(mask_of(o->dt) & mask))
        return bad(v, "%s is %s, the instruction takes %s", name, code_name(o->dt), mask_name(mask));
    if (s >= 4 && v->twritable && !v->twritable[id])
        return bad(v, "%s is tensor %lld, a constant or input the program must not write", name, (long long)id);
    return 0;
}

/* the slots an op does not use must be empty */
static int unused(vctx *v, int n_in, int n_out) {
    for (int s = n_in; s < 4; s++)
        if (v->in[1 + s] != -1) return bad(v, "input slot %d names tensor %lld, the op takes %d inputs", s, (long long)v->in[1 + s], n_in);
    for (int s = n_out; s < 3; s++)
        if (v->in[5 + s] != -1) return bad(v, "output slot %d names tensor %lld, the op has %d outputs", s, (long long)v->in[5 + s], n_out);
    if (v->in[0] != RNN_OP_RECURRENT && v->in[8] != -1) return bad(v, "aux word %lld set on an op without a stack", (long long)v->in[8]);
    return 0;
}

/* o holds at least n elements */
static int need(vctx *v, const operand *o, const char *name, const char *verb, int64_t n) {
    if (o->id >= 0 && n > o->n)
        return bad(v, "%s has %lld elements, the instruction %s %lld", name, (long long)o->n, verb, (long long)n);
    return 0;
}

static int nparams(vctx *v, int64_t want) {
    if (v->nip != want) return bad(v, "has %lld int parameters, the op reads %lld", (long long)v->nip, (long long)want);
    return 0;
}

/* product of n sizes, each >= 0, into *total; refuses negative sizes and overflow */
static int sizes(vctx *v, const char *what, int64_t n, const int64_t *dims, int64_t *total) {
    int64_t t = 1;
    for (int64_t d = 0; d < n; d++) {
        if (dims[d] < 0) return bad(v, "%s has a negative size %lld", what, (long long)dims[d]);
        if (!mul_ok(t, dims[d], &t) || t > SPAN_LIMIT) return bad(v, "the sizes of %s overflow", what);
    }
    *total = t;
    return 0;
}

/* A walk over shape (nd, total elements) with strides from element off stays inside o. */
static int span(vctx *v, const operand *o, const char *name, const char *verb, int64_t nd, const int64_t *shape,
                const int64_t *stride, int64_t off, int64_t total) {
    if (o->id < 0 || total == 0) return 0;
    if (off < -SPAN_LIMIT || off > SPAN_LIMIT) return bad(v, "%s: offset %lld is out of range", name, (long long)off);
    int64_t lo = off, hi = off;
    for (int64_t d = 0; d < nd; d++) {
        int64_t ext, whole;
        if (!mul_ok(stride[d], shape[d], &whole) || whole > SPAN_LIMIT || whole < -SPAN_LIMIT ||
            !mul_ok(stride[d], shape[d] - 1, &ext))
            return bad(v, "%s: stride %lld over %lld elements overflows", name, (long long)stride[d], (long long)shape[d]);
        if (!add_ok(ext > 0 ? hi : lo, ext, ext > 0 ? &hi : &lo) || hi > SPAN_LIMIT || lo < -SPAN_LIMIT)
            return bad(v, "%s: offsets overflow", name);
    }
    if (lo < 0) return bad(v, "%s: the instruction %s element %lld, before its start", name, verb, (long long)lo);
    if (hi >= o->n)
        return bad(v, "%s has %lld elements, the instruction %s %lld", name, (long long)o->n, verb, (long long)hi + 1);
    return 0;
}

static int esize_ok(vctx *v, int64_t es, const operand *o, const char *name) {
    if (code_size(o->dt) != es)
        return bad(v, "%s has %lld-byte elements (%s), the instruction moves %lld-byte ones", name,
                   (long long)code_size(o->dt), code_name(o->dt), (long long)es);
    return 0;
}

static int valid_es(vctx *v, int64_t es) {
    if (!(es == 1 || es == 2 || es == 4 || es == 8)) return bad(v, "element size %lld is not 1, 2, 4 or 8", (long long)es);
    return 0;
}

/* REDUCE / TREDUCE after its dtype: kind, nd, in_shape[nd], out_stride[nd], out_n, count */
static int verify_reduce(vctx *v, const int64_t *ip, int64_t nip, unsigned mask, int64_t dt) {
    operand x, y;
    if (nip < 2) return bad(v, "too few parameters");
    const int64_t kind = ip[0], nd = ip[1];
    if (kind < RNN_REDUCE_SUM || kind > RNN_REDUCE_PROD) return bad(v, "unknown reduction %lld", (long long)kind);
    if (nd < 0 || nd > MAX_ND) return bad(v, "rank %lld is outside 0..%d", (long long)nd, MAX_ND);
    if (nip != 4 + 2 * nd) return bad(v, "has %lld int parameters, a reduction of rank %lld reads %lld", (long long)nip, (long long)nd, (long long)(4 + 2 * nd));
    const int64_t *ishape = ip + 2, *ostr = ip + 2 + nd, out_n = ip[2 + 2 * nd], count = ip[3 + 2 * nd];
    int64_t total;
    if (unused(v, 1, 1) || get(v, 0, "input", 1, mask, &x) || get(v, 4, "output", 1, mask, &y) ||
        sizes(v, "the input", nd, ishape, &total) || need(v, &x, "input", "reads", total))
        return 1;
    if (dt >= 0 && (x.dt != dt || y.dt != dt))
        return bad(v, "input %s and output %s, the instruction computes on %s", code_name(x.dt), code_name(y.dt), code_name(dt));
    if (out_n < 0 || out_n > SPAN_LIMIT) return bad(v, "output size %lld is out of range", (long long)out_n);
    if (need(v, &y, "output", "writes", out_n)) return 1;
    for (int64_t d = 0; d < nd; d++)
        if (ostr[d] < 0) return bad(v, "a negative output stride %lld", (long long)ostr[d]);
    const operand o = {y.id, y.dt, out_n}; /* the walk stays within the out_n elements written */
    if (span(v, &o, "output", "writes", nd, ishape, ostr, 0, total)) return 1;
    if (count < 0 || (dt == RNN_DT_I32 && count > INT32_MAX)) return bad(v, "element count %lld of the mean is out of range", (long long)count);
    return 0;
}

static int verify_instr(vctx *v) {
    const int64_t op = v->in[0], *ip = v->ip, nip = v->nip;
    operand a, b, c, d, y, y2, y3;
    int64_t total, n;
    /* no op but COPY computes in place: an output is never one of its inputs, nor another output */
    for (int s = 0; s < 3; s++) {
        const int64_t o = v->in[5 + s];
        if (o < 0) continue;
        for (int r = 0; r < 4 && op != RNN_OP_COPY; r++)
            if (v->in[1 + r] == o) return bad(v, "output %d is input %d (tensor %lld): the op does not compute in place", s, r, (long long)o);
        for (int r = 0; r < s; r++)
            if (v->in[5 + r] == o) return bad(v, "outputs %d and %d are both tensor %lld", r, s, (long long)o);
        if (op == RNN_OP_RECURRENT && nip > 6 && o == ip[6]) return bad(v, "output %d is the state tensor %lld", s, (long long)o);
    }
    if (op != RNN_OP_UNARY && op != RNN_OP_CONV1D_PACKED && op != RNN_OP_LAYERNORM && v->nfp != 0)
        return bad(v, "has %lld float parameters, the op reads none", (long long)v->nfp);
    if (op == RNN_OP_CAST || (op >= RNN_OP_TBINARY && op <= RNN_OP_REVSEQ)) { /* codes and counts the op checks when it runs */
        const char *why = check_typed(op, ip, nip);
        if (why) return bad(v, "%s", why);
    }
    switch (op) {
    case RNN_OP_COPY: {
        if (nip < 4) return bad(v, "too few parameters");
        const int64_t es = ip[0], nd = ip[1];
        if (valid_es(v, es)) return 1;
        if (nd < 0 || nd > MAX_ND) return bad(v, "rank %lld is outside 0..%d", (long long)nd, MAX_ND);
        if (nparams(v, 4 + 3 * nd) || unused(v, 1, 1) || get(v, 0, "input", 1, M_ANY, &a) ||
            get(v, 4, "output", 1, M_ANY, &y) || esize_ok(v, es, &a, "input") || esize_ok(v, es, &y, "output"))
            return 1;
        if (!same_type(a.dt, y.dt)) return bad(v, "copies %s into %s", code_name(a.dt), code_name(y.dt));
        const int64_t *shape = ip + 4;
        if (sizes(v, "the copy", nd, shape, &total) || span(v, &a, "input", "reads", nd, shape, ip + 4 + nd, ip[2], total) ||
            span(v, &y, "output", "writes", nd, shape, ip + 4 + 2 * nd, ip[3], total))
            return 1;
        return need(v, &y, "output", "writes", total); /* every element written once: a finite walk */
    }
    case RNN_OP_BINARY:
    case RNN_OP_TBINARY:
    case RNN_OP_WHERE: {
        /* BINARY: kind, nd; TBINARY: dt, kind, nd; WHERE: es, nd (check_typed has checked their counts) */
        if (op == RNN_OP_BINARY && nip < 2) return bad(v, "too few parameters");
        const int64_t h = op == RNN_OP_BINARY ? 0 : 1;
        const int64_t nd = op == RNN_OP_WHERE ? ip[1] : ip[1 + h], k = op == RNN_OP_WHERE ? 3 : 2;
        if (op == RNN_OP_BINARY) {
            if (ip[0] < RNN_BIN_ADD || ip[0] > RNN_BIN_MIN) return bad(v, "unknown arithmetic kind %lld", (long long)ip[0]);
            if (nd < 0 || nd > MAX_ND) return bad(v, "rank %lld is outside 0..%d", (long long)nd, MAX_ND);
            if (nparams(v, 2 + 3 * nd)) return 1;
        }
        const int64_t *shape = ip + (op == RNN_OP_BINARY ? 2 : op == RNN_OP_WHERE ? 2 : 3);
        const int64_t dt = op == RNN_OP_TBINARY ? ip[0] : RNN_DT_F32;
        const unsigned m = op == RNN_OP_WHERE ? M_ANY : tmask(dt);
        if (unused(v, (int)k, 1) || sizes(v, "the result", nd, shape, &total)) return 1;
        if (op == RNN_OP_WHERE) {
            if (get(v, 0, "condition", 1, M_BYTE, &c) || get(v, 1, "input X", 1, M_ANY, &a) ||
                get(v, 2, "input Y", 1, M_ANY, &b) || get(v, 4, "output", 1, M_ANY, &y) ||
                esize_ok(v, ip[0], &a, "input X") || esize_ok(v, ip[0], &b, "input Y") || esize_ok(v, ip[0], &y, "output"))
                return 1;
            if (!same_type(a.dt, b.dt) || !same_type(a.dt, y.dt))
                return bad(v, "X %s, Y %s and output %s differ", code_name(a.dt), code_name(b.dt), code_name(y.dt));
            if (span(v, &c, "condition", "reads", nd, shape, shape + nd, 0, total) ||
                span(v, &a, "input X", "reads", nd, shape, shape + 2 * nd, 0, total) ||
                span(v, &b, "input Y", "reads", nd, shape, shape + 3 * nd, 0, total))
                return 1;
        } else {
            const unsigned ym = op == RNN_OP_TBINARY && ip[1] >= RNN_BIN_EQUAL ? M_BYTE : m;
            if (get(v, 0, "input A", 1, m, &a) || get(v, 1, "input B", 1, m, &b) || get(v, 4, "output", 1, ym, &y))
                return 1;
            if (op == RNN_OP_TBINARY && (!same_type(a.dt, dt) || !same_type(b.dt, dt)))
                return bad(v, "inputs %s and %s, the instruction computes on %s", code_name(a.dt), code_name(b.dt), code_name(dt));
            if (span(v, &a, "input A", "reads", nd, shape, shape + nd, 0, total) ||
                span(v, &b, "input B", "reads", nd, shape, shape + 2 * nd, 0, total))
                return 1;
        }
        return need(v, &y, "output", "writes", total);
    }
    case RNN_OP_UNARY: {
        if (nparams(v, 2)) return 1;
        if (v->nfp != 2) return bad(v, "has %lld float parameters, the op reads 2", (long long)v->nfp);
        const int64_t kind = ip[0];
        if (!((kind >= 0 && kind < RNN_ACT_COUNT) || (kind >= RNN_UNARY_SQRT && kind <= RNN_UNARY_CEIL))) return bad(v, "unknown function %lld", (long long)kind);
        if (sizes(v, "the input", 1, ip + 1, &n) || unused(v, 1, 1) || get(v, 0, "input", 1, M_F32, &a) ||
            get(v, 4, "output", 1, M_F32, &y))
            return 1;
        return need(v, &a, "input", "reads", n) || need(v, &y, "output", "writes", n);
    }
    case RNN_OP_MATMUL: {
        int64_t mk, nk, mn;
        if (nparams(v, 3) || sizes(v, "the product", 3, ip, &total) || unused(v, 3, 1)) return 1;
        const int64_t M = ip[0], N = ip[1], K = ip[2];
        if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return bad(v, "sizes beyond what BLAS takes");
        /* B is packed: ceil(N/16) panels of K x 16 floats (each size < 2^31: no overflow) */
        mul_ok(M, K, &mk), mul_ok((N + RNN_PANEL - 1) / RNN_PANEL * RNN_PANEL, K, &nk), mul_ok(M, N, &mn);
        if (get(v, 0, "input A", 1, M_F32, &a) || get(v, 1, "packed B", 1, M_F32, &b) ||
            get(v, 2, "bias", 0, M_F32, &c) || get(v, 4, "output", 1, M_F32, &y))
            return 1;
        if (M == 0 || N == 0) return 0;
        return need(v, &a, "input A", "reads", mk) || need(v, &b, "packed B", "reads", nk) ||
               need(v, &c, "bias", "reads", N) || need(v, &y, "output", "writes", mn);
    }
    case RNN_OP_SOFTMAX:
    case RNN_OP_CUMSUM:
    case RNN_OP_ARGMAX: {
        const int64_t *g = op == RNN_OP_SOFTMAX ? ip : ip + 1; /* outer, n, inner */
        if (op == RNN_OP_SOFTMAX && (nparams(v, 4))) return 1;
        if (op == RNN_OP_SOFTMAX && ip[3] != 0 && ip[3] != 1) return bad(v, "log flag %lld is not 0 or 1", (long long)ip[3]);
        if (sizes(v, "the input", 3, g, &total) || unused(v, 1, 1)) return 1;
        const unsigned m = op == RNN_OP_SOFTMAX ? M_F32 : tmask(ip[0]);
        if (get(v, 0, "input", 1, m, &a) || get(v, 4, "output", 1, op == RNN_OP_ARGMAX ? M_I64 : m, &y)) return 1;
        if (op != RNN_OP_SOFTMAX && !same_type(a.dt, ip[0]))
            return bad(v, "input is %s, the instruction computes on %s", code_name(a.dt), code_name(ip[0]));
        if (op == RNN_OP_CUMSUM && y.dt != a.dt) return bad(v, "input %s, output %s", code_name(a.dt), code_name(y.dt));
        if (need(v, &a, "input", "reads", total)) return 1;
        if (op == RNN_OP_ARGMAX) {
            mul_ok(g[0], g[2], &n);
            return need(v, &y, "output", "writes", n);
        }
        return need(v, &y, "output", "writes", total);
    }
    case RNN_OP_GATHER: {
        int64_t nout;
        if (nparams(v, 5) || valid_es(v, ip[0]) || sizes(v, "the data", 3, ip + 1, &total) ||
            sizes(v, "the indices", 1, ip + 4, &n) || unused(v, 2, 1) || get(v, 0, "data", 1, M_ANY, &a) ||
            get(v, 1, "indices", 1, M_I64, &b) || get(v, 4, "output", 1, M_ANY, &y) || esize_ok(v, ip[0], &a, "data"))
            return 1;
        if (!same_type(a.dt, y.dt)) return bad(v, "data %s, output %s", code_name(a.dt), code_name(y.dt));
        const int64_t g[3] = {ip[1], ip[4], ip[3]};
        if (sizes(v, "the output", 3, g, &nout)) return 1;
        return need(v, &a, "data", "reads", total) || need(v, &b, "indices", "reads", n) ||
               need(v, &y, "output", "writes", nout);
    }
    case RNN_OP_CONV1D:
    case RNN_OP_CONV1D_PACKED: {
        const int packed = op == RNN_OP_CONV1D_PACKED;
        if (nparams(v, packed ? 11 : 10) || sizes(v, "the convolution", 6, ip, &total) || unused(v, 3, 1)) return 1;
        if (packed && v->nfp != 1) return bad(v, "has %lld float parameters, the op reads 1", (long long)v->nfp);
        if (packed && ip[10] != -1 && ip[10] != RNN_ACT_RELU && ip[10] != RNN_ACT_LEAKY_RELU)
            return bad(v, "fused activation %lld is not -1 (none), Relu or LeakyRelu", (long long)ip[10]);
        const int64_t N = ip[0], C = ip[1], L = ip[2], M = ip[3], K = ip[4], Lout = ip[5];
        const int64_t s = ip[6], dil = ip[7], pad = ip[8], G = ip[9];
        if (s < 1 || dil < 1 || G < 1) return bad(v, "stride %lld, dilation %lld and group %lld must be >= 1", (long long)s, (long long)dil, (long long)G);
        if (C % G || M % G) return bad(v, "group %lld does not divide %lld channels and %lld filters", (long long)G, (long long)C, (long long)M);
        if (pad < -SPAN_LIMIT || pad > SPAN_LIMIT) return bad(v, "padding %lld is out of range", (long long)pad);
        int64_t x_n, w_n, y_n, ck, col, reach = 0, t;
        const int64_t xs[3] = {N, C, L}, ws[3] = {M, C / G, K}, ys[3] = {N, M, Lout}, cs[3] = {Lout, C / G, K};
        if (sizes(v, "the input", 3, xs, &x_n) || sizes(v, "the weights", 3, ws, &w_n) ||
            sizes(v, "the output", 3, ys, &y_n) || sizes(v, "the column buffer", 3, cs, &col))
            return 1;
        if (!mul_ok(C / G, K, &ck)) return bad(v, "the sizes of the kernel overflow");
        if (M / G > INT32_MAX || Lout > INT32_MAX || ck > INT32_MAX) return bad(v, "sizes beyond what BLAS takes");
        /* the input position l*stride + k*dil - pad (and a window's end past it) must not
         * overflow: reach + |pad| + K within SPAN_LIMIT */
        if (Lout > 0 && K > 0 &&
            (!mul_ok(Lout - 1, s, &reach) || !mul_ok(K - 1, dil, &t) || !add_ok(reach, t, &reach) ||
             !add_ok(reach, pad < 0 ? -pad : pad, &reach) || !add_ok(reach, K, &reach) || reach > SPAN_LIMIT))
            return bad(v, "stride, dilation and padding reach beyond any input");
        if (get(v, 0, "input", 1, M_F32, &a) || get(v, 1, "weights", 1, M_F32, &b) ||
            get(v, 2, "bias", 0, M_F32, &c) || get(v, 4, "output", 1, M_F32, &y))
            return 1;
        if (packed) { /* panels of 16 filters: the sizes of conv.c, each product now known to fit */
            /* (the workspace's rows, those of one block, are at most RNN_CONV_BLOCK) */
            const int64_t panels = (M / G + 15) / 16, lb = RNN_CONV_BLOCK;
            int64_t wk;
            if (!mul_ok(G, panels, &t) || !mul_ok(t, 16, &t) || !mul_ok(t, ck, &t) || t > SPAN_LIMIT ||
                !mul_ok(panels, 16, &wk) || !add_ok(wk, ck, &wk) || !mul_ok(wk, lb, &wk) || wk > SPAN_LIMIT)
                return bad(v, "the packed filters' or the workspace's size overflows");
            w_n = rnn_conv1d_packed_floats(M, C / G, K, G);
            col = rnn_conv1d_packed_work(N, Lout, C / G, K, M / G);
        }
        if (need(v, &a, "input", "reads", x_n) || need(v, &b, packed ? "packed filters" : "weights", "reads", w_n) ||
            need(v, &c, "bias", "reads", M) || need(v, &y, "output", "writes", y_n))
            return 1;
        if (col > v->work) return bad(v, "needs %lld floats of workspace, the program has %lld", (long long)col, (long long)v->work);
        return 0;
    }
    case RNN_OP_LAYERNORM: {
        if (nparams(v, 2) || sizes(v, "the input", 2, ip, &total) || unused(v, 3, 3)) return 1;
        if (v->nfp != 1) return bad(v, "has %lld float parameters, the op reads 1", (long long)v->nfp);
        const int64_t outer = ip[0], n = ip[1];
        if (n < 1) return bad(v, "normalises rows of %lld elements (at least 1)", (long long)n);
        if (get(v, 0, "input", 1, M_F32, &a) || get(v, 1, "scale", 0, M_F32, &b) || get(v, 2, "bias", 0, M_F32, &c) ||
            get(v, 4, "output", 1, M_F32, &y) || get(v, 5, "mean", 0, M_F32, &y2) || get(v, 6, "inv_std", 0, M_F32, &y3))
            return 1;
        return need(v, &a, "input", "reads", total) || need(v, &b, "scale", "reads", n) ||
               need(v, &c, "bias", "reads", n) || need(v, &y, "output", "writes", total) ||
               need(v, &y2, "mean", "writes", outer) || need(v, &y3, "inv_std", "writes", outer);
    }
    case RNN_OP_POOL1D: {
        if (nparams(v, 12) || unused(v, 1, 1)) return 1;
        const int64_t rows = ip[0], L = ip[1], Lout = ip[2], K = ip[3], s = ip[4], dil = ip[5], off = ip[6];
        const int64_t lo = ip[7], hi = ip[8], kind = ip[9], cnt_lo = ip[10], cnt_hi = ip[11];
        int64_t x_n = 0, y_n = 0, reach = 0, t;
        const int64_t xs[2] = {rows, L}, ys[2] = {rows, Lout};
        if (sizes(v, "the input", 2, xs, &x_n) || sizes(v, "the output", 2, ys, &y_n)) return 1;
        if (K < 1 || s < 1 || dil < 1) return bad(v, "kernel %lld, stride %lld and dilation %lld must be >= 1", (long long)K, (long long)s, (long long)dil);
        if (kind < 0 || kind > 2) return bad(v, "unknown pooling kind %lld", (long long)kind);
        if (lo < 0 || lo > hi || hi > L) return bad(v, "reads positions [%lld, %lld) of rows of %lld", (long long)lo, (long long)hi, (long long)L);
        const int64_t lim = (int64_t)1 << 60; /* op_pool1d's tap arithmetic adds three such values */
        if (off < -lim || off > lim || cnt_lo < -lim || cnt_lo > lim || cnt_hi < -lim || cnt_hi > lim)
            return bad(v, "offset or counted extent out of range");
        /* j*s + k*d - off must not overflow: (Lout-1)*s + (K-1)*d + |off| within 2^60 */
        if (Lout > 0 && (!mul_ok(Lout - 1, s, &reach) || !mul_ok(K - 1, dil, &t) || !add_ok(reach, t, &reach) ||
                         !add_ok(reach, off < 0 ? -off : off, &reach) || reach > lim))
            return bad(v, "stride, dilation and offset reach beyond any input");
        if (dil > lim) return bad(v, "dilation %lld is out of range", (long long)dil);
        if (get(v, 0, "input", 1, M_F32, &a) || get(v, 4, "output", 1, M_F32, &y)) return 1;
        return need(v, &a, "input", "reads", x_n) || need(v, &y, "output", "writes", y_n);
    }
    case RNN_OP_BMATMUL: {
        if (nip < 4) return bad(v, "too few parameters");
        const int64_t nd = ip[0], M = ip[1], N = ip[2], K = ip[3];
        if (nd < 0 || nd > MAX_ND) return bad(v, "rank %lld is outside 0..%d", (long long)nd, MAX_ND);
        if (nparams(v, 4 + 3 * nd) || unused(v, 2, 1)) return 1;
        const int64_t mnk[3] = {M, N, K}, *shape = ip + 4, *as = ip + 4 + nd, *bs = ip + 4 + 2 * nd;
        int64_t batch, mk, kn, mn, y_n;
        if (sizes(v, "the matrices", 3, mnk, &total) || sizes(v, "the batch", nd, shape, &batch)) return 1;
        if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return bad(v, "sizes beyond what BLAS takes");
        if (!mul_ok(M, K, &mk) || !mul_ok(K, N, &kn) || !mul_ok(M, N, &mn) || !mul_ok(batch, mn, &y_n) || y_n > SPAN_LIMIT)
            return bad(v, "the sizes of the product overflow");
        if (get(v, 0, "A", 1, M_F32, &a) || get(v, 1, "B", 1, M_F32, &b) || get(v, 4, "output", 1, M_F32, &y)) return 1;
        for (int64_t d = 0; d < nd; d++)
            if (as[d] < 0 || bs[d] < 0) return bad(v, "a negative batch stride");
        if (batch > 0 && mn > 0) { /* every matrix of A and B inside its tensor */
            const operand a1 = {a.id, a.dt, a.n - mk + 1}, b1 = {b.id, b.dt, b.n - kn + 1};
            if (mk > a.n) return bad(v, "A has %lld elements, a matrix of it %lld", (long long)a.n, (long long)mk);
            if (kn > b.n) return bad(v, "B has %lld elements, a matrix of it %lld", (long long)b.n, (long long)kn);
            if (span(v, &a1, "A (where a matrix may start)", "starts a matrix at", nd, shape, as, 0, batch) ||
                span(v, &b1, "B (where a matrix may start)", "starts a matrix at", nd, shape, bs, 0, batch))
                return 1;
        }
        return need(v, &y, "output", "writes", y_n);
    }
    case RNN_OP_STFT: {
        if (nparams(v, 7) || unused(v, 3, 1)) return 1;
        const int64_t N = ip[0], L = ip[1], Lout = ip[2], K = ip[3], s = ip[4], pad = ip[5], sign = ip[6];
        if (K < 4 || K > (1 << 20) || (K & (K - 1))) return bad(v, "frame length %lld is not a power of two from 4 to 2^20", (long long)K);
        if (s < 1) return bad(v, "stride %lld must be >= 1", (long long)s);
        if (sign != 1 && sign != -1) return bad(v, "sign %lld is not 1 or -1", (long long)sign);
        if (pad < -SPAN_LIMIT || pad > SPAN_LIMIT) return bad(v, "padding %lld is out of range", (long long)pad);
        int64_t x_n, y_n, w_n, reach = 0;
        const int64_t xs[2] = {N, L}, ys[3] = {N, K + 2, Lout}, ws[2] = {K + 2, K};
        if (sizes(v, "the input", 2, xs, &x_n) || sizes(v, "the output", 3, ys, &y_n) || sizes(v, "the filters", 2, ws, &w_n))
            return 1;
        if (Lout > 0 && (!mul_ok(Lout - 1, s, &reach) || !add_ok(reach, K, &reach) ||
                         !add_ok(reach, pad < 0 ? -pad : pad, &reach) || reach > SPAN_LIMIT))
            return bad(v, "the stride and padding reach beyond any input");
        if (get(v, 0, "input", 1, M_F32, &a) || get(v, 1, "filters", 1, M_F32, &b) || get(v, 2, "table", 1, M_F32, &c) ||
            get(v, 4, "output", 1, M_F32, &y))
            return 1;
        if (need(v, &a, "input", "reads", x_n) || need(v, &b, "filters", "reads", w_n) ||
            need(v, &c, "table", "reads", rnn_stft_table_floats(K)) || need(v, &y, "output", "writes", y_n))
            return 1;
        if (rnn_stft_work(K) > v->work) return bad(v, "needs %lld floats of workspace, the program has %lld", (long long)rnn_stft_work(K), (long long)v->work);
        return 0;
    }
    case RNN_OP_PAD: {
        if (nip < 2) return bad(v, "too few parameters");
        const int64_t es = ip[0], nd = ip[1], head = 3 + 3 * nd;
        if (valid_es(v, es)) return 1;
        if (nd < 0 || nd > MAX_ND) return bad(v, "rank %lld is outside 0..%d", (long long)nd, MAX_ND);
        if (nip < head) return bad(v, "has %lld int parameters, a pad of rank %lld reads at least %lld", (long long)nip, (long long)nd, (long long)head);
        const int64_t *oshape = ip + 2, *istr = ip + 2 + nd, *mstart = ip + 2 + 2 * nd;
        if (sizes(v, "the output", nd, oshape, &total) || unused(v, 1, 1) || get(v, 0, "input", 1, M_ANY, &a) ||
            get(v, 4, "output", 1, M_ANY, &y) || esize_ok(v, es, &a, "input") || esize_ok(v, es, &y, "output"))
            return 1;
        if (!same_type(a.dt, y.dt)) return bad(v, "pads %s into %s", code_name(a.dt), code_name(y.dt));
        if (need(v, &y, "output", "writes", total)) return 1;
        int64_t hi = 0, reads = total > 0;
        for (int64_t k = 0; k < nd; k++) {
            int64_t end, mx = -1;
            if (mstart[k] < head || !add_ok(mstart[k], oshape[k], &end) || end > nip)
                return bad(v, "the index map of axis %lld lies outside the parameters", (long long)k);
            if (istr[k] < 0) return bad(v, "a negative input stride %lld", (long long)istr[k]);
            for (int64_t i = mstart[k]; i < end; i++) {
                if (ip[i] < -1) return bad(v, "index map entry %lld of axis %lld is below -1", (long long)ip[i], (long long)k);
                mx = ip[i] > mx ? ip[i] : mx;
            }
            if (mx < 0) reads = 0; /* every output along this axis is the constant */
            int64_t ext;
            if (mx > 0 && (!mul_ok(mx, istr[k], &ext) || !add_ok(hi, ext, &hi) || hi > SPAN_LIMIT))
                return bad(v, "input offsets overflow");
        }
        if (reads && hi >= a.n)
            return bad(v, "input has %lld elements, the instruction reads %lld", (long long)a.n, (long long)hi + 1);
        return 0;
    }
    case RNN_OP_REDUCE: return verify_reduce(v, ip, nip, M_F32, -1);
    case RNN_OP_TREDUCE: return verify_reduce(v, ip + 1, nip - 1, M_I64 | M_I32, ip[0]);
    case RNN_OP_CAST:
        if (unused(v, 1, 1) || get(v, 0, "input", 1, M_TYPED, &a) || get(v, 4, "output", 1, M_TYPED, &y)) return 1;
        if (!same_type(a.dt, ip[0]) || !same_type(y.dt, ip[1]))
            return bad(v, "input %s and output %s, the instruction casts %s to %s", code_name(a.dt), code_name(y.dt),
                       code_name(ip[0]), code_name(ip[1]));
        return need(v, &a, "input", "reads", ip[2]) || need(v, &y, "output", "writes", ip[2]);
    case RNN_OP_TUNARY:
        if (unused(v, 1, 1) || get(v, 0, "input", 1, tmask(ip[0]), &a) || get(v, 4, "output", 1, tmask(ip[0]), &y))
            return 1;
        return need(v, &a, "input", "reads", ip[2]) || need(v, &y, "output", "writes", ip[2]);
    case RNN_OP_TOPK: {
        int64_t nout, g[3];
        if (nparams(v, 6) || sizes(v, "the input", 3, ip + 1, &total) || unused(v, 1, 2)) return 1;
        if (code_size(ip[0]) == 0 || ip[0] > RNN_DT_BOOL) return bad(v, "unknown element type code %lld", (long long)ip[0]);
        if (ip[4] < 0 || ip[4] > ip[2]) return bad(v, "k = %lld is outside [0, %lld]", (long long)ip[4], (long long)ip[2]);
        g[0] = ip[1], g[1] = ip[4], g[2] = ip[3];
        sizes(v, "the output", 3, g, &nout); /* <= total */
        if (get(v, 0, "input", 1, tmask(ip[0]), &a) || get(v, 4, "values", 1, tmask(ip[0]), &y) ||
            get(v, 5, "indices", 1, M_I64, &y2))
            return 1;
        if (!same_type(a.dt, y.dt)) return bad(v, "input %s, values %s", code_name(a.dt), code_name(y.dt));
        if (need(v, &a, "input", "reads", total) || need(v, &y, "values", "writes", nout) ||
            need(v, &y2, "indices", "writes", nout))
            return 1;
        if (ip[2] > v->work / 2) /* n int64 of scratch */
            return bad(v, "needs %lld floats of workspace, the program has %lld", (long long)(2 * ip[2]), (long long)v->work);
        return 0;
    }
    case RNN_OP_SCATTER: {
        if (nip < 2) return bad(v, "too few parameters");
        const int64_t es = ip[0], nd = ip[1];
        int64_t in_n;
        if (valid_es(v, es)) return 1;
        if (nd < 1 || nd > MAX_ND) return bad(v, "rank %lld is outside 1..%d", (long long)nd, MAX_ND);
        if (nparams(v, 3 + 2 * nd)) return 1;
        const int64_t *dshape = ip + 2, *ishape = ip + 2 + nd, axis = ip[2 + 2 * nd];
        if (axis < 0 || axis >= nd) return bad(v, "axis %lld is outside 0..%lld", (long long)axis, (long long)nd - 1);
        if (sizes(v, "the data", nd, dshape, &total) || sizes(v, "the indices", nd, ishape, &in_n)) return 1;
        for (int64_t k = 0; k < nd; k++)
            if (k != axis && ishape[k] > dshape[k])
                return bad(v, "indices are %lld wide on axis %lld, the data %lld", (long long)ishape[k], (long long)k,
                           (long long)dshape[k]);
        if (unused(v, 3, 1) || get(v, 0, "data", 1, M_ANY, &a) || get(v, 1, "indices", 1, M_I64, &b) ||
            get(v, 2, "updates", 1, M_ANY, &c) || get(v, 4, "output", 1, M_ANY, &y) || esize_ok(v, es, &a, "data"))
            return 1;
        if (!same_type(a.dt, c.dt) || !same_type(a.dt, y.dt))
            return bad(v, "data %s, updates %s and output %s differ", code_name(a.dt), code_name(c.dt), code_name(y.dt));
        return need(v, &a, "data", "reads", total) || need(v, &b, "indices", "reads", in_n) ||
               need(v, &c, "updates", "reads", in_n) || need(v, &y, "output", "writes", total);
    }
    case RNN_OP_REVSEQ: {
        if (valid_es(v, ip[0]) || sizes(v, "the input", 3, ip + 1, &total) || unused(v, 2, 1)) return 1;
        if (ip[4] != 0 && ip[4] != 1) return bad(v, "time_major flag %lld is not 0 or 1", (long long)ip[4]);
        if (get(v, 0, "input", 1, M_ANY, &a) || get(v, 1, "sequence_lens", 1, M_I64, &b) ||
            get(v, 4, "output", 1, M_ANY, &y) || esize_ok(v, ip[0], &a, "input"))
            return 1;
        if (!same_type(a.dt, y.dt)) return bad(v, "input %s, output %s", code_name(a.dt), code_name(y.dt));
        return need(v, &a, "input", "reads", total) || need(v, &b, "sequence_lens", "reads", ip[2]) ||
               need(v, &y, "output", "writes", total);
    }
    case RNN_OP_RECURRENT: {
        if (nparams(v, 9) || unused(v, 4, 3)) return 1;
        const int64_t T = ip[0], B = ip[1], layout = ip[2], D = ip[3], H = ip[4], has_c = ip[5];
        const int64_t sid = ip[6], mode = ip[7], fid = ip[8], aux = v->in[8];
        if (aux < 0 || aux >= v->ns || !v->stacks[aux])
            return bad(v, "names stack %lld, the program has %lld", (long long)aux, (long long)v->ns);
        const rnn_stack *st = v->stacks[aux];
        const int64_t *sh = v->stack_shape + 4 * aux;
        if (sh[0] != 1 || sh[1] != D || sh[2] != H || sh[3] != has_c)
            return bad(v, "D %lld, H %lld, has_c %lld, the stack has %lld layer(s) of D %lld, H %lld, has_c %lld",
                       (long long)D, (long long)H, (long long)has_c, (long long)sh[0], (long long)sh[1],
                       (long long)sh[2], (long long)sh[3]);
        if (layout != 0 && layout != 1) return bad(v, "layout %lld is not 0 or 1", (long long)layout);
        if (D != 1 && D != 2) return bad(v, "%lld directions", (long long)D);
        if (H < 1 || H > INT32_MAX) return bad(v, "hidden size %lld is out of range", (long long)H);
        if (has_c != 0 && has_c != 1) return bad(v, "has_c %lld is not 0 or 1", (long long)has_c);
        if (mode < 0 || mode > 2) return bad(v, "unknown initial state mode %lld", (long long)mode);
        int64_t block, state_n, x_n, y_n;
        const int64_t bs[3] = {D, B, H}, xs[3] = {T, B, rnn_stack_input_size(st)}, ys[2] = {T, 1};
        if (T < 0 || H < 1 || sizes(v, "the state", 3, bs, &block) || sizes(v, "the input", 3, xs, &x_n) ||
            sizes(v, "the output", 2, ys, &y_n) || !mul_ok(y_n, block, &y_n) || y_n > SPAN_LIMIT)
            return bad(v, "sizes T %lld, B %lld, H %lld are out of range", (long long)T, (long long)B, (long long)H);
        if (T > INT32_MAX || B > INT32_MAX || T * B > INT32_MAX) return bad(v, "T * B beyond what the stack takes");
        state_n = block * (1 + has_c);
        if (D * H != rnn_stack_output_size(st))
            return bad(v, "D * H = %lld, the stack's layer gives %d", (long long)(D * H), (int)rnn_stack_output_size(st));
        if (rnn_stack_state_floats(st, B) != state_n)
            return bad(v, "the stack's state is %lld floats for %lld rows, the instruction uses D*B*H*(1+has_c) = %lld",
                       (long long)rnn_stack_state_floats(st, B), (long long)B, (long long)state_n);
        const operand s = {sid, sid >= 0 && sid < v->nt ? v->tdt[sid] : -1, sid >= 0 && sid < v->nt ? v->tcount[sid] : 0};
        if (sid < 0 || sid >= v->nt) return bad(v, "state names tensor %lld, the program has tensors 0..%lld", (long long)sid, (long long)v->nt - 1);
        if (s.dt != RNN_DT_F32) return bad(v, "state is %s, the instruction takes float32", code_name(s.dt));
        if (s.n < 0 || s.n > SPAN_LIMIT) return bad(v, "state is tensor %lld of %lld elements", (long long)sid, (long long)s.n);
        if (v->twritable && !v->twritable[sid])
            return bad(v, "state is tensor %lld, a constant or input the program must not write", (long long)sid);
        if (get(v, 0, "X", 1, M_F32, &a) || get(v, 1, "sequence_lens", 0, M_I32, &b) ||
            get(v, 2, "initial_h", 0, M_F32, &c) || get(v, 3, "initial_c", 0, M_F32, &d) ||
            get(v, 4, "Y", 1, M_F32, &y) || get(v, 5, "Y_h", 0, M_F32, &y2) || get(v, 6, "Y_c", 0, M_F32, &y3))
            return 1;
        if (!has_c && (d.id >= 0 || y3.id >= 0)) return bad(v, "initial_c or Y_c given to a layer without a cell state");
        if (need(v, &s, "state", "uses", state_n) || need(v, &a, "X", "reads", x_n) || need(v, &b, "sequence_lens", "reads", B) ||
            need(v, &c, "initial_h", "reads", block) || need(v, &d, "initial_c", "reads", block) ||
            need(v, &y, "Y", "writes", y_n) || need(v, &y2, "Y_h", "writes", block) || need(v, &y3, "Y_c", "writes", block))
            return 1;
        if (fid != -1) { /* the started flags: B floats the op reads and writes, apart from every operand */
            if (fid < 0 || fid >= v->nt)
                return bad(v, "started flags name tensor %lld, the program has tensors 0..%lld", (long long)fid, (long long)v->nt - 1);
            if (v->tdt[fid] != RNN_DT_F32) return bad(v, "started flags are %s, the instruction takes float32", code_name(v->tdt[fid]));
            if (v->tcount[fid] < B) return bad(v, "started flags have %lld elements, the instruction uses %lld", (long long)v->tcount[fid], (long long)B);
            if (v->twritable && !v->twritable[fid])
                return bad(v, "started flags are tensor %lld, a constant or input the program must not write", (long long)fid);
            if (b.id < 0) return bad(v, "started flags without sequence_lens");
            if (fid == sid) return bad(v, "started flags are the state tensor %lld", (long long)fid);
            for (int r = 0; r < 7; r++)
                if (v->in[1 + r] == fid) return bad(v, "started flags are operand %d (tensor %lld)", r, (long long)fid);
        }
        const int64_t w = rnn_stack_workspace_floats(st, T, B);
        if (w > v->work) return bad(v, "needs %lld floats of workspace, the program has %lld", (long long)w, (long long)v->work);
        return 0;
    }
    default: return bad(v, "unknown op %lld", (long long)op);
    }
}

rnn_status rnn_graph_verify(const int64_t *program, int64_t n_instr, const int64_t *iparams, int64_t n_iparams,
                            int64_t n_fparams, const int64_t *tensor_dtype, const int64_t *tensor_count,
                            const uint8_t *tensor_writable, int64_t n_tensors, rnn_stack *const *stacks,
                            const int64_t *stack_shape, int64_t n_stacks, int64_t work_floats, char *err,
                            size_t errlen, int64_t *failed) {
    if (failed) *failed = -1;
    if (n_instr < 0 || n_iparams < 0 || n_fparams < 0 || n_tensors < 0 || n_stacks < 0 || work_floats < 0 ||
        (n_instr > 0 && !program) || (n_iparams > 0 && !iparams) || (n_tensors > 0 && (!tensor_dtype || !tensor_count)) ||
        (n_stacks > 0 && (!stacks || !stack_shape)))
        return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, "the program's tables are missing or of negative size");
    /* the tensor table's entries are checked where an instruction names them (get), so a
     * refusal names the instruction and its node */
    vctx v;
    v.tdt = tensor_dtype, v.tcount = tensor_count, v.twritable = tensor_writable, v.nt = n_tensors;
    v.stacks = stacks, v.stack_shape = stack_shape, v.ns = n_stacks, v.work = work_floats;
    for (int64_t k = 0; k < n_instr; k++) {
        const int64_t *in = program + k * RNN_INSTR_WORDS;
        const int64_t op = in[0];
        int64_t end;
        v.in = in, v.msg[0] = 0;
        int refused = 0;
        if (in[9] < 0 || in[10] < 0 || !add_ok(in[9], in[10], &end) || end > n_iparams)
            refused = bad(&v, "int parameters [%lld, +%lld) lie outside the %lld given", (long long)in[9], (long long)in[10],
                          (long long)n_iparams);
        else if (in[11] < 0 || in[12] < 0 || !add_ok(in[11], in[12], &end) || end > n_fparams)
            refused = bad(&v, "float parameters [%lld, +%lld) lie outside the %lld given", (long long)in[11],
                          (long long)in[12], (long long)n_fparams);
        else {
            v.ip = iparams + in[9], v.nip = in[10], v.nfp = in[12];
            refused = verify_instr(&v);
        }
        if (refused) {
            char msg[300];
            if (failed) *failed = k;
            snprintf(msg, sizeof msg, "instruction %lld (%s): %s", (long long)k,
                     op >= 0 && op < N_OPS ? OP_NAMES[op] : "unknown op", v.msg);
            return fail(err, errlen, RNN_STATUS_BAD_ARGUMENT, msg);
        }
    }
    return RNN_STATUS_OK;
}
