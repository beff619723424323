"""LayerNormalization (opset 17): the handler (rnnengine/ops/handlers.py), the C kernel
(src_c/graph.c LAYERNORM) and its verifier, the stream rule and the thread-split rule.

Compared with onnxruntime on random, non-symmetric data over axes, Scale / B broadcasts,
the optional Mean / InvStdDev outputs, epsilon, NaN and infinities, rows far from zero
(also against NumPy and onnx.reference) and rows beyond float32's squares."""
import os

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine import _core
from rnnengine.codes import OP_LAYERNORM
from rnnengine.errors import NotStreamableError

F = TensorProto.FLOAT


def ln_model(xshape, sshape, bshape=None, axis=-1, outs=1, eps=1e-5, scale=None, bias=None, stash=None,
             runtime_scale=False, time_axis=None, seed=1):
    """One LayerNormalization node; Scale / B initializers (random unless given), or Scale a
    graph input (runtime_scale). time_axis: that axis of x declared symbolic ("T")."""
    r = np.random.default_rng(seed)
    S = r.standard_normal(sshape).astype(np.float32) if scale is None else scale
    B = None if bshape is None else (r.standard_normal(bshape).astype(np.float32) if bias is None else bias)
    shape = list(xshape)
    if time_axis is not None:
        shape[time_axis] = "T"
    ins = [helper.make_tensor_value_info("x", F, shape)]
    inits = []
    if runtime_scale:
        ins.append(helper.make_tensor_value_info("s", F, list(sshape)))
    else:
        inits.append(numpy_helper.from_array(S, "s"))
    names = ["x", "s"]
    if B is not None:
        inits.append(numpy_helper.from_array(B, "b"))
        names.append("b")
    out_names = ["y", "mean", "inv_std"][:outs]
    kw = {"axis": axis, "epsilon": eps}
    if stash is not None:
        kw["stash_type"] = stash
    node = helper.make_node("LayerNormalization", names, out_names, name="ln", **kw)
    g = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info(o, F, None) for o in out_names], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, S, B


def numpy_layernorm(x, s, b, axis, eps):
    """The ONNX function's definition in float64: two-pass variance."""
    axes = tuple(range(axis % x.ndim, x.ndim))
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    d = xd - mean
    inv = 1.0 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + np.float64(np.float32(eps)))
    y = d * inv * s
    if b is not None:
        y = y + b
    return y, mean, inv


def ort_run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def check_vs_ort(m, feeds):
    want = ort_run(m, feeds)
    gm = rnnengine.convert(m)
    got = gm.run(feeds)
    for o, w in zip(m.graph.output, want):
        g = got[o.name]
        assert g.shape == w.shape and g.dtype == w.dtype, (o.name, g.shape, w.shape)
        assert max_violation(g, w) <= 1.0, (o.name, float(np.abs(g - w).max()))
    return gm, got


CASES = [  # (x shape, Scale shape, B shape or None, axis, outputs)
    ((2, 5, 16), (16,), (16,), -1, 1),
    ((2, 5, 16), (16,), None, -1, 3),
    ((3, 4, 6), (4, 6), (6,), -2, 3),       # over the last two axes
    ((3, 4, 6), (6,), (1,), 1, 1),          # Scale broadcast along the normalised axis 1
    ((3, 4, 6), (3, 1, 1), (4, 1), 1, 1),   # a different Scale per row: applied by broadcast
    ((3, 4, 6), (3, 4, 6), (3, 4, 6), -1, 2),
    ((3, 4, 6), (), None, 0, 3),            # over everything; a scalar Scale
    ((7, 1), (1,), (1,), -1, 3),            # rows of one element: y = B exactly
    ((0, 4), (4,), (4,), -1, 3),            # no rows
]


@pytest.mark.parametrize("xshape,sshape,bshape,axis,outs", CASES)
def test_matches_onnxruntime(xshape, sshape, bshape, axis, outs):
    m, _, _ = ln_model(xshape, sshape, bshape, axis, outs)
    x = (np.random.default_rng(7).standard_normal(xshape) * 2.5 + 0.7).astype(np.float32)
    check_vs_ort(m, {"x": x})


