/* batcher_stress.c - src_c/batch.c driven from many threads at once, built with
 * -fsanitize=thread by tests/test_batcher_tsan.py (a data race or a lock-order inversion
 * stops it with a report).
 *
 * NT threads each step their own slot STEPS times with rnn_batcher_step (each step computes a
 * batch in its own thread when none is running, else queues for the scheduler; every 7th step
 * has a timeout, and a withdrawn step is made again); one more thread submits NA slots' steps
 * asynchronously and collects them through the notify pipe and rnn_batcher_completions. Then
 * every slot's outputs are compared with its rows run alone as one sequence (rnn_stack_forward):
 * within 1e-5 (the whole sequence's input projection is one product, the steps' are not).
 * Prints the counters; exits 1 on a difference. */
#define _GNU_SOURCE
#include "rnnengine.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

enum { I = 8, H = 16, NT = 6, NA = 4, STEPS = 400 };
static rnn_stack *stack;
static rnn_batcher *bat;
static int64_t S;
static float X[NT + NA][STEPS][I];
static float Yb[NT + NA][STEPS][H];
static volatile int async_left;
static int pfd[2];

static float rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return ((*s >> 8) & 0xffff) / 65536.0f - 0.5f;
}

static void *stepper(void *arg) {
    int k = (int)(long)arg;
    float *st = calloc(S, sizeof(float));
    int32_t id = rnn_batcher_open(bat, st);
    for (int t = 0; t < STEPS; t++) {
        int32_t status;
        int32_t r = rnn_batcher_step(bat, id, X[k][t], Yb[k][t], (t % 7 == 0) ? 50000000 : -1, &status);
        if (r == RNN_BATCH_TIMEOUT) { t--; continue; }  /* withdrawn: not applied, try again */
        if (r != RNN_BATCH_OK) { fprintf(stderr, "step %d\n", r); exit(2); }
        if (t % 50 == 0) usleep(100);
    }
    free(st);
    return NULL;
}

static void *async_driver(void *arg) {
    (void)arg;
    float *st = calloc(S, sizeof(float));
    int32_t ids[NA];
    for (int a = 0; a < NA; a++) ids[a] = rnn_batcher_open(bat, st);
    int t = 0;
    while (t < STEPS) {
        for (int a = 0; a < NA; a++)
            while (rnn_batcher_submit(bat, ids[a], X[NT + a][t], Yb[NT + a][t]) == RNN_BATCH_FULL) usleep(10);
        int got = 0;
        while (got < NA) {
            char buf[64];
            (void)!read(pfd[0], buf, sizeof buf);
            int32_t cids[256], res[256];
            int32_t n;
            while ((n = rnn_batcher_completions(bat, cids, res, 256, 0)) > 0) {
                for (int j = 0; j < n; j++) if ((res[j] & 0xff) != RNN_BATCH_OK) { fprintf(stderr, "async %d\n", res[j]); exit(2); }
                got += n;
            }
            if (got < NA) usleep(20);
        }
        t++;
    }
    free(st);
    return NULL;
}

int main(void) {
    unsigned seed = 7;
    rnn_cell_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.kind = RNN_CELL_LSTM; cfg.input_size = I; cfg.hidden_size = H;
    cfg.act[0].kind = RNN_ACT_SIGMOID; cfg.act[1].kind = RNN_ACT_TANH; cfg.act[2].kind = RNN_ACT_TANH;
    static float W[4 * H * I], R[4 * H * H], B[8 * H];
    for (int i = 0; i < 4 * H * I; i++) W[i] = rnd(&seed);
    for (int i = 0; i < 4 * H * H; i++) R[i] = rnd(&seed);
    for (int i = 0; i < 8 * H; i++) B[i] = rnd(&seed);
    rnn_cell *cell;
    if (rnn_cell_create(&cfg, W, R, B, NULL, &cell)) return 1;
    int32_t dir = RNN_DIR_FORWARD;
    if (rnn_stack_create(1, &dir, &cell, &stack)) return 1;
    S = rnn_stack_state_floats(stack, 1);
    for (int k = 0; k < NT + NA; k++) for (int t = 0; t < STEPS; t++) for (int i = 0; i < I; i++) X[k][t][i] = rnd(&seed);
    if (rnn_batcher_create(stack, H, 8, 20000, 64, 64, 1, &bat)) return 1;
    if (pipe(pfd)) return 1;
    fcntl(pfd[0], F_SETFL, O_NONBLOCK);
    fcntl(pfd[1], F_SETFL, O_NONBLOCK);
    rnn_batcher_set_notify_fd(bat, pfd[1]);
    pthread_t th[NT + 1];
    for (int k = 0; k < NT; k++) pthread_create(&th[k], NULL, stepper, (void *)(long)k);
    pthread_create(&th[NT], NULL, async_driver, NULL);
    for (int k = 0; k <= NT; k++) pthread_join(th[k], NULL);
    int64_t c[6];
    rnn_batcher_counters(bat, c);
    rnn_batcher_free(bat);
    /* each sequence alone */
    int64_t ws = rnn_stack_workspace_floats(stack, STEPS, 1);
    float *work = calloc(ws, sizeof(float)), *st = calloc(S, sizeof(float));
    static float Y[STEPS][H];
    int bad = 0;
    for (int k = 0; k < NT + NA; k++) {
        memset(st, 0, S * sizeof(float));
        if (rnn_stack_forward(stack, &X[k][0][0], STEPS, 1, 0, NULL, &Y[0][0], H, H, H, st, work)) return 1;
        for (int t = 0; t < STEPS; t++) for (int h = 0; h < H; h++) {
            float d = Y[t][h] - Yb[k][t][h];
            if (d > 1e-5f || d < -1e-5f) { if (!bad) fprintf(stderr, "seq %d step %d differs %g\n", k, t, d); bad++; }
        }
    }
    printf("steps %lld batches %lld largest %lld; %d values differ\n", (long long)c[0], (long long)c[1], (long long)c[2], bad);
    return bad != 0;
}
