/* cell.c - creation of a cell (weight packing) and the sequence driver shared by all kinds. */
#include "internal.h"

#include <stdint.h>
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
    if (!cell->borrowed) {
        free(cell->W);
        rnn_packed_free(&cell->Wp);
        rnn_packed_free(&cell->Rp);
        rnn_packed_free(&cell->Rhp);
        rnn_packed_free(&cell->Whrp);
    }
    free(cell->bias_x);
    free(cell->bias_rh);
    free(cell->P);
    free(cell);
}

const rnn_cell_config *rnn_cell_get_config(const rnn_cell *cell) { return &cell->cfg; }

rnn_status rnn_cell_create(const rnn_cell_config *cfg, const float *W, const float *R,
                           const float *B, const float *P, rnn_cell **out) {
    if (!cfg) return RNN_STATUS_BAD_ARGUMENT;
    rnn_cell_config plain = *cfg;
    plain.proj_size = 0; /* no projection, whatever the caller left in the field */
    return rnn_cell_create_projected(&plain, W, R, B, P, NULL, out);
}

static rnn_status cell_create(const rnn_cell_config *cfg, const float *W, const float *R, const float *B,
                              const float *P, const float *Whr, const rnn_stored_weights *stored, rnn_cell **out);

rnn_status rnn_cell_create_projected(const rnn_cell_config *cfg, const float *W, const float *R,
                                     const float *B, const float *P, const float *Whr, rnn_cell **out) {
    return cell_create(cfg, W, R, B, P, Whr, NULL, out);
}

rnn_status rnn_cell_create_stored(const rnn_cell_config *cfg, const float *W, const float *B, const float *P,
                                  const rnn_stored_weights *stored, rnn_cell **out) {
    if (!cfg || !stored || !stored->W || !stored->R || cfg->proj_size != 0) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->weight_dtype == RNN_WEIGHTS_I8 ? !stored->W_scale || !stored->R_scale
                                            : cfg->weight_dtype != RNN_WEIGHTS_F16 || stored->W_scale || stored->R_scale)
        return RNN_STATUS_BAD_ARGUMENT;
    return cell_create(cfg, W, NULL, B, P, NULL, stored, out);
}

/* The checks every constructor makes on cfg (has_whr, has_p: a projection / peepholes given). */
static rnn_status check_config(const rnn_cell_config *cfg, int has_whr, int has_p) {
    /* a projection: LSTM only, with its weight, and no step mask (Keras has no projection) */
    if (cfg->proj_size < 0) return RNN_STATUS_BAD_SHAPE;
    if (cfg->proj_size > 0 && (cfg->kind != RNN_CELL_LSTM || !has_whr || cfg->step_mask)) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->proj_size == 0 && has_whr) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->kind < RNN_CELL_RNN || cfg->kind > RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->input_size < 0 || cfg->hidden_size <= 0) return RNN_STATUS_BAD_SHAPE;
    if (cfg->has_clip && !(cfg->clip >= 0.0f)) return RNN_STATUS_BAD_ARGUMENT;
    for (int k = 0; k < 3; k++)
        if (cfg->act[k].kind < 0 || cfg->act[k].kind >= RNN_ACT_COUNT) return RNN_STATUS_BAD_ARGUMENT;
    if (has_p && cfg->kind != RNN_CELL_LSTM) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->weight_dtype < RNN_WEIGHTS_F32 || cfg->weight_dtype > RNN_WEIGHTS_I8) return RNN_STATUS_BAD_ARGUMENT;
    if (cfg->step_mask < 0 || cfg->step_mask > 2) return RNN_STATUS_BAD_ARGUMENT;

    const int64_t H = cfg->hidden_size, I = cfg->input_size, G = gates_of(cfg->kind);
    /* G*H is a BLAS dimension; W and R must stay far below 2^40 floats. */
    const int64_t Hh = cfg->proj_size > 0 ? cfg->proj_size : H; /* floats of h: R is (G*H, Hh) */
    if (G * H > INT32_MAX || G * H * (I > Hh ? I : Hh) > ((int64_t)1 << 40) || Hh * H > ((int64_t)1 << 40))
        return RNN_STATUS_TOO_LARGE;
    return RNN_STATUS_OK;
}

