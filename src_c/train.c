/* train.c - training around the cells: dispatch, dense layer, losses, embedding, optimisers. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Dimension legend: N = rows (time steps x batch), K = input features, O = outputs,
 * C = classes, V = vocabulary, E = embedding size, G = gates, H = hidden size. */

static int64_t gates_of_kind(int32_t kind) { return kind == RNN_CELL_LSTM ? 4 : (kind == RNN_CELL_GRU ? 3 : 1); }

static rnn_status check_cell(const rnn_train_cell *c, int64_t T, int64_t B) {
    if (!c || !c->W || !c->R) return RNN_STATUS_BAD_ARGUMENT;
    if (c->kind < RNN_CELL_RNN || c->kind > RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (c->hidden_size <= 0 || c->input_size <= 0 || T < 0 || B < 0) return RNN_STATUS_BAD_SHAPE;
    if (c->has_clip && !(c->clip > 0.0f)) return RNN_STATUS_BAD_ARGUMENT;
    if (c->P && c->kind != RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (c->x_projected != 0 && c->x_projected != 1) return RNN_STATUS_BAD_ARGUMENT; /* (an unset field) */
    if (T * B > INT32_MAX || gates_of_kind(c->kind) * c->hidden_size * (int64_t)c->input_size > INT32_MAX)
        return RNN_STATUS_TOO_LARGE;
    return RNN_STATUS_OK;
}

int64_t rnn_train_saved_floats(const rnn_train_cell *c, int64_t T, int64_t B) {
    const int64_t H = c->hidden_size;
    const int64_t per = c->kind == RNN_CELL_LSTM ? rnn_lstm_saved_floats(H)
                        : c->kind == RNN_CELL_GRU ? rnn_gru_saved_floats(H) : rnn_rnn_saved_floats(H);
    return T * B * per;
}

int64_t rnn_train_work_floats(const rnn_train_cell *c, int64_t T, int64_t B) {
    const int64_t GH = gates_of_kind(c->kind) * c->hidden_size;
    /* two (T*B, G*H) blocks, one (B, G*H), five (B, H): enough for every kind's layout */
    return 2 * T * B * GH + B * GH + 5 * B * c->hidden_size + 16;
}

rnn_status rnn_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                             const float *c0, float *Y, float *hT, float *cT, float *saved, float *work) {
    rnn_status st = check_cell(c, T, B);
    if (st != RNN_STATUS_OK) return st;
    if (T * B > 0 && (!X || !Y || !saved || !work)) return RNN_STATUS_BAD_ARGUMENT;
    switch (c->kind) {
    case RNN_CELL_LSTM: rnn_lstm_train_forward(c, T, B, X, h0, c0, Y, hT, cT, saved, work); break;
    case RNN_CELL_GRU: rnn_gru_train_forward(c, T, B, X, h0, Y, hT, saved, work); break;
    default: rnn_rnn_train_forward(c, T, B, X, h0, Y, hT, saved, work); break;
    }
    return RNN_STATUS_OK;
}

rnn_status rnn_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                              const float *c0, const float *Y, const float *saved, const float *dY,
                              const float *dhT, const float *dcT, float *dX, float *dW, float *dR, float *dB,
                              float *dP, float *dh0, float *dc0, float *work) {
    rnn_status st = check_cell(c, T, B);
    if (st != RNN_STATUS_OK) return st;
    if (!dW || !dR || !dB || !work || (T * B > 0 && (!X || !Y || !saved))) return RNN_STATUS_BAD_ARGUMENT;
    switch (c->kind) {
    case RNN_CELL_LSTM:
        rnn_lstm_train_backward(c, T, B, X, h0, c0, Y, saved, dY, dhT, dcT, dX, dW, dR, dB, dP, dh0, dc0, work);
        break;
    case RNN_CELL_GRU: rnn_gru_train_backward(c, T, B, X, h0, Y, saved, dY, dhT, dX, dW, dR, dB, dh0, work); break;
    default: rnn_rnn_train_backward(c, T, B, X, h0, Y, saved, dY, dhT, dX, dW, dR, dB, dh0, work); break;
    }
    return RNN_STATUS_OK;
}

/* ---- the input's product ------------------------------------------------------------------ */
void rnn_train_input_forward(const rnn_train_cell *c, int64_t N, int64_t GH, const float *X, float *xproj) {
    if (c->x_projected) {
        for (int64_t k = 0; k < N * GH; k++) xproj[k] += X[k];
        return;
    }
    const int64_t I = c->input_size;
    rnn_train_gemm_weights(N, X, I, c->W, GH, I, 0, xproj, GH, 1); /* xproj += X @ W^T */
}

