# _core.pxd - Cython mirror of src_c/rnnengine.h (the one public C header).
from libc.stdint cimport int32_t, int64_t, uint8_t

cdef extern from "rnnengine.h" nogil:
    ctypedef enum rnn_status:
        RNN_STATUS_OK
        RNN_STATUS_BAD_ARGUMENT
        RNN_STATUS_BAD_SHAPE
        RNN_STATUS_OUT_OF_MEMORY
        RNN_STATUS_TOO_LARGE

    const char *rnn_status_string(rnn_status status)

    # The header's other enums, declared by name only: the C compiler supplies every value
    # (_core.C_CONSTANTS; tests/test_constants.py compares them with rnnengine/ops/codes.py).
    ctypedef enum rnn_cell_kind:
        RNN_CELL_RNN
        RNN_CELL_GRU
        RNN_CELL_LSTM

    ctypedef enum rnn_direction:
        RNN_DIR_FORWARD
        RNN_DIR_REVERSE
        RNN_DIR_BIDIRECTIONAL

    ctypedef enum rnn_weight_dtype:
        RNN_WEIGHTS_F32
        RNN_WEIGHTS_F16
        RNN_WEIGHTS_I8

    ctypedef enum rnn_activation_kind:
        RNN_ACT_RELU
        RNN_ACT_TANH
        RNN_ACT_SIGMOID
        RNN_ACT_AFFINE
        RNN_ACT_LEAKY_RELU
        RNN_ACT_THRESHOLDED_RELU
        RNN_ACT_SCALED_TANH
        RNN_ACT_HARD_SIGMOID
        RNN_ACT_ELU
        RNN_ACT_SOFTSIGN
        RNN_ACT_SOFTPLUS
        RNN_ACT_COUNT

    ctypedef enum rnn_op:
        RNN_OP_COPY
        RNN_OP_BINARY
        RNN_OP_UNARY
        RNN_OP_MATMUL
        RNN_OP_SOFTMAX
        RNN_OP_GATHER
        RNN_OP_CONV1D
        RNN_OP_PAD
        RNN_OP_REDUCE
        RNN_OP_CAST
        RNN_OP_RECURRENT
        RNN_OP_TOPK
        RNN_OP_SCATTER
        RNN_OP_TBINARY
        RNN_OP_TUNARY
        RNN_OP_WHERE
        RNN_OP_TREDUCE
        RNN_OP_ARGMAX
        RNN_OP_CUMSUM
        RNN_OP_REVSEQ
        RNN_OP_CONV1D_PACKED
        RNN_OP_STFT
        RNN_OP_LAYERNORM
        RNN_OP_POOL1D
        RNN_OP_BMATMUL

    ctypedef enum rnn_binary_kind:
        RNN_BIN_ADD
        RNN_BIN_SUB
        RNN_BIN_MUL
        RNN_BIN_DIV
        RNN_BIN_POW
        RNN_BIN_MAX
        RNN_BIN_MIN
        RNN_BIN_MOD
        RNN_BIN_FMOD
        RNN_BIN_EQUAL
        RNN_BIN_LESS
        RNN_BIN_LESS_EQUAL
        RNN_BIN_GREATER
        RNN_BIN_GREATER_EQUAL
        RNN_BIN_AND
        RNN_BIN_OR
        RNN_BIN_XOR

    ctypedef enum rnn_unary_kind:
        RNN_UNARY_SQRT
        RNN_UNARY_EXP
        RNN_UNARY_LOG
        RNN_UNARY_NEG
        RNN_UNARY_ABS
        RNN_UNARY_CLIP
        RNN_UNARY_RECIPROCAL
        RNN_UNARY_ERF
        RNN_UNARY_FLOOR
        RNN_UNARY_CEIL

    ctypedef enum rnn_tunary_kind:
        RNN_TUNARY_NEG
        RNN_TUNARY_ABS
        RNN_TUNARY_NOT

    ctypedef enum rnn_reduce_kind:
        RNN_REDUCE_SUM
        RNN_REDUCE_MEAN
        RNN_REDUCE_MAX
        RNN_REDUCE_MIN
        RNN_REDUCE_PROD

    ctypedef enum rnn_dtype:
        RNN_DT_F32
        RNN_DT_I64
        RNN_DT_I32
        RNN_DT_U8
        RNN_DT_BOOL
        RNN_DT_OTHER

    ctypedef struct rnn_activation:
        int32_t kind
        float alpha
        float beta

    void rnn_activation_apply(const rnn_activation *act, float *x, int64_t n)

    ctypedef struct rnn_cell_config:
        int32_t kind
        int32_t input_size
        int32_t hidden_size
        rnn_activation act[3]
        int32_t has_clip
        float clip
        int32_t input_forget
        int32_t linear_before_reset
        int32_t weight_dtype
        int32_t step_mask
        int32_t proj_size

    ctypedef struct rnn_cell:
        pass
    ctypedef struct rnn_stack:
        pass

    rnn_status rnn_cell_create(const rnn_cell_config *cfg, const float *W, const float *R,
                               const float *B, const float *P, rnn_cell **out)
    rnn_status rnn_cell_create_projected(const rnn_cell_config *cfg, const float *W, const float *R,
                                         const float *B, const float *P, const float *Whr, rnn_cell **out)
    ctypedef struct rnn_stored_weights:
        const void *W
        const void *R
        const float *W_scale
        const float *R_scale
    rnn_status rnn_cell_create_stored(const rnn_cell_config *cfg, const float *W, const float *B, const float *P,
                                      const rnn_stored_weights *stored, rnn_cell **out)
    ctypedef struct rnn_mapped_weights:
        const void *Wp
        const void *Rp
        const void *Rhp
        const float *Wp_scale
        const float *Rp_scale
        const float *Rhp_scale
    rnn_status rnn_cell_create_mapped(const rnn_cell_config *cfg, const float *W, const float *R, const float *B,
                                      const float *P, const rnn_stored_weights *stored,
                                      const rnn_mapped_weights *mapped, rnn_cell **out)
    int32_t rnn_panel_width()
    void rnn_cell_free(rnn_cell *cell)

    rnn_status rnn_stack_create(int32_t n_layers, const int32_t *direction, rnn_cell **cells,
                                rnn_stack **out)
    void rnn_stack_free(rnn_stack *stack)
    int32_t rnn_stack_input_size(const rnn_stack *stack)
    int32_t rnn_stack_output_size(const rnn_stack *stack)
    int64_t rnn_stack_state_floats(const rnn_stack *stack, int64_t B)
    int64_t rnn_stack_state_offset(const rnn_stack *stack, int32_t layer, int64_t B, int32_t want_c)
    int64_t rnn_stack_workspace_floats(const rnn_stack *stack, int64_t T, int64_t B)
    rnn_status rnn_stack_forward(const rnn_stack *stack, const float *X, int64_t T, int64_t B,
                                 int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                                 int64_t ys_b, int64_t ys_d, float *state, float *work)
    rnn_status rnn_stack_forward_threads(const rnn_stack *stack, const float *X, int64_t T, int64_t B,
                                         int32_t batch_first, const int32_t *lens, float *Y, int64_t ys_t,
                                         int64_t ys_b, int64_t ys_d, float *state, float *work, int32_t threads)
    int32_t rnn_threads_limit()
    int32_t rnn_threads_set_limit(int32_t n)
    int64_t rnn_threads_set_min_macs(int64_t n)
    int rnn_threads_set_adaptive(int on)
    void rnn_stack_gather_states(const rnn_stack *stack, float *batched, float **streams, int64_t n)
    void rnn_stack_scatter_states(const rnn_stack *stack, const float *batched, float **streams,
                                  int64_t n)

    ctypedef enum rnn_batch_result:
        RNN_BATCH_OK
        RNN_BATCH_CLOSED
        RNN_BATCH_TIMEOUT
        RNN_BATCH_FULL
        RNN_BATCH_BAD_SLOT
        RNN_BATCH_FAILED
    enum: RNN_BATCH_MAX_SLOTS
    ctypedef struct rnn_batcher:
        pass
    rnn_status rnn_batcher_create(const rnn_stack *stack, int64_t ys_d, int32_t max_batch, int64_t max_wait_ns,
                                  int32_t max_queue, int32_t max_slots, int32_t threads, rnn_batcher **out)
    void rnn_batcher_stop(rnn_batcher *b)
    void rnn_batcher_free(rnn_batcher *b)
    int32_t rnn_batcher_open(rnn_batcher *b, const float *state)
    int32_t rnn_batcher_close_slot(rnn_batcher *b, int32_t slot)
    float *rnn_batcher_slot_state(rnn_batcher *b, int32_t slot)
    int32_t rnn_batcher_step(rnn_batcher *b, int32_t slot, const float *x, float *y, int64_t timeout_ns,
                             int32_t *status)
    int32_t rnn_batcher_submit(rnn_batcher *b, int32_t slot, const float *x, float *y)
    int32_t rnn_batcher_withdraw(rnn_batcher *b, int32_t slot)
    int32_t rnn_batcher_completions(rnn_batcher *b, int32_t *ids, int32_t *results, int32_t cap,
                                    int64_t timeout_ns)
    void rnn_batcher_set_notify_fd(rnn_batcher *b, int fd)
    void rnn_batcher_counters(rnn_batcher *b, int64_t *out)
    void rnn_batcher_inject_failures(rnn_batcher *b, int32_t n)

    ctypedef void (*rnn_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                                  float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                                  int *ldc)
    void rnn_blas_set_sgemm(rnn_sgemm_fn fn)
    ctypedef void (*rnn_sgemv_fn)(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                                  float *x, int *incx, float *beta, float *y, int *incy)
    void rnn_blas_set_sgemv(rnn_sgemv_fn fn)
    int rnn_blas_has_sgemm()
    void rnn_gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                     const float *B, int64_t ldb, float beta, float *C, int64_t ldc, int use_blas)

    int rnn_kernel_level()
    int rnn_kernel_level_max()
    void rnn_set_kernel_level(int level)


