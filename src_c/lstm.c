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
void rnn_lstm_step(const rnn_cell *cell, const rnn_seq *s, int64_t step, float *h, float *c,
                   float *work) {
    const rnn_cell_config *cfg = &cell->cfg;
    const int64_t H = cfg->hidden_size, GH = 4 * H, B = s->B;
    float *gates = work; /* (B, 4H) */

    /* gates = h @ R^T   (B, 4H) */
    rnn_gemm_packed(B, h, H, &cell->Rp, gates, GH, 0);

    const float *Pi = cell->P, *Po = cell->P ? cell->P + H : NULL, *Pf = cell->P ? cell->P + 2 * H : NULL;
    for (int64_t b = 0; b < B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float *xp = rnn_seq_xrow(s, t, b, GH);
        float *g = gates + b * GH;
        float *gi = g, *go = g + H, *gf = g + 2 * H, *gc = g + 3 * H;
        float *cb = c + b * H, *hb = h + b * H;

        for (int64_t j = 0; j < GH; j++) g[j] += xp[j];
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

        /* h(Ct) in the c-gate slot, then Ht = o . h(Ct) */
        memcpy(gc, cb, sizeof(float) * (size_t)H);
        rnn_activation_apply(&cfg->act[2], gc, H);
        float *y = s->Y + t * s->ys_t + b * s->ys_b;
        for (int64_t j = 0; j < H; j++) {
            hb[j] = go[j] * gc[j];
            y[j] = hb[j];
        }
    }
}
