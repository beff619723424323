/* internal.h - structures and helpers shared by the cell files; not part of the public API. */
#ifndef RNNENGINE_INTERNAL_H
#define RNNENGINE_INTERNAL_H

#include "rnnengine.h"

#include <assert.h>

/* A weight matrix B (N, K) packed into 16-column panels once (pack.c), stored as float32,
 * float16 or int8 with one scale per output column n (rnn_weight_dtype). */
#define RNN_PANEL 16
typedef struct {
    int64_t N, K;
    int32_t dtype;  /* rnn_weight_dtype */
    void *data;     /* 64-byte aligned; ceil(N/16) panels of K x 16 elements */
    float *scale;   /* int8: (ceil(N/16)*16) scales, B[n][k] ~ scale[n] * q[n][k]; else NULL */
} rnn_packed;

rnn_status rnn_packed_init(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb);
rnn_status rnn_packed_init_dtype(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb,
                                 int32_t dtype);
/* float32 panels of M^T for a row-major M (rows, cols): N = cols, K = rows, the same layout
 * as rnn_packed_init of M^T, read straight from M (no transposed copy). */
rnn_status rnn_packed_init_t(rnn_packed *dst, const float *M, int64_t rows, int64_t cols);
/* Packs weights already stored compact, as they are (no rounding): dtype RNN_WEIGHTS_I8 takes
 * int8 codes Q (N, K) (row stride ldq) with one float32 scale per row, B[n][k] = scale[n] *
 * Q[n][k]; RNN_WEIGHTS_F16 takes IEEE half bits Q (N, K) and scale NULL. A weight file's
 * compact recurrent weights reach the kernels this way (rnn_cell_create_stored). */
rnn_status rnn_packed_init_stored(rnn_packed *dst, const void *Q, const float *scale, int64_t N, int64_t K,
                                  int64_t ldq, int32_t dtype);
/* The packed elements back in row-major (N, K) order, in their storage (float, half bits or
 * int8 codes), and for int8 the N scales; returns N*K. For tests: what the kernels read. */
int64_t rnn_packed_unpack(const rnn_packed *p, void *out, float *scale);
void rnn_packed_free(rnn_packed *p);
float rnn_half_to_float(uint16_t h);
/* C (M, N) = A (M, K) @ B^T, or C += ... when accumulate; the AVX2+FMA kernel when the
 * CPU has it (rnn_kernel_level) and Bp->data is aligned for the kernels' aligned loads
 * (float32 64 bytes, float16/int8 16), else the plain reference rnn_gemm_packed_ref. */
void rnn_gemm_packed(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                     int64_t ldc, int accumulate);
void rnn_gemm_packed_ref(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate);

/* ---- threads (pool.c) ----
 * A forward call that may use more than one thread claims the process-wide pool with
 * rnn_par_begin (NULL: run serially, e.g. threads = 1, no workers, or another call holds
 * them) and gives it back with rnn_par_end. rnn_par_run(par, n, fn, arg) calls fn(arg, c)
 * once for every chunk c in [0, n), spread over the caller and the workers, and returns
 * when all are done; with par NULL it runs them in order on the calling thread. */
typedef struct rnn_par rnn_par;
rnn_par *rnn_par_begin(int32_t threads, const void *key, int64_t rows, int64_t steps);
void rnn_par_end(rnn_par *par);
int32_t rnn_par_threads(const rnn_par *par);
void rnn_par_run(rnn_par *par, int64_t n_chunks, void (*fn)(void *arg, int64_t chunk), void *arg);
/* rnn_par_begin's key, rows and steps name the kind of call (the stack, its batch rows) and
 * its time steps: calls of one kind are timed split and on one thread as they run and the
 * faster way is used (pool.c); rnn_par_threads(par) is 1 when this call does not split. */
/* rnn_gemm_packed with B's panels (columns of C) split over the threads of par when the
 * product has at least rnn_threads_min_macs() multiply-adds, else on this thread. Every
 * output column is computed by the same kernel over the same k order either way, so the
 * result is bit-identical to rnn_gemm_packed. */
void rnn_gemm_packed_par(rnn_par *par, int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate);
int64_t rnn_threads_min_macs(void);
/* How many chunks workers (not callers) have run since the process started (for tests). */
int64_t rnn_threads_worker_chunks(void);

