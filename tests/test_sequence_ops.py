"""The planner's sequence ops and Loop wiring against onnxruntime, and the models they must refuse (fuzz findings of issue 11).

Valid models: every output compared exactly with onnxruntime (these ops only move data) on
random non-symmetric inputs, with the split input both a run-time input and a constant.
Invalid models: onnxruntime refuses them too (checked), and rnnengine raises an error naming
the node and the reason instead of the IndexError / KeyError / TypeError or the silently
different answer it gave before.
"""
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from rnnengine.errors import UnsupportedError
from rnnengine.format.weightfile import FormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = helper.make_node
F = TensorProto.FLOAT


def model(nodes, inits=None, xshape=(4, 3), outputs=("y",), opset=18, x_const=None, extra_inputs=()):
    """x (float, shape xshape) as a graph input, or as an initializer when x_const is given;
    extra_inputs: (name, elem type, shape) of more graph inputs."""
    inits = dict(inits or {})
    inputs = [helper.make_tensor_value_info(n, t, list(sh)) for n, t, sh in extra_inputs]
    if x_const is None:
        inputs.insert(0, helper.make_tensor_value_info("x", F, list(xshape)))
    else:
        inits["x"] = x_const
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, F, None) for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def rand(*shape):
    return np.random.default_rng(sum(shape) + len(shape)).standard_normal(shape).astype(np.float32)


def both(m, feeds):
    """(onnxruntime's outputs, rnnengine's) of one model."""
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    gm = rnnengine.convert(m)
    out = gm.run(feeds)
    return want, [out[o] for o in gm.outputs]


def ort_refuses(m, feeds):
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:  # noqa: BLE001 - any refusal (invalid graph or a run-time failure)
        return True
    return False


def engine_error(m, feeds):
    """The error rnnengine raises converting or running m (None when it runs)."""
    try:
        rnnengine.convert(m).run(feeds)
    except (UnsupportedError, ValueError) as e:
        return e
    return None


def split_parts(split, axis=0, keepdims=None, n_parts=1, x=None, const=False):
    """(model, feeds): SplitToSequence, then each part read out with SequenceAt (outputs p0,
    p1, ...) and the sequence's length. const: x is an initializer and the split is computed
    when the model is planned, from the shape of an input z (a sequence op whose inputs are
    all constants at conversion is refused there, so this is how its constant path runs)."""
    attrs = {"axis": axis} if keepdims is None else {"axis": axis, "keepdims": keepdims}
    nodes, inits, extra, feeds = [], {}, [], {} if const else {"x": x}
    if split is not None and const:
        arr = np.asarray(split)
        dims = [int(v) for v in arr.reshape(-1)]
        extra, feeds["z"] = [("z", F, ["d%d" % k for k in range(len(dims))])], np.zeros(dims, np.float32)
        nodes.append(N("Shape", ["z"], ["zs"]))
        if arr.ndim == 0:
            nodes.append(N("Gather", ["zs", "zero"], ["zg"]))
            inits["zero"] = np.int64(0)
        nodes.append(N("Cast", ["zg" if arr.ndim == 0 else "zs"], ["s"], to=helper.np_dtype_to_tensor_dtype(arr.dtype)))
    elif split is not None:
        inits["s"] = split
    nodes.append(N("SplitToSequence", ["x"] + (["s"] if split is not None else []), ["seq"], **attrs))
    for k in range(n_parts):
        nodes.append(N("SequenceAt", ["seq", f"i{k}"], [f"p{k}"]))
        inits[f"i{k}"] = np.int64(k)
    nodes.append(N("SequenceLength", ["seq"], ["n"]))
    nodes.append(N("Cast", ["n"], ["len"], to=F))
    m = model(nodes, inits, x.shape, [f"p{k}" for k in range(n_parts)] + ["len"], x_const=x if const else None,
              extra_inputs=extra)
    return m, feeds


VALID_SPLITS = [  # (split, axis, keepdims, parts)
    (None, 0, None, 4), (None, 1, 0, 3), (None, -1, 1, 3), (None, -2, 0, 4),
    (np.int64(2), 0, None, 2), (np.int64(3), 0, None, 2), (np.int64(5), 0, None, 1), (np.int64(2), -1, None, 2),
    (np.array([1, 3]), 0, None, 2), (np.array([3, 1]), 0, 0, 2), (np.array([4]), 0, None, 1),
    (np.array([0, 1, 2]), 1, None, 3), (np.array([2, 1], np.int32), 1, None, 2),
]


@pytest.mark.parametrize("const", [False, True], ids=["input", "constant"])
@pytest.mark.parametrize("split,axis,keepdims,parts", VALID_SPLITS)
def test_split_to_sequence_matches_onnxruntime(split, axis, keepdims, parts, const):
    if const and split is None:
        pytest.skip("all inputs constant at conversion: refused there (sequence ops are not folded)")
    m, feeds = split_parts(split, axis, keepdims, parts, rand(4, 3), const)
    want, got = both(m, feeds)
    assert len(got) == len(want) == parts + 1
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


