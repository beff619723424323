/* gru.c - the ONNX GRU cell: one time step over a batch (gate order z, r, h). */
#include "internal.h"

#include <string.h>

/*
 * Per active row b at time t (ONNX GRU, default activations f=Sigmoid, g=Tanh):
 *   z = f(clip(Xt Wz^T + Ht-1 Rz^T + Wbz + Rbz))
 *   r = f(clip(Xt Wr^T + Ht-1 Rr^T + Wbr + Rbr))
 *   linear_before_reset = 0:  n = g(clip(Xt Wh^T + (r . Ht-1) Rh^T + Wbh + Rbh))
 *   linear_before_reset = 1:  n = g(clip(Xt Wh^T + r . (Ht-1 Rh^T + Rbh) + Wbh))
 *   Ht = (1 - z) . n + z . Ht-1
 */
void rnn_gru_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *work) {
    const rnn_cell_config *cfg = &cell->cfg;
    const int64_t H = cfg->hidden_size, GH = 3 * H, B = s->B;
    float *gates = work;         /* (B, 3H) */
    float *rh = work + B * GH;   /* (B, H): r . Ht-1, linear_before_reset = 0 only */
    const int lbr = cfg->linear_before_reset;

    /* gates[:, :2H] = h @ Rzr^T, and with lbr also gates[:, 2H:] = h @ Rh^T */
    rnn_gemm_packed_par(s->par, B, h, H, &cell->Rp, gates, GH, 0);

    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        float *g = gates + b * GH;
        float *gr = g + H, *gh = g + 2 * H;
        float *hb = h + b * H, *rhb = rh + b * H;
        if (t < 0) {
            for (int64_t j = 0; j < H; j++) rhb[j] = 0.0f;
            continue;
        }
        const float *xp = rnn_seq_xrow(s, t, b, GH);
        for (int64_t j = 0; j < 2 * H; j++) g[j] += xp[j];
        rnn_clip(g, 2 * H, cfg);
        rnn_activation_apply(&cfg->act[0], g, 2 * H); /* z and r */
        if (lbr) {
            for (int64_t j = 0; j < H; j++) gh[j] = xp[2 * H + j] + gr[j] * (gh[j] + cell->bias_rh[j]);
        } else {
            for (int64_t j = 0; j < H; j++) rhb[j] = gr[j] * hb[j];
        }
    }

    if (!lbr) {
        /* gates[:, 2H:] = (r . h) @ Rh^T   (B, H) */
        rnn_gemm_packed_par(s->par, B, rh, H, &cell->Rhp, gates + 2 * H, GH, 0);
    }

    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float *xp = rnn_seq_xrow(s, t, b, GH);
        float *g = gates + b * GH;
        float *gz = g, *gh = g + 2 * H;
        float *hb = h + b * H;
        if (!lbr) {
            for (int64_t j = 0; j < H; j++) gh[j] += xp[2 * H + j];
        }
        rnn_clip(gh, H, cfg);
        rnn_activation_apply(&cfg->act[1], gh, H);
        float *y = s->Y + t * s->ys_t + b * s->ys_b;
        for (int64_t j = 0; j < H; j++) {
            hb[j] = (1.0f - gz[j]) * gh[j] + gz[j] * hb[j];
            y[j] = hb[j];
        }
    }
}

/* ---- training: forward with saved activations, and backward through time ---------------
 * Default activations (f = Sigmoid, g = Tanh), clip, linear_before_reset 0 and 1.
 * saved, per (t, b): pre (3H: z, r, n pre-activations before clipping), post (3H: z, r, n),
 *                    extra (H): lbr = 0: r . h_{t-1};  lbr = 1: h_{t-1} @ Rh^T + Rbh.
 * work: xproj / dAx (T*B, 3H), dAr (T*B, 3H), gates (B, 3H), zeros, dh, dz, dr (B, H). */
int64_t rnn_gru_saved_floats(int64_t H) { return 7 * H; }

