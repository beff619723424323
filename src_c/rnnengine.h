/* rnnengine.h - the one public header of the rnnengine C core: recurrent cells and stacks. */
#ifndef RNNENGINE_H
#define RNNENGINE_H

/*
 * Dimension legend used in every comment of the core:
 *   T = time steps, B = batch rows, I = input size, H = hidden size,
 *   G = gates per cell (RNN 1, GRU 3, LSTM 4), D = directions (1 or 2), L = layers.
 *
 * Ownership: the core never allocates inside a forward or step call. Every buffer
 * passed to rnn_stack_forward (input, output, state, workspace) belongs to the caller
 * and must hold at least the number of floats the matching *_floats() function
 * returns. Handles (rnn_cell, rnn_stack) are immutable after creation, so one handle
 * may be used by many threads at once as long as each thread passes its own state
 * and workspace.
 *
 * Errors come in two tiers: bad user data returns a status other than RNN_STATUS_OK
 * (see rnn_status_string); a broken internal invariant is a bug and asserts. Nothing
 * here calls exit() or abort() on user input.
 */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RNN_STATUS_OK = 0,
    RNN_STATUS_BAD_ARGUMENT = 1,  /* a NULL pointer or a value out of range */
    RNN_STATUS_BAD_SHAPE = 2,     /* sizes that do not fit together */
    RNN_STATUS_OUT_OF_MEMORY = 3, /* only from *_create */
    RNN_STATUS_TOO_LARGE = 4      /* a size whose product overflows or exceeds BLAS int */
} rnn_status;

const char *rnn_status_string(rnn_status status);

typedef enum { RNN_CELL_RNN = 0, RNN_CELL_GRU = 1, RNN_CELL_LSTM = 2 } rnn_cell_kind;

/* The activation functions of the ONNX RNN operators. alpha and beta are the
 * function's parameters (ignored by those that take none). */
typedef enum {
    RNN_ACT_RELU = 0,             /* max(0, x) */
    RNN_ACT_TANH = 1,             /* tanh(x) */
    RNN_ACT_SIGMOID = 2,          /* 1 / (1 + exp(-x)) */
    RNN_ACT_AFFINE = 3,           /* alpha * x + beta */
    RNN_ACT_LEAKY_RELU = 4,       /* x if x >= 0 else alpha * x */
    RNN_ACT_THRESHOLDED_RELU = 5, /* x if x > alpha else 0 */
    RNN_ACT_SCALED_TANH = 6,      /* alpha * tanh(beta * x) */
    RNN_ACT_HARD_SIGMOID = 7,     /* min(max(alpha * x + beta, 0), 1) */
    RNN_ACT_ELU = 8,              /* x if x >= 0 else alpha * (exp(x) - 1) */
    RNN_ACT_SOFTSIGN = 9,         /* x / (1 + |x|) */
    RNN_ACT_SOFTPLUS = 10,        /* log(1 + exp(x)) */
    RNN_ACT_COUNT = 11
} rnn_activation_kind;

typedef struct {
    int32_t kind; /* rnn_activation_kind */
    float alpha;
    float beta;
} rnn_activation;

/* Applies act to x[0..n) in place. */
void rnn_activation_apply(const rnn_activation *act, float *x, int64_t n);

/* One direction of one ONNX LSTM / GRU / RNN layer. */
/* How a cell keeps its packed weights for short (streaming) products. float16 and int8
 * read half / a quarter of the bytes per step, at an accuracy cost: float16 rounds each
 * weight to 11 significant bits; int8 keeps one scale per output row (max|row|/127). */
typedef enum { RNN_WEIGHTS_F32 = 0, RNN_WEIGHTS_F16 = 1, RNN_WEIGHTS_I8 = 2 } rnn_weight_dtype;

typedef struct {
    int32_t kind;                /* rnn_cell_kind */
    int32_t input_size;          /* I */
    int32_t hidden_size;         /* H */
    rnn_activation act[3];       /* LSTM: f, g, h; GRU: f, g; RNN: f (rest unused) */
    int32_t has_clip;            /* 1: clip gate pre-activations to [-clip, clip] */
    float clip;
    int32_t input_forget;        /* LSTM only: couple forget gate to input gate */
    int32_t linear_before_reset; /* GRU only */
    int32_t weight_dtype;        /* rnn_weight_dtype of the packed weights */
    int32_t step_mask;           /* 1, 2: a per-row step mask rides in the input (see below) */
    int32_t proj_size;           /* LSTM only: P > 0 projects the output, see rnn_cell_create_projected;
                                  * 0 = none (every ONNX layer) */
} rnn_cell_config;

