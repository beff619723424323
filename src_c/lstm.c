/* lstm.c - the ONNX LSTM cell: one time step over a batch (gate order i, o, f, c). */
#include "internal.h"

#include <string.h>

/*
 * Per active row b at time t (ONNX LSTM, default activations f=Sigmoid, g=Tanh, h=Tanh):
 *   i = f(clip(Xt Wi^T + Ht-1 Ri^T + Pi . Ct-1 + Wbi + Rbi))
 *   f = f(clip(Xt Wf^T + Ht-1 Rf^T + Pf . Ct-1 + Wbf + Rbf))   (1 - i with input_forget)
 *   c = g(clip(Xt Wc^T + Ht-1 Rc^T + Wbc + Rbc))
 *   Ct = f . Ct-1 + i . c
 *   o = f(clip(Xt Wo^T + Ht-1 Ro^T + Po . Ct + Wbo + Rbo))
 *   Ht = o . h(Ct)
 */
/* The gate math of one active row, shared by the plain and the projected step: g (4H) holds
 * Xt W^T + Ht-1 R^T on entry (the input projection xp (4H) is added here); cb (H) is Ct-1 on
 * entry and Ct on return; on return go (g + H) holds o and gc (g + 3H) holds h(Ct). */
static inline void lstm_row(const rnn_cell_config *cfg, const float *Pi, const float *Po, const float *Pf,
                            const float *xp, float *g, float *cb, int64_t H) {
    float *gi = g, *go = g + H, *gf = g + 2 * H, *gc = g + 3 * H;
    for (int64_t j = 0; j < 4 * H; j++) g[j] += xp[j];
    if (Pi) {
        for (int64_t j = 0; j < H; j++) {
            gi[j] += Pi[j] * cb[j];
            gf[j] += Pf[j] * cb[j];
        }
    }
    rnn_clip(gi, H, cfg);
    rnn_clip(gf, H, cfg);
    rnn_clip(gc, H, cfg);
    rnn_activation_apply(&cfg->act[0], gi, H);
    if (cfg->input_forget) {
        for (int64_t j = 0; j < H; j++) gf[j] = 1.0f - gi[j];
    } else {
        rnn_activation_apply(&cfg->act[0], gf, H);
    }
    rnn_activation_apply(&cfg->act[1], gc, H);

    for (int64_t j = 0; j < H; j++) cb[j] = gf[j] * cb[j] + gi[j] * gc[j];

    if (Po) {
        for (int64_t j = 0; j < H; j++) go[j] += Po[j] * cb[j];
    }
    rnn_clip(go, H, cfg);
    rnn_activation_apply(&cfg->act[0], go, H);

    /* h(Ct) in the c-gate slot */
    memcpy(gc, cb, sizeof(float) * (size_t)H);
    rnn_activation_apply(&cfg->act[2], gc, H);
}

void rnn_lstm_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *c,
                   float *work) {
    const rnn_cell_config *cfg = &cell->cfg;
    const int64_t H = cfg->hidden_size, GH = 4 * H, B = s->B;
    float *gates = work; /* (B, 4H) */

    /* gates = h @ R^T   (B, 4H) */
    rnn_gemm_packed_par(s->par, B, h, H, &cell->Rp, gates, GH, 0);

    const float *Pi = cell->P, *Po = cell->P ? cell->P + H : NULL, *Pf = cell->P ? cell->P + 2 * H : NULL;
    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float *xp = rnn_seq_xrow(s, t, b, GH);
        float *g = gates + b * GH, *go = g + H, *gc = g + 3 * H;
        float *hb = h + b * H;
        lstm_row(cfg, Pi, Po, Pf, xp, g, c + b * H, H);

        /* Ht = o . h(Ct) */
        float *y = s->Y + t * s->ys_t + b * s->ys_b;
        for (int64_t j = 0; j < H; j++) {
            hb[j] = go[j] * gc[j];
            y[j] = hb[j];
        }
    }
}

