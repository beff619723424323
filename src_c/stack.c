/* stack.c - a stack of uni- or bidirectional layers run over a sequence, with its state layout. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t direction; /* rnn_direction */
    int32_t D, H, I;
    int32_t O;         /* floats of h and of each direction's output: H, or P for a projected LSTM */
    int32_t has_c;     /* LSTM (c keeps H floats) */
    int32_t mask;      /* 1: input rows carry a step mask after their I floats (layer 0 only) */
    rnn_cell *cell[2];
} rnn_layer;

struct rnn_stack {
    int32_t L;
    rnn_layer *layer;
};

void rnn_stack_free(rnn_stack *st) {
    if (!st) return;
    for (int32_t l = 0; l < st->L; l++) {
        rnn_cell_free(st->layer[l].cell[0]);
        rnn_cell_free(st->layer[l].cell[1]);
    }
    free(st->layer);
    free(st);
}

rnn_status rnn_stack_create(int32_t n_layers, const int32_t *direction, rnn_cell *const *cells,
                            rnn_stack **out) {
    if (!out) return RNN_STATUS_BAD_ARGUMENT;
    *out = NULL;
    rnn_stack *st = calloc(1, sizeof *st);
    rnn_layer *layers = n_layers > 0 ? calloc((size_t)n_layers, sizeof *layers) : NULL;
    if (!st || (n_layers > 0 && !layers)) {
        free(st);
        free(layers);
        return RNN_STATUS_OUT_OF_MEMORY;
    }
    st->L = n_layers;
    st->layer = layers;
    /* Take ownership of every cell first, so failures below free them all. */
    int64_t k = 0;
    for (int32_t l = 0; l < n_layers; l++) {
        int32_t D = (direction && direction[l] == RNN_DIR_BIDIRECTIONAL) ? 2 : 1;
        layers[l].direction = direction ? direction[l] : -1;
        layers[l].D = D;
        for (int32_t d = 0; d < D; d++) layers[l].cell[d] = cells ? cells[k++] : NULL;
    }
    rnn_status status = RNN_STATUS_OK;
    if (n_layers <= 0 || !direction || !cells) status = RNN_STATUS_BAD_ARGUMENT;
    for (int32_t l = 0; l < n_layers && status == RNN_STATUS_OK; l++) {
        rnn_layer *ly = &layers[l];
        if (ly->direction < RNN_DIR_FORWARD || ly->direction > RNN_DIR_BIDIRECTIONAL) { status = RNN_STATUS_BAD_ARGUMENT; break; }
        for (int32_t d = 0; d < ly->D; d++)
            if (!ly->cell[d]) status = RNN_STATUS_BAD_ARGUMENT;
        if (status != RNN_STATUS_OK) break;
        const rnn_cell_config *c0 = &ly->cell[0]->cfg;
        ly->H = c0->hidden_size;
        ly->O = c0->proj_size > 0 ? c0->proj_size : c0->hidden_size;
        ly->I = c0->input_size;
        ly->has_c = c0->kind == RNN_CELL_LSTM;
        ly->mask = c0->step_mask != 0;
        if (ly->D == 2) {
            const rnn_cell_config *c1 = &ly->cell[1]->cfg;
            if (c1->kind != c0->kind || c1->hidden_size != ly->H || c1->input_size != ly->I ||
                c1->proj_size != c0->proj_size)
                status = RNN_STATUS_BAD_SHAPE;
            if (c1->step_mask != c0->step_mask) status = RNN_STATUS_BAD_ARGUMENT;
        }
        /* only the stack's own input carries a step mask column */
        if (l > 0 && ly->mask) status = RNN_STATUS_BAD_ARGUMENT;
        if (l > 0 && ly->I != layers[l - 1].D * layers[l - 1].O) status = RNN_STATUS_BAD_SHAPE;
    }
    if (status != RNN_STATUS_OK) {
        rnn_stack_free(st);
        return status;
    }
    *out = st;
    return RNN_STATUS_OK;
}

int32_t rnn_stack_input_size(const rnn_stack *st) { return st->layer[0].I + st->layer[0].mask; }
int32_t rnn_stack_output_size(const rnn_stack *st) {
    const rnn_layer *ly = &st->layer[st->L - 1];
    return ly->D * ly->O;
}

static int64_t layer_state_floats(const rnn_layer *ly, int64_t B) {
    return ly->D * B * (ly->O + (ly->has_c ? ly->H : 0)); /* h (D, B, O), c (D, B, H) */
}

int64_t rnn_stack_state_floats(const rnn_stack *st, int64_t B) {
    int64_t n = 0;
    for (int32_t l = 0; l < st->L; l++) n += layer_state_floats(&st->layer[l], B);
    return n;
}

int64_t rnn_stack_state_offset(const rnn_stack *st, int32_t layer, int64_t B, int32_t want_c) {
    int64_t off = 0;
    for (int32_t l = 0; l < layer; l++) off += layer_state_floats(&st->layer[l], B);
    const rnn_layer *ly = &st->layer[layer];
    if (!want_c) return off;
    return ly->has_c ? off + ly->D * B * ly->O : -1;
}

int64_t rnn_stack_workspace_floats(const rnn_stack *st, int64_t T, int64_t B) {
    int64_t cell_max = 0, inter = 0;
    for (int32_t l = 0; l < st->L; l++) {
        const rnn_layer *ly = &st->layer[l];
        int64_t f = rnn_cell_forward_floats(ly->cell[0], T, B);
        if (f > cell_max) cell_max = f;
        if (l < st->L - 1 && ly->D * ly->O > inter) inter = ly->D * ly->O;
    }
    /* two ping-pong buffers (T, B, D*O) between layers, then one cell's workspace */
    return 2 * T * B * inter + cell_max;
}

