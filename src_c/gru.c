/* gru.c - the ONNX GRU cell: one time step over a batch (gate order z, r, h). */
#include "internal.h"

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
    rnn_gemm_packed(B, h, H, &cell->Rp, gates, GH, 0);

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
        rnn_gemm_packed(B, rh, H, &cell->Rhp, gates + 2 * H, GH, 0);
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
