/* batch.c - many single-row streams of one stack stepped together: the session batcher's core. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, sem_timedwait, pthread_condattr_setclock */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/*
 * A service opens one session per user and steps it one row at a time from that user's
 * thread or task. Stepping each session alone costs a full matrix-vector product per step;
 * stepping the sessions that have a row waiting as one batch turns those into one
 * matrix-matrix product (5x fewer cycles per row at 64 rows of an LSTM 256).
 *
 * Here every session is a *slot*: its state lives in a page of the batcher's pooled state
 * memory (RNN_BATCH_PAGE slots per page, pages made as sessions open, never moved). A
 * caller submits a row (a pointer to it, and where the output goes) and waits on the slot's
 * semaphore; one scheduler thread, which never takes Python's GIL, takes the queued slots
 * in arrival order, gathers their rows and states into its own batch buffers (made once),
 * runs rnn_stack_forward_threads on them, scatters states and outputs back and posts each
 * slot's semaphore. The caller's thread sleeps in the kernel (futex) until then, so the only
 * per-step cost on the caller's side is the call itself.
 *
 * Waiting to fill a batch: the scheduler runs as soon as every open session has a row
 * queued (or max_batch have), otherwise when the oldest queued row has waited max_wait_ns.
 *
 * A blocking step that finds no batch being computed computes one at once in its caller's
 * thread: its own row and the rows queued (up to max_batch), with the same buffers, waking
 * those rows' callers as the scheduler would. That saves the hand-off to the scheduler and
 * back (two thread wake-ups, 20-50 us each on a shared machine, which made a lone session
 * 2x slower than its own stream); batches still form from the rows that arrive while one is
 * computed. Those queue for the scheduler (or the next such caller), which waits until that
 * batch is done: one batch is computed at a time, whoever computes it. Asynchronous steps
 * always go through the scheduler (an event loop must not compute).
 *
 * Slot life: FREE -> (open) IDLE -> (submit) QUEUED -> (taken) RUNNING -> (done) IDLE;
 * QUEUED -> IDLE when withdrawn (a timed-out or cancelled call: never applied); IDLE -> FREE
 * on close. A slot's state may be read or written by its owner (rnn_batcher_slot_state) only
 * while it is IDLE: the scheduler touches QUEUED and RUNNING slots only. The caller side
 * (the binding) makes sure a session has at most one call in flight.
 *
 * Queued slots form an intrusive doubly linked list (next/prev slot ids), so a withdrawn
 * slot leaves in O(1) and the order of arrival is kept. Completed asynchronous steps go to a
 * ring of slot ids that rnn_batcher_completions hands out (each slot is there at most once).
 */

#define RNN_BATCH_PAGE 64

enum { SLOT_FREE = 0, SLOT_IDLE, SLOT_QUEUED, SLOT_RUNNING };

typedef struct {
    const float *x;  /* the submitted row (the caller's buffer, alive until done) */
    float *y;        /* where the output row goes (likewise) */
    int64_t t_queued;
    int32_t state;   /* SLOT_* */
    int32_t async;   /* done goes to the completion ring instead of the semaphore */
    int32_t result;  /* rnn_batch_result of the last step */
    int32_t status;  /* rnn_status of its batched call */
    int32_t next, prev; /* queue links (-1: none) */
    sem_t done;      /* posted when a blocking step is done */
} rnn_slot;

struct rnn_batcher {
    const rnn_stack *stack;
    int64_t I, O, S, ys_d;
    int32_t max_batch, max_queue, max_slots, threads;
    int64_t max_wait_ns;

    pthread_mutex_t mu;
    pthread_cond_t work;    /* the scheduler waits here for rows */
    pthread_cond_t room;    /* blocking submitters wait here for queue room */
    pthread_cond_t done_cv; /* rnn_batcher_completions waits here */