/*
 * LSTM with an output projection (PyTorch nn.LSTM(proj_size=P); no ONNX operator has it).
 * The gates are rnn_lstm_step's, except that the recurrence reads the projected h (P floats)
 * and the cell's output is projected:
 *   gates = Xt W^T + Ht-1 R^T + biases      R (4H, P), Ht-1 (P)
 *   Ct    = f . Ct-1 + i . c                (H)
 *   Ht    = Whr (o . h(Ct))                 Whr (P, H), Ht (P): the state h and the output
 * The row math is rnn_lstm_step's (lstm_row); the projection is one packed product over
 * all rows after it. The naive
 * reference is rnn_lstmp_step_ref below; tests compare both with torch.
 * work: gates (B, 4H), then the projected rows (B, P).
 */
void rnn_lstmp_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *c,
                    float *work) {
    const rnn_cell_config *cfg = &cell->cfg;
    const int64_t H = cfg->hidden_size, GH = 4 * H, B = s->B, P = cfg->proj_size;
    float *gates = work;                 /* (B, 4H) */
    float *proj = work + B * GH + B * H; /* (B, P) (after the B*H floats GRU steps use) */

    /* gates = h @ R^T   (B, P) @ (P, 4H) -> (B, 4H) */
    rnn_gemm_packed_par(s->par, B, h, P, &cell->Rp, gates, GH, 0);

    const float *Pi = cell->P, *Po = cell->P ? cell->P + H : NULL, *Pf = cell->P ? cell->P + 2 * H : NULL;
    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float *xp = rnn_seq_xrow(s, t, b, GH);
        float *g = gates + b * GH, *go = g + H, *gc = g + 3 * H;
        lstm_row(cfg, Pi, Po, Pf, xp, g, c + b * H, H);
        /* o . h(Ct) in the c-gate slot (H floats of row b, stride 4H between rows) */
        for (int64_t j = 0; j < H; j++) gc[j] *= go[j];
    }

    /* proj = (o . h(Ct)) @ Whr^T   (B, H) @ (H, P) -> (B, P); rows that are past their
     * length were not touched above and are not copied below */
    rnn_gemm_packed_par(s->par, B, gates + 3 * H, GH, &cell->Whrp, proj, P, 0);
    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        float *y = s->Y + t * s->ys_t + b * s->ys_b;
        memcpy(h + b * P, proj + b * P, sizeof(float) * (size_t)P);
        memcpy(y, proj + b * P, sizeof(float) * (size_t)P);
    }
}

/* Naive reference of one projected step for one row, plain loops over row-major float32
 * weights, default activations (Sigmoid, Tanh, Tanh), no clip or peepholes (what PyTorch's
 * nn.LSTM(proj_size=P) computes):
 *   x (I), W (4H, I), R (4H, P), B (8H) = [Wb; Rb] or NULL, Whr (P, H);
 *   h (P) and c (H) updated in place; work holds 5H floats. */
void rnn_lstmp_step_ref(int64_t I, int64_t H, int64_t P, const float *x, const float *W, const float *R,
                        const float *B, const float *Whr, float *h, float *c, float *work) {
    float *a = work, *u = work + 4 * H; /* a: gate pre-activations (4H, order i, o, f, c); u (H) */
    for (int64_t r = 0; r < 4 * H; r++) {
        double acc = B ? (double)B[r] + B[4 * H + r] : 0.0;
        for (int64_t k = 0; k < I; k++) acc += (double)W[r * I + k] * x[k];
        for (int64_t k = 0; k < P; k++) acc += (double)R[r * P + k] * h[k];
        a[r] = (float)acc;
    }
    for (int64_t j = 0; j < H; j++) {
        const float i = rnn_sigmoidf(a[j]), o = rnn_sigmoidf(a[H + j]), f = rnn_sigmoidf(a[2 * H + j]);
        const float g = tanhf(a[3 * H + j]);
        c[j] = f * c[j] + i * g;
        u[j] = o * tanhf(c[j]);
    }
    for (int64_t p = 0; p < P; p++) {
        double acc = 0.0;
        for (int64_t j = 0; j < H; j++) acc += (double)Whr[p * H + j] * u[j];
        h[p] = (float)acc;
    }
}

