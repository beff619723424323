/* pool.c - a persistent pool of worker threads that split one product's panels (batch-1 steps). */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/*
 * One process-wide pool of (limit - 1) workers, made on the first call that asks for more
 * than one thread. A forward call claims the whole pool (rnn_par_begin) or, when another
 * thread holds it, runs on its own thread: the threads computing never exceed the limit and
 * no caller waits for another.
 *
 * A job is n chunks of one function. Its claim state is one 64-bit word,
 *     gen (20 bits) | workers allowed (4) | lo (20) | hi (20),
 * chunks [lo, hi) not yet taken. The caller takes chunks from the front (lo++), workers
 * from the back (hi--), each by compare-and-swap, so with two threads of equal speed each
 * takes the same half at every step and its weights stay in its own core's cache. A worker
 * reads the job's function and argument only after a successful claim: the caller writes
 * them while every chunk of the previous job is taken (no claim can succeed then) and
 * publishes the job with a release store, so a claim always sees the job it claimed in.
 * When a worker is late (descheduled on a busy machine), the caller simply takes every
 * chunk itself; it then waits only for chunks a worker has started.
 *
 * Idle workers spin for a bounded time (RNN_POOL_SPIN_NS, longer than the gap between the
 * steps of a stream driven from Python) and then sleep on a condition variable, so a pool
 * between calls costs no CPU.
 */

#define RNN_POOL_MAX 16        /* threads (caller included): the 4-bit field above */
#ifndef RNN_POOL_SPIN_NS
#define RNN_POOL_SPIN_NS 50000 /* a worker spins this long (ns) for the next job, then sleeps */
#endif
#define RNN_POOL_YIELD 2000    /* pause loops the caller spins before yielding its core */

#define ST_GEN(s) ((s) >> 44)
#define ST_ACT(s) (((s) >> 40) & 0xfu)
#define ST_LO(s) (((s) >> 20) & 0xfffffu)
#define ST_HI(s) ((s) & 0xfffffu)
#define ST_MAKE(gen, act, lo, hi) \
    ((((uint64_t)(gen) & 0xfffffu) << 44) | ((uint64_t)(act) << 40) | ((uint64_t)(lo) << 20) | (uint64_t)(hi))

/* What calls of one kind (a key: the stack, and the batch rows) have cost per time step,
 * split and not split: an average of recent times (ns) of each way, and how many were seen. */
#define RNN_TUNE_SLOTS 64
typedef struct {
    const void *key;
    int64_t rows;
    int64_t ns[2];      /* per step; 0: on the calling thread alone, 1: split */
    int32_t seen[2];
    int32_t trial;      /* calls left in a trial of the way `trial_way` (the first is not timed) */
    int32_t trial_way;
    int32_t trial_len;
    uint64_t calls;
    uint64_t next_try;  /* the call at which the slower way is tried again */
    uint64_t interval;  /* calls between such tries */
} tune_slot;