/* Step mask (cfg.step_mask = 1; the first layer of a stack only): every input row holds
 * I + 1 floats, the last being that row's mask m at that step (1 = the step counts, 0 = the
 * row skips it, as Keras masking does). After each step the state of every row and its
 * output are the blend the Keras exports write,
 *     h = m * h_new + (1 - m) * h_old      (c likewise for an LSTM),  Y[t, b] = h,
 * so a masked step keeps the state and repeats it as output, also in the middle of a
 * sequence; with step_mask = 2 (Keras' zero_output_for_mask, e.g. in Bidirectional) the
 * output is Y[t, b] = m * h_new + (1 - m) * 0 instead. Computed as written, so NaN and Inf
 * propagate as in onnxruntime. */

typedef struct rnn_cell rnn_cell;

/* Packs one direction's weights, in ONNX layout and gate order:
 *   W (G*H, I), R (G*H, H), B (2*G*H) = [Wb; Rb] or NULL for zeros,
 *   P (3*H) = [Pi; Po; Pf] or NULL (LSTM only).
 * The weights are copied; the caller may free its arrays afterwards. */
rnn_status rnn_cell_create(const rnn_cell_config *cfg, const float *W, const float *R,
                           const float *B, const float *P, rnn_cell **out);
/* An LSTM cell with an output projection (PyTorch nn.LSTM(proj_size=P), which ONNX cannot
 * express): cfg.proj_size = P > 0, gates in ONNX order as above, but
 *   R (4*H, P)  (the recurrence reads the projected h of P floats),
 *   Whr (P, H)  the projection, and per step, after Ct (H floats) is computed as usual,
 *   Ht = Whr @ (o . h(Ct))     (P floats: the state h and the output of the cell).
 * The cell state c keeps H floats. No step mask. rnn_cell_create is this with Whr = NULL
 * and cfg.proj_size = 0. */
rnn_status rnn_cell_create_projected(const rnn_cell_config *cfg, const float *W, const float *R,
                                     const float *B, const float *P, const float *Whr, rnn_cell **out);
/* A cell whose recurrent weights a weight file already stores compact, so the packed kernels
 * read exactly the stored values (no second rounding): cfg->weight_dtype RNN_WEIGHTS_F16 with
 * stored->W (G*H, I) and stored->R (G*H, H) as IEEE half bits (uint16, scales NULL), or
 * RNN_WEIGHTS_I8 with int8 codes and one float32 scale per row (W_scale, R_scale: G*H each),
 * weight = scale[row] * code. W (G*H, I) is still given as float32 (the stored values widened,
 * exactly): long sequences' input projections go to BLAS with it. No projection. */
typedef struct {
    const void *W, *R;
    const float *W_scale, *R_scale;
} rnn_stored_weights;
rnn_status rnn_cell_create_stored(const rnn_cell_config *cfg, const float *W, const float *B, const float *P,
                                  const rnn_stored_weights *stored, rnn_cell **out);
/* A cell that reads its packed weights from memory it does not own, typically pages of a
 * file mapped read-only and shared by every process serving the same model (the panel cache,
 * docs/FORMAT.md): no panel is allocated, and W is not copied. Arguments as for
 * rnn_cell_create (stored NULL) or rnn_cell_create_stored (stored given, R NULL), plus
 * `mapped`: the panels rnn_cell_create would pack for this cfg (layout: rnn_panel_width()
 * columns per panel, see pack.c): Wp from W (G*H, I), Rp from R (G*H, H), or for a GRU with
 * linear_before_reset = 0 Rp from R[:2H] and Rhp from R[2H:]; each 64-byte aligned, in
 * cfg->weight_dtype; for int8 also their scales, ceil(N/16)*16 floats each (else NULL).
 * The mapped bytes are not trusted: they are compared with a packing of W / R / stored, one
 * panel at a time (a few kB of scratch), and RNN_STATUS_BAD_ARGUMENT is returned when any
 * byte differs, when a buffer is NULL or misaligned, or when scales do not match
 * weight_dtype. The caller keeps W and the mapped buffers alive and unchanged until
 * rnn_cell_free (the cell reads W in place for BLAS input projections). B and P are copied.
 * No projection (cfg->proj_size must be 0). The sizes are the caller's contract (the Cython
 * binding checks them). */