/* Input projections (rnn_cell_forward) go through the packed kernels at every number of rows,
 * in the cell's storage, so a row's projection has the same bits as one streamed step, one
 * row of a batch or one step of a whole sequence: run() equals the same steps streamed, and a
 * session stepped inside the session batcher equals the session stepped alone, bit for bit.
 * With rows in L2-sized blocks (pack.c, row_block) the packed kernels are level with or ahead
 * of OpenBLAS's sgemm at every size measured (AVX2 and AVX-512 machines; pack.c gives the
 * AVX2 numbers). Before 2026-12-02, below AVX-512, 128 rows or more went to sgemm, and
 * float16/int8 cells above batch 2 took the float32 W there: a session of a compact model
 * stepped in a batch of 64 sessions two steps at a time was then 4e-2 (int8) / 1.3e-3
 * (float16) off the same session alone. Only the plain portable kernels (kernel level 0, no
 * AVX2) still send this many rows to sgemm over the float32 W (their reference loops are far
 * slower), so there a whole sequence or a large batch differs from the steps streamed by
 * rounding (float32) or by W's storage rounding (float16/int8). */
#define RNN_BLAS_MIN_ROWS 128

struct rnn_cell {
    rnn_cell_config cfg;
    int32_t G;      /* gates: RNN 1, GRU 3, LSTM 4 */
    float *W;       /* (G*H, I), for BLAS input projections */
    rnn_packed Wp;  /* W packed, for short input projections */
    rnn_packed Rp;  /* R (G*H, H) packed; GRU with linear_before_reset = 0: only R[:2H] */
    rnn_packed Rhp; /* GRU with linear_before_reset = 0: R[2H:] (H, H) packed */
    float *bias_x;  /* (G*H) biases summed once, added to the input projection */
    float *bias_rh; /* (H) GRU with linear_before_reset: Rbh, applied inside r * (.) */
    float *P;       /* (3*H) LSTM peepholes [Pi; Po; Pf] or NULL */
    rnn_packed Whrp; /* LSTM with proj_size P: Whr (P, H) packed; Rp then packs R (4H, P) */
    int32_t borrowed; /* W and the panels belong to the caller (rnn_cell_create_mapped): not freed */
};

/* The packed weights of layer `layer`, direction `dir` of a stack: which = 0 W, 1 R (GRU
 * with linear_before_reset = 0: R[:2H]), 2 R[2H:] of that GRU, 3 Whr; NULL when the cell has
 * none. For tests (rnnengine._core.Stack.packed_weights): what the kernels read. */
const rnn_packed *rnn_stack_packed(const rnn_stack *st, int32_t layer, int32_t dir, int32_t which);

/* Floats of h (and of the cell's output per row): proj_size for a projected LSTM, else H. */
static inline int64_t rnn_cell_h_size(const rnn_cell *cell) {
    return cell->cfg.proj_size > 0 ? cell->cfg.proj_size : cell->cfg.hidden_size;
}

/* One direction's pass over a sequence, as seen by a cell's step function. */
typedef struct {
    int64_t T, B;
    const float *xproj;   /* rows of G*H floats: X @ W^T + bias_x; row (t, b) = t*xs_t + b*xs_b */
    int64_t xs_t, xs_b;
    float *Y;             /* h of (t, b) goes to Y[t*ys_t + b*ys_b ..), H floats (P when projected) */
    int64_t ys_t, ys_b;
    const int32_t *lens;  /* (B) or NULL */
    int32_t reverse;
    rnn_par *par;         /* threads for the step's products, or NULL */
} rnn_seq;

/* Time index that row b processes at step s, or -1 when the row is already finished.
 * A reverse pass walks each row from its own last valid step down to 0. */
static inline int64_t rnn_seq_time(const rnn_seq *s, int64_t step, int64_t b) {
    int64_t len = s->lens ? s->lens[b] : s->T;
    if (step >= len) return -1;
    return s->reverse ? len - 1 - step : step;
}

static inline const float *rnn_seq_xrow(const rnn_seq *s, int64_t t, int64_t b, int64_t width) {
    return s->xproj + (t * s->xs_t + b * s->xs_b) * width;
}

static inline void rnn_clip(float *x, int64_t n, const rnn_cell_config *cfg) {
    if (!cfg->has_clip) return;
    const float c = cfg->clip;
    for (int64_t i = 0; i < n; i++) x[i] = x[i] < -c ? -c : (x[i] > c ? c : x[i]);
}