cdef extern from "internal.h" nogil:
    ctypedef struct rnn_packed:
        int64_t N
        int64_t K
        int32_t dtype
        void *data
        float *scale
    rnn_status rnn_packed_init(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb)
    rnn_status rnn_packed_init_dtype(rnn_packed *dst, const float *B, int64_t N, int64_t K, int64_t ldb,
                                     int32_t dtype)
    rnn_status rnn_packed_init_stored(rnn_packed *dst, const void *Q, const float *scale, int64_t N, int64_t K,
                                      int64_t ldq, int32_t dtype)
    int64_t rnn_packed_unpack(const rnn_packed *p, void *out, float *scale)
    const rnn_packed *rnn_stack_packed(const rnn_stack *st, int32_t layer, int32_t dir, int32_t which)
    void rnn_packed_free(rnn_packed *p)
    void rnn_gemm_packed(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                         int64_t ldc, int accumulate)
    void rnn_gemm_packed_ref(int64_t M, const float *A, int64_t lda, const rnn_packed *Bp, float *C,
                             int64_t ldc, int accumulate)
    int64_t rnn_threads_worker_chunks()
    int64_t rnn_stft_table_floats(int64_t K)
    int64_t rnn_conv1d_packed_floats(int64_t M, int64_t Cg, int64_t K, int64_t G)
    int64_t rnn_conv1d_packed_work(int64_t N, int64_t Lout, int64_t Cg, int64_t K, int64_t Mg)
    int64_t rnn_conv1d_parts(int64_t CK, int64_t Lout)
    void rnn_conv1d_pack(const float *W, int64_t M, int64_t Cg, int64_t K, int64_t G, int64_t parts, float *out)
    int64_t rnn_stft_work(int64_t K)
    void rnn_lstmp_step_ref(int64_t I, int64_t H, int64_t P, const float *x, const float *W, const float *R,
                            const float *B, const float *Whr, float *h, float *c, float *work)


