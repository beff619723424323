"""Erf, Gelu (opset 20), PRelu and BatchNormalization (inference mode): against onnxruntime
on random non-symmetric data, NaN and infinities included; streams through them equal the
whole run; what they cannot compute exactly is refused naming the node."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.errors import NotStreamableError

F = TensorProto.FLOAT
rng = np.random.default_rng(2024)


def one_node(op, xshape, inits=(), attrs=None, opset=17, outs=("y",), name="n", sym=None):
    shape = list(xshape)
    for axis in sym or ():
        shape[axis] = "T"
    node = helper.make_node(op, ["x"] + [n for n, _ in inits], list(outs), name=name, **(attrs or {}))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, shape)],
                          [helper.make_tensor_value_info(o, F, None) for o in outs],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 20 else 8
    return m


def check(m, x):
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    gm = rnnengine.convert(m)
    got = gm.run({"x": x})[m.graph.output[0].name]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert max_violation(got[ok], want[ok]) <= 1.0, float(np.abs(got[ok] - want[ok]).max())
    return gm, got


def data(shape, scale=3.0):
    x = (rng.standard_normal(shape) * scale + 0.3).astype(np.float32)
    flat = x.reshape(-1)
    if flat.size >= 6:
        flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 40.0]
    return x


def test_erf():
    check(one_node("Erf", (4, 50)), data((4, 50)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    check(one_node("Gelu", (3, 40), attrs={"approximate": approximate}, opset=20), data((3, 40)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_near_the_top_of_float32(approximate):
    """(0.5 x)(1 + ...), onnxruntime's order: x (1 + ...) first overflows above 1.7e38."""
    x = np.array([[1.6e38, 1.8e38, 2e38, 3.4e38, -3.4e38, 1e-30]], np.float32)
    _, got = check(one_node("Gelu", (1, 6), attrs={"approximate": approximate}, opset=20), x)
    assert np.isfinite(got[0, :4]).all()


def test_gelu_unknown_approximation_refused():
    m = one_node("Gelu", (3, 4), attrs={"approximate": "fast"}, opset=20, name="g1")
    with pytest.raises(rnnengine.UnsupportedError, match="g1.*approximate='fast'"):
        rnnengine.convert(m).run({"x": np.ones((3, 4), np.float32)})


@pytest.mark.parametrize("slope_shape", [(1,), (5, 1), (5, 7), (7,), ()])
def test_prelu(slope_shape):
    slope = (rng.standard_normal(slope_shape) * 0.5).astype(np.float32)
    check(one_node("PRelu", (2, 5, 7), [("s", slope)]), data((2, 5, 7)))


def test_prelu_slope_that_grows_x_is_refused():
    m = one_node("PRelu", (5,), [("s", np.ones((2, 5), np.float32))], name="p1")
    with pytest.raises(rnnengine.UnsupportedError, match="p1.*does not broadcast to X"):
        rnnengine.convert(m).run({"x": np.ones(5, np.float32)})


def bn_inits(C):
    return [("s", rng.uniform(0.5, 2, C).astype(np.float32)), ("b", rng.standard_normal(C).astype(np.float32)),
            ("mean", rng.standard_normal(C).astype(np.float32)), ("var", rng.uniform(0.1, 3, C).astype(np.float32))]


@pytest.mark.parametrize("opset,xshape", [(9, (2, 4, 9)), (14, (2, 4)), (15, (3, 4, 9)), (15, (1, 4, 2, 5))])
def test_batchnorm(opset, xshape):
    check(one_node("BatchNormalization", xshape, bn_inits(4), attrs={"epsilon": 1e-3}, opset=opset), data(xshape))


def test_batchnorm_large_running_mean_rounds_as_onnxruntime():
    """b = B - mean * a cancels when X sits near a large mean: a and b must be rounded as
    onnxruntime rounds them (float32 steps), not computed in float64 (5e-4 off before)."""
    inits = [("s", np.array([0.7], np.float32)), ("b", np.array([0.1], np.float32)),
             ("mean", np.array([12345.6], np.float32)), ("var", np.array([1.7], np.float32))]
    x = np.array([[[12345.6, 12345.601, 12345.599, 12346.0]]], np.float32)
    _, got = check(one_node("BatchNormalization", (1, 1, 4), inits, opset=15), x)


def test_batchnorm_training_mode_refused():
    m = one_node("BatchNormalization", (2, 4, 3), bn_inits(4), attrs={"training_mode": 1}, opset=15, name="bn1")
    with pytest.raises(rnnengine.UnsupportedError, match="bn1.*training_mode=1"):
        rnnengine.convert(m).run({"x": np.ones((2, 4, 3), np.float32)})