INVALID_SPLITS = [  # (split, axis, what the message says)
    (np.int64(0), 0, "must be greater than 0"),
    (np.int64(-1), 0, "must be greater than 0"),
    (np.array([1, 2]), 0, "sum to 4"),        # too few: rnnengine returned fewer rows before
    (np.array([2]), 0, "sum to 4"),
    (np.array([-1, 5]), 0, ">= 0"),
    (np.float32(2), 0, "integer"),             # a float split: rnnengine split by 2 before
    (None, 2, "out of range"),                 # rnnengine wrapped the axis before
    (None, -3, "out of range"),
]


@pytest.mark.parametrize("const", [False, True], ids=["input", "constant"])
@pytest.mark.parametrize("split,axis,msg", INVALID_SPLITS)
def test_split_to_sequence_refuses_what_onnx_forbids(split, axis, msg, const):
    if const and (split is None or np.asarray(split).min() < 0):
        pytest.skip("not expressible with the split computed from a shape, or all constant at conversion")
    m, feeds = split_parts(split, axis, None, 1, rand(4, 3), const)
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "SplitToSequence" in str(e) and msg in str(e), e


def test_split_to_sequence_of_a_scalar_is_refused():
    """The long fuzz run's IndexError in sequence_op (fuzz_onnx/splittosequence-of-a-scalar)."""
    m = model([N("Shape", ["x"], ["s"]), N("SplitToSequence", ["c", "s"], ["seq"]),
               N("ConcatFromSequence", ["seq"], ["y"], axis=0)], {"c": np.float32(0.5)}, outputs=("y",))
    e = engine_error(m, {"x": rand(4, 3)})
    assert e is not None and "SplitToSequence" in str(e) and "scalar" in str(e), e


def insert_model(pos):
    nodes = [N("Neg", ["x"], ["x1"]), N("Abs", ["x"], ["x0"]), N("SequenceConstruct", ["x", "x1"], ["s"]),
             N("SequenceInsert", ["s", "x0"] + ([] if pos is None else ["p"]), ["s2"]),
             N("ConcatFromSequence", ["s2"], ["y"], axis=0)]
    return model(nodes, {} if pos is None else {"p": np.int64(pos)})


@pytest.mark.parametrize("pos", [None, 0, 1, 2, -1, -2])
def test_sequence_insert_matches_onnxruntime(pos):
    x = rand(4, 3)
    (want,), (got,) = both(insert_model(pos), {"x": x})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pos", [3, -3, 7])
