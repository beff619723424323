/* blas.c - the one place rnnengine calls BLAS, plus the naive reference GEMM beside it. */
#include "rnnengine.h"

#include <stddef.h>

static rnn_sgemm_fn g_sgemm = NULL;
static rnn_sgemv_fn g_sgemv = NULL;

void rnn_blas_set_sgemm(rnn_sgemm_fn fn) { g_sgemm = fn; }
void rnn_blas_set_sgemv(rnn_sgemv_fn fn) { g_sgemv = fn; }
int rnn_blas_has_sgemm(void) { return g_sgemm != NULL; }

/* Naive reference: C (M,N) = alpha * A (M,K) @ B (N,K)^T + beta * C, row-major. */
static void gemm_nt_naive(int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                          int64_t ldc) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += A[m * lda + k] * B[n * ldb + k];
            float prev = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
            C[m * ldc + n] = alpha * acc + prev;
        }
    }
}

void rnn_gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc, int use_blas) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta * C */
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) C[m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
        return;
    }
    if (!use_blas || g_sgemm == NULL) {
        gemm_nt_naive(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (M == 1 && g_sgemv != NULL) {
        /* One row: c = alpha * B @ a + beta * c. sgemm would pack all of B on every call.
         * B (N, K) row-major is column-major (K, N):   sgemv('T', K, N, B, a, c) */
        char tr = 'T';
        int m = (int)K, n = (int)N, ild = (int)ldb, one = 1;
        g_sgemv(&tr, &m, &n, &alpha, (float *)B, &ild, (float *)A, &one, &beta, C, &one);
        return;
    }
    /* Row-major C = A @ B^T is column-major C^T = B @ A^T with B stored as (K x N)^T:
     * C = alpha * A @ B.T + beta * C   ->   sgemm('T', 'N', N, M, K, B, A, C) */
    char ta = 'T', tb = 'N';
    int m = (int)N, n = (int)M, k = (int)K;
    int ilda = (int)ldb, ildb = (int)lda, ildc = (int)ldc;
    g_sgemm(&ta, &tb, &m, &n, &k, &alpha, (float *)B, &ilda, (float *)A, &ildb, &beta, C, &ildc);
}

/* Row-major C (M, N) = alpha * op(A) @ B (K, N) + beta * C, op(A) = A (M, K) or A (K, M)^T. */
static void gemm_xn(int transa, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (g_sgemm == NULL || K <= 0) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) {
                float acc = 0.0f;
                for (int64_t k = 0; k < K; k++) acc += (transa ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + n];
                C[m * ldc + n] = alpha * acc + (beta == 0.0f ? 0.0f : beta * C[m * ldc + n]);
            }
        return;
    }
    /* column-major C^T = B^T @ op(A)^T:   sgemm('N', transa ? 'T' : 'N', N, M, K, B, A, C) */
    char ta = 'N', tb = transa ? 'T' : 'N';
    int m = (int)N, n = (int)M, k = (int)K, il = (int)ldb, ir = (int)lda, ic = (int)ldc;
    g_sgemm(&ta, &tb, &m, &n, &k, &alpha, (float *)B, &il, (float *)A, &ir, &beta, C, &ic);
}

/* NumPy: C = alpha * A @ B + beta * C */
void rnn_gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    gemm_xn(0, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* NumPy: C = alpha * A.T @ B + beta * C */
void rnn_gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    gemm_xn(1, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