void rnn_gru_train_forward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                           float *Y, float *hT, float *saved, float *work) {
    const int64_t H = c->hidden_size, GH = 3 * H, S = 7 * H;
    const int lbr = c->linear_before_reset;
    float *xproj = work, *gates = xproj + 2 * T * B * GH, *zeros = gates + B * GH, *rh = zeros + B * H;
    for (int64_t k = 0; k < B * H; k++) zeros[k] = 0.0f;
    /* xproj = X @ W^T + Wb + Rb (Rbh only without linear_before_reset) */
    for (int64_t r = 0; r < T * B; r++)
        for (int64_t j = 0; j < GH; j++)
            xproj[r * GH + j] = c->B ? c->B[j] + (lbr && j >= 2 * H ? 0.0f : c->B[GH + j]) : 0.0f;
    rnn_train_input_forward(c, T * B, GH, X, xproj);
    const float *Rh = c->R + 2 * H * H;
    rnn_packed Rp, Rhp;
    const int64_t nrows = lbr ? GH : 2 * H;
    const int packed = rnn_train_pack(&Rp, c->R, nrows, H, 0), packed_h = lbr ? 0 : rnn_train_pack(&Rhp, Rh, H, H, 0);
    if (lbr) memset(&Rhp, 0, sizeof Rhp);
    for (int64_t t = 0; t < T; t++) {
        const float *hp = rnn_train_hprev(h0, Y, zeros, t, B, H);
        /* gates[:, :2H] = h @ Rzr^T; with lbr also gates[:, 2H:] = h @ Rh^T */
        rnn_train_gemm(packed, &Rp, B, hp, H, c->R, nrows, H, gates, GH, 0, 0);
        for (int64_t b = 0; b < B; b++) {
            float *sv = saved + (t * B + b) * S, *pre = sv, *post = sv + GH, *ex = sv + 2 * GH;
            const float *a = gates + b * GH, *xp = xproj + (t * B + b) * GH, *hb = hp + b * H;
            for (int64_t j = 0; j < 2 * H; j++) {
                pre[j] = a[j] + xp[j];
                post[j] = rnn_train_clip(c, pre[j]);
            }
            rnn_vsigmoid(post, 2 * H); /* z, r */
            for (int64_t j = 0; j < H; j++) {
                if (lbr) ex[j] = a[2 * H + j] + (c->B ? c->B[GH + 2 * H + j] : 0.0f);
                else ex[j] = post[H + j] * hb[j];
                rh[b * H + j] = ex[j];
            }
        }
        if (!lbr) /* gates[:, 2H:] = (r . h) @ Rh^T */
            rnn_train_gemm(packed_h, &Rhp, B, rh, H, Rh, H, H, gates + 2 * H, GH, 0, 0);
        for (int64_t b = 0; b < B; b++) {
            float *sv = saved + (t * B + b) * S, *pre = sv, *post = sv + GH, *ex = sv + 2 * GH;
            const float *a = gates + b * GH, *xp = xproj + (t * B + b) * GH, *hb = hp + b * H;
            float *y = Y + (t * B + b) * H;
            for (int64_t j = 0; j < H; j++) {
                pre[2 * H + j] = xp[2 * H + j] + (lbr ? post[H + j] * ex[j] : a[2 * H + j]);
                post[2 * H + j] = rnn_train_clip(c, pre[2 * H + j]);
            }
            rnn_vtanh(post + 2 * H, H); /* n */
            for (int64_t j = 0; j < H; j++) y[j] = (1.0f - post[j]) * post[2 * H + j] + post[j] * hb[j];
        }
    }
    rnn_packed_free(&Rp);
    rnn_packed_free(&Rhp);
    if (hT) {
        const float *src = T ? Y + (T - 1) * B * H : (h0 ? h0 : zeros);
        for (int64_t k = 0; k < B * H; k++) hT[k] = src[k];
    }
}

/* The element-wise parts of one backward step for one row. Per column j, with z, r, n the
 * saved gate values and h = h_{t-1}:
 *   n part (before the products through Rh):  dht = dh + dy;  dn = dht (1 - z) (1 - n^2) clip'(pre_n)
 *     dz = dht (h - n);  dh = dht z;  dAx_n = dn;
 *     lbr: dr = dn ex (ex = h Rh^T + Rbh), dAr_n = dn r;  else dAr_n = dn
 *   z, r part (after them):  dAx_z = dAr_z = dz z (1 - z) clip'(pre_z);  same for r with dr */
typedef struct {
    const float *pre, *post, *ex; /* saved: pre (3H), post (3H: z, r, n), ex (H) */
    const float *dy, *hb;         /* dY_t (H), h_{t-1} (H) */
    float *dh, *dz, *dr;          /* (H) each */
    float *ax, *ar;               /* dAx, dAr rows (3H) */
} gru_bwd_row;