/* ---- training: forward with saved activations, and backward through time ---------------
 * Default activations (f = Sigmoid, g = h = Tanh), clip and peepholes; row-major float32.
 * saved, per (t, b): pre (4H: the gate pre-activations i, o, f, c before clipping),
 *                    post (4H: i, o, f, g after activation), c (H), tanh(c) (H).
 * work: xproj / dA (T*B, 4H), gates (B, 4H), zeros (B, H), forward: Wb + Rb (4H); backward: dh,
 *       dc (B, H) and the column sums of dA (4H). */
int64_t rnn_lstm_saved_floats(int64_t H) { return 10 * H; }

void rnn_lstm_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *c0, float *Y, float *hT, float *cT, float *saved, float *work) {
    const int64_t H = c->hidden_size, GH = 4 * H, S = 10 * H;
    float *xproj = work, *gates = xproj + T * B * GH, *zeros = gates + B * GH, *bsum = zeros + B * H;
    memset(zeros, 0, sizeof(float) * (size_t)(B * H));
    /* the input's product X @ W^T (T*B, 4H), in xproj or the caller's own; the biases
     * Wb + Rb (bsum: within work's second block, as T*B >= 1 there) are added per row below */
    const float *xin = xproj;
    if (T > 0 && B > 0) {
        xin = rnn_train_input_product(c, T * B, GH, X, xproj);
        for (int64_t j = 0; j < GH; j++) bsum[j] = c->B ? c->B[j] + c->B[GH + j] : 0.0f;
    }
    const float *Pi = c->P, *Po = c->P ? c->P + H : NULL, *Pf = c->P ? c->P + 2 * H : NULL;
    const int has_clip = c->has_clip;
    const float clip = c->clip;
    rnn_packed Rp;
    const int packed = rnn_train_pack(&Rp, c->R, GH, H, 0);
    for (int64_t t = 0; t < T; t++) {
        const float *hp = rnn_train_hprev(h0, Y, zeros, t, B, H);
        /* gates = h_{t-1} @ R^T   (B, 4H) */
        rnn_train_gemm(packed, &Rp, B, hp, H, c->R, GH, H, gates, GH, 0, 0);
        for (int64_t b = 0; b < B; b++) {
            float *sv = saved + (t * B + b) * S, *pre = sv, *post = sv + GH, *cs = sv + 2 * GH, *tc = cs + H;
            const float *cp = t == 0 ? (c0 ? c0 + b * H : zeros) : saved + ((t - 1) * B + b) * S + 2 * GH;
            const float *a = gates + b * GH, *xp = xin + (t * B + b) * GH;
            float *y = Y + (t * B + b) * H;
            /* pre-activations (o's peephole term is added once c is known), then the
             * activations over whole gate blocks with the vectorised sigmoid / tanh */
            if (!has_clip && !Pi) {
                /* no clip and no peepholes: backward never reads `pre` (clip' is 1), so the
                 * pre-activations go straight into `post` (a 4H write and copy less per row) */
                float *restrict po = post;
                const float *restrict av = a, *restrict xv = xp, *restrict bv = bsum;
                for (int64_t j = 0; j < GH; j++) po[j] = av[j] + xv[j] + bv[j];
            } else {   /* the clip read once into locals: with c's fields reread at every store
                 * (they may alias the floats written, as far as the compiler knows) these
                 * loops did not vectorise (6% of a char LM training step) */
                float *restrict pr = pre, *restrict po = post;
                const float *restrict av = a, *restrict xv = xp, *restrict bv = bsum;
                for (int64_t j = 0; j < GH; j++) pr[j] = av[j] + xv[j] + bv[j];
                if (Pi)
                    for (int64_t j = 0; j < H; j++) {
                        pr[j] += Pi[j] * cp[j];
                        pr[2 * H + j] += Pf[j] * cp[j];
                    }
                if (has_clip)
                    for (int64_t j = 0; j < GH; j++) po[j] = pr[j] < -clip ? -clip : (pr[j] > clip ? clip : pr[j]);
                else
                    memcpy(po, pr, sizeof(float) * (size_t)GH);
            }
            rnn_vsigmoid(post, 3 * H); /* i, o (recomputed below with a peephole), f */
            rnn_vtanh(post + 3 * H, H); /* g */
            {
                float *restrict cv = cs;
                const float *restrict pv = post, *restrict cpv = cp;
                for (int64_t j = 0; j < H; j++) cv[j] = pv[2 * H + j] * cpv[j] + pv[j] * pv[3 * H + j];
            }
            if (Po) {
                for (int64_t j = 0; j < H; j++) {
                    pre[H + j] += Po[j] * cs[j];
                    post[H + j] = rnn_train_clip(c, pre[H + j]);
                }
                rnn_vsigmoid(post + H, H);
            }
            memcpy(tc, cs, sizeof(float) * (size_t)H);
            rnn_vtanh(tc, H);
            {
                float *restrict yv = y;
                const float *restrict ov = post + H, *restrict tv = tc;
                for (int64_t j = 0; j < H; j++) yv[j] = ov[j] * tv[j];
            }
        }
    }
    rnn_packed_free(&Rp);
    if (hT) memcpy(hT, T ? Y + (T - 1) * B * H : (h0 ? h0 : zeros), sizeof(float) * (size_t)(B * H));
    if (cT) {
        for (int64_t b = 0; b < B; b++)
            memcpy(cT + b * H, T ? saved + ((T - 1) * B + b) * S + 2 * GH : (c0 ? c0 + b * H : zeros),
                   sizeof(float) * (size_t)H);
    }
}

