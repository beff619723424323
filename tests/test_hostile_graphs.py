"""Hostile graphs: well-formed ONNX models (and weight files) that describe graphs which used to
reach the C executor with unchecked shapes, offsets and element types (found by fuzzing): heap
writes and reads out of bounds, an information leak, an endless loop. Each is refused with the
op, the node's name and the reason: by the planner in Python, through rnnengine.convert and
through a weight file written by `rnnengine convert` and loaded back; and, with the planner's
check switched off, by the C verifier (rnn_graph_verify), naming the node and the instruction."""
import numpy as np
import pytest
from onnx import TensorProto as TP, helper, numpy_helper

import rnnengine
from rnnengine import _core, cli
from rnnengine.runtime import graph
from rnnengine.ops import handlers as ops
from rnnengine.ops.handlers import UnsupportedError

ort = pytest.importorskip("onnxruntime")


def make(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def loop_growing_state():
    """A Loop whose carried float state starts (1, 2) and is concatenated with itself each
    iteration: (1, 8) after two. A stream holds it as state of its start size (2 floats) and
    wrote the final 8 into it (a heap write out of bounds)."""
    body = helper.make_graph(
        [helper.make_node("Concat", ["s_in", "s_in"], ["s_cat"], axis=1, name="grow"),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="keep")],
        "body", [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c_in", TP.BOOL, []),
                 helper.make_tensor_value_info("s_in", TP.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TP.BOOL, []), helper.make_tensor_value_info("s_cat", TP.FLOAT, None)])
    return make([helper.make_node("Loop", ["M", "cond", "s0"], ["s_final"], body=body, name="lp"),
                 helper.make_node("ReduceSum", ["s_final"], ["tot"], keepdims=0, name="sum"),
                 helper.make_node("Add", ["x", "tot"], ["y"], name="add")],
                [("x", TP.FLOAT, [1, 4])], [("y", TP.FLOAT)],
                [("M", np.array(2, np.int64)), ("cond", np.array(True)), ("s0", np.ones((1, 2), np.float32))])


R = np.random.default_rng(7)
X23 = R.standard_normal((2, 3)).astype(np.float32)
# name -> (model, feeds, stream?, handler whose check is switched off (or "loop"), planner's message, C's message)
CASES = {
    "loop_state_grows": (
        loop_growing_state(), {"x": R.standard_normal((1, 4)).astype(np.float32)}, True, "loop",
        r"Loop node 'lp': loop-carried state 0 starts as float32 \(1, 2\) and ends as float32 \(1, 8\)",
        r"Loop node 'lp': instruction \d+ \(COPY\): output has 2 elements, the instruction writes 8"),
    "scatter_indices_wider_than_data": (
        make([helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=0, name="sc")],
             [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)],
             [("i", np.array([[0, 1, 0, 1, 1], [1, 0, 1, 0, 0]], np.int64)), ("u", np.ones((2, 5), np.float32))]),
        {"x": X23}, False, ops.ScatterElements,
        r"ScatterElements node 'sc': indices of shape \(2, 5\) are wider than the data \(2, 3\) on axis 1",
        r"ScatterElements node 'sc': instruction 0 \(SCATTER\): indices are 5 wide on axis 1, the data 3"),
    "split_negative_sizes": (
        make([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1, name="sp")],
             [("x", TP.FLOAT, [2, 3])], [("a", TP.FLOAT), ("b", TP.FLOAT)], [("s", np.array([-2, 5], np.int64))]),
        {"x": X23}, False, ops.Split,
        r"Split node 'sp': split sizes \[-2, 5\] must not be negative",
        r"Split node 'sp': instruction 0 \(COPY\): output is tensor \d+ of -4 elements"),
    "softmax_over_uint8": (
        make([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [("x", TP.UINT8, [2, 3])], [("y", TP.UINT8)]),
        {"x": np.array([[1, 2, 3], [4, 5, 250]], np.uint8)}, False, ops.Softmax,
        r"Softmax node 'sm': needs a float32 input at run time, got uint8",
        r"Softmax node 'sm': instruction 0 \(SOFTMAX\): input is uint8, the instruction takes float32"),
    "conv_over_bool": (
        make([helper.make_node("Conv", ["x", "w"], ["y"], name="cv")], [("x", TP.BOOL, [1, 2, 5])], [("y", TP.FLOAT)],
             [("w", R.standard_normal((3, 2, 2)).astype(np.float32))]),
        {"x": R.random((1, 2, 5)) < 0.5}, False, ops.Conv,
        r"Conv node 'cv': needs a float32 input at run time, got bool",
        r"Conv node 'cv': instruction 0 \(CONV1D_PACKED\): input is bool, the instruction takes float32"),
    "gemm_over_uint8": (
        make([helper.make_node("Gemm", ["x", "w"], ["y"], name="g")], [("x", TP.UINT8, [2, 3])], [("y", TP.FLOAT)],
             [("w", R.standard_normal((3, 4)).astype(np.float32))]),
        {"x": np.array([[1, 2, 3], [4, 5, 6]], np.uint8)}, False, ops.Gemm,
        r"Gemm node 'g': takes float32 A and C at run time, got uint8",
        r"Gemm node 'g': instruction 0 \(MATMUL\): input A is uint8, the instruction takes float32"),
    "gemm_c_not_broadcastable": (
        make([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g")], [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)],
             [("w", R.standard_normal((3, 4)).astype(np.float32)), ("c", np.arange(3, dtype=np.float32))]),
        {"x": X23}, False, ops.Gemm,
        r"Gemm node 'g': C of shape \(3,\) does not broadcast to the result \(2, 4\)",
        r"Gemm node 'g': instruction 1 \(BINARY\): input B has 3 elements, the instruction reads 4"),
    "reshape_to_negative_dims": (
        make([helper.make_node("Reshape", ["x", "s"], ["r"], name="rs"), helper.make_node("Transpose", ["r"], ["y"], name="tr")],
             [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)], [("s", np.array([-2, -3], np.int64))]),
        {"x": X23}, False, ops.Reshape,
        r"Reshape node 'rs': shape \[-2, -3\] has a dimension below -1",
        r"Transpose node 'tr': instruction 0 \(COPY\): the copy has a negative size -3"),
}