/* Plain references, columns [j0, H): also the tails of the vector kernels. */
static void gru_backward_n_ref(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w, int64_t j0) {
    const float *pre = w->pre, *post = w->post;
    for (int64_t j = j0; j < H; j++) {
        const float z = post[j], r = post[H + j], n = post[2 * H + j];
        const float dht = w->dh[j] + w->dy[j];
        const float dn_pre = dht * (1.0f - z) * (1.0f - n * n) * rnn_train_clip_grad(c, pre[2 * H + j]);
        w->dz[j] = dht * (w->hb[j] - n);
        w->dh[j] = dht * z; /* the direct path; gate paths are added after */
        w->ax[2 * H + j] = dn_pre;
        if (c->linear_before_reset) {
            w->dr[j] = dn_pre * w->ex[j]; /* n_pre = xh + r . hr */
            w->ar[2 * H + j] = dn_pre * r; /* d hr */
        } else {
            w->ar[2 * H + j] = dn_pre; /* n_pre = xh + (r . h) Rh^T */
        }
    }
}

static void gru_backward_zr_ref(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w, int64_t j0) {
    const float *pre = w->pre, *post = w->post;
    for (int64_t j = j0; j < H; j++) {
        const float z = post[j], r = post[H + j];
        const float dzp = w->dz[j] * z * (1.0f - z) * rnn_train_clip_grad(c, pre[j]);
        const float drp = w->dr[j] * r * (1.0f - r) * rnn_train_clip_grad(c, pre[H + j]);
        w->ax[j] = w->ar[j] = dzp;
        w->ax[H + j] = w->ar[H + j] = drp;
    }
}

#ifdef RNN_HAVE_AVX2_TRAIN

/* The references eight columns at a time, the same operations in the same order. */
AVX2T static void gru_backward_n_avx2(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const float *pre = w->pre, *post = w->post;
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
        const __m256 z = _mm256_loadu_ps(post + j), r = _mm256_loadu_ps(post + H + j);
        const __m256 n = _mm256_loadu_ps(post + 2 * H + j);
        const __m256 dht = _mm256_add_ps(_mm256_loadu_ps(w->dh + j), _mm256_loadu_ps(w->dy + j));
        const __m256 dn = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dht, _mm256_sub_ps(one, z)),
                                                      _mm256_sub_ps(one, _mm256_mul_ps(n, n))),
                                        rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + 2 * H + j)));
        _mm256_storeu_ps(w->dz + j, _mm256_mul_ps(dht, _mm256_sub_ps(_mm256_loadu_ps(w->hb + j), n)));
        _mm256_storeu_ps(w->dh + j, _mm256_mul_ps(dht, z));
        _mm256_storeu_ps(w->ax + 2 * H + j, dn);
        if (c->linear_before_reset) {
            _mm256_storeu_ps(w->dr + j, _mm256_mul_ps(dn, _mm256_loadu_ps(w->ex + j)));
            _mm256_storeu_ps(w->ar + 2 * H + j, _mm256_mul_ps(dn, r));
        } else {
            _mm256_storeu_ps(w->ar + 2 * H + j, dn);
        }
    }
    gru_backward_n_ref(c, H, w, j);
}

AVX2T static void gru_backward_zr_avx2(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const float *pre = w->pre, *post = w->post;
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
        const __m256 z = _mm256_loadu_ps(post + j), r = _mm256_loadu_ps(post + H + j);
        const __m256 dzp = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(w->dz + j), z), _mm256_sub_ps(one, z)),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + j)));
        const __m256 drp = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(w->dr + j), r), _mm256_sub_ps(one, r)),
                                         rnn_train_clip_grad8(c, _mm256_loadu_ps(pre + H + j)));
        _mm256_storeu_ps(w->ax + j, dzp);
        _mm256_storeu_ps(w->ar + j, dzp);
        _mm256_storeu_ps(w->ax + H + j, drp);
        _mm256_storeu_ps(w->ar + H + j, drp);
    }
    gru_backward_zr_ref(c, H, w, j);
}
#endif

/* The vector kernels when the CPU has AVX2+FMA (rnn_kernel_level >= 1), else the references;
 * tests/test_train.py compares the two (kernel level 0 against the top level). */
static void gru_backward_n(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w) {
#ifdef RNN_HAVE_AVX2_TRAIN
    if (rnn_kernel_level() >= 1) {
        gru_backward_n_avx2(c, H, w);
        return;
    }
#endif
    gru_backward_n_ref(c, H, w, 0);
}

static void gru_backward_zr(const rnn_train_cell *c, int64_t H, const gru_bwd_row *w) {
#ifdef RNN_HAVE_AVX2_TRAIN
    if (rnn_kernel_level() >= 1) {
        gru_backward_zr_avx2(c, H, w);
        return;
    }
#endif
    gru_backward_zr_ref(c, H, w, 0);
}

