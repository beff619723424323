"""A row of a batch gets the bits it gets alone: every product computes each row with the same
chain of sums whatever other rows share the call (src_c/pack.c), so a stream's batch, the
session batcher's joined sessions and a whole sequence's time steps all give each row what
that row gives alone. Before 2026-12-02 a MatMul / Gemm went to BLAS (sgemv for one row,
sgemm for more: the demo char LM's logits were up to 1.9e-6 relative off), and below AVX-512
an input projection of 128 rows or more went to sgemm over the float32 W (a float16 / int8
model's rows were 1.3e-3 / 4e-2 off the same rows alone). The plain portable kernels (no
AVX2), which still send many rows to BLAS, are tested in test_compact_sequences.py."""
import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation

rng = np.random.default_rng(2026)


def same_bits(got, want, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
        f"{what}: max diff {np.nanmax(np.abs(got.astype(np.float64) - want))}"


def test_rows_of_the_char_lm_stream_equal_each_row_alone():
    """The demo char LM (Gather, two LSTMs, a MatMul head) streamed at batch 8: every row's
    logits and state equal that row streamed alone."""
    m = rnnengine.convert(os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx"))
    B, T = 8, 12
    toks = rng.integers(0, 60, size=(T, B)).astype(np.int64)
    s = m.stream()
    ys = [s.step({"tokens": toks[t]}) for t in range(T)]
    for b in range(B):
        alone = m.stream()
        for t in range(T):
            y = alone.step({"tokens": toks[t, b:b + 1]})
            same_bits(ys[t]["logits"][b:b + 1], y["logits"], f"row {b} step {t} logits")
            same_bits(ys[t]["hN_1"][:, b:b + 1], y["hN_1"], f"row {b} step {t} state")


def lstm_model(I, H, seed):
    r = np.random.default_rng(seed)
    return rnnengine.Model([rnnengine.LSTM((r.standard_normal((1, 4 * H, I)) / np.sqrt(I)).astype(np.float32),
                                           (r.standard_normal((1, 4 * H, H)) / np.sqrt(H)).astype(np.float32),
                                           (r.standard_normal((1, 8 * H)) * 0.1).astype(np.float32))])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_rows_of_a_large_chunk_equal_each_row_alone(dtype):
    """A stream fed 4 steps at batch 64 (256 rows in one input projection: BLAS before, below
    AVX-512) gives each row the bits of that row fed alone, in every weight storage; and the
    whole-sequence run gives them too."""
    I, H, B, T = 40, 48, 64, 4
    model = lstm_model(I, H, 3)
    if dtype != "float32":
        model = rnnengine.Model(model.layers, weight_dtype=dtype)
    xs = rng.standard_normal((T, B, I)).astype(np.float32)
    batched = model.stream(batch_size=B).feed(xs)
    whole = model.run(xs)[0]
    same_bits(whole, batched, "run() vs the stream's chunk")
    for b in (0, 1, 17, 63):
        same_bits(batched[:, b:b + 1], model.stream().feed(xs[:, b:b + 1].copy()), f"row {b}")


def matmul_graph(op, K, N, rank3=False):
    # scaled as trained layers are (1/sqrt(fan-in)), as tests/oracle.py's tolerance assumes
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    shape = ["T", "B", K] if rank3 else ["B", K]
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"])]
        inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(bias, "b")]
    else:  # Gemm with transB, alpha and a bias row
        nodes = [helper.make_node("Gemm", ["x", "Wt", "b"], ["y"], transB=1, alpha=0.75)]
        inits = [numpy_helper.from_array(np.ascontiguousarray(W.T), "Wt"), numpy_helper.from_array(bias, "b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("K, N", [(1, 1), (7, 5), (33, 17), (192, 96), (70, 300), (1024, 40)])
def test_matmul_rows_equal_each_row_alone_and_onnxruntime(op, K, N):
    """MatMul (+ Add) and Gemm over 1 to 300 rows: each row's result is the same bits as that
    row run alone, and within tests/oracle.py's tolerance of onnxruntime."""
    import onnxruntime as ort
    model = matmul_graph(op, K, N)
    ours = rnnengine.convert(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((300, K)).astype(np.float32)
    for M in (1, 3, 17, 300):  # 300 rows: more than one block of rows (src_c/pack.c, row_block)
        got = ours.run({"x": x[:M]})["y"]
        assert max_violation(got, sess.run(None, {"x": x[:M]})[0]) <= 1.0
        for m in sorted({0, M // 2, M - 1}):
            same_bits(got[m:m + 1], ours.run({"x": x[m:m + 1]})["y"], f"M={M} row {m}")


def test_matmul_over_time_and_batch_equals_its_steps():
    """A rank-3 MatMul over (T, B, K) run whole equals the same input streamed step by step,
    bit for bit (the time steps are rows of the product, as the batch rows are)."""
    model = rnnengine.convert(matmul_graph("MatMul", 24, 40, rank3=True))
    x = rng.standard_normal((9, 5, 24)).astype(np.float32)
    whole = model.run({"x": x})["y"]
    s = model.stream()
    steps = np.concatenate([s({"x": x[t:t + 1]})["y"] for t in range(9)])
    same_bits(steps, whole)
