/* rnn.c - the ONNX simple RNN cell: one time step over a batch. */
#include "internal.h"

/*
 * Per active row b at time t (default f = Tanh):
 *   Ht = f(clip(Xt Wi^T + Ht-1 Ri^T + Wbi + Rbi))
 */
void rnn_rnn_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *work) {
    const rnn_cell_config *cfg = &cell->cfg;
    const int64_t H = cfg->hidden_size, B = s->B;
    float *gates = work; /* (B, H) */

    /* gates = h @ R^T   (B, H) */
    rnn_gemm_packed_par(s->par, B, h, H, &cell->Rp, gates, H, 0);

    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float *xp = rnn_seq_xrow(s, t, b, H);
        float *g = gates + b * H, *hb = h + b * H;
        for (int64_t j = 0; j < H; j++) g[j] += xp[j];
        rnn_clip(g, H, cfg);
        rnn_activation_apply(&cfg->act[0], g, H);
        float *y = s->Y + t * s->ys_t + b * s->ys_b;
        for (int64_t j = 0; j < H; j++) {
            hb[j] = g[j];
            y[j] = g[j];
        }
    }
}

/* ---- training: forward with saved activations, and backward through time ---------------
 * f = Tanh or Relu, with clip. saved, per (t, b): the pre-activation before clipping (H).
 * work: xproj / dA (T*B, H), gates (B, H), zeros (B, H), dh (B, H). */
int64_t rnn_rnn_saved_floats(int64_t H) { return H; }

void rnn_rnn_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                           float *Y, float *hT, float *saved, float *work) {
    const int64_t H = c->hidden_size;
    float *xproj = work, *gates = xproj + T * B * H, *zeros = gates + B * H;
    for (int64_t k = 0; k < B * H; k++) zeros[k] = 0.0f;
    /* xproj = X @ W^T + Wb + Rb */
    for (int64_t r = 0; r < T * B; r++)
        for (int64_t j = 0; j < H; j++) xproj[r * H + j] = c->B ? c->B[j] + c->B[H + j] : 0.0f;
    rnn_train_input_forward(c, T * B, H, X, xproj);
    rnn_packed Rp;
    const int packed = rnn_train_pack(&Rp, c->R, H, H, 0);
    for (int64_t t = 0; t < T; t++) {
        const float *hp = rnn_train_hprev(h0, Y, zeros, t, B, H);
        rnn_train_gemm(packed, &Rp, B, hp, H, c->R, H, H, gates, H, 0, 0); /* h @ R^T */
        float *y = Y + t * B * H;
        for (int64_t k = 0; k < B * H; k++) {
            const float pre = gates[k] + xproj[t * B * H + k], v = rnn_train_clip(c, pre);
            saved[t * B * H + k] = pre;
            y[k] = c->relu ? (v > 0.0f ? v : 0.0f) : v;
        }
        if (!c->relu) rnn_vtanh(y, B * H);
    }
    rnn_packed_free(&Rp);
    if (hT) {
        const float *src = T ? Y + (T - 1) * B * H : (h0 ? h0 : zeros);
        for (int64_t k = 0; k < B * H; k++) hT[k] = src[k];
    }
}

void rnn_rnn_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *Y, const float *saved, const float *dY, const float *dhT, float *dX,
                            float *dW, float *dR, float *dB, float *dh0, float *work) {
    const int64_t H = c->hidden_size;
    float *dA = work, *zeros = dA + T * B * H, *dh = zeros + B * H;
    for (int64_t k = 0; k < B * H; k++) {
        zeros[k] = 0.0f;
        dh[k] = dhT ? dhT[k] : 0.0f;
    }
    rnn_packed RTp;
    const int packed = rnn_train_pack(&RTp, c->R, H, H, 1);
    for (int64_t t = T - 1; t >= 0; t--) {
        for (int64_t k = 0; k < B * H; k++) {
            const float pre = saved[t * B * H + k], y = Y[t * B * H + k];
            const float dact = c->relu ? (rnn_train_clip(c, pre) > 0.0f ? 1.0f : 0.0f) : 1.0f - y * y;
            dA[t * B * H + k] = (dh[k] + (dY ? dY[t * B * H + k] : 0.0f)) * dact * rnn_train_clip_grad(c, pre);
        }
        /* dh_{t-1} = dA_t @ R */
        rnn_train_gemm(packed, &RTp, B, dA + t * B * H, H, c->R, H, H, dh, H, 1, 0);
    }
    rnn_packed_free(&RTp);
    if (dh0)
        for (int64_t k = 0; k < B * H; k++) dh0[k] = dh[k];
    if (T == 0) return;
    rnn_gemm_tn(H, H, B, 1.0f, dA, H, h0 ? h0 : zeros, H, 1.0f, dR, H);
    rnn_gemm_tn(H, H, (T - 1) * B, 1.0f, dA + B * H, H, Y, H, 1.0f, dR, H);
    rnn_train_colsum_add(T * B, H, dA, dB, dB + H); /* dWb, dRb += colsum(dA) */
    rnn_train_input_backward(c, T * B, H, dA, H, X, dW, dX); /* dW += dA^T X;  dX = dA @ W */
}