    rnn_slot **slot_pages;  /* max_slots / RNN_BATCH_PAGE pages, made on demand */
    float **state_pages;    /* S * RNN_BATCH_PAGE floats per page */
    int32_t n_made;         /* slots made so far (ids [0, n_made)) */
    int32_t *free_ids;      /* a stack of FREE slot ids */
    int32_t n_free, n_open;
    int32_t q_head, q_tail, n_queued; /* the queue (QUEUED slots) */
    int32_t n_inflight;     /* QUEUED + RUNNING: bounded by max_queue */
    int32_t *ring;          /* completed asynchronous steps */
    int32_t ring_head, ring_count;
    int32_t *wake;          /* completed blocking steps whose callers are still to be woken */
    int32_t wake_head, wake_count;
    int chain;              /* wake callers one after another (1), or all at once (0: RNNE_BATCH_BURST=1, set
                             * for the side-by-side measurement in benchmarks/bench_batcher.py) */
    int32_t want;           /* rows the scheduler waits for: min(max_batch, n_open) */
    int32_t sched_waiting;  /* the scheduler sleeps on `work` */
    int32_t running;        /* a batch is being computed (by the scheduler, or inline by a caller) */
    int32_t fail_next;      /* fault injection (tests): fail this many batched calls */
    int notify_fd;          /* rnn_batcher_set_notify_fd: -1, or a pipe written when completions arrive */
    int notify_pending;     /* a byte is written and rnn_batcher_completions not called since */
    int stop, exited, started;
    pthread_t thread;

    /* the scheduler's batch buffers, made once */
    float *X, *Y, *bstate, *work_buf;
    float **sptr;
    int32_t *ids;

    int64_t steps, batches, largest, most_inflight;
};

static int64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static struct timespec ts_of(int64_t ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000);
    ts.tv_nsec = (long)(ns % 1000000000);
    return ts;
}

static rnn_slot *slot_at(const rnn_batcher *b, int32_t id) {
    return &b->slot_pages[id / RNN_BATCH_PAGE][id % RNN_BATCH_PAGE];
}

static float *state_at(const rnn_batcher *b, int32_t id) {
    return b->state_pages[id / RNN_BATCH_PAGE] + (int64_t)(id % RNN_BATCH_PAGE) * b->S;
}

/* The slot of a valid id in any state but FREE, else NULL (with the lock held). */
static rnn_slot *live_slot(const rnn_batcher *b, int32_t id) {
    if (id < 0 || id >= b->n_made) return NULL;
    rnn_slot *s = slot_at(b, id);
    return s->state == SLOT_FREE ? NULL : s;
}

static void queue_push(rnn_batcher *b, int32_t id) {
    rnn_slot *s = slot_at(b, id);
    s->next = -1;
    s->prev = b->q_tail;
    if (b->q_tail >= 0) slot_at(b, b->q_tail)->next = id; else b->q_head = id;
    b->q_tail = id;
    b->n_queued++;
}

static void queue_remove(rnn_batcher *b, int32_t id) {
    rnn_slot *s = slot_at(b, id);
    if (s->prev >= 0) slot_at(b, s->prev)->next = s->next; else b->q_head = s->next;
    if (s->next >= 0) slot_at(b, s->next)->prev = s->prev; else b->q_tail = s->prev;
    s->next = s->prev = -1;
    b->n_queued--;
}

static void update_want(rnn_batcher *b) {
    int32_t w = b->n_open < b->max_batch ? b->n_open : b->max_batch;
    b->want = w < 1 ? 1 : w;
    if (b->sched_waiting) pthread_cond_signal(&b->work); /* fewer sessions: maybe enough now */
}

/* Wakes the caller of the oldest completed blocking step (lock held). Each woken caller wakes
 * the next one as it leaves (rnn_batcher_step), so the callers of a batch come back one after
 * another, each finding Python's GIL about free, rather than all at once to queue for it. */
static void wake_next(rnn_batcher *b) {
    if (b->wake_count == 0) return;
    int32_t id = b->wake[b->wake_head];
    b->wake_head = (b->wake_head + 1) % b->max_slots;
    b->wake_count--;
    sem_post(&slot_at(b, id)->done);
}

/* Marks n taken slots done with one result (lock held) and hands each out: to the completion
 * ring, or to its waiting caller; `computer` is the slot whose own caller computed the batch
 * (it waits on nothing), or -1. */
