/* cell.c - creation of a cell (weight packing) and the sequence driver shared by all kinds. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

const char *rnn_status_string(rnn_status status) {
    switch (status) {
    case RNN_STATUS_OK: return "ok";
    case RNN_STATUS_BAD_ARGUMENT: return "bad argument";
    case RNN_STATUS_BAD_SHAPE: return "bad shape";
    case RNN_STATUS_OUT_OF_MEMORY: return "out of memory";
    case RNN_STATUS_TOO_LARGE: return "size too large";
    }
    return "unknown status";
}

static int32_t gates_of(int32_t kind) {
    return kind == RNN_CELL_LSTM ? 4 : kind == RNN_CELL_GRU ? 3 : 1;
}

void rnn_cell_free(rnn_cell *cell) {
    if (!cell) return;
    free(cell->W);
    rnn_packed_free(&cell->Wp);
    rnn_packed_free(&cell->Rp);
    rnn_packed_free(&cell->Rhp);
    free(cell->bias_x);
    free(cell->bias_rh);
    free(cell->P);
    free(cell);
}

const rnn_cell_config *rnn_cell_get_config(const rnn_cell *cell) { return &cell->cfg; }

rnn_status rnn_cell_create(const rnn_cell_config *cfg, const float *W, const float *R,
                           const float *B, const float *P, rnn_cell **out) {
    if (!cfg || !W || !R || !out) return RNN_STATUS_BAD_ARGUMENT;
    *out = NULL;
    if (cfg->kind < RNN_CELL_RNN || cfg->kind > RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->input_size < 0 || cfg->hidden_size <= 0) return RNN_STATUS_BAD_SHAPE;
    if (cfg->has_clip && !(cfg->clip >= 0.0f)) return RNN_STATUS_BAD_ARGUMENT;
    for (int k = 0; k < 3; k++)
        if (cfg->act[k].kind < 0 || cfg->act[k].kind >= RNN_ACT_COUNT) return RNN_STATUS_BAD_ARGUMENT;
    if (P && cfg->kind != RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->weight_dtype < RNN_WEIGHTS_F32 || cfg->weight_dtype > RNN_WEIGHTS_I8) return RNN_STATUS_BAD_ARGUMENT;

    const int64_t H = cfg->hidden_size, I = cfg->input_size, G = gates_of(cfg->kind);
    /* G*H is a BLAS dimension; W and R must stay far below 2^40 floats. */
    if (G * H > INT32_MAX || G * H * (I > H ? I : H) > ((int64_t)1 << 40)) return RNN_STATUS_TOO_LARGE;

    rnn_cell *c = calloc(1, sizeof *c);
    if (!c) return RNN_STATUS_OUT_OF_MEMORY;
    c->cfg = *cfg;
    c->G = (int32_t)G;
    c->W = malloc(sizeof(float) * (size_t)(G * H * (I > 0 ? I : 1)));
    c->bias_x = calloc((size_t)(G * H), sizeof(float));
    c->bias_rh = calloc((size_t)H, sizeof(float));
    if (P) c->P = malloc(sizeof(float) * (size_t)(3 * H));
    /* GRU without linear_before_reset needs r before (r . h) @ Rh^T: pack R in two parts. */
    const int split = cfg->kind == RNN_CELL_GRU && !cfg->linear_before_reset;
    rnn_status st = RNN_STATUS_OK;
    const int32_t wd = cfg->weight_dtype;
    if (c->W) st = rnn_packed_init_dtype(&c->Wp, W, G * H, I, I, wd);
    if (st == RNN_STATUS_OK) st = rnn_packed_init_dtype(&c->Rp, R, split ? 2 * H : G * H, H, H, wd);
    if (st == RNN_STATUS_OK && split) st = rnn_packed_init_dtype(&c->Rhp, R + 2 * H * H, H, H, H, wd);
    if (st != RNN_STATUS_OK || !c->W || !c->bias_x || !c->bias_rh || (P && !c->P)) {
        rnn_cell_free(c);
        return RNN_STATUS_OUT_OF_MEMORY;
    }
    memcpy(c->W, W, sizeof(float) * (size_t)(G * H * I));
    if (P) memcpy(c->P, P, sizeof(float) * (size_t)(3 * H));
    if (B) {
        const float *Wb = B, *Rb = B + G * H;
        /* Biases summed once: bias_x = Wb + Rb, except the GRU h gate with
         * linear_before_reset, where Rbh sits inside r * (H Rh^T + Rbh). */
        for (int64_t j = 0; j < G * H; j++) c->bias_x[j] = Wb[j] + Rb[j];
        if (cfg->kind == RNN_CELL_GRU && cfg->linear_before_reset) {
            for (int64_t j = 0; j < H; j++) {
                c->bias_x[2 * H + j] = Wb[2 * H + j];
                c->bias_rh[j] = Rb[2 * H + j];
            }
        }
    }
    *out = c;
    return RNN_STATUS_OK;
}

int64_t rnn_cell_step_floats(const rnn_cell *cell, int64_t B) {
    const int64_t H = cell->cfg.hidden_size;
    /* gates (B, G*H) + GRU's r * h (B, H) */
    return B * cell->G * H + B * H;
}

int64_t rnn_cell_forward_floats(const rnn_cell *cell, int64_t T, int64_t B) {
    return T * B * cell->G * cell->cfg.hidden_size + rnn_cell_step_floats(cell, B);
}

void rnn_cell_forward(const rnn_cell *cell, const float *X, int64_t T, int64_t B, int64_t xs_t,
                      int64_t xs_b, const int32_t *lens, int32_t reverse, float *Y, int64_t ys_t,
                      int64_t ys_b, float *h, float *c, float *work) {
    const int64_t H = cell->cfg.hidden_size, I = cell->cfg.input_size, GH = cell->G * H;
    const int64_t N = T * B;
    float *xproj = work;          /* (T*B, G*H), rows in X's order */
    float *step_work = work + N * GH;

    /* xproj = X @ W^T + bias_x   (one GEMM for all time steps) */
    for (int64_t r = 0; r < N; r++) memcpy(xproj + r * GH, cell->bias_x, sizeof(float) * (size_t)GH);
    if (N >= RNN_BLAS_MIN_ROWS && rnn_kernel_level() < 2)
        rnn_gemm_nt(N, GH, I, 1.0f, X, I, cell->W, I, 1.0f, xproj, GH, 1);
    else
        rnn_gemm_packed(N, X, I, &cell->Wp, xproj, GH, 1);

    /* Outputs past each row's length are zero. */
    int64_t max_len = T;
    if (lens) {
        max_len = 0;
        for (int64_t b = 0; b < B; b++) {
            if (lens[b] > max_len) max_len = lens[b];
            for (int64_t t = lens[b]; t < T; t++) memset(Y + t * ys_t + b * ys_b, 0, sizeof(float) * (size_t)H);
        }
    }

    rnn_seq s = {T, B, xproj, xs_t, xs_b, Y, ys_t, ys_b, lens, reverse};
    for (int64_t step = 0; step < max_len; step++) {
        switch (cell->cfg.kind) {
        case RNN_CELL_LSTM: rnn_lstm_step(cell, &s, step, h, c, step_work); break;
        case RNN_CELL_GRU: rnn_gru_step(cell, &s, step, h, step_work); break;
        default: rnn_rnn_step(cell, &s, step, h, step_work); break;
        }
    }
}