/* Vectorised elementwise functions (vmath.c), in place over x[0..n). */
int rnn_kernel_level(void);
void rnn_vsigmoid(float *x, int64_t n);
void rnn_vexp(float *x, int64_t n); /* exp, x clamped to [-87, 89] first (vmath.c) */
void rnn_vtanh(float *x, int64_t n);

/* Scratch floats one step of the cell needs for B rows. */
int64_t rnn_cell_step_floats(const rnn_cell *cell, int64_t B);

/* One time step of each cell kind over all B rows. h (B, H) and c (B, H) are updated
 * in place for active rows; work holds rnn_cell_step_floats(B) floats. */
void rnn_lstm_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *c,
                   float *work);
/* LSTM with projection (cfg.proj_size = P): h (B, P), c (B, H). */
void rnn_lstmp_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *c,
                    float *work);
/* The naive one-row reference of rnn_lstmp_step (lstm.c; default activations only). */
void rnn_lstmp_step_ref(int64_t I, int64_t H, int64_t P, const float *x, const float *W, const float *R,
                        const float *B, const float *Whr, float *h, float *c, float *work);
void rnn_gru_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *work);
void rnn_rnn_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *work);

/* One direction over a whole sequence (see rnn_stack_forward for the conventions).
 * X rows have I floats; work holds rnn_cell_forward_floats(T, B) floats. */
int64_t rnn_cell_forward_floats(const rnn_cell *cell, int64_t T, int64_t B);
void rnn_cell_forward(const rnn_cell *cell, const float *X, int64_t T, int64_t B, int64_t xs_t,
                      int64_t xs_b, const int32_t *lens, int32_t reverse, float *Y, int64_t ys_t,
                      int64_t ys_b, float *h, float *c, float *work, rnn_par *par);

/* ---- training helpers (lstm.c, gru.c, rnn.c, train.c) ---- */
#include <math.h>

static inline float rnn_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float rnn_train_clip(const rnn_train_cell *c, float x) {
    return c->has_clip ? (x < -c->clip ? -c->clip : (x > c->clip ? c->clip : x)) : x;
}
/* d clip(x) / dx: 1 inside the clip range, 0 where the value was clipped. */
static inline float rnn_train_clip_grad(const rnn_train_cell *c, float x) {
    return !c->has_clip || (x > -c->clip && x < c->clip) ? 1.0f : 0.0f;
}
/* The vectorised backward loops of lstm.c and gru.c (beside their plain references), built
 * with a target attribute so the file needs no CPU flags; run when rnn_kernel_level() >= 1. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNN_HAVE_AVX2_TRAIN 1
#define AVX2T __attribute__((target("avx2,fma")))

/* rnn_train_clip_grad in each of eight lanes: 1.0 inside (-clip, clip) or without clip, else
 * 0.0 (NaN -> 0, as the scalar comparisons give). */
AVX2T static inline __m256 rnn_train_clip_grad8(const rnn_train_cell *c, __m256 x) {
    if (!c->has_clip) return _mm256_set1_ps(1.0f);
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-c->clip), _CMP_GT_OQ),
                                        _mm256_cmp_ps(x, _mm256_set1_ps(c->clip), _CMP_LT_OQ));
    return _mm256_and_ps(inside, _mm256_set1_ps(1.0f));
}
#endif

/* h_{t-1} of rows (B, H): h0 (or zeros) at t = 0, else Y[t-1]. */
static inline const float *rnn_train_hprev(const float *h0, const float *Y, const float *zeros, int64_t t,
                                           int64_t B, int64_t H) {
    return t == 0 ? (h0 ? h0 : zeros) : Y + (t - 1) * B * H;
}

/* Packs M (rows, cols) for per-step products (or M^T when transpose), so the T small products
 * of a training pass stream one packed copy instead of OpenBLAS repacking R at every step.
 * Returns 0 when packing failed (out of memory): callers then use BLAS. One allocation per
 * pass (not per step), freed with rnn_packed_free. */
int rnn_train_pack(rnn_packed *p, const float *M, int64_t rows, int64_t cols, int transpose);
/* The input's part of a pass, the one place the cells read W (or, with c->x_projected, take
 * the caller's product instead): xproj (N, GH), holding the biases, += X @ W^T, or += X.
 * Backward: dW += dAx^T X and dX = dAx @ W (dX may be NULL), dAx's rows lda apart; with
 * c->x_projected, dX = dAx and dW is left alone. */