static void finish_slots(rnn_batcher *b, const int32_t *ids, int32_t n, int32_t result, rnn_status st,
                         int32_t computer) {
    int any_async = 0;
    for (int32_t k = 0; k < n; ++k) {
        rnn_slot *s = slot_at(b, ids[k]);
        s->state = SLOT_IDLE;
        s->result = result;
        s->status = (int32_t)st;
        s->x = NULL;
        s->y = NULL;
        b->n_inflight--;
        if (ids[k] == computer) {
            continue;
        } else if (s->async) {
            b->ring[(b->ring_head + b->ring_count) % b->max_slots] = ids[k];
            b->ring_count++;
            any_async = 1;
        } else if (b->chain) {
            b->wake[(b->wake_head + b->wake_count) % b->max_slots] = ids[k];
            b->wake_count++;
        } else {
            sem_post(&s->done);
        }
    }
    wake_next(b);
    if (any_async) {
        pthread_cond_broadcast(&b->done_cv);
        if (b->notify_fd >= 0 && !b->notify_pending) {
            /* one byte wakes the event loop; a full pipe (EAGAIN) already holds a wake-up */
            const char one = 1;
            b->notify_pending = write(b->notify_fd, &one, 1) == 1;
        }
    }
    pthread_cond_broadcast(&b->room);
}

/* Computes the rows of slots b->ids[0..n) (RUNNING: no lock needed) as one batch, with the
 * batcher's buffers; on success scatters the states and outputs back. A failed call leaves
 * every state as it was. Called by whoever set b->running. */
static rnn_status compute_rows(rnn_batcher *b, int32_t n, int fail) {
    for (int32_t k = 0; k < n; ++k) {
        rnn_slot *s = slot_at(b, b->ids[k]);
        memcpy(b->X + k * b->I, s->x, (size_t)b->I * sizeof(float));
        b->sptr[k] = state_at(b, b->ids[k]);
    }
    if (fail) return RNN_STATUS_BAD_ARGUMENT;
    rnn_stack_gather_states(b->stack, b->bstate, b->sptr, n);
    rnn_status st = rnn_stack_forward_threads(b->stack, b->X, 1, n, 0, NULL, b->Y, 0, b->O, b->ys_d, b->bstate,
                                              b->work_buf, b->threads);
    if (st == RNN_STATUS_OK) {
        rnn_stack_scatter_states(b->stack, b->bstate, b->sptr, n);
        for (int32_t k = 0; k < n; ++k)
            memcpy(slot_at(b, b->ids[k])->y, b->Y + k * b->O, (size_t)b->O * sizeof(float));
    }
    return st;
}

/* After a batch of n rows (lock held): counters, and the scheduler told if rows queued. */
static void batch_done(rnn_batcher *b, int32_t n, rnn_status st) {
    if (st == RNN_STATUS_OK) b->steps += n;
    b->batches++;
    if (n > b->largest) b->largest = n;
    b->running = 0;
    if (b->sched_waiting && (b->n_queued > 0 || b->stop)) pthread_cond_signal(&b->work);
}

/* Starts a batch (lock held): the queued rows join b->ids after the n already there, up to
 * max_batch, in arrival order; marks it running. Returns the batch's size; *fail: fault
 * injection (tests) says this batched call fails. */
static int32_t start_batch(rnn_batcher *b, int32_t n, int *fail) {
    while (n < b->max_batch && b->q_head >= 0) {
        int32_t id = b->q_head;
        queue_remove(b, id);
        slot_at(b, id)->state = SLOT_RUNNING;
        b->ids[n++] = id;
    }
    *fail = b->fail_next > 0;
    if (*fail) b->fail_next--;
    b->running = 1;
    return n;
}

