/* wake_latency.c - how long this machine takes to wake a sleeping thread: the floor under the
 * session batcher's latency (each batched step waits for at least one such wake-up).
 *
 *   gcc -O2 -pthread benchmarks/wake_latency.c -o /tmp/wake_latency && /tmp/wake_latency
 *
 * Two threads hand a turn back and forth through a mutex and condition variable (what the
 * batcher's scheduler and callers do); each side does 300 us / 200 us of work between turns,
 * so the other has gone to sleep. Prints percentiles of the round trip minus the work: two
 * wake-ups each. Not a test: a measurement of the machine, quoted in BENCHMARKS.md. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { N = 5000 };
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int turn;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void busy(double us) {
    double t0 = now_us();
    while (now_us() - t0 < us) {}
}

static void wait_for(int v) {
    pthread_mutex_lock(&mu);
    while (turn != v) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void give(int v) {
    pthread_mutex_lock(&mu);
    turn = v;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static void *other(void *arg) {
    (void)arg;
    for (int i = 0; i < N; i++) {
        wait_for(1);
        busy(300);
        give(0);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    static double lat[N];
    pthread_t t;
    pthread_create(&t, NULL, other, NULL);
    for (int i = 0; i < N; i++) {
        double t0 = now_us();
        give(1);
        wait_for(0);
        lat[i] = now_us() - t0 - 300;
        busy(200);
    }
    pthread_join(t, NULL);
    qsort(lat, N, sizeof lat[0], cmp);
    printf("two wake-ups (us): p50 %.0f  p90 %.0f  p99 %.0f  p99.9 %.0f  max %.0f  (%d round trips)\n",
           lat[N / 2], lat[N * 9 / 10], lat[N * 99 / 100], lat[N * 999 / 1000], lat[N - 1], N);
    return 0;
}
