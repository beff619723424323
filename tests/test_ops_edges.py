"""Edges of the non-recurrent ops where rnnengine differed from onnxruntime without an error
(found by a red-team review of rnnengine/ops/handlers.py; each test fails on 7919b26). Every
case runs twice: the input fed at run time (the C kernels) and the input a constant (folded
with NumPy at conversion)."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.ops.handlers import UnsupportedError

DT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
      np.dtype(np.int64): TensorProto.INT64}


def one_node(op, x, extra=(), opset=17, outputs=("y",), folded=False, **attrs):
    """op(x, *extra constants) -> outputs; x fed at run time, or a constant when folded."""
    inits = [numpy_helper.from_array(np.asarray(v), f"c{k}") for k, v in enumerate(extra) if v is not None]
    names = ["x"] + [f"c{k}" if v is not None else "" for k, v in enumerate(extra)]
    inputs = []
    if folded:
        inits.append(numpy_helper.from_array(x, "x"))
    else:
        inputs.append(helper.make_tensor_value_info("x", DT[x.dtype], list(x.shape)))
    g = helper.make_graph([helper.make_node(op, names, list(outputs), name="n", **attrs)], "g", inputs,
                          [helper.make_empty_tensor_value_info(o) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def runs_like_onnxruntime(m, x, folded):
    feeds = {} if folded else {"x": x}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = rnnengine.convert(m).run(feeds)
    for o, w in zip([o.name for o in m.graph.output], want):
        assert got[o].shape == w.shape and got[o].dtype == w.dtype, (o, got[o].dtype, got[o].shape, w.dtype, w.shape)
        if w.dtype.kind == "f":
            assert max_violation(got[o], w) <= 1, (o, got[o], w)
        else:
            assert np.array_equal(got[o], w), (o, got[o], w)


@pytest.mark.parametrize("folded", [False, True])
def test_logsoftmax_keeps_the_small_part_beside_a_large_max(folded):
    # lse was rounded to float32 before x - lse: 1e6 + 1.349 came out as 1e6 + 1.375
    x = np.array([[1e6, 1e6 + 1, 1e6 - 2], [1e4, 1e4 + 0.3, 1e4 - 0.7]], np.float32)
    runs_like_onnxruntime(one_node("LogSoftmax", x, axis=-1, folded=folded), x, folded)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("lo, hi", [(0.5, -0.5), (np.nan, 1.0), (-1.0, np.nan)])
def test_clip_bounds_like_onnxruntime(lo, hi, folded):
    # lo > hi: hi wins (min(max(x, lo), hi)); a NaN bound clips nothing (np.clip made all NaN)
    x = np.array([0.0, 1.5, -1.5, 2.5, -0.25], np.float32)
    runs_like_onnxruntime(one_node("Clip", x, [np.float32(lo), np.float32(hi)], folded=folded), x, folded)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("b_shape", [(1, 4, 5), (1, 1, 4, 5)])
@pytest.mark.parametrize("a_shape", [(3, 4), (4,), (2, 3, 4)])
def test_matmul_keeps_the_weights_unit_batch_axes(a_shape, b_shape, folded):
    # the weights' leading 1s were dropped: (3, 4) @ (1, 4, 5) came out (3, 5), not (1, 3, 5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(a_shape).astype(np.float32)
    w = rng.standard_normal(b_shape).astype(np.float32)
    runs_like_onnxruntime(one_node("MatMul", x, [w], folded=folded), x, folded)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("opset", [7, 10, 11, 12, 13])
def test_dropout_mask_at_every_opset(opset, folded):
    # onnxruntime: zeros of the input's type (7-9), all false (10-11), all true (12-)
    x = np.array([[0.5, -1.0, 2.0]], np.float32)
    runs_like_onnxruntime(one_node("Dropout", x, opset=opset, outputs=("y", "mask"), folded=folded), x, folded)


@pytest.mark.parametrize("folded", [False, True])
def test_reducemean_over_an_empty_axis_is_zero(folded):
    x = np.zeros((2, 0, 3), np.float32)
    runs_like_onnxruntime(one_node("ReduceMean", x, [np.array([1], np.int64)], opset=18, keepdims=0, folded=folded),
                          x, folded)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("op, values, dtype", [("ReduceSum", [2**30, 2**30, 2**30, 1, 0], np.int32),
                                               ("ReduceMean", [2**30, 2**30, 2**30, 1, 0], np.int32),
                                               ("ReduceProd", [65536, 65536, 3], np.int32),
                                               ("ReduceSum", [2**62, 2**62, 1], np.int64)])
def test_an_integer_reduction_that_overflows_is_refused(op, values, dtype, folded):
    # it wrapped (ReduceSum int32 of 3 * 2**30 + 1 gave -1073741823; onnxruntime saturates)
    x = np.array([values], dtype)
    m = one_node(op, x, [np.array([1], np.int64)], opset=18, keepdims=0, folded=folded)
    with pytest.raises(ValueError, match=r"overflows"):
        rnnengine.convert(m).run({} if folded else {"x": x})
    ok = np.array([[3, -7, 11]], dtype)  # and in range, exactly
    runs_like_onnxruntime(one_node(op, ok, [np.array([1], np.int64)], opset=18, keepdims=0, folded=folded),
                          ok, folded)


@pytest.mark.parametrize("folded", [False, True])
def test_pad_wrap_that_crops_one_end_and_extends_the_other_is_refused(folded):
    x = np.arange(5, dtype=np.float32)
    m = one_node("Pad", x, [np.array([-1, 3], np.int64)], opset=19, mode="wrap", folded=folded)
    with pytest.raises(UnsupportedError, match=r"mode 'wrap' with pads that crop one end and extend the other"):
        rnnengine.convert(m).run({} if folded else {"x": x})
    runs_like_onnxruntime(one_node("Pad", x, [np.array([2, 3], np.int64)], opset=19, mode="wrap", folded=folded),
                          x, folded)


def test_a_float64_constant_output_is_refused_not_rounded():
    # Cast(to=DOUBLE) of a constant was folded and returned as float32 (2**40 + 1 -> 2**40)
    x = np.array([1, 2**40 + 1, -3], np.int64)
    m = one_node("Cast", x, to=TensorProto.DOUBLE, folded=True)
    with pytest.raises(ValueError, match=r"graph output 'y' is a float64 constant"):
        rnnengine.convert(m)