rnn_status rnn_stack_forward(const rnn_stack *st, const float *X, int64_t T, int64_t B,
                             int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                             int64_t ys_b, int64_t ys_d, float *state, float *work) {
    return rnn_stack_forward_threads(st, X, T, B, batch_first, lens, Y, ys_t, ys_b, ys_d, state, work, 1);
}

static void stack_run(const rnn_stack *st, const float *X, int64_t T, int64_t B, int32_t batch_first,
                      const int32_t *lens, float *Y, int64_t ys_t, int64_t ys_b, int64_t ys_d, float *state,
                      float *work, rnn_par *par);

rnn_status rnn_stack_forward_threads(const rnn_stack *st, const float *X, int64_t T, int64_t B,
                                     int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                                     int64_t ys_b, int64_t ys_d, float *state, float *work, int32_t threads) {
    if (!st || !state || !work || (T > 0 && B > 0 && (!X || !Y))) return RNN_STATUS_BAD_ARGUMENT;
    if (T < 0 || B < 0) return RNN_STATUS_BAD_SHAPE;
    if (T > INT32_MAX || B > INT32_MAX || T * B > INT32_MAX) return RNN_STATUS_TOO_LARGE;
    if (lens)
        for (int64_t b = 0; b < B; b++)
            if (lens[b] < 0 || lens[b] > T) return RNN_STATUS_BAD_ARGUMENT;
    if (T == 0 || B == 0) return RNN_STATUS_OK;
    rnn_par *par = rnn_par_begin(threads, st, B, T); /* NULL: this thread alone */
    stack_run(st, X, T, B, batch_first, lens, Y, ys_t, ys_b, ys_d, state, work, par);
    rnn_par_end(par);
    return RNN_STATUS_OK;
}

static void stack_run(const rnn_stack *st, const float *X, int64_t T, int64_t B, int32_t batch_first,
                      const int32_t *lens, float *Y, int64_t ys_t, int64_t ys_b, int64_t ys_d, float *state,
                      float *work, rnn_par *par) {
    /* Row (t, b) of every (T, B, width) or (B, T, width) buffer is at t*xs_t + b*xs_b. */
    const int64_t xs_t = batch_first ? 1 : B, xs_b = batch_first ? T : 1;
    int64_t inter = 0;
    for (int32_t l = 0; l < st->L - 1; l++)
        if (st->layer[l].D * st->layer[l].O > inter) inter = st->layer[l].D * st->layer[l].O;
    float *buf[2] = {work, work + T * B * inter};
    float *cell_work = work + 2 * T * B * inter;

    const float *in = X;
    int64_t state_off = 0;
    for (int32_t l = 0; l < st->L; l++) {
        const rnn_layer *ly = &st->layer[l];
        const int64_t H = ly->H, O = ly->O, DO = ly->D * O; /* O: h and output floats */
        float *out;
        int64_t o_t, o_b, o_d;
        if (l == st->L - 1) {
            out = Y; o_t = ys_t; o_b = ys_b; o_d = ys_d;
        } else {
            out = buf[l % 2]; o_t = xs_t * DO; o_b = xs_b * DO; o_d = O;
        }
        float *h = state + state_off;
        float *c = ly->has_c ? h + ly->D * B * O : NULL;
        for (int32_t d = 0; d < ly->D; d++) {
            int32_t reverse = ly->direction == RNN_DIR_REVERSE || d == 1;
            rnn_cell_forward(ly->cell[d], in, T, B, xs_t, xs_b, lens, reverse, out + d * o_d, o_t, o_b,
                             h + d * B * O, c ? c + d * B * H : NULL, cell_work, par);
        }
        state_off += layer_state_floats(ly, B);
        in = out;
    }
}

/* Visits every (layer, block, direction) run of the state layout: D runs of h (O floats
 * each), then for an LSTM D runs of c (H floats each). */
static void move_states(const rnn_stack *st, float *batched, float *const *streams, int64_t n,
                        int to_batch) {
    int64_t off_b = 0, off_1 = 0;
    for (int32_t l = 0; l < st->L; l++) {
        const rnn_layer *ly = &st->layer[l];
        const int64_t runs = (ly->has_c ? 2 : 1) * ly->D; /* h per direction, then c */
        for (int64_t r = 0; r < runs; r++) {
            const int64_t w = r < ly->D ? ly->O : ly->H; /* floats of this run */
            for (int64_t i = 0; i < n; i++) {
                float *b = batched + off_b + i * w;
                float *s = streams[i] + off_1;
                if (to_batch) memcpy(b, s, sizeof(float) * (size_t)w);
                else memcpy(s, b, sizeof(float) * (size_t)w);
            }
            off_b += n * w;
            off_1 += w;
        }
    }
}

void rnn_stack_gather_states(const rnn_stack *st, float *batched, float *const *streams, int64_t n) {
    move_states(st, batched, streams, n, 1);
}

void rnn_stack_scatter_states(const rnn_stack *st, const float *batched, float *const *streams,
                              int64_t n) {
    move_states(st, (float *)batched, streams, n, 0);
}

const rnn_packed *rnn_stack_packed(const rnn_stack *st, int32_t layer, int32_t dir, int32_t which) {
    if (!st || layer < 0 || layer >= st->L || dir < 0 || dir >= st->layer[layer].D) return NULL;
    const rnn_cell *c = st->layer[layer].cell[dir];
    const rnn_packed *p = which == 0 ? &c->Wp : which == 1 ? &c->Rp : which == 2 ? &c->Rhp : which == 3 ? &c->Whrp : NULL;
    return p && p->data ? p : NULL;
}