static void *scheduler(void *arg) {
    rnn_batcher *b = (rnn_batcher *)arg;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        while ((b->n_queued == 0 || b->running) && !(b->stop && !b->running)) {
            b->sched_waiting = 1; /* no rows, or a caller computes a batch inline: wait for it */
            pthread_cond_wait(&b->work, &b->mu);
            b->sched_waiting = 0;
        }
        if (b->n_queued == 0) break; /* stopped, and every queued row has run */
        /* let more rows join: until every open session (or max_batch) has one queued, or
         * the oldest queued row has waited max_wait_ns */
        while (!b->stop && b->n_queued > 0 && b->n_queued < b->want && !b->running) {
            int64_t deadline = slot_at(b, b->q_head)->t_queued + b->max_wait_ns;
            if (now_ns(CLOCK_MONOTONIC) >= deadline) break;
            struct timespec ts = ts_of(deadline);
            b->sched_waiting = 1;
            pthread_cond_timedwait(&b->work, &b->mu, &ts);
            b->sched_waiting = 0;
        }
        if (b->n_queued == 0 || b->running) continue; /* all withdrawn meanwhile, or a caller runs */
        int fail;
        int32_t n = start_batch(b, 0, &fail);
        pthread_mutex_unlock(&b->mu);

        rnn_status st = compute_rows(b, n, fail); /* RUNNING slots are ours alone: no lock */

        pthread_mutex_lock(&b->mu);
        finish_slots(b, b->ids, n, st == RNN_STATUS_OK ? RNN_BATCH_OK : RNN_BATCH_FAILED, st, -1);
        batch_done(b, n, st);
    }
    b->exited = 1;
    pthread_cond_broadcast(&b->done_cv);
    pthread_cond_broadcast(&b->room);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

void rnn_batcher_free(rnn_batcher *b) {
    if (!b) return;
    rnn_batcher_stop(b);
    for (int32_t p = 0; p * RNN_BATCH_PAGE < b->n_made; ++p) {
        for (int32_t k = 0; k < RNN_BATCH_PAGE; ++k) sem_destroy(&b->slot_pages[p][k].done);
        free(b->slot_pages[p]);
        free(b->state_pages[p]);
    }
    free(b->slot_pages);
    free(b->state_pages);
    free(b->free_ids);
    free(b->ring);
    free(b->wake);
    free(b->X);
    free(b->Y);
    free(b->bstate);
    free(b->work_buf);
    free(b->sptr);
    free(b->ids);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->work);
    pthread_cond_destroy(&b->room);
    pthread_cond_destroy(&b->done_cv);
    free(b);
}