void rnn_train_input_forward(const rnn_train_cell *c, int64_t N, int64_t GH, const float *X, float *xproj);
/* The input's product alone (no biases): X @ W^T written to xproj and returned, or X itself
 * (nothing written) when the caller made it (c->x_projected). */
const float *rnn_train_input_product(const rnn_train_cell *c, int64_t N, int64_t GH, const float *X, float *xproj);
void rnn_train_input_backward(const rnn_train_cell *c, int64_t N, int64_t GH, const float *dAx, int64_t lda,
                              const float *X, float *dW, float *dX);
/* C (M, N) (+)= A (M, K) @ W^T (W: (N, K)), or with transposed @ W (W: (K, N)), through W
 * packed for this call (BLAS when packing fails). */
void rnn_train_gemm_weights(int64_t M, const float *A, int64_t lda, const float *W, int64_t wrows, int64_t wcols,
                            int transposed, float *C, int64_t ldc, int accumulate);
/* dst1 (+)= the column sums of A (N, G), and dst2 too when not NULL (the two ONNX bias halves
 * get the same gradient); A must not overlap dst1 / dst2. */
void rnn_train_colsum_add(int64_t N, int64_t G, const float *A, float *dst1, float *dst2);
/* C (B, N) = A (B, K) @ M^T where p packs M (N, K) when ok, else through BLAS with M itself. */
void rnn_train_gemm(int ok, const rnn_packed *p, int64_t B, const float *A, int64_t lda, const float *M,
                    int64_t N, int64_t K, float *C, int64_t ldc, int transposed, int accumulate);

/* Conv1d over filters packed into 16-filter panels (conv.c; layout and parameters there and in
 * graph.c, RNN_OP_CONV1D_PACKED). Outputs are computed RNN_CONV_BLOCK positions at a time. */
#define RNN_CONV_BLOCK 64
#define RNN_CONV_PARTS 4       /* partial sums per output, each over a quarter of the taps, */
#define RNN_CONV_SPLIT_TAPS 64 /* in calls of 1-3 positions of this many taps (C/group * K) on */
int64_t rnn_conv1d_parts(int64_t CK, int64_t Lout);
int64_t rnn_conv1d_packed_floats(int64_t M, int64_t Cg, int64_t K, int64_t G);
void rnn_conv1d_pack(const float *W, int64_t M, int64_t Cg, int64_t K, int64_t G, int64_t parts, float *out);
int64_t rnn_conv1d_packed_work(int64_t N, int64_t Lout, int64_t Cg, int64_t K, int64_t Mg);
void rnn_conv1d_packed(const int64_t *ip, float alpha, const float *x, const float *Wp, const float *bias,
                       float *out, float *work);
void rnn_im2col(const float *xg, int64_t Cg, int64_t L, int64_t K, int64_t stride, int64_t dil, int64_t pad,
                int64_t l0, int64_t lb, float *colT);

/* A Conv1d whose filters are a windowed DFT basis, by FFT (stft.c; RNN_OP_STFT in graph.c). */
int64_t rnn_stft_table_floats(int64_t K);
int64_t rnn_stft_work(int64_t K);
void rnn_stft(const int64_t *ip, const float *x, const float *W, const float *table, float *out, float *work);

int64_t rnn_lstm_saved_floats(int64_t H);
int64_t rnn_gru_saved_floats(int64_t H);
int64_t rnn_rnn_saved_floats(int64_t H);
void rnn_lstm_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *c0, float *Y, float *hT, float *cT, float *saved, float *work);
void rnn_lstm_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                             const float *c0, const float *Y, const float *saved, const float *dY,
                             const float *dhT, const float *dcT, float *dX, float *dW, float *dR, float *dB,
                             float *dP, float *dh0, float *dc0, float *work);
void rnn_gru_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                           float *Y, float *hT, float *saved, float *work);
void rnn_gru_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *Y, const float *saved, const float *dY, const float *dhT, float *dX,
                            float *dW, float *dR, float *dB, float *dh0, float *work);
void rnn_rnn_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                           float *Y, float *hT, float *saved, float *work);
void rnn_rnn_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *Y, const float *saved, const float *dY, const float *dhT, float *dX,
                            float *dW, float *dR, float *dB, float *dh0, float *work);

#endif