def run(model, feeds, stream):
    if stream:
        s = model.stream()
        return [s(feeds) for _ in range(2)]
    return model.run(feeds)


def weight_file(m, tmp_path):
    """The model through `rnnengine convert` into a weight file, loaded back."""
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "m.rnne")
    with open(src, "wb") as f:
        f.write(m.SerializeToString())
    assert cli.main(["convert", src, "-o", dst]) == 0
    return rnnengine.load(dst)


@pytest.mark.parametrize("name", CASES)
def test_refused_by_the_planner_through_convert(name):
    m, feeds, stream, _, planner_msg, _ = CASES[name]
    with pytest.raises(UnsupportedError, match=planner_msg):
        run(rnnengine.convert(m), feeds, stream)


@pytest.mark.parametrize("name", CASES)
def test_refused_by_the_planner_through_a_weight_file(name, tmp_path):
    m, feeds, stream, _, planner_msg, _ = CASES[name]
    with pytest.raises(UnsupportedError, match=planner_msg):
        run(weight_file(m, tmp_path), feeds, stream)


def switch_off_the_planner_check(monkeypatch, which):
    """The planner as it was before its checks (the C verifier must hold on its own)."""
    if which == "loop":
        monkeypatch.setattr(graph, "_check_loop_state", lambda *a: None)
    else:  # the handler's refusals become no-ops: it goes on planning what it was given
        monkeypatch.setattr(which, "fail", lambda self, msg: None)
        monkeypatch.setattr(graph.Planner, "_check_view", lambda *a: None)  # nor are its views checked


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("route", ["convert", "weight file"])
def test_refused_by_the_c_verifier_when_the_planner_lets_it_through(name, route, tmp_path, monkeypatch):
    m, feeds, stream, which, _, c_msg = CASES[name]
    model = rnnengine.convert(m) if route == "convert" else weight_file(m, tmp_path)
    switch_off_the_planner_check(monkeypatch, which)
    with pytest.raises(_core.ProgramError, match=c_msg):
        run(model, feeds, stream)


@pytest.mark.parametrize("route", ["convert", "weight file"])
def test_a_view_that_does_not_hold_its_input_is_refused_by_the_planner(route, tmp_path, monkeypatch):
    """Behind the Reshape handler's own checks, the planner checks every view a handler asks
    for (sizes >= 0, exactly the input's elements, exact integers): with the handler's
    refusals switched off, the negative dims are refused there, naming the node."""
    m, feeds, stream, which, _, _ = CASES["reshape_to_negative_dims"]
    model = rnnengine.convert(m) if route == "convert" else weight_file(m, tmp_path)
    monkeypatch.setattr(which, "fail", lambda self, msg: None)
    with pytest.raises(UnsupportedError, match=r"Reshape node 'rs': a view of shape \(-2, -3\) does not hold "
                                               r"the 6 elements of its input of shape \(2, 3\)"):
        run(model, feeds, stream)