struct rnn_par {
    int32_t n_workers;          /* started workers */
    int32_t active;             /* workers the current holder may use (threads - 1) */
    uint64_t state;             /* the claim word above (atomic) */
    int64_t done;               /* finished chunks of the current job (atomic) */
    int32_t sleepers;           /* workers asleep or about to sleep (atomic) */
    int32_t busy;               /* 1 while a caller holds the pool (atomic) */
    tune_slot tune[RNN_TUNE_SLOTS]; /* per kind of call: split or not (rnn_par_begin) */
    tune_slot *slot;            /* the current call's, or NULL (not timed) */
    int32_t split;              /* the current call splits its products */
    int32_t timed;              /* the current call's time is recorded */
    int64_t t0, steps;          /* its start (ns) and time steps */
    void (*fn)(void *arg, int64_t chunk);
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

typedef struct {
    rnn_par *pool;
    int32_t index; /* 0 .. n_workers-1 */
} worker_arg;

static int g_adaptive = 1; /* rnn_threads_set_adaptive */

int rnn_threads_set_adaptive(int on) {
    const int old = g_adaptive;
    g_adaptive = on != 0;
    return old;
}

static int64_t g_worker_chunks = 0; /* chunks run by workers, ever (for tests) */

int64_t rnn_threads_worker_chunks(void) { return __atomic_load_n(&g_worker_chunks, __ATOMIC_RELAXED); }

/* Takes and runs chunks of the current job until none is left. me: -1 for the caller
 * (from the front), else the worker's index (from the back; only workers the job allows). */
static void run_chunks(rnn_par *p, int32_t me) {
    for (;;) {
        uint64_t s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
        const uint64_t lo = ST_LO(s), hi = ST_HI(s);
        if (lo >= hi || (me >= 0 && (uint64_t)me >= ST_ACT(s))) return;
        const uint64_t next = me < 0 ? ST_MAKE(ST_GEN(s), ST_ACT(s), lo + 1, hi)
                                     : ST_MAKE(ST_GEN(s), ST_ACT(s), lo, hi - 1);
        if (!__atomic_compare_exchange_n(&p->state, &s, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        p->fn(p->arg, (int64_t)(me < 0 ? lo : hi - 1));
        if (me >= 0) __atomic_fetch_add(&g_worker_chunks, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&p->done, 1, __ATOMIC_RELEASE);
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *worker_main(void *varg) {
    worker_arg *wa = varg;
    rnn_par *p = wa->pool;
    const int32_t me = wa->index;
    free(wa);
#ifdef __GLIBC__
    pthread_setname_np(pthread_self(), "rnnengine-pool"); /* in top -H and /proc/<pid>/task */
#endif
    uint64_t seen = ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE));
    for (;;) {
        /* wait for a new job: spin a while, then sleep */
        uint64_t s = 0;
        int fresh = 0;
        const int64_t until = now_ns() + RNN_POOL_SPIN_NS;
        for (int i = 1;; i++) {
            s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
            if (ST_GEN(s) != seen) { fresh = 1; break; }
            cpu_relax();
            if (i % 64 == 0 && now_ns() > until) break;
        }
        if (!fresh) {
            pthread_mutex_lock(&p->mu);
            __atomic_fetch_add(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            while (ST_GEN(s = __atomic_load_n(&p->state, __ATOMIC_SEQ_CST)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            __atomic_fetch_sub(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&p->mu);
        }
        seen = ST_GEN(s);
        run_chunks(p, me);
    }
    return NULL; /* not reached: workers live as long as the process */
}

/* ---- the process-wide pool ---- */

static pthread_mutex_t g_init_mu = PTHREAD_MUTEX_INITIALIZER;
static rnn_par *g_pool = NULL;      /* made once, never freed (workers sleep when idle) */
static int32_t g_limit = 0;         /* 0: not read yet */
static int g_atfork = 0;

/* After fork() the child has no workers: forget the parent's pool (its memory stays; its
 * mutex may be held by a thread that no longer exists) and make a new one on demand. */
static void after_fork_child(void) {
    g_pool = NULL;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_init_mu, &fresh, sizeof fresh);
}

/* The first positive integer in the environment variable, or 0. */
static int32_t env_threads(const char *name) {
    const char *v = getenv(name);
    if (!v) return 0;
    char *end = NULL;
    long n = strtol(v, &end, 10); /* OMP_NUM_THREADS may be a list "4,2": its first entry */
    if (end == v || n < 1) return 0;
    return n > RNN_POOL_MAX ? RNN_POOL_MAX : (int32_t)n;
}

static int32_t cpus_available(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n >= 1) return n > RNN_POOL_MAX ? RNN_POOL_MAX : n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > RNN_POOL_MAX ? RNN_POOL_MAX : (int32_t)n);
}

/* Caller holds g_init_mu. */
static int32_t limit_locked(void) {
    if (g_limit == 0) {
        int32_t n = env_threads("RNNENGINE_NUM_THREADS");
        if (!n) n = env_threads("OMP_NUM_THREADS");
        const int32_t cpus = cpus_available();
        g_limit = n ? (n < cpus ? n : cpus) : cpus;
    }
    return g_limit;
}

int32_t rnn_threads_limit(void) {
    pthread_mutex_lock(&g_init_mu);
    const int32_t n = limit_locked();
    pthread_mutex_unlock(&g_init_mu);
    return n;
}

int32_t rnn_threads_set_limit(int32_t n) {
    pthread_mutex_lock(&g_init_mu);
    if (n <= 0) {
        g_limit = 0; /* back to the environment and the CPUs */
        n = limit_locked();
    } else {
        g_limit = n > RNN_POOL_MAX ? RNN_POOL_MAX : n;
        n = g_limit;
    }
    pthread_mutex_unlock(&g_init_mu);
    return n;
}

/* Makes the pool with workers for the limit; a worker that cannot be started is simply not
 * there (no workers at all: every call runs serially). */
static rnn_par *pool_get(void) {
    rnn_par *p = __atomic_load_n(&g_pool, __ATOMIC_ACQUIRE);
    if (p) return p;
    pthread_mutex_lock(&g_init_mu);
    p = g_pool;
    if (!p) {
        if (!g_atfork) g_atfork = pthread_atfork(NULL, NULL, after_fork_child) == 0;
        const int32_t want = limit_locked() - 1;
        p = calloc(1, sizeof *p);
        if (p && pthread_mutex_init(&p->mu, NULL) == 0) {
            if (pthread_cond_init(&p->cv, NULL) != 0) {
                pthread_mutex_destroy(&p->mu);
                free(p);
                p = NULL;
            }
        } else {
            free(p);
            p = NULL;
        }
        for (int32_t w = 0; p && w < want; w++) {
            worker_arg *wa = malloc(sizeof *wa);
            if (!wa) break;
            wa->pool = p;
            wa->index = w;
            pthread_attr_t attr;
            pthread_t th;
            int ok = pthread_attr_init(&attr) == 0;
            if (ok) {
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                ok = pthread_create(&th, &attr, worker_main, wa) == 0;
                pthread_attr_destroy(&attr);
            }
            if (!ok) {
                free(wa);
                break;
            }
            p->n_workers = w + 1;
        }
        if (p) __atomic_store_n(&g_pool, p, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_init_mu);
    return p;
}

/* Publishes a job of n chunks (fn and arg already set) and wakes sleeping workers. */
static void publish(rnn_par *p, int64_t n) {
    __atomic_store_n(&p->done, 0, __ATOMIC_RELAXED);
    const uint64_t old = __atomic_load_n(&p->state, __ATOMIC_RELAXED);
    __atomic_store_n(&p->state, ST_MAKE(ST_GEN(old) + 1, p->active, 0, n), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

/*
 * threads = 2 must never be slower than 1. Whether a split gains depends on more than the
 * size of the products: on whether the other core is free (not on a machine whose cores all
 * run other work, where a worker preempted in the middle of its chunk stalls the job for a
 * scheduler time slice), on whether the weights then fit in each core's cache, on the
 * memory bandwidth two cores share. So calls of each kind (key, rows) are timed both ways,
 * per time step, as they run: a few calls on one thread, then a trial of split calls, then
 * the faster way; the slower way gets a new trial after RNN_TUNE_FIRST calls, then after
 * twice as many each time it is still slower (up to RNN_TUNE_LAST), so a machine whose load
 * changes is followed while a way that keeps losing costs a few calls in a thousand. A
 * trial is RNN_TUNE_TRIAL calls in a row whose first is not timed: a worker asleep since
 * the last split call needs that call to wake up, and whole calls (not single products)
 * are compared because between the products of one call a worker stays awake. Times are
 * averaged with weight 1/4 for the newest, each sample capped at 4x the average (one
 * preemption must not decide). Both ways compute the same bits.
 */
#define RNN_TUNE_FIRST 16
#define RNN_TUNE_LAST 1024
#define RNN_TUNE_TRIAL 6

static void tune_choose(rnn_par *p, const void *key, int64_t rows) {
    const uintptr_t h = ((uintptr_t)key >> 6) ^ (uintptr_t)rows * 0x9e3779b1u;
    tune_slot *t = &p->tune[(h ^ (h >> 7)) % RNN_TUNE_SLOTS];
    if (t->key != key || t->rows != rows) {
        memset(t, 0, sizeof *t);
        t->key = key;
        t->rows = rows;
        t->interval = RNN_TUNE_FIRST;
    }
    t->calls++;
    p->slot = t;
    p->timed = 1;
    if (t->trial == 0) {
        if (t->seen[0] < 2) { /* first a few calls on one thread */
            p->split = 0;
            return;
        }
        const int best = t->seen[1] >= 2 && t->ns[1] < t->ns[0];
        if (t->seen[1] >= 2 && t->calls < t->next_try) {
            p->split = best;
            return;
        }
        t->trial_way = t->seen[1] < 2 ? 1 : !best; /* start a trial of the other way */
        t->trial = t->trial_len = RNN_TUNE_TRIAL;
    }
    p->split = t->trial_way;
    p->timed = t->trial != t->trial_len; /* the trial's first call wakes the worker */
    t->trial--;
}

static void tune_record(rnn_par *p) {
    tune_slot *t = p->slot;
    if (!t || !p->timed || p->steps <= 0) return;
    const int w = p->split;
    int64_t ns = (now_ns() - p->t0) / p->steps;
    if (t->seen[w] == 0) t->ns[w] = ns;
    else {
        if (ns > 4 * t->ns[w]) ns = 4 * t->ns[w];
        t->ns[w] += (ns - t->ns[w]) / 4;
    }
    if (t->seen[w] < 1000000) t->seen[w]++;
    if (t->trial_len && t->trial == 0) { /* a trial ended */
        const int tried_wins = (t->ns[1] < t->ns[0]) == t->trial_way;
        if (t->seen[0] >= 2 && t->seen[1] >= 2)
            t->interval = tried_wins ? RNN_TUNE_FIRST
                                     : (t->interval * 2 > RNN_TUNE_LAST ? RNN_TUNE_LAST : t->interval * 2);
        t->next_try = t->calls + t->interval;
        t->trial_len = 0;
    }
}

rnn_par *rnn_par_begin(int32_t threads, const void *key, int64_t rows, int64_t steps) {
    if (threads <= 1) return NULL;
    const int32_t limit = rnn_threads_limit();
    if (threads > limit) threads = limit;
    if (threads <= 1) return NULL;
    rnn_par *p = pool_get();
    if (!p || p->n_workers == 0) return NULL;
    int32_t free_ = 0;
    if (!__atomic_compare_exchange_n(&p->busy, &free_, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return NULL; /* another call holds the workers: run on this thread alone */
    p->active = threads - 1 < p->n_workers ? threads - 1 : p->n_workers;
    p->slot = NULL;
    p->split = 1;
    p->steps = steps;
    if (g_adaptive) tune_choose(p, key, rows);
    p->t0 = now_ns();
    return p;
}

void rnn_par_end(rnn_par *p) {
    if (!p) return;
    tune_record(p);
    __atomic_store_n(&p->busy, 0, __ATOMIC_RELEASE);
}

int32_t rnn_par_threads(const rnn_par *p) { return p && p->split ? p->active + 1 : 1; }

void rnn_par_run(rnn_par *p, int64_t n_chunks, void (*fn)(void *arg, int64_t chunk), void *arg) {
    if (n_chunks <= 0) return;
    if (!p || !p->split || n_chunks == 1 || n_chunks > 0xfffff) {
        for (int64_t c = 0; c < n_chunks; c++) fn(arg, c);
        return;
    }
    /* every chunk of the previous job is taken and done: no claim can succeed while the
     * job is written */
    p->fn = fn;
    p->arg = arg;
    publish(p, n_chunks);
    run_chunks(p, -1);
    for (int i = 0; __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < n_chunks; i++) {
        if (i < RNN_POOL_YIELD) cpu_relax();
        else sched_yield(); /* a worker holding a chunk was descheduled */
    }
}

