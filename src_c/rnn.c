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
    rnn_gemm_packed(B, h, H, &cell->Rp, gates, H, 0);

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
