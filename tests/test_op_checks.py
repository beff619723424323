"""Op checks the fuzzer showed missing (issue 11): each invalid model is refused by rnnengine naming the node and the reason (and by onnxruntime, except where said); its valid neighbour matches onnxruntime.

Before, these raised bare ValueError / IndexError / TypeError / ZeroDivisionError from inside
the handlers, or (negative Conv pads, a longer strides list, a float shape) gave an answer
where onnxruntime refuses the model.
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.errors import UnsupportedError

N = helper.make_node
F = TensorProto.FLOAT


def model(nodes, inits, xshape, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, list(xshape))],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def rand(*shape):
    return np.random.default_rng(len(shape) * 7 + sum(shape)).standard_normal(shape).astype(np.float32)


def ort_run(m, x):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def check_refused(m, x, op, words, ort_refuses=True):
    if ort_refuses:
        with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error types
            ort_run(m, x)
    with pytest.raises(UnsupportedError) as e:
        rnnengine.convert(m).run({"x": x})
    assert op in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def check_matches(m, x):
    want = ort_run(m, x)
    got = rnnengine.convert(m).run({"x": x})["y"]
    assert got.shape == want.shape
    assert max_violation(got, want) <= 1


def conv(**attrs):
    return model([N("Conv", ["x", "w"], ["y"], **attrs)], {"w": rand(3, 2, 3)}, (1, 2, 9))


@pytest.mark.parametrize("attrs,words", [
    ({"pads": [1, 2, 3]}, ["pads", "2 values >= 0"]),     # ValueError: too many values to unpack
    ({"pads": [1]}, ["pads"]),
    ({"pads": [-1, 0]}, ["pads", ">= 0"]),                # ran, cropping the input
    ({"strides": [2, 3]}, ["strides", "1 value >= 1"]),   # ran with stride 2
    ({"strides": [0]}, ["strides"]),                      # ZeroDivisionError
    ({"strides": [-1]}, ["strides"]),
    ({"dilations": [0]}, ["dilations"]),                  # refused only by the C verifier
    ({"dilations": [2, 1]}, ["dilations"]),               # ran with dilation 2
    ({"group": 0}, ["group 0"]),
])
def test_conv_attributes_onnx_forbids_are_refused(attrs, words):
    check_refused(conv(**attrs), rand(1, 2, 9), "Conv", words)


@pytest.mark.parametrize("attrs", [{}, {"pads": [1, 2]}, {"strides": [2]}, {"dilations": [2], "pads": [0, 3]}])
def test_conv_valid_neighbours_match_onnxruntime(attrs):
    check_matches(conv(**attrs), rand(1, 2, 9))


@pytest.mark.parametrize("shape,words,ort_refuses", [
    (np.array([2.0, 3.0], np.float32), ["shape", "int64", "float32"], True),   # truncated to ints before
    (np.array([-1, 3]), ["below 0"], True),
    # onnxruntime runs these two; rnnengine refuses them cleanly: a 0-d shape is not the 1-D
    # tensor ONNX types it as (TypeError: iteration over a 0-d array before), and rnnengine
    # runs tensors of rank <= 8 (a RuntimeError from inside NumPy before)
    (np.int64(3), ["shape", "1-D"], False),
    (np.ones(64, np.int64), ["64 values", "rank <= 8"], False),
])
def test_expand_shape_input_onnx_forbids_is_refused(shape, words, ort_refuses):
    check_refused(model([N("Expand", ["x", "s"], ["y"])], {"s": shape}, (2, 3)), rand(2, 3), "Expand", words,
                  ort_refuses)


@pytest.mark.parametrize("shape", [np.array([4, 2, 3]), np.array([2, 1]), np.array([1, 1, 1])])
def test_expand_valid_neighbours_match_onnxruntime(shape):
    check_matches(model([N("Expand", ["x", "s"], ["y"])], {"s": shape}, (2, 3)), rand(2, 3))


def test_tile_repeats_must_match_the_rank():
    nodes = [N("Tile", ["c", "r"], ["t"]), N("Add", ["x", "t"], ["y"])]
    c = np.arange(3, dtype=np.float32).reshape(1, 3)
    check_refused(model(nodes, {"c": c, "r": np.array([2])}, (2, 3)), rand(2, 3), "Tile", ["one value per dimension"])
    check_matches(model(nodes, {"c": c, "r": np.array([2, 1])}, (2, 3)), rand(2, 3))


def test_constant_of_shape_takes_a_1d_shape():
    nodes = [N("ConstantOfShape", ["s"], ["t"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
             N("Add", ["x", "t"], ["y"])]
    check_refused(model(nodes, {"s": np.int64(3)}, (2, 3)), rand(2, 3), "ConstantOfShape", ["1-D"])
    check_matches(model(nodes, {"s": np.array([2, 3])}, (2, 3)), rand(2, 3))


def test_gather_from_a_scalar_is_refused():
    """IndexError in Gather.emit before (a weight file's data input of rank 0)."""
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Gather", ["s", "i"], ["g"]), N("Add", ["x", "g"], ["y"])]
    check_refused(model(nodes, {"i": np.int64(0)}, (2, 3), opset=11), rand(2, 3), "Gather", ["scalar"])


def test_gemm_with_a_1d_b_is_refused():
    """IndexError in Gemm.emit before (a 1-D B with transB)."""
    m = model([N("Gemm", ["x", "b"], ["y"], transB=1)], {"b": rand(3)}, (2, 3))
    check_refused(m, rand(2, 3), "Gemm", ["B must be 2-D"])
    check_matches(model([N("Gemm", ["x", "b"], ["y"], transB=1)], {"b": rand(4, 3)}, (2, 3)), rand(2, 3))


@pytest.mark.parametrize("starts", [np.array([np.nan], np.float32), np.array([1.0], np.float32)])
def test_slice_bounds_must_be_integers(starts):
    """A float starts input (NaN: ValueError from int() before; 1.0 was read as 1), as ONNX
    types it int32/int64; computed from the input's shape so it reaches the planner."""
    nodes = [N("Shape", ["x"], ["s"], end=1), N("Cast", ["s"], ["sf"], to=F), N("Mul", ["sf", "zero"], ["z"]),
             N("Add", ["z", "st"], ["starts"]), N("Slice", ["x", "starts", "ends"], ["y"])]
    inits = {"zero": np.float32(0), "st": starts, "ends": np.array([3])}
    check_refused(model(nodes, inits, ("n", 3)), rand(2, 3), "Slice", ["starts", "integers"])
    ok = [N("Slice", ["x", "starts", "ends"], ["y"])]
    check_matches(model(ok, {"starts": np.array([1]), "ends": np.array([3])}, ("n", 3)), rand(4, 3))


@pytest.mark.parametrize("pads", [np.array([np.nan, 0, 0, 0], np.float32), np.array([1.0, 0, 0, 0], np.float32)])
def test_pad_pads_must_be_integers(pads):
    """A float pads input (NaN: ValueError from int() before; 1.0 was read as 1), as ONNX
    types it int64; computed from the input's shape so it reaches the planner."""
    nodes = [N("Shape", ["x"], ["s"], end=1), N("Cast", ["s"], ["sf"], to=F), N("Mul", ["sf", "zero"], ["z"]),
             N("Add", ["z", "p"], ["pads"]), N("Pad", ["x", "pads"], ["y"])]
    check_refused(model(nodes, {"zero": np.float32(0), "p": pads}, ("n", 3)), rand(2, 3), "Pad", ["pads", "integers"])
    ok = [N("Pad", ["x", "pads"], ["y"])]
    check_matches(model(ok, {"pads": np.array([1, 0, 0, 2])}, ("n", 3)), rand(2, 3))