/* The element-wise part of one backward step for one row (everything but the products):
 * from dh (H, the gradient reaching h_t from step t+1), dy (H, from the output) and dc (H)
 * to dA (4H: the gradients of the pre-activations i, o, f, c) and dc_{t-1} (in place);
 * with peepholes dP (3H) accumulates. Per column j:
 *   dht = dh + dy;  dct = dc + dht o (1 - tanh(c)^2) [+ dpo Po]
 *   dpo = dht tanh(c) o (1 - o) clip'(pre_o);  dpi = dct g i (1 - i) clip'(pre_i)
 *   dpf = dct c_{t-1} f (1 - f) clip'(pre_f);  dpc = dct i (1 - g^2) clip'(pre_c)
 *   dc_{t-1} = dct f [+ dpi Pi + dpf Pf] */
typedef struct {
    const float *pre, *post, *cs, *tc; /* saved: pre (4H), post (4H), c_t (H), tanh(c_t) (H) */
    const float *cp, *dy;              /* c_{t-1} (H), dY_t (H) */
    float *dh, *dc, *da;               /* dh (H, read), dc (H, updated), dA (4H, written) */
    float *dP;                         /* (3H) accumulated, or NULL */
    const float *Pi, *Po, *Pf;         /* peepholes (H each) or NULL */
} lstm_bwd_row;

/* Plain reference, columns [j0, H): also the tail of the vector kernel. */
static void lstm_backward_cols_ref(const rnn_train_cell *c, int64_t H, const lstm_bwd_row *r, int64_t j0) {
    const float *post = r->post, *pre = r->pre, *tc = r->tc, *cp = r->cp, *dy = r->dy;
    for (int64_t j = j0; j < H; j++) {
        const float i = post[j], o = post[H + j], f = post[2 * H + j], g = post[3 * H + j];
        const float dht = r->dh[j] + dy[j];
        float dct = r->dc[j] + dht * o * (1.0f - tc[j] * tc[j]);
        const float dpo = dht * tc[j] * o * (1.0f - o) * rnn_train_clip_grad(c, pre[H + j]);
        if (r->Po) dct += dpo * r->Po[j];
        const float dpi = dct * g * i * (1.0f - i) * rnn_train_clip_grad(c, pre[j]);
        const float dpf = dct * cp[j] * f * (1.0f - f) * rnn_train_clip_grad(c, pre[2 * H + j]);
        const float dpc = dct * i * (1.0f - g * g) * rnn_train_clip_grad(c, pre[3 * H + j]);
        r->dc[j] = dct * f + (r->Pi ? dpi * r->Pi[j] + dpf * r->Pf[j] : 0.0f);
        if (r->dP) {
            r->dP[j] += dpi * cp[j];
            r->dP[H + j] += dpo * r->cs[j];
            r->dP[2 * H + j] += dpf * cp[j];
        }
        float *da = r->da;
        da[j] = dpi, da[H + j] = dpo, da[2 * H + j] = dpf, da[3 * H + j] = dpc;
    }
}