typedef struct {
    const void *Wp, *Rp, *Rhp;
    const float *Wp_scale, *Rp_scale, *Rhp_scale;
} rnn_mapped_weights;
rnn_status rnn_cell_create_mapped(const rnn_cell_config *cfg, const float *W, const float *R, const float *B,
                                  const float *P, const rnn_stored_weights *stored,
                                  const rnn_mapped_weights *mapped, rnn_cell **out);
/* Columns per packed panel (16): the layout rnn_cell_create_mapped's panels must have. */
int32_t rnn_panel_width(void);
void rnn_cell_free(rnn_cell *cell);
const rnn_cell_config *rnn_cell_get_config(const rnn_cell *cell);

/* A stack of layers; layer l has 1 or 2 directions (forward, reverse or both) and
 * its input is the previous layer's output of size D*H (directions concatenated).
 * For a projected LSTM layer (proj_size P) read P for H wherever h or the output is meant:
 * its output is D*P wide and its h blocks (D, B, P); only its c blocks keep H. */
typedef struct rnn_stack rnn_stack;

/* The direction of a layer. */
typedef enum { RNN_DIR_FORWARD = 0, RNN_DIR_REVERSE = 1, RNN_DIR_BIDIRECTIONAL = 2 } rnn_direction;

/* direction per layer: an rnn_direction. cells[l] holds D cells
 * (forward first). The stack takes ownership of the cells, also on failure. */
rnn_status rnn_stack_create(int32_t n_layers, const int32_t *direction, rnn_cell *const *cells,
                            rnn_stack **out);
void rnn_stack_free(rnn_stack *stack);
int32_t rnn_stack_input_size(const rnn_stack *stack); /* floats per input row (I, +1 with a step mask) */
int32_t rnn_stack_output_size(const rnn_stack *stack); /* D*H of the last layer */

/* State of the whole stack for B rows, in floats. Layout, layer by layer:
 *   h (D, B, H), then for LSTM layers c (D, B, H). */
int64_t rnn_stack_state_floats(const rnn_stack *stack, int64_t B);
/* Offset (floats) of layer l's h block and c block (-1 when the layer has no c). */
int64_t rnn_stack_state_offset(const rnn_stack *stack, int32_t layer, int64_t B, int32_t want_c);
/* Workspace for a forward over T steps and B rows, in floats. */
int64_t rnn_stack_workspace_floats(const rnn_stack *stack, int64_t T, int64_t B);

/* Runs the stack over a sequence.
 *   X     rows of I floats, C-contiguous: (T, B, I), or (B, T, I) when batch_first.
 *   lens  (B) int32 valid lengths in [0, T], or NULL for all T. Outputs past a row's
 *         length are 0; the state of a row stops at its last valid step; a reverse
 *         direction starts at each row's own end.
 *   Y     output of the last layer; element (t, b, d, j) is written at
 *         Y[t*ys_t + b*ys_b + d*ys_d + j].
 *   state in/out, rnn_stack_state_floats(B) floats: initial state in, final state out.
 *   work  rnn_stack_workspace_floats(T, B) floats. */
rnn_status rnn_stack_forward(const rnn_stack *stack, const float *X, int64_t T, int64_t B,
                             int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                             int64_t ys_b, int64_t ys_d, float *state, float *work);

/* rnn_stack_forward with the products of each step (and the input projection of the whole
 * sequence) split over up to `threads` threads by gate rows: each thread computes whole
 * output columns, so the result is bit-identical to threads = 1. Meant for batches too small
 * to split by rows (batch 1 streams and sequences); products smaller than
 * rnn_threads_min_macs() multiply-adds stay on the calling thread, where splitting would
 * cost more than it gains. The threads come from one process-wide pool of
 * rnn_threads_limit() - 1 workers (src_c/pool.c), made on first use; workers spin briefly
 * after a call and then sleep (no CPU while idle). A call that finds the pool held by
 * another thread's call runs on its own thread (never waits, never exceeds the limit); if
 * no worker can be started everything runs serially. threads <= 1 is rnn_stack_forward. */
rnn_status rnn_stack_forward_threads(const rnn_stack *stack, const float *X, int64_t T, int64_t B,
                                     int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                                     int64_t ys_b, int64_t ys_d, float *state, float *work, int32_t threads);
/* The most threads one call uses (the caller included): RNNENGINE_NUM_THREADS, else the
 * first entry of OMP_NUM_THREADS, capped by the CPUs this process may run on (at most 16),
 * read on first use. rnn_threads_set_limit(n) sets it (n <= 0: back to the environment)
 * and returns the limit now in force; the pool keeps the workers it started with, so a
 * limit raised after first use is capped by them. */