def test_runtime_scale_matches_onnxruntime():
    m, _, _ = ln_model((4, 3, 8), (8,), (8,), runtime_scale=True)
    r = np.random.default_rng(3)
    check_vs_ort(m, {"x": r.standard_normal((4, 3, 8)).astype(np.float32),
                     "s": r.standard_normal(8).astype(np.float32)})


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_property_random_shapes_axes_and_broadcasts(data):
    rank = data.draw(st.integers(1, 4))
    xshape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = data.draw(st.integers(-rank, rank - 1))

    def operand():  # a shape that broadcasts to X's without growing it
        k = data.draw(st.integers(0, rank))
        return tuple(d if data.draw(st.booleans()) else 1 for d in xshape[rank - k:])
    bshape = operand() if data.draw(st.booleans()) else None
    eps = data.draw(st.sampled_from([1e-5, 1e-12, 0.1, 3.0]))
    outs = data.draw(st.integers(1, 3))
    m, _, _ = ln_model(xshape, operand(), bshape, axis, outs, eps=eps, seed=data.draw(st.integers(0, 99)))
    x = np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal(xshape).astype(np.float32) * 3 - 1
    check_vs_ort(m, {"x": x})


def test_rows_far_from_zero_follow_the_onnx_definition():
    """The mean is a float32 value (stash_type 1), so X - Mean carries its rounding: at an
    offset of 300 times the spread that rounding alone is above the tolerance, and
    onnxruntime, onnx.reference (the ONNX function run op by op in NumPy) and rnnengine agree."""
    from onnx.reference import ReferenceEvaluator
    x = (300.0 + np.random.default_rng(11).standard_normal((4, 64))).astype(np.float32)
    m, S, B = ln_model(x.shape, (64,), (64,), outs=3)
    ref = ReferenceEvaluator(m).run(None, {"x": x})
    theirs = ort_run(m, {"x": x})
    got = rnnengine.convert(m).run({"x": x})
    for name, want, w2 in zip(("y", "mean", "inv_std"), ref, theirs):
        assert max_violation(got[name], want) <= 1.0, (name, float(np.abs(got[name] - want).max()))
        assert max_violation(got[name], w2) <= 1.0, name


@pytest.mark.parametrize("offset,spread", [(1e3, 1.0), (1e4, 1.0), (1e3, 0.01), (1e5, 1.0)])
def test_ill_conditioned_rows_match_onnxruntime(offset, spread):
    """Rows 1e3 to 1e5 times their spread away from zero: rnnengine's correctly rounded float32
    mean and float64 second pass agree with onnxruntime 1.32 and with NumPy computing exactly
    that; onnx.reference's float32 ReduceMean carries its summation error into X - Mean (up
    to ~1800x the tolerance here), so it is no oracle for these rows."""
    x = (offset + spread * np.random.default_rng(11).standard_normal((4, 64))).astype(np.float32)
    m, S, B = ln_model(x.shape, (64,), (64,))
    xd = x.astype(np.float64)
    mean = xd.mean(axis=-1, keepdims=True).astype(np.float32).astype(np.float64)
    d = xd - mean
    want = d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + np.float64(np.float32(1e-5))) * S + B
    got = rnnengine.convert(m).run({"x": x})["y"]
    assert max_violation(got, want) <= 1.0, float(np.abs(got - want).max())
    assert max_violation(got, ort_run(m, {"x": x})[0]) <= 1.0


def test_rows_beyond_float32_squares_give_b_as_onnxruntime():
    """|x - mean| >= 1.9e19: D^2 leaves float32's range, Var is inf, InvStdDev 0, Y = B (and a
    row whose float32 sum overflows has an infinite mean: Y NaN) in onnxruntime and the
    definition; float64 arithmetic alone would give finite normalised values."""
    x = np.array([[1e38, -1e38, 1e38, -1e38], [2e19, -2e19, 0, 1], [1, 2, 3, 4]], np.float32)
    m, S, B = ln_model(x.shape, (4,), (4,), outs=3)
    want = ort_run(m, {"x": x})
    got = rnnengine.convert(m).run({"x": x})
    np.testing.assert_array_equal(got["y"][:2], np.broadcast_to(B, (2, 4)))
    np.testing.assert_array_equal(got["inv_std"][:2], np.zeros((2, 1), np.float32))
    for name, w in zip(("y", "mean", "inv_std"), want):
        assert max_violation(got[name], w) <= 1.0, name


def test_nan_and_infinity_make_their_row_nan_as_in_onnxruntime():
    """Y and InvStdDev as onnxruntime gives them; Mean of a row holding an infinity is that
    infinity (the ONNX definition, onnx.reference), where onnxruntime gives NaN."""
    from onnx.reference import ReferenceEvaluator
    x = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, 5], x[3, 6] = np.inf, -np.inf
    m, _, _ = ln_model(x.shape, (8,), (8,), outs=3)
    want = ort_run(m, {"x": x})
    want[1] = ReferenceEvaluator(m).run(None, {"x": x})[1]
    assert np.isposinf(want[1][2, 0])
    got = rnnengine.convert(m).run({"x": x})
    for o, w in zip(("y", "mean", "inv_std"), want):
        assert np.array_equal(np.isnan(got[o]), np.isnan(w)), o
        ok = ~np.isnan(w)
        assert np.array_equal(got[o][ok] == np.inf, w[ok] == np.inf), o
        fin = np.isfinite(w)
        assert max_violation(got[o][fin], w[fin]) <= 1.0, o
    assert np.isnan(got["y"][[1, 2, 3]]).all() and not np.isnan(got["y"][[0, 4]]).any()