cdef extern from "rnnengine.h" nogil:
    int RNN_INSTR_WORDS
    rnn_status rnn_graph_run(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                             const float *fparams, void **tensors, rnn_stack **stacks,
                             float *work, char *err, size_t errlen, int64_t *failed)
    rnn_status rnn_graph_run_threads(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                                     const float *fparams, void **tensors, rnn_stack **stacks,
                                     float *work, char *err, size_t errlen, int64_t *failed, int32_t threads)
    rnn_status rnn_graph_verify(const int64_t *program, int64_t n_instr, const int64_t *iparams,
                                int64_t n_iparams, int64_t n_fparams, const int64_t *tensor_dtype,
                                const int64_t *tensor_count, const uint8_t *tensor_writable,
                                int64_t n_tensors, rnn_stack **stacks, const int64_t *stack_shape,
                                int64_t n_stacks, int64_t work_floats, char *err, size_t errlen,
                                int64_t *failed)


cdef extern from "rnnengine.h" nogil:
    ctypedef struct rnn_train_cell:
        int32_t kind
        int32_t input_size
        int32_t hidden_size
        int32_t linear_before_reset
        int32_t relu
        int32_t has_clip
        float clip
        const float *W
        const float *R
        const float *B
        const float *P
        int32_t x_projected
    int64_t rnn_train_saved_floats(const rnn_train_cell *cell, int64_t T, int64_t B)
    int64_t rnn_train_work_floats(const rnn_train_cell *cell, int64_t T, int64_t B)
    rnn_status rnn_train_forward(const rnn_train_cell *cell, int64_t T, int64_t B, const float *X,
                                 const float *h0, const float *c0, float *Y, float *hT, float *cT,
                                 float *saved, float *work)
    rnn_status rnn_train_backward(const rnn_train_cell *cell, int64_t T, int64_t B, const float *X,
                                  const float *h0, const float *c0, const float *Y, const float *saved,
                                  const float *dY, const float *dhT, const float *dcT, float *dX,
                                  float *dW, float *dR, float *dB, float *dP, float *dh0, float *dc0,
                                  float *work)
    void rnn_dense_forward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *b, float *Y)
    void rnn_dense_backward(int64_t N, int64_t K, int64_t O, const float *X, const float *W, const float *dY,
                            float *dW, float *db, float *dX)
    double rnn_softmax_xent(int64_t N, int64_t C, const float *logits, const int32_t *targets, float *dlogits)
    double rnn_mse(int64_t N, int64_t D, const float *y, const float *t, float *dy)
    int rnn_embedding_forward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *table, float *out)
    int rnn_embedding_backward(int64_t N, int64_t V, int64_t E, const int32_t *ids, const float *dout, float *dtable)
    double rnn_clip_grad_norm(int64_t n, float *g, double max_norm)
    void rnn_sgd_step(int64_t n, float *w, const float *g, float *v, float lr, float momentum, float weight_decay)
    void rnn_adam_step(int64_t n, float *w, const float *g, float *m, float *v, int64_t t, float lr, float beta1,
                       float beta2, float eps, float weight_decay)