int32_t rnn_threads_limit(void);
int32_t rnn_threads_set_limit(int32_t n);
/* The threshold below which a product is not split (multiply-adds, M*N*K); set for tests
 * and benchmarks (process-wide, not while other threads compute); n < 0 restores the
 * default. Returns the value in force. */
int64_t rnn_threads_set_min_macs(int64_t n);
/* 1 (default): calls of each stack and batch size are timed split and on one thread as
 * they run, and the faster way is used (src_c/pool.c, rnn_par_begin), so a machine whose
 * other cores are busy with other work falls back to one thread. 0: always split (tests,
 * so that every product really is split). Process-wide; returns the previous setting. */
int rnn_threads_set_adaptive(int on);

/* Copies the state of n single-row streams into / out of one batched state of n rows
 * (per layer, direction: rows stacked), so independent streams can be stepped together. */
void rnn_stack_gather_states(const rnn_stack *stack, float *batched, float *const *streams,
                             int64_t n);
void rnn_stack_scatter_states(const rnn_stack *stack, const float *batched, float *const *streams,
                              int64_t n);

/* The session batcher (src_c/batch.c): many single-row streams ("slots") of one stack whose
 * rows, submitted from any threads, are stepped together in batches by one scheduler thread
 * of its own. Slot states live in the batcher's pooled memory; a caller blocks in
 * rnn_batcher_step (no lock of the caller's held) until its row has run. Results: */
typedef enum {
    RNN_BATCH_OK = 0,
    RNN_BATCH_CLOSED = 1,   /* the batcher is stopped */
    RNN_BATCH_TIMEOUT = 2,  /* not started within the timeout: withdrawn, never applied */
    RNN_BATCH_FULL = 3,     /* no room: max_queue rows in flight, or max_slots sessions open */
    RNN_BATCH_BAD_SLOT = 4, /* not an open slot, or one with a row already in flight */
    RNN_BATCH_FAILED = 5    /* the batched call failed (its rnn_status given): states unchanged */
} rnn_batch_result;
#define RNN_BATCH_MAX_SLOTS 1048576
typedef struct rnn_batcher rnn_batcher;

/* Starts the scheduler. ys_d: as rnn_stack_forward's (floats per direction of the output);
 * max_batch rows per batched call; a row waits at most max_wait_ns for others to join
 * (none when every open slot has a row queued); at most max_queue rows in flight (queued
 * or running: more submitters wait, or get RNN_BATCH_FULL); at most max_slots slots;
 * threads: as rnn_stack_forward_threads's. The stack must outlive the batcher. */
rnn_status rnn_batcher_create(const rnn_stack *stack, int64_t ys_d, int32_t max_batch, int64_t max_wait_ns,
                              int32_t max_queue, int32_t max_slots, int32_t threads, rnn_batcher **out);
/* Runs the rows already queued, then ends the scheduler; later calls get RNN_BATCH_CLOSED. */
void rnn_batcher_stop(rnn_batcher *b);
void rnn_batcher_free(rnn_batcher *b); /* stops first; no call may be inside the batcher */
/* A new slot holding a copy of `state` (rnn_stack_state_floats(stack, 1) floats): its id
 * (>= 0), or minus an rnn_batch_result (CLOSED, FULL, FAILED when out of memory). */
int32_t rnn_batcher_open(rnn_batcher *b, const float *state);
/* Frees an idle slot (RNN_BATCH_BAD_SLOT when it has a row in flight or is not open). */
int32_t rnn_batcher_close_slot(rnn_batcher *b, int32_t slot);
/* The state of an idle slot, for its owner to read or write while it submits nothing
 * (NULL when the slot is not open or has a row in flight). */
float *rnn_batcher_slot_state(rnn_batcher *b, int32_t slot);
/* One step of a slot: x (input size floats) in, y (output size floats) out, both the
 * caller's until this returns. Blocks until done. timeout_ns >= 0: a row not started by
 * then is withdrawn (RNN_BATCH_TIMEOUT); one already running is waited for. *status: the
 * rnn_status behind RNN_BATCH_FAILED. */
int32_t rnn_batcher_step(rnn_batcher *b, int32_t slot, const float *x, float *y, int64_t timeout_ns,
                         int32_t *status);