def test_constant_input_is_folded_at_conversion_as_onnxruntime_computes_it():
    r = np.random.default_rng(4)
    x = r.standard_normal((3, 6)).astype(np.float32)
    s, b = r.standard_normal(6).astype(np.float32), r.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["c", "s", "b"], ["n"], axis=-1, epsilon=1e-3),
             helper.make_node("Add", ["x", "n"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [3, 6])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(a, n) for n, a in (("c", x), ("s", s), ("b", b))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    gm, _ = check_vs_ort(m, {"x": r.standard_normal((3, 6)).astype(np.float32)})
    assert not any(n["op"] == "LayerNormalization" for n in gm.graph["nodes"])  # folded


@pytest.mark.parametrize("kw,match", [
    ({"stash": 11}, "stash_type"),
    ({"axis": 3}, "axis 3 is out of range"),
    ({"sshape": (5,)}, r"Scale of shape \(5,\) does not broadcast"),
    ({"bshape": (2, 1, 1, 4)}, r"B of shape \(2, 1, 1, 4\) does not broadcast"),
    ({"xshape": (2, 0)}, "hold no element"),
])
def test_refused_with_the_node_named(kw, match):
    args = {"xshape": (2, 4), "sshape": (4,), "bshape": None, "axis": -1}
    stash = kw.pop("stash", None)
    args.update(kw)
    m, _, _ = ln_model(args["xshape"], args["sshape"], args["bshape"], args["axis"], stash=stash)
    x = np.ones(args["xshape"], np.float32)
    with pytest.raises(rnnengine.UnsupportedError, match=match) as info:
        rnnengine.convert(m).run({"x": x})
    assert "'ln'" in str(info.value) or "ln" in str(info.value)


def test_float16_input_is_refused_by_name():
    """float16 reaches the op only as a constant (the executor has no float16 tensors):
    folding it is refused, not computed in another precision than onnxruntime's."""
    r = np.random.default_rng(5)
    nodes = [helper.make_node("LayerNormalization", ["c", "s"], ["n"], name="ln16"),
             helper.make_node("Cast", ["n"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "f"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4])],
                          [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(r.standard_normal((2, 4)).astype(np.float16), "c"),
                           numpy_helper.from_array(np.ones(4, np.float16), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ort_run(m, {"x": np.ones((2, 4), np.float32)})  # a valid model
    with pytest.raises(rnnengine.UnsupportedError, match="ln16.*float16.*only float32"):
        rnnengine.convert(m)


# --- streams ----------------------------------------------------------------------------

def lstm_layernorm_model(H=6, I=3, ln_axis=-1, scale_shape=None):
    """LSTM (T, B, I) -> Y (T, 1, B, H) -> Squeeze -> LayerNorm over H (or another axis)."""
    r = np.random.default_rng(8)
    W = r.standard_normal((1, 4 * H, I)).astype(np.float32) * 0.5
    R = r.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.5
    Bb = r.standard_normal((1, 8 * H)).astype(np.float32) * 0.1
    sshape = scale_shape or (H,)
    S = r.standard_normal(sshape).astype(np.float32)
    Bn = r.standard_normal(H).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "one"], ["y"]),
             helper.make_node("LayerNormalization", ["y", "s", "bn"], ["z"], name="ln", axis=ln_axis)]
    inits = [numpy_helper.from_array(a, n) for n, a in
             (("W", W), ("R", R), ("B", Bb), ("one", np.array([1], np.int64)), ("s", S), ("bn", Bn))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["T", "B", I])],
                          [helper.make_tensor_value_info("z", F, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_stream_after_a_recurrent_layer_equals_the_whole_run(chunk):
    m = lstm_layernorm_model()
    x = np.random.default_rng(9).standard_normal((12, 2, 3)).astype(np.float32)
    gm, whole = check_vs_ort(m, {"x": x})
    s = gm.stream()
    parts = [s({"x": x[t:t + chunk]})["z"] for t in range(0, 12, chunk)]
    np.testing.assert_array_equal(np.concatenate(parts), whole["z"])


def test_normalising_over_time_is_not_streamable():
    m = lstm_layernorm_model(ln_axis=0)
    x = np.random.default_rng(9).standard_normal((5, 2, 3)).astype(np.float32)
    gm, _ = check_vs_ort(m, {"x": x})
    with pytest.raises(NotStreamableError, match="ln.*time axis"):
        gm.stream()({"x": x[:2]})


def test_scale_fixed_along_time_is_not_streamable():
    """Scale (5, 1, H): one value per time step of the exported length; a whole run of 5
    steps is what onnxruntime computes, but a stream's chunks would each start at row 0."""
    m = lstm_layernorm_model(scale_shape=(5, 1, 6))
    x = np.random.default_rng(9).standard_normal((5, 2, 3)).astype(np.float32)
    gm, _ = check_vs_ort(m, {"x": x})
    with pytest.raises(NotStreamableError):  # (the time axis cannot be told: no other length plans)
        gm.stream()({"x": x})


def test_threads_split_the_batch_rows_bit_for_bit(tmp_path):
    m = lstm_layernorm_model()
    x = np.random.default_rng(10).standard_normal((7, 8, 3)).astype(np.float32)
    one, two = rnnengine.convert(m), rnnengine.convert(m, threads=2)
    a, b = one.run({"x": x})["z"], two.run({"x": x})["z"]
    assert two.thread_split_reason is None
    np.testing.assert_array_equal(a, b)


def test_weight_file_round_trip(tmp_path):
    m = lstm_layernorm_model()
    x = np.random.default_rng(12).standard_normal((4, 2, 3)).astype(np.float32)
    gm = rnnengine.convert(m)
    path = os.path.join(tmp_path, "ln.rnne")
    rnnengine.save(gm, path)
    np.testing.assert_array_equal(rnnengine.load(path).run({"x": x})["z"], gm.run({"x": x})["z"])


# --- the C instruction and its verifier ------------------------------------------------------

W = _core.INSTR_WORDS


def ln_program(table, ins, outs, ip, fp=(1e-5,)):
    word = [OP_LAYERNORM] + [-1] * (W - 1)
    for k, t in enumerate(ins):
        word[1 + k] = t
    for k, t in enumerate(outs):
        word[5 + k] = t
    word[9], word[10], word[11], word[12] = 0, len(ip), 0, len(fp)
    return _core.Program(np.array(word, np.int64).reshape(1, W), np.array(ip, np.int64), np.array(fp, np.float32),
                         [], None, tensor_dtypes=[t for t, _ in table], tensor_counts=[n for _, n in table],
                         work_floats=0)


def test_instruction_computes_the_reference():
    r = np.random.default_rng(13)
    x = r.standard_normal((3, 5)).astype(np.float32)
    s, b = r.standard_normal(5).astype(np.float32), r.standard_normal(5).astype(np.float32)
    y, mean, inv = np.zeros((3, 5), np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32)
    p = ln_program([(0, 15), (0, 5), (0, 5), (0, 15), (0, 3), (0, 3)], [0, 1, 2], [3, 4, 5], [3, 5], [0.25])
    p.run(np.array([_core.address(a) for a in (x, s, b, y, mean, inv)], np.int64), np.zeros(1, np.float32))
    want, wm, wi = numpy_layernorm(x, s, b, -1, 0.25)
    assert max_violation(y, want) <= 1.0
    assert max_violation(mean, wm.ravel()) <= 1.0 and max_violation(inv, wi.ravel()) <= 1.0


@pytest.mark.parametrize("table,ins,outs,ip,fp,match", [
    ([(0, 15), (0, 4), (0, 15)], [0, 1], [2], [3, 5], (1e-5,), "scale has 4 elements"),
    ([(0, 15), (0, 5), (0, 5), (0, 15)], [0, 1, 2], [3], [3, 6], (1e-5,), "input has 15 elements"),
    ([(0, 15), (0, 15), (0, 2)], [0], [1, 2], [3, 5], (1e-5,), "mean has 2 elements"),
    ([(0, 15), (0, 15), (0, 3), (0, 2)], [0], [1, 2, 3], [3, 5], (1e-5,), "inv_std has 2 elements"),
    ([(0, 15), (0, 15)], [0], [1], [5, 0], (1e-5,), "rows of 0 elements"),
    ([(0, 15), (0, 15)], [0], [1], [3, 5], (), "float parameters"),
    ([(1, 15), (0, 15)], [0], [1], [3, 5], (1e-5,), "input is int64"),
    ([(0, 15), (0, 15)], [0], [1], [3, 5, 1], (1e-5,), "int parameters"),
    ([(0, 15), (0, 15)], [0], [1], [-3, 5], (1e-5,), "negative size"),
])
def test_verifier_refuses_bad_instructions(table, ins, outs, ip, fp, match):
    with pytest.raises(_core.ProgramError, match=match):
        ln_program(table, ins, outs, ip, fp)