/* bias_x = Wb + Rb, except the GRU h gate with linear_before_reset (see cell_create). */
static void set_biases(rnn_cell *c, const float *B);

/* Both constructors: packs R from its float32 values (R) or as stored (stored, R NULL). */
static rnn_status cell_create(const rnn_cell_config *cfg, const float *W, const float *R, const float *B,
                              const float *P, const float *Whr, const rnn_stored_weights *stored, rnn_cell **out) {
    if (!cfg || !W || (!R && !stored) || !out) return RNN_STATUS_BAD_ARGUMENT;
    *out = NULL;
    const rnn_status bad = check_config(cfg, Whr != NULL, P != NULL);
    if (bad != RNN_STATUS_OK) return bad;
    const int64_t H = cfg->hidden_size, I = cfg->input_size, G = gates_of(cfg->kind);
    const int64_t Hh = cfg->proj_size > 0 ? cfg->proj_size : H; /* floats of h: R is (G*H, Hh) */

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
    if (stored) { /* the file's codes / halves as they are: no second rounding (Hh = H here) */
        const size_t es = wd == RNN_WEIGHTS_F16 ? 2 : 1;
        const float *Rs = stored->R_scale;
        if (c->W) st = rnn_packed_init_stored(&c->Wp, stored->W, stored->W_scale, G * H, I, I, wd);
        if (st == RNN_STATUS_OK)
            st = rnn_packed_init_stored(&c->Rp, stored->R, Rs, split ? 2 * H : G * H, H, H, wd);
        if (st == RNN_STATUS_OK && split)
            st = rnn_packed_init_stored(&c->Rhp, (const char *)stored->R + (size_t)(2 * H * H) * es,
                                        Rs ? Rs + 2 * H : NULL, H, H, H, wd);
    } else {
        if (c->W) st = rnn_packed_init_dtype(&c->Wp, W, G * H, I, I, wd);
        if (st == RNN_STATUS_OK) st = rnn_packed_init_dtype(&c->Rp, R, split ? 2 * H : G * H, Hh, Hh, wd);
        if (st == RNN_STATUS_OK && split) st = rnn_packed_init_dtype(&c->Rhp, R + 2 * H * H, H, H, H, wd);
        if (st == RNN_STATUS_OK && Whr) st = rnn_packed_init_dtype(&c->Whrp, Whr, Hh, H, H, wd); /* (P, H) */
    }
    if (st != RNN_STATUS_OK || !c->W || !c->bias_x || !c->bias_rh || (P && !c->P)) {
        rnn_cell_free(c);
        return st != RNN_STATUS_OK ? st : RNN_STATUS_OUT_OF_MEMORY;
    }
    memcpy(c->W, W, sizeof(float) * (size_t)(G * H * I));
    if (P) memcpy(c->P, P, sizeof(float) * (size_t)(3 * H));
    set_biases(c, B);
    *out = c;
    return RNN_STATUS_OK;
}

static void set_biases(rnn_cell *c, const float *B) {
    if (!B) return;
    const int64_t H = c->cfg.hidden_size, G = c->G;
    const float *Wb = B, *Rb = B + G * H;
    /* Biases summed once: bias_x = Wb + Rb, except the GRU h gate with
     * linear_before_reset, where Rbh sits inside r * (H Rh^T + Rbh). */
    for (int64_t j = 0; j < G * H; j++) c->bias_x[j] = Wb[j] + Rb[j];
    if (c->cfg.kind == RNN_CELL_GRU && c->cfg.linear_before_reset) {
        for (int64_t j = 0; j < H; j++) {
            c->bias_x[2 * H + j] = Wb[2 * H + j];
            c->bias_rh[j] = Rb[2 * H + j];
        }
    }
}