/* The same without waiting (x and y stay alive until its completion is handed out by
 * rnn_batcher_completions); RNN_BATCH_FULL instead of waiting for room. */
int32_t rnn_batcher_submit(rnn_batcher *b, int32_t slot, const float *x, float *y);
/* 1: the slot's submitted row had not started and never will; 0: it runs (or ran). */
int32_t rnn_batcher_withdraw(rnn_batcher *b, int32_t slot);
/* Waits up to timeout_ns for submitted steps to finish; writes up to cap slot ids and their
 * results (rnn_batch_result | rnn_status << 8); returns how many, 0 on timeout, -1 once the
 * scheduler has ended and nothing is left. */
int32_t rnn_batcher_completions(rnn_batcher *b, int32_t *ids, int32_t *results, int32_t cap, int64_t timeout_ns);
/* fd >= 0: after a batch adds completions while none are pending, the scheduler writes one
 * byte to fd (a non-blocking pipe an event loop watches), so the loop itself can collect
 * them with rnn_batcher_completions (timeout 0) without a helper thread; a later batch
 * writes again once rnn_batcher_completions has been called. -1: no writes. The fd is the
 * caller's: it must stay open until this is called again with -1 or the batcher is freed. */
void rnn_batcher_set_notify_fd(rnn_batcher *b, int fd);
/* steps, batched calls, largest batch, most rows in flight, rows in flight now, open slots. */
void rnn_batcher_counters(rnn_batcher *b, int64_t out[6]);
/* Tests: the next n batched calls fail (RNN_STATUS_BAD_ARGUMENT) without touching a state. */
void rnn_batcher_inject_failures(rnn_batcher *b, int32_t n);

/* The BLAS entry points, Fortran sgemm/sgemv (column-major). Set once at import by the
 * binding from SciPy's cython_blas; without it a naive reference GEMM is used. */
typedef void (*rnn_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                             float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                             int *ldc);
void rnn_blas_set_sgemm(rnn_sgemm_fn fn);
/* Optional Fortran sgemv, used for single-row products (batch-1 steps). */
typedef void (*rnn_sgemv_fn)(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                             float *x, int *incx, float *beta, float *y, int *incy);
void rnn_blas_set_sgemv(rnn_sgemv_fn fn);
int rnn_blas_has_sgemm(void);

/* Which compute kernels run, chosen at load time from what the CPU has: 2 = AVX-512F for
 * float32 products (AVX2 for the rest), 1 = AVX2+FMA+F16C, 0 = the portable reference
 * kernels. rnn_set_kernel_level is for tests and benchmarks
 * (process-wide, not to be called while other threads compute). */
int rnn_kernel_level(void);
int rnn_kernel_level_max(void);
void rnn_set_kernel_level(int level);

/* Row-major C (M, N) = alpha * A (M, K) @ B(N, K)^T + beta * C. use_blas=0 forces the
 * naive reference kernel (exposed for tests). */
void rnn_gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc, int use_blas);

/* ---------------------------------------------------------------------------------------
 * Graph executor: runs a converted model as a flat program of instructions over tensors
 * whose shapes were fixed when the program was planned (rnnengine/graph.py). Everything
 * shape-dependent (strides, broadcast, axes) is computed by the planner; the executor
 * only moves and computes float32, int64, int32 and bool elements, so one call runs a whole
 * model step.
 *
 * A program is n instructions of RNN_INSTR_WORDS int64 words each:
 *   [0] op (rnn_op)   [1..4] input tensor ids   [5..7] output tensor ids (-1 = none)
 *   [8] aux (the stack index of RNN_OP_RECURRENT)   [9] offset, [10] count of the int64
 *   parameters in iparams   [11] offset, [12] count of the float parameters in fparams.
 * tensors[id] points at tensor id's data (inputs, constants, intermediates, outputs,
 * recurrent state), all C-contiguous; work holds the planner's workspace floats.
 * rnn_graph_verify checks a program against its tensors once, when it is created; the
 * instructions also check the codes and parameter counts they are given when they run and
 * refuse (an error status and message, never a crash) what does not fit.
 * ------------------------------------------------------------------------------------- */
#define RNN_INSTR_WORDS 16

