"""Single ops that answered differently from onnxruntime without an error (a read-only review
of the op handlers, twelfth session), on both of rnnengine's paths: the input fed at run time
(the C executor) and the same input as an initializer (folded at conversion by the handler's
NumPy eval). Each now equals onnxruntime or is refused by name."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from rnnengine.verify import ort_session

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _single(op, x, attrs=None, consts=None, const_x=False, opset=13, out_types=(F,), n_out=1, extra_nodes=()):
    """op(x, *consts) -> y (and y1, ...), x a graph input or (const_x) an initializer."""
    consts = consts or {}
    outs = [f"y{k}" if k else "y" for k in range(n_out)]
    nodes = [helper.make_node(op, ["x"] + list(consts), outs, **(attrs or {}))] + list(extra_nodes)
    final = [n.output[0] for n in extra_nodes] or outs
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    if const_x:
        inits.append(numpy_helper.from_array(x, "x"))
    g = helper.make_graph(nodes, "g", [] if const_x else [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)],
                          [helper.make_tensor_value_info(o, t, None) for o, t in zip(final, out_types)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m, ({} if const_x else {"x": x})


def _agree_or_refuse(m, feeds):
    """rnnengine equals onnxruntime (NaN where it is NaN) or refuses with its own error."""
    want = ort_session(m).run(None, feeds)
    try:
        got = rnnengine.convert(m).run(feeds)
    except rnnengine.RnnEngineError:
        return None
    for o, w in zip([o.name for o in m.graph.output], want):
        g = got[o]
        assert g.shape == w.shape, (o, g.shape, w.shape)
        if w.dtype.kind == "f":
            assert np.allclose(g, w, rtol=1e-6, atol=0, equal_nan=True) and \
                np.array_equal(np.signbit(g[g == 0]), np.signbit(w[w == 0])), (o, g, w)
        else:
            assert np.array_equal(g, w), (o, g, w)
    return got


@pytest.mark.parametrize("const_x", [False, True])
def test_scatter_elements_with_indices_narrower_than_the_data(const_x):
    # folded: np.put_along_axis stretched (1, 3) indices over all 3 rows of the (3, 4) data
    m, feeds = _single("ScatterElements", np.arange(12, dtype=np.float32).reshape(3, 4), {"axis": 1},
                       {"i": np.array([[0, 3, 1]], np.int64), "u": np.array([[-1, -2, -3]], np.float32)}, const_x)
    assert _agree_or_refuse(m, feeds) is not None


def test_cast_of_floats_to_uint32_and_uint64():
    # folded: through int32, 3e9 -> uint32 gave 2147483648; out of range is undefined: refused
    for to in (TensorProto.UINT32, TensorProto.UINT64):
        for x, refused in ((np.array([3e9, 1.7, 2.0 ** 31, 0.5], np.float32), False),
                           (np.array([3e9, np.nan], np.float32), True), (np.array([-5.0], np.float32), True)):
            m, feeds = _single("Cast", x, {"to": to}, const_x=True, out_types=(I64,),
                               extra_nodes=[helper.make_node("Cast", ["y"], ["z"], to=I64)])
            if refused:
                with pytest.raises(rnnengine.RnnEngineError, match="out of range"):
                    rnnengine.convert(m)
            else:
                assert _agree_or_refuse(m, feeds) is not None


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_pow_is_onnxruntime_s_or_refused(dtype):
    # folded: NumPy's exact wrapping power; onnxruntime converts a double pow back (3**39 differs
    # in the last digits, 3**40 is INT64_MIN there): exact below 2**53, refused beyond
    for base, exps, refused in ((3, [0, 1, 5, 19, -1, 2], False), (3, [39], True), (3, [21], dtype == np.int32)):
        m, feeds = _single("Pow", np.full(len(exps), base, dtype), consts={"e": np.array(exps, dtype)}, const_x=True,
                           out_types=(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),))
        if refused:
            with pytest.raises(rnnengine.RnnEngineError, match="2\\*\\*53"):
                rnnengine.convert(m)
        else:
            assert _agree_or_refuse(m, feeds) is not None


@pytest.mark.parametrize("const_x", [False, True])
def test_float_pow_of_minus_inf_and_minus_zero_to_a_half(const_x):
    # folded: NumPy takes a one-element exponent of 0.5 for sqrt: sqrt(-inf) = NaN, sqrt(-0) = -0
    for x in (np.array([-np.inf, 4.0, -0.0], np.float32), np.array([-np.inf], np.float32)):
        m, feeds = _single("Pow", x, consts={"e": np.array([0.5], np.float32)}, const_x=const_x)
        assert _agree_or_refuse(m, feeds) is not None


@pytest.mark.parametrize("const_x", [False, True])
def test_topk_unsorted_is_refused(const_x):
    m, feeds = _single("TopK", np.array([[5, 1, 4, 2, 8, 3]], np.float32), {"axis": -1, "sorted": 0},
                       {"k": np.array([3], np.int64)}, const_x, out_types=(F, I64), n_out=2)
    with pytest.raises(rnnengine.UnsupportedError, match="sorted = 0"):
        rnnengine.convert(m).run(feeds)
    m, feeds = _single("TopK", np.array([[5, 1, 4, 2, 8, 3]], np.float32), {"axis": -1, "sorted": 0},
                       {"k": np.array([1], np.int64)}, const_x, out_types=(F, I64), n_out=2)
    assert _agree_or_refuse(m, feeds) is not None   # one result has one order


@pytest.mark.parametrize("const_x", [False, True])
def test_squeeze_with_an_empty_axes_input_is_refused(const_x):
    # onnxruntime's Squeeze kernel squeezes every unit axis for an empty axes input, its graph
    # optimiser (default session options) none: rnnengine squeezed nothing, then (review of
    # the first fix) every axis; neither is the answer, so it refuses
    x = np.random.default_rng(0).standard_normal((1, 3, 1, 2)).astype(np.float32)
    m, feeds = _single("Squeeze", x, consts={"axes": np.zeros(0, np.int64)}, const_x=const_x)
    with pytest.raises(rnnengine.UnsupportedError, match="empty axes"):
        rnnengine.convert(m).run(feeds)
    m, feeds = _single("Squeeze", x, const_x=const_x)   # no axes input: every unit axis
    got = _agree_or_refuse(m, feeds)
    assert got is not None and got["y"].shape == (3, 2)


@pytest.mark.parametrize("const_x", [False, True])
def test_gemm_with_beta_zero_does_not_read_c(const_x):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((2, 4)).astype(np.float32)
    c[0, :2] = np.nan
    m, feeds = _single("Gemm", rng.standard_normal((2, 3)).astype(np.float32), {"beta": 0.0},
                       {"B": rng.standard_normal((3, 4)).astype(np.float32), "C": c}, const_x)
    got = _agree_or_refuse(m, feeds)
    assert got is not None and not np.isnan(got["y"]).any()


def test_split_and_flatten_that_onnxruntime_refuses_are_refused():
    x = np.zeros((6, 2), np.float32)
    m, feeds = _single("Split", x, {"axis": 0, "num_outputs": 2}, opset=18, n_out=3, out_types=(F, F, F))
    with pytest.raises(rnnengine.RnnEngineError, match="num_outputs"):
        rnnengine.convert(m).run(feeds)
    m, feeds = _single("Split", x, {"axis": 0}, opset=18, n_out=2, out_types=(F, F))
    with pytest.raises(rnnengine.RnnEngineError, match="num_outputs"):
        rnnengine.convert(m).run(feeds)
    m, feeds = _single("Flatten", np.zeros((2, 3, 4), np.float32), {"axis": 4})
    with pytest.raises(rnnengine.RnnEngineError, match="out of range"):
        rnnengine.convert(m).run(feeds)


@pytest.mark.parametrize("const_x", [False, True])
def test_reduce_max_keeps_a_nan_wherever_it_sits(const_x):
    # a deliberate departure: NaN propagates as in NumPy and PyTorch; onnxruntime 1.32 gives
    # NaN for a row only when the NaN comes first ([1, NaN, 3, 2] -> 3, [NaN, 1, 2, 3] -> NaN)
    x = np.array([[1, np.nan, 3, 2], [np.nan, 1, 2, 3], [1, 2, 3, 4]], np.float32)
    for op, ref in (("ReduceMax", np.max), ("ReduceMin", np.min)):
        m, feeds = _single(op, x, {"axes": [1], "keepdims": 0}, const_x=const_x)
        got = rnnengine.convert(m).run(feeds)["y"]
        assert np.array_equal(got, ref(x, axis=1), equal_nan=True)
        try:
            import torch   # (the main CI installs it; the sanitizer build's venv does not)
        except ImportError:
            continue
        assert np.array_equal(got, getattr(torch, op[6:].lower())(torch.from_numpy(x), dim=1).values.numpy(),
                              equal_nan=True)