/* Whether the panels at `mapped` (and for int8 `mscale`) hold what packing the (N, K)
 * matrix gives: B float32 rows, or Q stored rows (halves / int8 codes with qscale). Packs 16
 * rows at a time (one panel; packing is row by row, so a panel alone packs the same bytes as
 * within the whole matrix, its int8 scales included). 1 equal, 0 different, -1 no memory. */
static int panels_equal(const void *mapped, const float *mscale, const float *B, const void *Q,
                        const float *qscale, int64_t N, int64_t K, int32_t dtype) {
    const size_t es = dtype == RNN_WEIGHTS_F32 ? 4 : dtype == RNN_WEIGHTS_F16 ? 2 : 1;
    const size_t bytes = (size_t)K * RNN_PANEL * es;
    for (int64_t n0 = 0; n0 < N; n0 += RNN_PANEL) {
        const int64_t w = N - n0 < RNN_PANEL ? N - n0 : RNN_PANEL;
        rnn_packed p;
        const rnn_status st = Q ? rnn_packed_init_stored(&p, (const char *)Q + (size_t)(n0 * K) * es,
                                                         qscale ? qscale + n0 : NULL, w, K, K, dtype)
                                : rnn_packed_init_dtype(&p, B + n0 * K, w, K, K, dtype);
        if (st != RNN_STATUS_OK) return -1;
        int same = memcmp(p.data, (const char *)mapped + (size_t)(n0 / RNN_PANEL) * bytes, bytes) == 0;
        if (same && p.scale) same = memcmp(p.scale, mscale + n0, sizeof(float) * RNN_PANEL) == 0;
        rnn_packed_free(&p);
        if (!same) return 0;
    }
    return 1;
}

rnn_status rnn_cell_create_mapped(const rnn_cell_config *cfg, const float *W, const float *R, const float *B,
                                  const float *P, const rnn_stored_weights *stored,
                                  const rnn_mapped_weights *m, rnn_cell **out) {
    if (!cfg || !W || !m || !out || cfg->proj_size != 0 || (!R) == (!stored)) return RNN_STATUS_BAD_ARGUMENT;
    *out = NULL;
    const rnn_status bad = check_config(cfg, 0, P != NULL);
    if (bad != RNN_STATUS_OK) return bad;
    const int split = cfg->kind == RNN_CELL_GRU && !cfg->linear_before_reset;
    const int32_t wd = cfg->weight_dtype, q = wd == RNN_WEIGHTS_I8;
    if (stored && (!stored->W || !stored->R || wd == RNN_WEIGHTS_F32 || q != !!stored->W_scale || q != !!stored->R_scale))
        return RNN_STATUS_BAD_ARGUMENT;
    /* the kernels use aligned loads on panels (pack.c); scales are read unaligned */
#define RNN_ALIGNED(p) ((p) && ((uintptr_t)(p) & 63u) == 0)
    if (!RNN_ALIGNED(m->Wp) || !RNN_ALIGNED(m->Rp) || (split ? !RNN_ALIGNED(m->Rhp) : m->Rhp != NULL))
        return RNN_STATUS_BAD_ARGUMENT;
#undef RNN_ALIGNED
    if (q != !!m->Wp_scale || q != !!m->Rp_scale || (split && q) != !!m->Rhp_scale) return RNN_STATUS_BAD_ARGUMENT;
    const int64_t H = cfg->hidden_size, I = cfg->input_size, G = gates_of(cfg->kind);
    const int64_t NR = split ? 2 * H : G * H;
    /* never trust the mapped bytes: each must be what packing gives here and now */
    const size_t es = wd == RNN_WEIGHTS_F16 ? 2 : 1;
    const void *QW = stored ? stored->W : NULL, *QR = stored ? stored->R : NULL;
    const float *SW = stored ? stored->W_scale : NULL, *SR = stored ? stored->R_scale : NULL;
    int eq = panels_equal(m->Wp, m->Wp_scale, W, QW, SW, G * H, I, wd);
    if (eq == 1) eq = panels_equal(m->Rp, m->Rp_scale, R, QR, SR, NR, H, wd);
    if (eq == 1 && split)
        eq = panels_equal(m->Rhp, m->Rhp_scale, R ? R + 2 * H * H : NULL,
                          QR ? (const char *)QR + (size_t)(2 * H * H) * es : NULL, SR ? SR + 2 * H : NULL, H, H, wd);
    if (eq != 1) return eq < 0 ? RNN_STATUS_OUT_OF_MEMORY : RNN_STATUS_BAD_ARGUMENT;

    rnn_cell *c = calloc(1, sizeof *c);
    if (!c) return RNN_STATUS_OUT_OF_MEMORY;
    c->cfg = *cfg;
    c->G = (int32_t)G;
    c->bias_x = calloc((size_t)(G * H), sizeof(float));
    c->bias_rh = calloc((size_t)H, sizeof(float));
    if (P) c->P = malloc(sizeof(float) * (size_t)(3 * H));
    if (!c->bias_x || !c->bias_rh || (P && !c->P)) {
        rnn_cell_free(c); /* borrowed is still 0 here, and W and the panels NULL */
        return RNN_STATUS_OUT_OF_MEMORY;
    }
    /* the kernels only read W and the panels; const is dropped to fit rnn_packed */
    c->borrowed = 1;
    c->W = (float *)W;
    c->Wp = (rnn_packed){G * H, I, wd, (void *)m->Wp, (float *)m->Wp_scale};
    c->Rp = (rnn_packed){NR, H, wd, (void *)m->Rp, (float *)m->Rp_scale};
    if (split) c->Rhp = (rnn_packed){H, H, wd, (void *)m->Rhp, (float *)m->Rhp_scale};
    if (P) memcpy(c->P, P, sizeof(float) * (size_t)(3 * H));
    set_biases(c, B);
    *out = c;
    return RNN_STATUS_OK;
}