const float *rnn_train_input_product(const rnn_train_cell *c, int64_t N, int64_t GH, const float *X, float *xproj) {
    if (c->x_projected) return X;
    const int64_t I = c->input_size;
    rnn_train_gemm_weights(N, X, I, c->W, GH, I, 0, xproj, GH, 0); /* xproj = X @ W^T */
    return xproj;
}

void rnn_train_input_backward(const rnn_train_cell *c, int64_t N, int64_t GH, const float *dAx, int64_t lda,
                              const float *X, float *dW, float *dX) {
    if (c->x_projected) {
        if (dX)
            for (int64_t r = 0; r < N; r++) memcpy(dX + r * GH, dAx + r * lda, sizeof(float) * (size_t)GH);
        return;
    }
    const int64_t I = c->input_size;
    if (dW) rnn_gemm_tn(GH, I, N, 1.0f, dAx, lda, X, I, 1.0f, dW, I); /* dW += dAx^T X */
    if (dX) rnn_train_gemm_weights(N, dAx, lda, c->W, GH, I, 1, dX, I, 0); /* dX = dAx @ W */
}

/* ---- packed weights for the per-step products ------------------------------------------ */

int rnn_train_pack(rnn_packed *p, const float *M, int64_t rows, int64_t cols, int transpose) {
    memset(p, 0, sizeof *p);
    return (transpose ? rnn_packed_init_t(p, M, rows, cols) : rnn_packed_init(p, M, rows, cols, cols)) ==
           RNN_STATUS_OK;
}

void rnn_train_gemm(int ok, const rnn_packed *p, int64_t B, const float *A, int64_t lda, const float *M,
                    int64_t N, int64_t K, float *C, int64_t ldc, int transposed, int accumulate) {
    if (ok) {
        rnn_gemm_packed(B, A, lda, p, C, ldc, accumulate);
    } else if (transposed) {
        /* C (B, N) (+)= A (B, K) @ M (K, N) */
        rnn_gemm_nn(B, N, K, 1.0f, A, lda, M, N, accumulate ? 1.0f : 0.0f, C, ldc);
    } else {
        /* C (B, N) (+)= A (B, K) @ M (N, K)^T */
        rnn_gemm_nt(B, N, K, 1.0f, A, lda, M, K, accumulate ? 1.0f : 0.0f, C, ldc, 1);
    }
}

/* C (M, N) (+)= A (M, K) @ op(W) for a row-major weight matrix W (wrows, wcols): op(W) = W^T
 * (N = wrows, K = wcols) or, transposed, W itself (K = wrows, N = wcols). W is packed into
 * panels for the packed kernel (93-96 GFLOP/s where OpenBLAS takes 84-92 on training's
 * shapes: K or N of a few hundred, thousands of rows); BLAS when packing fails. */
void rnn_train_gemm_weights(int64_t M, const float *A, int64_t lda, const float *W, int64_t wrows, int64_t wcols,
                            int transposed, float *C, int64_t ldc, int accumulate) {
    rnn_packed p;
    const int ok = rnn_train_pack(&p, W, wrows, wcols, transposed);
    rnn_train_gemm(ok, &p, M, A, lda, W, transposed ? wcols : wrows, transposed ? wrows : wcols, C, ldc,
                   transposed, accumulate);
    rnn_packed_free(&p);
}

void rnn_train_colsum_add(int64_t N, int64_t G, const float *A, float *dst1, float *dst2) {
    /* restrict: no overlap, so the compiler vectorises the inner loops */
    const float *restrict a = A;
    float *restrict d1 = dst1, *restrict d2 = dst2;
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = 0; j < G; j++) d1[j] += a[r * G + j];
    if (d2)
        for (int64_t r = 0; r < N; r++)
            for (int64_t j = 0; j < G; j++) d2[j] += a[r * G + j];
}

/* ---- dense layer ------------------------------------------------------------------------ */

void rnn_dense_forward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *b, float *Y) {
    /* Y (N, O) = X (N, K) @ W (O, K)^T + b */
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < O; o++) Y[n * O + o] = b ? b[o] : 0.0f;
    rnn_train_gemm_weights(N, X, K, W, O, K, 0, Y, O, 1);
}

void rnn_dense_backward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *dY,
                        float *dW, float *db, float *dX) {
    rnn_gemm_tn(O, K, N, 1.0f, dY, O, X, K, 1.0f, dW, K); /* dW += dY^T X */
    if (db)
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < O; o++) db[o] += dY[n * O + o];
    if (dX) rnn_train_gemm_weights(N, dY, O, W, O, K, 1, dX, K, 0); /* dX = dY @ W */
}

/* ---- losses ----------------------------------------------------------------------------- */