@pytest.mark.parametrize("route", ["convert", "weight file"])
def test_a_view_with_the_wrong_element_count_is_refused_by_the_planner(route, tmp_path, monkeypatch):
    """The element-count branch of the planner's view check: Reshape to [2**62 + 1, 4, -1]
    (whose int64 product wraps around to 4) with the handler's refusals switched off asks
    for a view (2**62 + 1, 4, 0) of 6 elements: refused by the planner, naming the node."""
    m = make([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")], [("x", TP.FLOAT, [2, 3])],
             [("y", TP.FLOAT)], [("s", np.array([2**62 + 1, 4, -1], np.int64))])
    model = rnnengine.convert(m) if route == "convert" else weight_file(m, tmp_path)
    monkeypatch.setattr(ops.Reshape, "fail", lambda self, msg: None)
    with pytest.raises(UnsupportedError, match=r"Reshape node 'rs': a view of shape \(4611686018427387905, 4, 0\) "
                                               r"does not hold the 6 elements"):
        run(model, {"x": X23}, False)


@pytest.mark.parametrize("concat", [False, True])
def test_empty_tensors_with_huge_sizes_are_refused_by_a_limit(concat):
    """An empty tensor of shape (2**63 - 1, 0) holds 0 elements, so counting elements does not
    bound it; NumPy cannot make it (a raw ValueError before), and a Concat of two would have a
    size of 2**64 - 2. Every size is bounded: refused by max_tensor_elements, naming the node."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Slice", ["r", "st", "en", "ax"], ["z"], name="empty"),
             helper.make_node("Reshape", ["z", "s"], ["v" if concat else "y"], name="rs", allowzero=1)]
    if concat:
        nodes.append(helper.make_node("Concat", ["v", "v"], ["y"], name="cat", axis=0))
    m = make(nodes, [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)],
             [("st", np.array([0], np.int64)), ("en", np.array([0], np.int64)), ("ax", np.array([0], np.int64)),
              ("s", np.array([2**63 - 1, 0], np.int64))])
    with pytest.raises(rnnengine.LimitError, match=r"Reshape node 'rs': a view of shape \(9223372036854775807, 0\) "
                                                   r"has sizes whose product.* max_tensor_elements"):
        rnnengine.convert(m).run({"x": X23})


def test_the_valid_neighbours_still_run_like_onnxruntime():
    """Each hostile model made valid (a loop state that keeps its shape, indices within the data,
    sizes >= 0, float inputs, a C of (N,), a real shape): runs and matches onnxruntime, so the
    refusals above are not of the ops themselves."""
    x = R.standard_normal((2, 3)).astype(np.float32)
    models = [
        make([helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=0, name="sc")],
             [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)],
             [("i", np.array([[1, 0, 1], [0, 1, 0]], np.int64)), ("u", R.standard_normal((2, 3)).astype(np.float32))]),
        make([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1, name="sp")],
             [("x", TP.FLOAT, [2, 3])], [("a", TP.FLOAT), ("b", TP.FLOAT)], [("s", np.array([0, 3], np.int64))]),
        make([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)]),
        make([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", beta=0.5)], [("x", TP.FLOAT, [2, 3])],
             [("y", TP.FLOAT)], [("w", R.standard_normal((3, 4)).astype(np.float32)),
                                  ("c", R.standard_normal((2, 1)).astype(np.float32))]),
        make([helper.make_node("Reshape", ["x", "s"], ["r"], name="rs"), helper.make_node("Transpose", ["r"], ["y"], name="tr")],
             [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT)], [("s", np.array([3, -1], np.int64))]),
    ]
    for m in models:
        want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})
        got = rnnengine.convert(m).run({"x": x})
        for w, (k, g) in zip(want, got.items()):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, np.uint8, np.bool_])
def test_pad_fills_with_the_constant_in_the_input_type(dtype):
    """Pad's constant in the input's own type (int32 padding used to write the float's bits:
    7 -> 1088421888, a silent wrong answer); against onnxruntime, reflect and edge too."""
    tp = {np.float32: TP.FLOAT, np.int32: TP.INT32, np.int64: TP.INT64, np.uint8: TP.UINT8, np.bool_: TP.BOOL}[dtype]
    r = np.random.default_rng(3)
    x = (r.random((2, 3, 4)) < 0.5) if dtype is np.bool_ else (r.standard_normal((2, 3, 4)) * 50).astype(dtype)
    big = {np.float32: -2.5e9, np.int32: -2 ** 31 + 5, np.int64: 2 ** 62 + 3, np.uint8: 201, np.bool_: True}[dtype]
    for mode, value in (("constant", big), ("constant", 7), ("reflect", 0), ("edge", 0)):
        inits = [("p", np.array([0, 1, 2, 1, 0, 3], np.int64))]
        if mode == "constant":
            inits.append(("v", np.array(value, dtype)))
        m = make([helper.make_node("Pad", ["x", "p"] + (["v"] if mode == "constant" else []), ["y"], mode=mode, name="pd")],
                 [("x", tp, [2, 3, 4])], [("y", tp)], inits, opset=18)
        if dtype is np.bool_ and mode != "constant":
            continue  # onnxruntime has no bool Pad kernel for these modes
        want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        got = rnnengine.convert(m).run({"x": x})["y"]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"{mode} {value}")