void rnn_gru_train_backward(const rnn_train_cell *c, int64_t T, int64_t B, const float *X, const float *h0,
                            const float *Y, const float *saved, const float *dY, const float *dhT, float *dX,
                            float *dW, float *dR, float *dB, float *dh0, float *work) {
    const int64_t H = c->hidden_size, GH = 3 * H, S = 7 * H;
    const int lbr = c->linear_before_reset;
    float *dAx = work, *dAr = dAx + T * B * GH, *tmp = dAr + T * B * GH;
    float *zeros = tmp + B * GH, *dh = zeros + B * H, *dz = dh + B * H, *dr = dz + B * H, *drh = dr + B * H;
    for (int64_t k = 0; k < B * H; k++) {
        zeros[k] = 0.0f;
        dh[k] = dhT ? dhT[k] : 0.0f;
    }
    const float *Rh = c->R + 2 * H * H;
    rnn_packed RzrT, RhT; /* Rzr^T (H, 2H) and Rh^T (H, H) packed */
    const int pz = rnn_train_pack(&RzrT, c->R, 2 * H, H, 1), ph = rnn_train_pack(&RhT, Rh, H, H, 1);
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *hp = rnn_train_hprev(h0, Y, zeros, t, B, H);
        float *ax = dAx + t * B * GH, *ar = dAr + t * B * GH;
        for (int64_t b = 0; b < B; b++) {
            const float *sv = saved + (t * B + b) * S;
            const gru_bwd_row r = {sv, sv + GH, sv + 2 * GH, dY ? dY + (t * B + b) * H : zeros, hp + b * H,
                                   dh + b * H, dz + b * H, dr + b * H, ax + b * GH, ar + b * GH};
            gru_backward_n(c, H, &r);
        }
        if (lbr) {
            /* dh += d(hr) @ Rh */
            rnn_train_gemm(ph, &RhT, B, ar + 2 * H, GH, Rh, H, H, dh, H, 1, 1);
        } else {
            /* d(r . h) = dn_pre @ Rh;  dr = d(rh) . h;  dh += d(rh) . r */
            rnn_train_gemm(ph, &RhT, B, ax + 2 * H, GH, Rh, H, H, drh, H, 1, 0);
            for (int64_t b = 0; b < B; b++) {
                const float *post = saved + (t * B + b) * S + GH;
                for (int64_t j = 0; j < H; j++) {
                    dr[b * H + j] = drh[b * H + j] * hp[b * H + j];
                    dh[b * H + j] += drh[b * H + j] * post[H + j];
                }
            }
        }
        for (int64_t b = 0; b < B; b++) {
            const float *sv = saved + (t * B + b) * S;
            const gru_bwd_row r = {sv, sv + GH, NULL, NULL, NULL, NULL, dz + b * H, dr + b * H, ax + b * GH,
                                   ar + b * GH};
            gru_backward_zr(c, H, &r);
        }
        /* dh += dA_zr @ Rzr   (B, 2H) @ (2H, H) */
        rnn_train_gemm(pz, &RzrT, B, ar, GH, c->R, H, 2 * H, dh, H, 1, 1);
    }
    rnn_packed_free(&RzrT);
    rnn_packed_free(&RhT);
    if (dh0)
        for (int64_t k = 0; k < B * H; k++) dh0[k] = dh[k];
    if (T == 0) return;
    /* dW += dAx^T X;  dX = dAx @ W */
    rnn_train_input_backward(c, T * B, GH, dAx, GH, X, dW, dX);
    /* dRzr += dAr_zr^T H_{t-1};  dRh += dAr_h^T (lbr: H_{t-1}; else r . H_{t-1}) */
    const int64_t hrows = lbr ? GH : 2 * H;
    rnn_gemm_tn(hrows, H, B, 1.0f, dAr, GH, h0 ? h0 : zeros, H, 1.0f, dR, H);
    rnn_gemm_tn(hrows, H, (T - 1) * B, 1.0f, dAr + B * GH, GH, Y, H, 1.0f, dR, H);
    if (!lbr) rnn_gemm_tn(H, H, T * B, 1.0f, dAr + 2 * H, GH, saved + 2 * GH, S, 1.0f, dR + 2 * H * H, H);
    rnn_train_colsum_add(T * B, GH, dAx, dB, NULL); /* dWb += colsum(dAx) */
    rnn_train_colsum_add(T * B, GH, dAr, dB + GH, NULL); /* dRb += colsum(dAr) */
}