double rnn_softmax_xent(int64_t N, int64_t C, const float *logits, const int32_t *targets, float *dlogits) {
    int64_t count = 0;
    for (int64_t n = 0; n < N; n++) {
        if (targets[n] >= C) return -1.0;
        count += targets[n] >= 0;
    }
    double loss = 0.0;
    for (int64_t n = 0; n < N; n++) {
        const float *z = logits + n * C;
        float *dz = dlogits ? dlogits + n * C : NULL;
        if (targets[n] < 0) {
            if (dz) memset(dz, 0, sizeof(float) * (size_t)C);
            continue;
        }
        float mx = z[0];
        for (int64_t k = 1; k < C; k++) mx = z[k] > mx ? z[k] : mx;
        const float zt = z[targets[n]]; /* read before dz (which may be z itself) is written */
        /* e_k = exp(z_k - mx) by the vectorised float32 exp (vmath.c: a few ulps; arguments
         * below -87 give ~1e-38 for 0, invisible in a sum that holds exp(0) = 1), summed in
         * double; kept in dz (when the gradient is wanted, else a block at a time on the stack)
         * until the sum is known */
        double sum = 0.0;
        float block[256];
        for (int64_t k0 = 0; k0 < C; k0 += 256) {
            const int64_t nk = C - k0 < 256 ? C - k0 : 256;
            float *e = dz ? dz + k0 : block;
            for (int64_t k = 0; k < nk; k++) e[k] = z[k0 + k] - mx;
            rnn_vexp(e, nk);
            for (int64_t k = 0; k < nk; k++) sum += (double)e[k];
        }
        const double lse = log(sum) + mx;
        loss += lse - zt;
        if (dz) {
            /* d(mean loss)/dz = (softmax(z) - onehot) / count, softmax(z)_k = e_k / sum */
            const double scale = 1.0 / (sum * (double)count);
            for (int64_t k = 0; k < C; k++) dz[k] = (float)((double)dz[k] * scale);
            dz[targets[n]] -= (float)(1.0 / (double)count);
        }
    }
    return count ? loss / (double)count : 0.0;
}

double rnn_mse(int64_t N, int64_t D, const float *y, const float *t, float *dy) {
    const int64_t n = N * D;
    double loss = 0.0;
    for (int64_t k = 0; k < n; k++) {
        const double d = (double)y[k] - (double)t[k];
        loss += d * d;
        if (dy) dy[k] = (float)(2.0 * d / (double)n);
    }
    return n ? loss / (double)n : 0.0;
}

/* ---- embedding -------------------------------------------------------------------------- */

int rnn_embedding_forward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *table, float *out) {
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) return -1;
    for (int64_t n = 0; n < N; n++) memcpy(out + n * E, table + (int64_t)ids[n] * E, sizeof(float) * (size_t)E);
    return 0;
}

int rnn_embedding_backward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *dout, float *dtable) {
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) return -1;
    for (int64_t n = 0; n < N; n++) {
        float *row = dtable + (int64_t)ids[n] * E;
        for (int64_t e = 0; e < E; e++) row[e] += dout[n * E + e];
    }
    return 0;
}

/* ---- optimisers ------------------------------------------------------------------------- */

double rnn_clip_grad_norm(int64_t n, float *g, double max_norm) {
    double ss = 0.0;
    for (int64_t k = 0; k < n; k++) ss += (double)g[k] * g[k];
    const double norm = sqrt(ss);
    if (max_norm > 0.0 && norm > max_norm) {
        const float s = (float)(max_norm / (norm + 1e-12));
        for (int64_t k = 0; k < n; k++) g[k] *= s;
    }
    return norm;
}

void rnn_sgd_step(int64_t n, float *w, const float *g, float *v, float lr, float momentum, float weight_decay) {
    for (int64_t k = 0; k < n; k++) {
        const float grad = g[k] + weight_decay * w[k];
        v[k] = momentum * v[k] + grad;
        w[k] -= lr * v[k];
    }
}

void rnn_adam_step(int64_t n, float *w, const float *g, float *m, float *v, int64_t t, float lr, float beta1,
                   float beta2, float eps, float weight_decay) {
    const double c1 = 1.0 - pow((double)beta1, (double)t), c2 = 1.0 - pow((double)beta2, (double)t);
    const float step = (float)(lr * sqrt(c2) / c1);
    for (int64_t k = 0; k < n; k++) {
        m[k] = beta1 * m[k] + (1.0f - beta1) * g[k];
        v[k] = beta2 * v[k] + (1.0f - beta2) * g[k] * g[k];
        w[k] -= step * m[k] / (sqrtf(v[k]) + eps * (float)sqrt(c2)) + lr * weight_decay * w[k];
    }
}