def test_batchnorm_wrong_statistics_shape_refused():
    inits = bn_inits(4)
    inits[3] = ("var", np.ones(5, np.float32))
    m = one_node("BatchNormalization", (2, 4, 3), inits, opset=15, name="bn2")
    with pytest.raises(rnnengine.UnsupportedError, match=r"bn2.*var must be float32 of shape \(4,\)"):
        rnnengine.convert(m).run({"x": np.ones((2, 4, 3), np.float32)})


def conv_bn_prelu_gru(opset=15):
    """(B, C=3, T) -> Conv1d(k=3, pad 1) -> BatchNormalization -> PRelu (per channel)
    -> Transpose to (T, B, 8) -> GRU -> Y (T, 1, B, 6) -> erf(Y / sqrt 2) + 1 (GELU's chain)."""
    r = np.random.default_rng(5)
    C, M, H = 3, 8, 6
    inits = [("w", r.standard_normal((M, C, 3)).astype(np.float32) * 0.4), ("cb", r.standard_normal(M).astype(np.float32)),
             ("slope", (r.standard_normal((M, 1)) * 0.3).astype(np.float32)),
             ("W", r.standard_normal((1, 3 * H, M)).astype(np.float32) * 0.4),
             ("R", r.standard_normal((1, 3 * H, H)).astype(np.float32) * 0.4),
             ("half", np.array(0.7071067, np.float32)), ("one", np.array(1.0, np.float32))]
    inits += bn_inits(M)
    nodes = [helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "mean", "var"], ["n"], name="bn"),
             helper.make_node("PRelu", ["n", "slope"], ["p"]),
             helper.make_node("Transpose", ["p"], ["t"], perm=[2, 0, 1]),
             helper.make_node("GRU", ["t", "W", "R"], ["Y"], hidden_size=H),
             helper.make_node("Mul", ["Y", "half"], ["yh"]),
             helper.make_node("Erf", ["yh"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", C, "T"])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_conv_batchnorm_prelu_gru_erf_streams_as_the_whole_run(chunk):
    m = conv_bn_prelu_gru()
    x = np.random.default_rng(6).standard_normal((2, 3, 20)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})["y"]
    assert max_violation(whole, want) <= 1.0
    s = gm.stream()
    parts = [s({"x": x[:, :, t:t + chunk]})["y"] for t in range(0, 20, chunk)]
    parts.append(s.finish()["y"])
    np.testing.assert_array_equal(np.concatenate(parts, axis=0), whole)


def test_batchnorm_whose_channels_are_time_is_not_streamable():
    """A GRU's Y (T, 1, B, H) moved to (B, T, H): BatchNormalization's channel axis 1 is then
    time, its statistics one per step of the exported length. Refused (the time axis is
    undecidable there, or the rule refuses the channel axis on time)."""
    r = np.random.default_rng(3)
    H, T = 4, 5
    inits = [("W", r.standard_normal((1, 3 * H, 2)).astype(np.float32)),
             ("R", r.standard_normal((1, 3 * H, H)).astype(np.float32)), ("ax", np.array([1], np.int64))]
    inits += bn_inits(T)
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "ax"], ["y3"]),
             helper.make_node("Transpose", ["y3"], ["bt"], perm=[1, 0, 2]),
             helper.make_node("BatchNormalization", ["bt", "s", "b", "mean", "var"], ["y"], name="bn3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["T", "B", 2])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    x = np.random.default_rng(1).standard_normal((T, 2, 2)).astype(np.float32)
    gm, _ = check(m, x)
    with pytest.raises(NotStreamableError):
        gm.stream()({"x": x})


@pytest.mark.parametrize("attrs", [{}, {"alpha": 1.2, "gamma": 0.9}])
def test_selu(attrs):
    check(one_node("Selu", (3, 30), attrs=attrs), data((3, 30)))


@pytest.mark.parametrize("xshape", [(2, 3, 7), (2, 3, 4, 5)])
def test_global_average_pool(xshape):
    check(one_node("GlobalAveragePool", xshape), data(xshape))


def lstm_then(op_nodes, out, H=4):
    r = np.random.default_rng(12)
    inits = [("W", r.standard_normal((1, 4 * H, 2)).astype(np.float32)),
             ("R", r.standard_normal((1, 4 * H, H)).astype(np.float32)), ("perm_any", np.array([0], np.int64))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=H)] + op_nodes
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["T", "B", 2])],
                          [helper.make_tensor_value_info(out, F, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_global_pool_over_features_streams_and_over_time_is_refused():
    x = np.random.default_rng(2).standard_normal((8, 3, 2)).astype(np.float32)
    # Y (T, 1, B, H): GlobalAveragePool over (B, H) per step -> (T, 1, 1, 1): streams
    m = lstm_then([helper.make_node("GlobalAveragePool", ["Y"], ["y"])], "y")
    gm, whole = check(m, x)
    s = gm.stream()
    np.testing.assert_array_equal(np.concatenate([s({"x": x[t:t + 3]})["y"] for t in range(0, 8, 3)]), whole)
    # Y moved to (1, B, H, T): pooled over (H, T), time included
    m = lstm_then([helper.make_node("Transpose", ["Y"], ["yt"], perm=[1, 2, 3, 0]),
                   helper.make_node("GlobalAveragePool", ["yt"], ["y"], name="gp_time")], "y")
    gm, _ = check(m, x)
    with pytest.raises(NotStreamableError, match="gp_time.*time"):
        gm.stream()({"x": x[:3]})


def test_hardswish_and_mish():
    check(one_node("HardSwish", (3, 30), opset=14), data((3, 30)))
    check(one_node("Mish", (3, 30), opset=18), data((3, 30)))


@pytest.mark.parametrize("op", ["ReduceSumSquare", "ReduceL1", "ReduceL2"])
@pytest.mark.parametrize("opset,keep", [(13, 1), (18, 0)])
def test_reduce_norms(op, opset, keep):
    x = data((3, 4, 5))
    x[np.isinf(x)] = 7.0  # (infinities: inf both ways; NaN kept)
    if opset < 18:
        m = one_node(op, (3, 4, 5), attrs={"axes": [-1], "keepdims": keep}, opset=opset)
    else:
        m = one_node(op, (3, 4, 5), [("axes", np.array([1, 2], np.int64))], attrs={"keepdims": keep}, opset=opset)
    check(m, x)


@pytest.mark.parametrize("xshape", [(2, 3, 9), (1, 4, 2, 5)])
def test_instance_normalization(xshape):
    C = xshape[1]
    inits = [("s", rng.uniform(0.5, 2, C).astype(np.float32)), ("b", rng.standard_normal(C).astype(np.float32))]
    x = (rng.standard_normal(xshape) * 2 + 1).astype(np.float32)
    check(one_node("InstanceNormalization", xshape, inits, attrs={"epsilon": 1e-3}), x)


def test_instance_normalization_over_time_is_not_streamable():
    """(B, C, T) as nn.InstanceNorm1d sees a sequence: statistics over time."""
    C = 3
    inits = [("s", np.ones(C, np.float32)), ("b", np.zeros(C, np.float32))]
    m = one_node("InstanceNormalization", (2, C, 6), inits, sym=[2], name="inorm")
    x = rng.standard_normal((2, C, 6)).astype(np.float32)
    gm, _ = check(m, x)
    with pytest.raises(NotStreamableError):
        s = gm.stream()
        s({"x": x[:, :, :3]})


def test_l2_normalised_features_stream_as_the_whole_run():
    """F.normalize(lstm(x), dim=-1) as the legacy exporter writes it: ReduceL2 over the
    features (keepdims), Clip, Expand, Div."""
    m = lstm_then([helper.make_node("ReduceL2", ["Y"], ["n"], axes=[-1], keepdims=1),
                   helper.make_node("Div", ["Y", "n"], ["y"])], "y")
    x = np.random.default_rng(4).standard_normal((7, 2, 2)).astype(np.float32)
    gm, whole = check(m, x)
    s = gm.stream()
    np.testing.assert_array_equal(np.concatenate([s({"x": x[t:t + 2]})["y"] for t in range(0, 7, 2)]), whole)


@pytest.mark.parametrize("op,attrs", [("GlobalAveragePool", {}), ("ReduceMean", {"axes": [-1]}),
                                      ("ReduceSum", {"axes": [1, 2]})])
def test_sums_over_the_innermost_axes_are_correctly_rounded(op, attrs):
    """Rows far from zero: the sum / mean of each row in double, rounded once (a float32
    running sum errs by up to ~n ulps of the partial sums; x - mean then magnifies it).
    Checked against NumPy's float64 sum rounded to float32; onnxruntime's own float32 sum can
    differ from it by an ulp, which a graph computing x - mean amplifies (README)."""
    x = (1000.0 + np.random.default_rng(3).standard_normal((3, 4, 64))).astype(np.float32)
    opset = 11 if op == "ReduceSum" else 17
    m = one_node(op, x.shape, attrs=attrs, opset=opset)
    got = rnnengine.convert(m).run({"x": x})["y"]
    axes = (2,) if op != "ReduceSum" else (1, 2)
    s = x.astype(np.float64).sum(axis=axes, keepdims=True)
    want = (s / x.shape[2] if op != "ReduceSum" else s).astype(np.float32)
    np.testing.assert_array_equal(got, want)