typedef enum {
    RNN_OP_COPY = 0,      /* strided copy: Transpose, Slice, Concat part, Expand, Split */
    RNN_OP_BINARY = 1,    /* broadcast Add/Sub/Mul/Div/Pow/Max/Min */
    RNN_OP_UNARY = 2,     /* activations and elementwise math */
    RNN_OP_MATMUL = 3,    /* (M, K) @ B(N, K)^T + bias(N), B packed in panels (pack.c) */
    RNN_OP_SOFTMAX = 4,   /* (outer, n, inner) softmax or log-softmax over n */
    RNN_OP_GATHER = 5,    /* (outer, n, inner) rows picked by int64 indices */
    RNN_OP_CONV1D = 6,    /* (N, C, L) * W (M, C/g, K) + bias */
    RNN_OP_PAD = 7,       /* N-d gather through per-axis index maps (-1: constant) */
    RNN_OP_REDUCE = 8,    /* sum/mean/max/min over axes */
    RNN_OP_CAST = 9,      /* between float32, int64, int32, uint8 */
    RNN_OP_RECURRENT = 10, /* one LSTM/GRU/RNN layer (a one-layer rnn_stack) */
    RNN_OP_TOPK = 11,      /* k largest/smallest along the middle axis of (outer, n, inner) */
    RNN_OP_SCATTER = 12,   /* ScatterElements: data with updates written at indices on an axis */
    /* Typed ops: their first int parameter is the rnn_dtype of the data they compute on. */
    RNN_OP_TBINARY = 13,   /* broadcast integer arithmetic, Mod, comparisons, And/Or/Xor */
    RNN_OP_TUNARY = 14,    /* integer Neg/Abs, boolean Not */
    RNN_OP_WHERE = 15,     /* broadcast select by a bool condition (any element size) */
    RNN_OP_TREDUCE = 16,   /* sum/mean/max/min/prod of int64/int32 over axes */
    RNN_OP_ARGMAX = 17,    /* ArgMax/ArgMin along the middle axis of (outer, n, inner) */
    RNN_OP_CUMSUM = 18,    /* (exclusive, reverse) running sum along the middle axis */
    RNN_OP_REVSEQ = 19,    /* ReverseSequence: each batch row's first len steps reversed */
    RNN_OP_CONV1D_PACKED = 20, /* CONV1D with filters packed at plan time, fused bias + Relu */
    RNN_OP_STFT = 21,          /* CONV1D whose filters are a windowed DFT basis, by FFT (stft.c) */
    RNN_OP_LAYERNORM = 22,     /* LayerNormalization over the last axes of (outer, n) rows */
    RNN_OP_POOL1D = 23,        /* MaxPool / AveragePool along the rows of (rows, L) */
    RNN_OP_BMATMUL = 24        /* batched MatMul of two run-time operands (numpy.matmul broadcasting) */
} rnn_op;

/* The kind (first int parameter after the dtype of a typed op) that selects an instruction's
 * function. BINARY (float32) takes ADD..MIN; TBINARY takes ADD..DIV, MAX, MIN, MOD on int64 /
 * int32, FMOD on float32 / int64 / int32, the comparisons on float32 / int64 / int32 / bool
 * (a bool result) and AND, OR, XOR on bool. */
typedef enum {
    RNN_BIN_ADD = 0,
    RNN_BIN_SUB = 1,
    RNN_BIN_MUL = 2,
    RNN_BIN_DIV = 3,            /* integers: truncated toward 0; by 0 is an error */
    RNN_BIN_POW = 4,
    RNN_BIN_MAX = 5,            /* float32: NaN in either operand gives NaN */
    RNN_BIN_MIN = 6,
    RNN_BIN_MOD = 7,            /* ONNX Mod fmod=0: the divisor's sign (integers) */
    RNN_BIN_FMOD = 8,           /* ONNX Mod fmod=1: the dividend's sign, as C fmod */
    RNN_BIN_EQUAL = 10,
    RNN_BIN_LESS = 11,
    RNN_BIN_LESS_EQUAL = 12,
    RNN_BIN_GREATER = 13,
    RNN_BIN_GREATER_EQUAL = 14,
    RNN_BIN_AND = 15,
    RNN_BIN_OR = 16,
    RNN_BIN_XOR = 17
} rnn_binary_kind;

/* UNARY (float32): an rnn_activation_kind (fparams alpha, beta) or one of these. */
typedef enum {
    RNN_UNARY_SQRT = 20,
    RNN_UNARY_EXP = 21,
    RNN_UNARY_LOG = 22,
    RNN_UNARY_NEG = 23,
    RNN_UNARY_ABS = 24,
    RNN_UNARY_CLIP = 25,        /* fparams lo, hi */
    RNN_UNARY_RECIPROCAL = 26,
    RNN_UNARY_ERF = 27,
    RNN_UNARY_FLOOR = 28,
    RNN_UNARY_CEIL = 29
} rnn_unary_kind;