def test_sequence_insert_out_of_range_is_refused(pos):
    """Python's list.insert clamps a position past the end: rnnengine inserted at the end before."""
    m, feeds = insert_model(pos), {"x": rand(4, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "SequenceInsert" in str(e) and "[-2, 2]" in str(e), e


@pytest.mark.parametrize("axis,new_axis", [(0, 0), (1, 0), (-1, 0), (-2, 0), (0, 1), (2, 1), (-1, 1), (-3, 1)])
def test_concat_from_sequence_matches_onnxruntime(axis, new_axis):
    nodes = [N("Neg", ["x"], ["x1"]), N("SequenceConstruct", ["x", "x1", "c"], ["s"]),
             N("ConcatFromSequence", ["s"], ["y"], axis=axis, new_axis=new_axis)]
    m = model(nodes, {"c": rand(2, 3) + 7}, xshape=(2, 3))
    x = rand(2, 3)
    (want,), (got,) = both(m, {"x": x})
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("axis,new_axis", [(2, 0), (-3, 0), (3, 1), (-4, 1)])
def test_concat_from_sequence_axis_out_of_range_is_refused(axis, new_axis):
    nodes = [N("Neg", ["x"], ["x1"]), N("SequenceConstruct", ["x", "x1"], ["s"]),
             N("ConcatFromSequence", ["s"], ["y"], axis=axis, new_axis=new_axis)]
    m, feeds = model(nodes, xshape=(2, 3)), {"x": rand(2, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "ConcatFromSequence" in str(e) and "out of range" in str(e), e


def test_a_sequence_of_mixed_types_is_refused():
    """A float and an int64 tensor in one sequence (were they both constants, NumPy's
    concatenate would have promoted them to float64 silently)."""
    nodes = [N("SequenceConstruct", ["x", "d"], ["s"]), N("ConcatFromSequence", ["s"], ["y"], axis=0)]
    m = model(nodes, {"d": np.ones((1, 3), np.int64)}, xshape=(2, 3))
    feeds = {"x": rand(2, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "different types" in str(e), e


def loop_model(body_out="v2", trip="M", M=np.int64(3), cond=np.array(True)):
    """Loop(M=3, cond=true, v) whose body adds one to v; body_out is what the body returns as v."""
    body = helper.make_graph(
        [N("Add", ["v", "one"], ["v2"]), N("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", F, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info(body_out, F, None)])
    nodes = [N("Loop", [trip, "t", "x"], ["y"], body=body)]
    return model(nodes, {"M": M, "t": cond, "one": np.float32(1)}, xshape=(2, 3))


def test_loop_matches_onnxruntime():
    (want,), (got,) = both(loop_model(), {"x": rand(2, 3)})
    np.testing.assert_array_equal(got, want)


def test_a_loop_body_output_nothing_produces_is_refused():
    """The long fuzz run's KeyError in Planner.loop (fuzz_onnx/loop-body-output-produced-by-nothing)."""
    m, feeds = loop_model(body_out="ghost"), {"x": rand(2, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "Loop" in str(e) and "'ghost'" in str(e) and "produced by no body node" in str(e), e


@pytest.mark.parametrize("op,attrs,inits,outs", [
    ("Unsqueeze", {"axes": [0]}, {"a": np.array([1])}, 1),
    ("Squeeze", {"axes": [0]}, {"a": np.array([0])}, 1),
    ("ReduceSum", {"axes": [0]}, {"a": np.array([1])}, 1),   # rnnengine summed over the attribute's axis before
    ("Split", {"split": [1, 2], "axis": 1}, {}, 2),
])
def test_an_attribute_the_opset_does_not_define_is_refused(op, attrs, inits, outs):
    """Opset 13 moved these attributes to inputs; a file that still has them is invalid
    (onnxruntime refuses it) and the handler would read an attribute no schema typed."""
    names = [f"y{k}" for k in range(outs)]
    m = model([N(op, ["x"] + list(inits), names, **attrs)], inits, xshape=(1, 3), outputs=names, opset=17)
    feeds = {"x": rand(1, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and op in str(e) and "not defined" in str(e) and "opset 17" in str(e), e


def test_a_weight_file_with_such_an_attribute_is_refused_when_loaded(tmp_path):
    """The long fuzz run's TypeError (fuzz_weights/unsqueeze-axes-attribute-at-opset-17): the
    same rule holds for a stored graph, checked when the file is read."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "fuzz"))
    try:
        import fuzz_weights as fw
    finally:
        sys.path.pop(0)
    m = model([N("Unsqueeze", ["x", "a"], ["y"])], {"a": np.array([1])}, xshape=(1, 3), opset=17)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path)
    x = rand(1, 3)
    np.testing.assert_array_equal(rnnengine.load(path).run({"x": x})["y"], x[:, None])  # the valid file loads
    fields, doc, section = fw.parse(open(path, "rb").read())
    (node,) = doc["graph"]["nodes"]
    for value in ([0], 5):  # the right type for opset 11, and the finding's bare integer
        node.setdefault("attrs", {})["axes"] = value
        with open(path, "wb") as f:
            f.write(fw.serialize(fields, doc, section))
        with pytest.raises(FormatError, match="Unsqueeze.*'axes'.*not defined.*opset 17"):
            rnnengine.load(path)


def test_an_if_branch_output_nothing_produces_is_refused():
    """The same for an If whose chosen branch names an output nothing computes (KeyError before);
    the condition comes from the input's shape, so the branch is chosen when planning."""
    def branch(out):
        return helper.make_graph([N("Neg", ["x"], ["nx"])], "b", [], [helper.make_tensor_value_info(out, F, None)])
    nodes = [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["d"]), N("Greater", ["d", "zero"], ["c"]),
             N("If", ["c"], ["y"], then_branch=branch("ghost"), else_branch=branch("nx"))]
    m = model(nodes, {"zero": np.int64(0)}, xshape=("n", 3), opset=17)
    feeds = {"x": rand(2, 3)}
    assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "If" in str(e) and "'ghost'" in str(e), e
    good = model(nodes[:3] + [N("If", ["c"], ["y"], then_branch=branch("nx"), else_branch=branch("nx"))],
                 {"zero": np.int64(0)}, xshape=("n", 3), opset=17)
    (want,), (got,) = both(good, feeds)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("M,cond,what", [
    (np.zeros(0, np.int64), np.array(True), "trip count"),     # IndexError before
    (np.float32(3), np.array(True), "trip count"),             # truncated to 3 before
    (np.int64(3), np.zeros(0, bool), "condition"),             # IndexError before
    (np.int64(3), np.array([True, False]), "condition"),
])
def test_a_loop_trip_count_or_condition_not_one_value_is_refused(M, cond, what):
    m, feeds = loop_model(M=M, cond=cond), {"x": rand(2, 3)}
    if M.size and cond.size:  # onnxruntime 1.x crashes (SIGSEGV) on an empty trip count or condition
        assert ort_refuses(m, feeds)
    e = engine_error(m, feeds)
    assert e is not None and "Loop" in str(e) and what in str(e), e