int32_t rnn_panel_width(void) { return RNN_PANEL; }

int64_t rnn_cell_step_floats(const rnn_cell *cell, int64_t B) {
    const int64_t H = cell->cfg.hidden_size;
    /* gates (B, G*H) + GRU's r * h (B, H); a projected LSTM's projected rows (B, P) */
    return B * cell->G * H + B * H + (cell->cfg.proj_size > 0 ? B * cell->cfg.proj_size : 0);
}

int64_t rnn_cell_forward_floats(const rnn_cell *cell, int64_t T, int64_t B) {
    /* xproj (T*B, G*H), one step's scratch, and with a step mask the old h and c (B, H) each */
    const int64_t saved = cell->cfg.step_mask ? 2 * B * cell->cfg.hidden_size : 0;
    return T * B * cell->G * cell->cfg.hidden_size + rnn_cell_step_floats(cell, B) + saved;
}

/* Step mask blend after one step (see rnn_cell_config.step_mask): for each active row b,
 *   h[b] = m * h[b] + (1 - m) * h_old[b]   (B, H); c likewise;
 *   Y[t, b] = h[b] (mode 1), or m * h_new[b] + (1 - m) * 0 (mode 2: masked steps output 0).
 * Written exactly as the exported graphs compute it (Cast(m) * new + Cast(!m) * old), so the
 * result is bitwise theirs, NaN and Inf included. */
static void blend_step_mask(const rnn_seq *s, int64_t step, const float *X, int64_t width, int64_t H,
                            int32_t mode, float *h, const float *h_old, float *c, const float *c_old) {
    for (int64_t b = 0; b < s->B; b++) {
        const int64_t t = rnn_seq_time(s, step, b);
        if (t < 0) continue;
        const float m = X[(t * s->xs_t + b * s->xs_b) * width + (width - 1)] != 0.0f ? 1.0f : 0.0f;
        const float k = 1.0f - m;
        float *hb = h + b * H, *y = s->Y + t * s->ys_t + b * s->ys_b;
        const float *ho = h_old + b * H;
        if (mode == 2) {
            for (int64_t j = 0; j < H; j++) y[j] = m * hb[j] + k * 0.0f;
            for (int64_t j = 0; j < H; j++) hb[j] = m * hb[j] + k * ho[j];
        } else {
            for (int64_t j = 0; j < H; j++) hb[j] = m * hb[j] + k * ho[j];
            memcpy(y, hb, sizeof(float) * (size_t)H);
        }
        if (c) {
            float *cb = c + b * H;
            const float *co = c_old + b * H;
            for (int64_t j = 0; j < H; j++) cb[j] = m * cb[j] + k * co[j];
        }
    }
}

