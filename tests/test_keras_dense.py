"""A Dense layer on a sequence as tf2onnx writes it (Keras' Tensordot): Reshape(x, [-1, K]) ->
MatMul(W) -> Reshape(Shape(x)[:2] + [N]). The converter marks the first Reshape so that it
checks its target and passes x on (rnnengine/frontend/converter.py _unflatten_matmuls):
the MatMul computes the same rows from x itself, and the time axis stays an axis of its
own: whole runs equal onnxruntime, streams equal the whole run, and where the rewrite would
change the meaning (rows that are not x's last axis) the marked Reshape refuses instead."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation

F = TensorProto.FLOAT
I, H, N = 3, 5, 4


def tensordot_model(feature_dim=H, second_target=None, extra_reader=False, computed_rows=False):
    """x (B, T, I) -> LSTM (time-major inside, as tf2onnx) -> (B, T, H) -> Dense(N) written as
    Tensordot. second_target: replaces the computed Shape(x)[:2] + [N] by a constant."""
    r = np.random.default_rng(3)
    inits = {"W": r.standard_normal((1, 4 * H, I)).astype(np.float32) * 0.5,
             "R": r.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.5,
             "one": np.array([1], np.int64), "flat": np.array([-1, feature_dim], np.int64),
             "free": np.array([0, 1], np.int64), "n": np.array([N], np.int64),
             "Wd": r.standard_normal((feature_dim, N)).astype(np.float32),
             "bd": r.standard_normal(N).astype(np.float32)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "one"], ["y3"]),
             helper.make_node("Transpose", ["y3"], ["seq"], perm=[1, 0, 2])]
    src = "seq"
    if feature_dim != H:  # (B, T, H) viewed as (B, T * H / feature_dim, feature_dim)
        inits["view"] = np.array([0, -1, feature_dim], np.int64)
        nodes.append(helper.make_node("Reshape", ["seq", "view"], ["seqv"]))
        src = "seqv"
    nodes += [helper.make_node("Shape", [src], ["shp"]),
              helper.make_node("Gather", ["shp", "free"], ["lead"], axis=0),
              helper.make_node("Concat", ["lead", "n"], ["target"], axis=0),
              helper.make_node("Reshape", [src, "rowshape" if computed_rows else "flat"], ["rows"], name="td_reshape"),
              helper.make_node("MatMul", ["rows", "Wd"], ["prod"], name="td_matmul"),
              helper.make_node("Reshape", ["prod", "target" if second_target is None else "fixed"], ["back"]),
              helper.make_node("Add", ["back", "bd"], ["y"])]
    if computed_rows:  # as tf2onnx writes it when shapes are unknown: [prod(dims free), prod(dims axes)]
        inits["axes"] = np.array([2], np.int64)
        nodes[-4:-4] = [helper.make_node("Gather", ["shp", "axes"], ["dk"], axis=0),
                        helper.make_node("ReduceProd", ["lead"], ["nrows"], keepdims=1),
                        helper.make_node("ReduceProd", ["dk"], ["ncols"], keepdims=1),
                        helper.make_node("Concat", ["nrows", "ncols"], ["rowshape"], axis=0)]
    outs = ["y"]
    if second_target is not None:
        inits["fixed"] = np.asarray(second_target, np.int64)
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["rows"], ["rowsum"], keepdims=0))
        outs.append("rowsum")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", "T", I])],
                          [helper.make_tensor_value_info(o, F, None) for o in outs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def ort_run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_dense_on_a_sequence_streams_as_the_whole_run(chunk):
    m = tensordot_model()
    x = np.random.default_rng(4).standard_normal((2, 9, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    flat = next(n for n in gm.graph["nodes"] if n["outputs"] == ["rows"])
    assert flat["attrs"].get("rnnengine_rows_view") == 1  # passes the sequence on, checked
    assert next(n for n in gm.graph["nodes"] if n["outputs"] == ["back"])["attrs"].get("rnnengine_rows_view") == 2
    whole = gm.run({"x": x})["y"]
    assert max_violation(whole, ort_run(m, {"x": x})[0]) <= 1.0
    s = gm.stream()
    parts = [s({"x": x[:, t:t + chunk]})["y"] for t in range(0, 9, chunk)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("chunk", [1, 4])
def test_rows_computed_from_the_shape_stream_too(chunk, tmp_path):
    m = tensordot_model(computed_rows=True)
    x = np.random.default_rng(8).standard_normal((3, 8, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})["y"]
    assert max_violation(whole, ort_run(m, {"x": x})[0]) <= 1.0
    s = gm.stream()
    parts = [s({"x": x[:, t:t + chunk]})["y"] for t in range(0, 8, chunk)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    path = str(tmp_path / "td.rnne")  # the mark is stored and read back (docs/FORMAT.md)
    rnnengine.save(gm, path)
    np.testing.assert_array_equal(rnnengine.load(path).run({"x": x})["y"], whole)


def test_rows_that_are_not_the_last_axis_are_refused_not_regrouped():
    """Rows of K = x's last axis: the mark holds (equal to onnxruntime). Rows of K = twice
    x's last axis regroup two steps' features into one row: onnxruntime computes that; the
    marked Reshape refuses it, naming itself (never a different answer)."""
    m = tensordot_model(feature_dim=H)
    x = np.random.default_rng(5).standard_normal((2, 4, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    assert max_violation(gm.run({"x": x})["y"], ort_run(m, {"x": x})[0]) <= 1.0
    # flat target [-1, 2H] over (B, T, H): rows of two steps; the second Reshape a constant (2, 2, N)
    r = tensordot_model(second_target=[2, 2, N])
    for init in r.graph.initializer:
        if init.name == "flat":
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 2 * H], np.int64), "flat"))
        if init.name == "Wd":
            init.CopyFrom(numpy_helper.from_array(
                np.random.default_rng(6).standard_normal((2 * H, N)).astype(np.float32), "Wd"))
    ort_run(r, {"x": x})  # onnxruntime runs it
    with pytest.raises(rnnengine.UnsupportedError, match="td_reshape.*not the rows of the last axis"):
        rnnengine.convert(r).run({"x": x})


def test_flattened_rows_read_elsewhere_are_left_alone():
    m = tensordot_model(extra_reader=True)
    x = np.random.default_rng(7).standard_normal((2, 5, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    assert not any(n["attrs"].get("rnnengine_rows_view") for n in gm.graph["nodes"])
    got = gm.run({"x": x})
    for name, w in zip(("y", "rowsum"), ort_run(m, {"x": x})):
        assert max_violation(got[name], w) <= 1.0, name


def test_a_zero_in_the_second_target_that_reads_the_product_shape_is_refused():
    """Reshape(prod, [0, -1]) copies dimension 0 of its input: rows in the original, B after
    the mark; the marked Reshape refuses rather than give (B, T * N) for (rows, N)."""
    m = tensordot_model(second_target=[0, -1])
    x = np.random.default_rng(9).standard_normal((2, 3, I)).astype(np.float32)
    assert ort_run(m, {"x": x})[0].shape == (6, N)
    with pytest.raises(rnnengine.UnsupportedError, match="reads the dimensions of the"):
        rnnengine.convert(m).run({"x": x})


def test_a_chunk_with_no_steps_passes_through_the_dense():
    m = tensordot_model()
    x = np.random.default_rng(10).standard_normal((2, 6, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})["y"]
    s = gm.stream()
    parts = [s({"x": x[:, :3]})["y"], s({"x": x[:, 3:3]})["y"], s({"x": x[:, 3:]})["y"]]
    assert parts[1].shape == (2, 0, N)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_a_constant_target_that_is_not_rows_is_left_unmarked():
    """[1, -1, K] keeps a leading 1: not the pattern, the graph runs as written."""
    m = tensordot_model()
    for init in m.graph.initializer:
        if init.name == "flat":
            init.CopyFrom(numpy_helper.from_array(np.array([1, -1, H], np.int64), "flat"))
    x = np.random.default_rng(11).standard_normal((2, 4, I)).astype(np.float32)
    gm = rnnengine.convert(m)
    assert not any(n["attrs"].get("rnnengine_rows_view") for n in gm.graph["nodes"])
    assert max_violation(gm.run({"x": x})["y"], ort_run(m, {"x": x})[0]) <= 1.0


@pytest.mark.parametrize("mark", [1, 2, 3, True, -1])
def test_a_weight_file_mark_outside_the_pattern_is_refused(tmp_path, mark):
    """rnnengine_rows_view written by hand on a Reshape -> Softmax: passing the input on
    would give (2, 3, 4) for (6, 4); the file is refused when loaded."""
    nodes = [helper.make_node("Reshape", ["x", "t"], ["r"], name="r"),
             helper.make_node("Softmax", ["r"], ["y"], axis=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", 3, 4])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(np.array([6, 4], np.int64), "t")])
    mo = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mo.ir_version = 8
    gm = rnnengine.convert(mo)
    next(n for n in gm.graph["nodes"] if n["name"] == "r").setdefault("attrs", {})["rnnengine_rows_view"] = mark
    path = str(tmp_path / "edited.rnne")
    rnnengine.save(gm, path)
    with pytest.raises(rnnengine.FormatError, match="rnnengine_rows_view"):
        rnnengine.load(path)