rnn_status rnn_batcher_create(const rnn_stack *stack, int64_t ys_d, int32_t max_batch, int64_t max_wait_ns,
                              int32_t max_queue, int32_t max_slots, int32_t threads, rnn_batcher **out) {
    if (!out) return RNN_STATUS_BAD_ARGUMENT;
    *out = NULL;
    if (!stack || ys_d < 1 || max_batch < 1 || max_wait_ns < 0 || max_queue < 1 || max_slots < 1 ||
        max_slots > RNN_BATCH_MAX_SLOTS || threads < 1)
        return RNN_STATUS_BAD_ARGUMENT;
    rnn_batcher *b = (rnn_batcher *)calloc(1, sizeof(rnn_batcher));
    if (!b) return RNN_STATUS_OUT_OF_MEMORY;
    b->stack = stack;
    b->I = rnn_stack_input_size(stack);
    b->O = rnn_stack_output_size(stack);
    b->S = rnn_stack_state_floats(stack, 1);
    b->ys_d = ys_d;
    b->max_batch = max_batch;
    b->max_wait_ns = max_wait_ns;
    b->max_queue = max_queue;
    b->max_slots = max_slots;
    b->threads = threads;
    b->q_head = b->q_tail = -1;
    b->notify_fd = -1;
    b->want = 1;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* timed waits on monotonic deadlines */
    pthread_cond_init(&b->work, &ca);
    pthread_cond_init(&b->room, &ca);
    pthread_cond_init(&b->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    int32_t pages = (max_slots + RNN_BATCH_PAGE - 1) / RNN_BATCH_PAGE;
    b->slot_pages = (rnn_slot **)calloc((size_t)pages, sizeof(rnn_slot *));
    b->state_pages = (float **)calloc((size_t)pages, sizeof(float *));
    b->free_ids = (int32_t *)malloc((size_t)max_slots * sizeof(int32_t));
    b->ring = (int32_t *)malloc((size_t)max_slots * sizeof(int32_t));
    b->wake = (int32_t *)malloc((size_t)max_slots * sizeof(int32_t));
    b->chain = getenv("RNNE_BATCH_BURST") == NULL;
    b->X = (float *)malloc((size_t)(max_batch * b->I) * sizeof(float));
    b->Y = (float *)malloc((size_t)(max_batch * b->O) * sizeof(float));
    b->bstate = (float *)malloc((size_t)rnn_stack_state_floats(stack, max_batch) * sizeof(float));
    b->work_buf = (float *)malloc((size_t)rnn_stack_workspace_floats(stack, 1, max_batch) * sizeof(float));
    b->sptr = (float **)malloc((size_t)max_batch * sizeof(float *));
    b->ids = (int32_t *)malloc((size_t)max_batch * sizeof(int32_t));
    if (!b->slot_pages || !b->state_pages || !b->free_ids || !b->ring || !b->wake || !b->X || !b->Y || !b->bstate ||
        !b->work_buf || !b->sptr || !b->ids) {
        rnn_batcher_free(b);
        return RNN_STATUS_OUT_OF_MEMORY;
    }
    if (pthread_create(&b->thread, NULL, scheduler, b) != 0) {
        rnn_batcher_free(b);
        return RNN_STATUS_OUT_OF_MEMORY;
    }
    b->started = 1;
    *out = b;
    return RNN_STATUS_OK;
}

void rnn_batcher_stop(rnn_batcher *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    int join = b->started;
    b->started = 0; /* a second stop (or free after stop) joins nothing */
    b->stop = 1;
    pthread_cond_broadcast(&b->work);
    pthread_cond_broadcast(&b->room);
    pthread_cond_broadcast(&b->done_cv);
    pthread_mutex_unlock(&b->mu);
    if (join) pthread_join(b->thread, NULL);
    pthread_mutex_lock(&b->mu);
    b->exited = 1;
    pthread_cond_broadcast(&b->done_cv);
    pthread_mutex_unlock(&b->mu);
}

int32_t rnn_batcher_open(rnn_batcher *b, const float *state) {
    if (!b || !state) return RNN_BATCH_BAD_SLOT;
    pthread_mutex_lock(&b->mu);
    int32_t id;
    if (b->stop) {
        id = -RNN_BATCH_CLOSED;
    } else if (b->n_free > 0) {
        id = b->free_ids[--b->n_free];
    } else if (b->n_made >= b->max_slots) {
        id = -RNN_BATCH_FULL;
    } else {
        id = b->n_made;
        int32_t p = id / RNN_BATCH_PAGE;
        if (id % RNN_BATCH_PAGE == 0) { /* a new page of slots and of states */
            rnn_slot *sp = (rnn_slot *)calloc(RNN_BATCH_PAGE, sizeof(rnn_slot));
            float *fp = (float *)malloc((size_t)(RNN_BATCH_PAGE * b->S) * sizeof(float));
            if (!sp || !fp) {
                free(sp);
                free(fp);
                pthread_mutex_unlock(&b->mu);
                return -RNN_BATCH_FAILED;
            }
            for (int32_t k = 0; k < RNN_BATCH_PAGE; ++k) {
                sem_init(&sp[k].done, 0, 0);
                sp[k].next = sp[k].prev = -1;
            }
            b->slot_pages[p] = sp;
            b->state_pages[p] = fp;
        }
        b->n_made++;
    }
    if (id >= 0) {
        rnn_slot *s = slot_at(b, id);
        s->state = SLOT_IDLE;
        s->result = RNN_BATCH_OK;
        s->status = RNN_STATUS_OK;
        memcpy(state_at(b, id), state, (size_t)b->S * sizeof(float));
        b->n_open++;
        update_want(b);
    }
    pthread_mutex_unlock(&b->mu);
    return id;
}

int32_t rnn_batcher_close_slot(rnn_batcher *b, int32_t id) {
    if (!b) return RNN_BATCH_BAD_SLOT;
    pthread_mutex_lock(&b->mu);
    rnn_slot *s = live_slot(b, id);
    int32_t r = RNN_BATCH_OK;
    if (!s || s->state != SLOT_IDLE) {
        r = RNN_BATCH_BAD_SLOT;
    } else {
        s->state = SLOT_FREE;
        s->async = 0;
        b->free_ids[b->n_free++] = id;
        b->n_open--;
        update_want(b);
    }
    pthread_mutex_unlock(&b->mu);
    return r;
}

float *rnn_batcher_slot_state(rnn_batcher *b, int32_t id) {
    if (!b) return NULL;
    pthread_mutex_lock(&b->mu);
    rnn_slot *s = live_slot(b, id);
    float *p = s && s->state == SLOT_IDLE ? state_at(b, id) : NULL;
    pthread_mutex_unlock(&b->mu);
    return p;
}

/* Queues a row on an IDLE slot (lock held); the caller checked room and stop. */
static void enqueue(rnn_batcher *b, int32_t id, rnn_slot *s, const float *x, float *y, int32_t async) {
    s->x = x;
    s->y = y;
    s->async = async;
    s->state = SLOT_QUEUED;
    s->t_queued = now_ns(CLOCK_MONOTONIC);
    queue_push(b, id);
    b->n_inflight++;
    if (b->n_inflight > b->most_inflight) b->most_inflight = b->n_inflight;
    /* wake the scheduler when it sleeps for a first row, or when the batch it waits for is full */
    if (b->sched_waiting && (b->n_queued == 1 || b->n_queued >= b->want)) pthread_cond_signal(&b->work);
}

/* Takes a queued row back (lock held): 1 when it had not started (it never will), else 0. */
static int withdraw_locked(rnn_batcher *b, int32_t id, rnn_slot *s) {
    if (s->state != SLOT_QUEUED) return 0;
    queue_remove(b, id);
    s->state = SLOT_IDLE;
    s->x = NULL;
    s->y = NULL;
    b->n_inflight--;
    pthread_cond_broadcast(&b->room);
    return 1;
}

int32_t rnn_batcher_step(rnn_batcher *b, int32_t id, const float *x, float *y, int64_t timeout_ns,
                         int32_t *status) {
    if (status) *status = RNN_STATUS_OK;
    if (!b || !x || !y) return RNN_BATCH_BAD_SLOT;
    int64_t deadline = timeout_ns >= 0 ? now_ns(CLOCK_MONOTONIC) + timeout_ns : -1;
    pthread_mutex_lock(&b->mu);
    rnn_slot *s = live_slot(b, id);
    if (!s || s->state != SLOT_IDLE) {
        pthread_mutex_unlock(&b->mu);
        return RNN_BATCH_BAD_SLOT;
    }
    while (!b->stop && b->n_inflight >= b->max_queue) { /* back-pressure */
        if (deadline < 0) {
            pthread_cond_wait(&b->room, &b->mu);
        } else {
            struct timespec ts = ts_of(deadline);
            if (pthread_cond_timedwait(&b->room, &b->mu, &ts) == ETIMEDOUT && b->n_inflight >= b->max_queue) {
                pthread_mutex_unlock(&b->mu);
                return RNN_BATCH_TIMEOUT;
            }
        }
    }
    if (b->stop) {
        pthread_mutex_unlock(&b->mu);
        return RNN_BATCH_CLOSED;
    }
    if (!b->running) { /* no batch is being computed: this caller computes one now, its own row
                        * first, then the rows queued (up to max_batch), whose callers it wakes */
        s->x = x;
        s->y = y;
        s->async = 0;
        s->state = SLOT_RUNNING;
        b->n_inflight++;
        if (b->n_inflight > b->most_inflight) b->most_inflight = b->n_inflight;
        b->ids[0] = id;
        int fail;
        int32_t n = start_batch(b, 1, &fail);
        pthread_mutex_unlock(&b->mu);

        rnn_status st = compute_rows(b, n, fail);

        pthread_mutex_lock(&b->mu);
        int32_t result = st == RNN_STATUS_OK ? RNN_BATCH_OK : RNN_BATCH_FAILED;
        finish_slots(b, b->ids, n, result, st, id); /* wakes the other rows' callers */
        batch_done(b, n, st);
        if (status) *status = s->status;
        pthread_mutex_unlock(&b->mu);
        return result;
    }
    enqueue(b, id, s, x, y, 0);
    pthread_mutex_unlock(&b->mu);

    int waited = 0;
    if (deadline >= 0) {
        /* sem_timedwait counts on the realtime clock: the same span from now */
        int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
        struct timespec ts = ts_of(now_ns(CLOCK_REALTIME) + (left > 0 ? left : 0));
        int r;
        while ((r = sem_timedwait(&s->done, &ts)) != 0 && errno == EINTR) {}
        waited = r == 0;
        if (!waited) {
            pthread_mutex_lock(&b->mu);
            int withdrawn = withdraw_locked(b, id, s); /* not started: withdrawn, never applied */
            pthread_mutex_unlock(&b->mu);
            if (withdrawn) return RNN_BATCH_TIMEOUT;
            /* already running: it will be applied, so wait for it */
        }
    }
    if (!waited)
        while (sem_wait(&s->done) != 0 && errno == EINTR) {}
    pthread_mutex_lock(&b->mu);
    wake_next(b);
    int32_t r = s->result;
    if (status) *status = s->status;
    pthread_mutex_unlock(&b->mu);
    return r;
}

int32_t rnn_batcher_submit(rnn_batcher *b, int32_t id, const float *x, float *y) {
    if (!b || !x || !y) return RNN_BATCH_BAD_SLOT;
    pthread_mutex_lock(&b->mu);
    rnn_slot *s = live_slot(b, id);
    int32_t r = RNN_BATCH_OK;
    if (!s || s->state != SLOT_IDLE) r = RNN_BATCH_BAD_SLOT;
    else if (b->stop) r = RNN_BATCH_CLOSED;
    else if (b->n_inflight >= b->max_queue) r = RNN_BATCH_FULL;
    else enqueue(b, id, s, x, y, 1);
    pthread_mutex_unlock(&b->mu);
    return r;
}

int32_t rnn_batcher_withdraw(rnn_batcher *b, int32_t id) {
    if (!b) return 0;
    pthread_mutex_lock(&b->mu);
    rnn_slot *s = live_slot(b, id);
    int32_t r = s ? withdraw_locked(b, id, s) : 0;
    pthread_mutex_unlock(&b->mu);
    return r;
}

int32_t rnn_batcher_completions(rnn_batcher *b, int32_t *ids, int32_t *results, int32_t cap, int64_t timeout_ns) {
    if (!b || !ids || !results || cap < 1) return -1;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + (timeout_ns > 0 ? timeout_ns : 0);
    pthread_mutex_lock(&b->mu);
    /* timeout 0 (an event loop collecting after its wake-up byte) never waits: a timed wait on
     * a deadline already past still cost ~60 us per call here (the kernel's timer slack) */
    while (timeout_ns > 0 && b->ring_count == 0 && !b->exited) {
        struct timespec ts = ts_of(deadline);
        if (pthread_cond_timedwait(&b->done_cv, &b->mu, &ts) == ETIMEDOUT) break;
    }
    b->notify_pending = 0; /* the next completions write a new byte */
    int32_t n = 0;
    while (n < cap && b->ring_count > 0) {
        int32_t id = b->ring[b->ring_head];
        b->ring_head = (b->ring_head + 1) % b->max_slots;
        b->ring_count--;
        rnn_slot *s = slot_at(b, id);
        ids[n] = id;
        results[n] = s->result | (s->status << 8);
        s->async = 0;
        n++;
    }
    if (n == 0 && b->exited) n = -1;
    pthread_mutex_unlock(&b->mu);
    return n;
}

void rnn_batcher_set_notify_fd(rnn_batcher *b, int fd) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->notify_fd = fd < 0 ? -1 : fd;
    b->notify_pending = 0;
    pthread_mutex_unlock(&b->mu);
}

void rnn_batcher_counters(rnn_batcher *b, int64_t out[6]) {
    if (!b || !out) return;
    pthread_mutex_lock(&b->mu);
    out[0] = b->steps;
    out[1] = b->batches;
    out[2] = b->largest;
    out[3] = b->most_inflight;
    out[4] = b->n_inflight;
    out[5] = b->n_open;
    pthread_mutex_unlock(&b->mu);
}

void rnn_batcher_inject_failures(rnn_batcher *b, int32_t n) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->fail_next = n > 0 ? n : 0;
    pthread_mutex_unlock(&b->mu);
}
