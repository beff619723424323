/* activations.c - the ONNX RNN activation functions, applied in place to a vector.
 *
 * NaN in gives NaN out for every function (the selects below test the condition under
 * which the input is replaced, so a NaN, for which every comparison is false, is kept),
 * and +-Inf follow the formulas: Relu(-Inf) = 0, Softplus(+Inf) = +Inf, Softsign(+-Inf) =
 * Inf / Inf = NaN as the formula (and onnxruntime) gives. */
#include "internal.h"

#include <math.h>

static inline float softplusf(float x) {
    /* log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)). */
    return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x)));
}

void rnn_activation_apply(const rnn_activation *act, float *x, int64_t n) {
    const float a = act->alpha, b = act->beta;
    switch (act->kind) {
    case RNN_ACT_RELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] < 0.0f ? 0.0f : x[i];
        break;
    case RNN_ACT_TANH:
        rnn_vtanh(x, n);
        break;
    case RNN_ACT_SIGMOID:
        rnn_vsigmoid(x, n);
        break;
    case RNN_ACT_AFFINE:
        for (int64_t i = 0; i < n; i++) x[i] = a * x[i] + b;
        break;
    case RNN_ACT_LEAKY_RELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] >= 0.0f ? x[i] : a * x[i];
        break;
    case RNN_ACT_THRESHOLDED_RELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] <= a ? 0.0f : x[i];
        break;
    case RNN_ACT_SCALED_TANH:
        for (int64_t i = 0; i < n; i++) x[i] = b * x[i];
        rnn_vtanh(x, n);
        for (int64_t i = 0; i < n; i++) x[i] = a * x[i];
        break;
    case RNN_ACT_HARD_SIGMOID:
        for (int64_t i = 0; i < n; i++) {
            float v = a * x[i] + b;
            x[i] = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
        }
        break;
    case RNN_ACT_ELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] >= 0.0f ? x[i] : a * (expf(x[i]) - 1.0f);
        break;
    case RNN_ACT_SOFTSIGN:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + fabsf(x[i]));
        break;
    case RNN_ACT_SOFTPLUS:
        for (int64_t i = 0; i < n; i++) x[i] = softplusf(x[i]);
        break;
    default:
        /* Unreachable: rnn_cell_create rejects unknown kinds. */
        break;
    }
}