/* TUNARY: NEG and ABS of int64 / int32 (wrapping), NOT of bool. */
typedef enum { RNN_TUNARY_NEG = 0, RNN_TUNARY_ABS = 1, RNN_TUNARY_NOT = 2 } rnn_tunary_kind;

/* REDUCE (float32) and TREDUCE (int64 / int32). */
typedef enum {
    RNN_REDUCE_SUM = 0,
    RNN_REDUCE_MEAN = 1,
    RNN_REDUCE_MAX = 2,
    RNN_REDUCE_MIN = 3,
    RNN_REDUCE_PROD = 4
} rnn_reduce_kind;

/* Element types of graph tensors. RNN_DT_BOOL is one byte holding 0 or 1. In the tensor
 * table given to rnn_graph_verify, RNN_DT_OTHER + n (n = 1..16) is another type of n-byte
 * elements (float64, int8...), which only the ops that move elements (COPY, GATHER, PAD,
 * WHERE, SCATTER, REVSEQ) may touch. */
typedef enum { RNN_DT_F32 = 0, RNN_DT_I64 = 1, RNN_DT_I32 = 2, RNN_DT_U8 = 3, RNN_DT_BOOL = 4, RNN_DT_OTHER = 100 } rnn_dtype;

/* Checks a program once, before it ever runs, against the tensors it names: tensor
 * t (0 <= t < n_tensors) holds tensor_count[t] elements of type tensor_dtype[t], and may be
 * written only when tensor_writable[t] is 1 (constants and inputs are 0; NULL: every tensor
 * may be written); stacks[k]
 * is the recurrent stack aux word k names, stack_shape[4k..4k+3] its number of layers and
 * its last layer's D, H and has_c (a RECURRENT instruction runs a one-layer stack of its
 * own D, H, has_c); every run gives a workspace of at least
 * work_floats floats. Every instruction must read and write inside its buffers, on element
 * types its op computes on, with its parameter slices inside iparams (n_iparams) and fparams
 * (n_fparams) and of the length the op reads; sizes whose products overflow are refused.
 * What is data (Gather / Scatter indices, sequence lengths, divisors) is checked by the ops
 * when they run. On a refusal: RNN_STATUS_BAD_ARGUMENT, the reason in err ("instruction k
 * (OP): ...") and k in *failed (-1 when the tables themselves are missing). Table entries
 * (a known type code, 0 <= count <= 2^62) are checked where an instruction names them. */
rnn_status rnn_graph_verify(const int64_t *program, int64_t n_instr, const int64_t *iparams, int64_t n_iparams,
                            int64_t n_fparams, const int64_t *tensor_dtype, const int64_t *tensor_count,
                            const uint8_t *tensor_writable, int64_t n_tensors, rnn_stack *const *stacks,
                            const int64_t *stack_shape, int64_t n_stacks, int64_t work_floats, char *err,
                            size_t errlen, int64_t *failed);

/* Runs the program. On a data error (an index out of range, bad sequence lengths, an
 * integer division by zero) or an instruction it refuses, it stops and returns a status with
 * a message in err (errlen bytes) and, when failed is not NULL, the index of the
 * instruction that stopped in *failed (-1 when none did). */
rnn_status rnn_graph_run(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                         const float *fparams, void *const *tensors, rnn_stack *const *stacks,
                         float *work, char *err, size_t errlen, int64_t *failed);
/* rnn_graph_run with the recurrent layers' products split over up to `threads` threads
 * (rnn_stack_forward_threads: bit-identical to threads = 1). */
rnn_status rnn_graph_run_threads(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                                 const float *fparams, void *const *tensors, rnn_stack *const *stacks,
                                 float *work, char *err, size_t errlen, int64_t *failed, int32_t threads);

/* ---------------------------------------------------------------------------------------
 * Training: forward with saved activations and backward through time for one direction of
 * one layer (src_c/lstm.c, gru.c, rnn.c), and the pieces around it (src_c/train.c).
 * Plain float32 row-major matrices, ONNX layout and gate order; gradients accumulate (+=)
 * into caller-owned buffers; nothing allocates per time step (each pass packs R once for its
 * per-step products, falling back to BLAS if that allocation fails). Supported: default activations (Sigmoid,
 * Tanh; RNN Tanh or Relu), clip, LSTM peepholes, GRU linear_before_reset 0 and 1.
 * ------------------------------------------------------------------------------------- */