#ifdef RNN_HAVE_AVX2_TRAIN

/* lstm_backward_cols_ref eight columns at a time, the same operations in the same order
 * (multiplying by clip' rather than masking, so 0 * Inf stays NaN as in the reference). */
AVX2T static void lstm_backward_row_avx2(const rnn_train_cell *c, int64_t H, const lstm_bwd_row *r) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const float *post = r->post, *pre = r->pre;
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
        const __m256 i = _mm256_loadu_ps(post + j), o = _mm256_loadu_ps(post + H + j);
        const __m256 f = _mm256_loadu_ps(post + 2 * H + j), g = _mm256_loadu_ps(post + 3 * H + j);
        const __m256 tc = _mm256_loadu_ps(r->tc + j), cp = _mm256_loadu_ps(r->cp + j);
        const __m256 dht = _mm256_add_ps(_mm256_loadu_ps(r->dh + j), _mm256_loadu_ps(r->dy + j));
        __m256 dct = _mm256_add_ps(_mm256_loadu_ps(r->dc + j),
                                   _mm256_mul_ps(_mm256_mul_ps(dht, o), _mm256_sub_ps(one, _mm256_mul_ps(tc, tc))));
        const __m256 dpo = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dht, tc), o), _mm256_sub_ps(one, o)),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + H + j)));
        if (r->Po) dct = _mm256_add_ps(dct, _mm256_mul_ps(dpo, _mm256_loadu_ps(r->Po + j)));
        const __m256 dpi = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dct, g), i), _mm256_sub_ps(one, i)),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + j)));
        const __m256 dpf = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dct, cp), f), _mm256_sub_ps(one, f)),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + 2 * H + j)));
        const __m256 dpc = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dct, i), _mm256_sub_ps(one, _mm256_mul_ps(g, g))),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + 3 * H + j)));
        __m256 dcn = _mm256_mul_ps(dct, f);
        if (r->Pi)
            dcn = _mm256_add_ps(dcn, _mm256_add_ps(_mm256_mul_ps(dpi, _mm256_loadu_ps(r->Pi + j)),
                                                   _mm256_mul_ps(dpf, _mm256_loadu_ps(r->Pf + j))));
        _mm256_storeu_ps(r->dc + j, dcn);
        if (r->dP) {
            float *dP = r->dP;
            _mm256_storeu_ps(dP + j, _mm256_add_ps(_mm256_loadu_ps(dP + j), _mm256_mul_ps(dpi, cp)));
            _mm256_storeu_ps(dP + H + j, _mm256_add_ps(_mm256_loadu_ps(dP + H + j),
                                                       _mm256_mul_ps(dpo, _mm256_loadu_ps(r->cs + j))));
            _mm256_storeu_ps(dP + 2 * H + j, _mm256_add_ps(_mm256_loadu_ps(dP + 2 * H + j), _mm256_mul_ps(dpf, cp)));
        }
        _mm256_storeu_ps(r->da + j, dpi);
        _mm256_storeu_ps(r->da + H + j, dpo);
        _mm256_storeu_ps(r->da + 2 * H + j, dpf);
        _mm256_storeu_ps(r->da + 3 * H + j, dpc);
    }
    lstm_backward_cols_ref(c, H, r, j);
}
#endif