void rnn_cell_forward(const rnn_cell *cell, const float *X, int64_t T, int64_t B, int64_t xs_t,
                      int64_t xs_b, const int32_t *lens, int32_t reverse, float *Y, int64_t ys_t,
                      int64_t ys_b, float *h, float *c, float *work, rnn_par *par) {
    const int64_t H = cell->cfg.hidden_size, I = cell->cfg.input_size, GH = cell->G * H;
    const int64_t N = T * B, Hh = rnn_cell_h_size(cell); /* floats of h and of each output row */
    const int32_t masked = cell->cfg.step_mask;
    const int64_t width = I + (masked != 0); /* floats per input row: the step mask rides last */
    float *xproj = work;          /* (T*B, G*H), rows in X's order */
    float *step_work = work + N * GH;
    float *h_old = step_work + rnn_cell_step_floats(cell, B); /* (B, H), step mask only */
    float *c_old = h_old + B * H;                              /* (B, H), step mask only */

    /* xproj = X[:, :I] @ W^T + bias_x   (one GEMM for all time steps; with threads, its
     * columns split over them) through the packed kernels, in the cell's storage (float32,
     * float16 or int8), whatever the number of rows: each row's projection is then the same
     * bits whether it is one streamed step, one row of a batch (the session batcher's joined
     * sessions), or one step of a whole sequence (internal.h, RNN_BLAS_MIN_ROWS). Only on the
     * plain portable kernels (kernel level 0, no AVX2), far slower than BLAS for many rows,
     * do 128 rows or more go to BLAS sgemm over the float32 W. */
    for (int64_t r = 0; r < N; r++) memcpy(xproj + r * GH, cell->bias_x, sizeof(float) * (size_t)GH);
    if (N >= RNN_BLAS_MIN_ROWS && rnn_kernel_level() == 0)
        rnn_gemm_nt(N, GH, I, 1.0f, X, width, cell->W, I, 1.0f, xproj, GH, 1);
    else
        rnn_gemm_packed_par(par, N, X, width, &cell->Wp, xproj, GH, 1);

    /* Outputs past each row's length are zero. */
    int64_t max_len = T;
    if (lens) {
        max_len = 0;
        for (int64_t b = 0; b < B; b++) {
            if (lens[b] > max_len) max_len = lens[b];
            for (int64_t t = lens[b]; t < T; t++) memset(Y + t * ys_t + b * ys_b, 0, sizeof(float) * (size_t)Hh);
        }
    }

    rnn_seq s = {T, B, xproj, xs_t, xs_b, Y, ys_t, ys_b, lens, reverse, par};
    for (int64_t step = 0; step < max_len; step++) {
        if (masked) {
            memcpy(h_old, h, sizeof(float) * (size_t)(B * H));
            if (c) memcpy(c_old, c, sizeof(float) * (size_t)(B * H));
        }
        switch (cell->cfg.kind) {
        case RNN_CELL_LSTM:
            if (cell->cfg.proj_size > 0) rnn_lstmp_step(cell, &s, step, h, c, step_work);
            else rnn_lstm_step(cell, &s, step, h, c, step_work);
            break;
        case RNN_CELL_GRU: rnn_gru_step(cell, &s, step, h, step_work); break;
        default: rnn_rnn_step(cell, &s, step, h, step_work); break;
        }
        if (masked) blend_step_mask(&s, step, X, width, H, masked, h, h_old, c, c_old);
    }
}