typedef struct {
    int32_t kind;                /* rnn_cell_kind */
    int32_t input_size;          /* I */
    int32_t hidden_size;         /* H */
    int32_t linear_before_reset; /* GRU */
    int32_t relu;                /* RNN: 1 = Relu, 0 = Tanh */
    int32_t has_clip;
    float clip;
    const float *W;              /* (G*H, I) */
    const float *R;              /* (G*H, H) */
    const float *B;              /* (2*G*H) = [Wb; Rb] */
    const float *P;              /* (3*H) = [Pi; Po; Pf] or NULL (LSTM) */
    int32_t x_projected;         /* 1: X is (T, B, G*H), the input's product X_in @ W^T made by the
                                  * caller (an embedding's rows through a table, rnnengine.train);
                                  * W is then not read, dW not written, and dX is that product's
                                  * gradient (T, B, G*H) */
} rnn_train_cell;

/* Floats of the saved activations and of the workspace for T steps of B rows. */
int64_t rnn_train_saved_floats(const rnn_train_cell *cell, int64_t T, int64_t B);
int64_t rnn_train_work_floats(const rnn_train_cell *cell, int64_t T, int64_t B);

/* X (T, B, I); h0, c0 (B, H) or NULL for zeros (c0: LSTM); out: Y (T, B, H), hT, cT (B, H)
 * (cT: LSTM, may be NULL), saved. */
rnn_status rnn_train_forward(const rnn_train_cell *cell, int64_t T, int64_t B, const float *X,
                             const float *h0, const float *c0, float *Y, float *hT, float *cT,
                             float *saved, float *work);

/* dY (T, B, H), dhT / dcT (B, H) or NULL. Accumulates dW (G*H, I), dR (G*H, H), dB (2*G*H),
 * dP (3*H, NULL without peepholes); writes dX (T, B, I) (NULL: not wanted), dh0, dc0 (B, H)
 * (NULL: not wanted). X, h0, c0, Y, saved as given to / made by rnn_train_forward. */
rnn_status rnn_train_backward(const rnn_train_cell *cell, int64_t T, int64_t B, const float *X,
                              const float *h0, const float *c0, const float *Y, const float *saved,
                              const float *dY, const float *dhT, const float *dcT, float *dX,
                              float *dW, float *dR, float *dB, float *dP, float *dh0, float *dc0,
                              float *work);

/* Row-major products used by training (blas.c): C = a * A @ B + b * C and C = a * A^T @ B + b * C. */
void rnn_gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
void rnn_gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* Dense layer and losses over N rows (train.c). */
/* Y (N, O) = X (N, K) @ W (O, K)^T + b (O) */
void rnn_dense_forward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *b, float *Y);
/* dW += dY^T X, db += colsum(dY), dX = dY @ W (dX may be NULL) */
void rnn_dense_backward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *dY,
                        float *dW, float *db, float *dX);
/* Mean softmax cross-entropy of logits (N, C) against int32 targets (N) (targets < 0 are
 * ignored); dlogits = d(loss)/d(logits). Returns the loss; a target >= C gives -1 (bad). */
double rnn_softmax_xent(int64_t N, int64_t C, const float *logits, const int32_t *targets, float *dlogits);
/* Mean squared error over N*D values: returns mean((y - t)^2), dy = d(loss)/dy. */
double rnn_mse(int64_t N, int64_t D, const float *y, const float *t, float *dy);
/* Embedding: out (N, E) = table[ids]; backward: dtable[ids] += dout. Ids out of range: -1. */
int rnn_embedding_forward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *table, float *out);
int rnn_embedding_backward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *dout, float *dtable);

/* Optimisers over n parameters (train.c). Returns the global gradient norm before clipping
 * (rnn_clip_grad_norm scales g in place when the norm exceeds max_norm > 0). */
double rnn_clip_grad_norm(int64_t n, float *g, double max_norm);
/* SGD with momentum: v = mu * v + g + wd * w; w -= lr * v */
void rnn_sgd_step(int64_t n, float *w, const float *g, float *v, float lr, float momentum, float weight_decay);
/* Adam(W) with bias correction at step t >= 1; decoupled weight decay: w -= lr * wd * w. */
void rnn_adam_step(int64_t n, float *w, const float *g, float *m, float *v, int64_t t, float lr, float beta1,
                   float beta2, float eps, float weight_decay);

#ifdef __cplusplus
}
#endif
#endif