/* The vector kernel when the CPU has AVX2+FMA (rnn_kernel_level >= 1), else the reference;
 * tests/test_train.py compares the two (kernel level 0 against the top level). */
static void lstm_backward_row(const rnn_train_cell *c, int64_t H, const lstm_bwd_row *r) {
#ifdef RNN_HAVE_AVX2_TRAIN
    if (rnn_kernel_level() >= 1) {
        lstm_backward_row_avx2(c, H, r);
        return;
    }
#endif
    lstm_backward_cols_ref(c, H, r, 0);
}

void rnn_lstm_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                             const float *c0, const float *Y, const float *saved, const float *dY,
                             const float *dhT, const float *dcT, float *dX, float *dW, float *dR, float *dB,
                             float *dP, float *dh0, float *dc0, float *work) {
    const int64_t H = c->hidden_size, GH = 4 * H, S = 10 * H;
    float *dA = work, *zeros = dA + T * B * GH, *dh = zeros + B * H, *dc = dh + B * H, *dAsum = dc + B * H;
    memset(zeros, 0, sizeof(float) * (size_t)(B * H));
    if (T > 0 && B > 0) memset(dAsum, 0, sizeof(float) * (size_t)GH); /* (work holds it only when T*B >= 1) */
    for (int64_t k = 0; k < B * H; k++) {
        dh[k] = dhT ? dhT[k] : 0.0f;
        dc[k] = dcT ? dcT[k] : 0.0f;
    }
    const float *Pi = c->P, *Po = c->P ? c->P + H : NULL, *Pf = c->P ? c->P + 2 * H : NULL;
    rnn_packed RTp; /* R^T (H, 4H) packed: dh = dA @ R */
    const int packed = rnn_train_pack(&RTp, c->R, GH, H, 1);
    for (int64_t t = T - 1; t >= 0; t--) {
        for (int64_t b = 0; b < B; b++) {
            const float *sv = saved + (t * B + b) * S;
            lstm_bwd_row r = {sv, sv + GH, sv + 2 * GH, sv + 2 * GH + H,
                              t == 0 ? (c0 ? c0 + b * H : zeros) : saved + ((t - 1) * B + b) * S + 2 * GH,
                              dY ? dY + (t * B + b) * H : zeros, dh + b * H, dc + b * H, dA + (t * B + b) * GH,
                              dP && Pi ? dP : NULL, Pi, Po, Pf};
            lstm_backward_row(c, H, &r);
            {   /* the bias gradient's column sums, while the row is in L1 (not a pass over dA) */
                float *restrict acc = dAsum;
                const float *restrict da = r.da;
                for (int64_t j = 0; j < GH; j++) acc[j] += da[j];
            }
        }
        /* dh_{t-1} = dA_t @ R   (B, 4H) @ (4H, H) */
        rnn_train_gemm(packed, &RTp, B, dA + t * B * GH, GH, c->R, H, GH, dh, H, 1, 0);
    }
    rnn_packed_free(&RTp);
    if (dh0) memcpy(dh0, dh, sizeof(float) * (size_t)(B * H));
    if (dc0) memcpy(dc0, dc, sizeof(float) * (size_t)(B * H));
    if (T == 0 || B == 0) return; /* (no rows: nothing to add) */
    /* dWb, dRb += colsum(dA);  dR += dA^T H_{t-1};  dW += dA^T X and dX = dA @ W */
    for (int64_t j = 0; j < GH; j++) {
        dB[j] += dAsum[j];
        dB[GH + j] += dAsum[j];
    }
    rnn_gemm_tn(GH, H, B, 1.0f, dA, GH, h0 ? h0 : zeros, H, 1.0f, dR, H);
    rnn_gemm_tn(GH, H, (T - 1) * B, 1.0f, dA + B * GH, GH, Y, H, 1.0f, dR, H);
    rnn_train_input_backward(c, T * B, GH, dA, GH, X, dW, dX);
}
