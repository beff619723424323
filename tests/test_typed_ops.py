"""Typed tensors in the graph executor: int64 / int32 / bool arithmetic, comparisons, logic,
Where, Cast, integer reductions, ArgMax/ArgMin, CumSum, ReverseSequence, Range, and the
NaN behaviour of float ops, each against onnxruntime (exactly for integers and bools) on
random data, both computed at run time in C (inputs fed as graph inputs) and folded at
conversion with NumPy (the same inputs as initializers)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine import _core
from rnnengine.ops.handlers import UnsupportedError

ET = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
      np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL,
      np.dtype(np.uint8): TensorProto.UINT8}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
INTS = [np.int64, np.int32]


def make(nodes, inputs, outputs, runtime, opset=17):
    """A model of `nodes` whose inputs (name, array) are graph inputs when their name is in
    runtime, else initializers; output types come from ONNX shape inference."""
    ginputs = [helper.make_tensor_value_info(n, ET[a.dtype], list(a.shape)) for n, a in inputs if n in runtime]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in inputs if n not in runtime]
    g = helper.make_graph(nodes, "g", ginputs, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.CopyFrom(io)
    return m


def compare(got, want, name):
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype.kind == "f":
        assert max_violation(got, want) <= 1.0, (name, got, want)
    else:
        assert np.array_equal(got, want), (name, got, want)


def check(nodes, inputs, outputs, opset=17, modes=("runtime", "mixed", "folded")):
    """Runs the nodes through onnxruntime and rnnengine with every input fed at run time
    (C), with only the first one fed (the rest constants), and with none fed (folded by
    NumPy at conversion); the outputs must agree."""
    names = [n for n, _ in inputs]
    for mode in modes:
        runtime = {"runtime": set(names), "mixed": set(names[:1]), "folded": set()}[mode]
        m = make(nodes, inputs, outputs, runtime, opset)
        feeds = {n: a for n, a in inputs if n in runtime}
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = rnnengine.convert(m).run(feeds)
        for o, w in zip(outputs, want):
            compare(got[o], w, f"{o} ({mode})")


def int_arrays(dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    # extremes and small numbers both: draws mix the two
    elems = st.one_of(st.integers(-9, 9), st.integers(lo, hi), st.sampled_from([lo, hi, lo + 1, hi - 1]))
    return hnp.arrays(dtype, shape, elements=elems)


def two_shapes():
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)


# --- integer arithmetic ----------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), op=st.sampled_from(["Add", "Sub", "Mul", "Max", "Min"]), dtype=st.sampled_from(INTS),
       shapes=two_shapes())
def test_int_arithmetic(data, op, dtype, shapes):
    a = data.draw(int_arrays(dtype, shapes.input_shapes[0]))
    b = data.draw(int_arrays(dtype, shapes.input_shapes[1]))
    check([helper.make_node(op, ["a", "b"], ["y"])], [("a", a), ("b", b)], ["y"])


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(INTS), shapes=two_shapes(),
       op=st.sampled_from([("Div", None), ("Mod", 0), ("Mod", 1)]))
def test_int_division_and_mod(data, dtype, shapes, op):
    """Division truncates toward 0; Mod fmod=0 takes the divisor's sign, fmod=1 the
    dividend's; negative operands and extremes included (never a divisor 0, nor min / -1,
    which onnxruntime does not define)."""
    a = data.draw(int_arrays(dtype, shapes.input_shapes[0]))
    b = data.draw(int_arrays(dtype, shapes.input_shapes[1]))
    b = np.where(b == 0, -3, b).astype(dtype)
    if op[0] == "Div":  # min / -1 overflows: keep min out (test_int_division_signs has min / 7)
        a = np.where(a == np.iinfo(dtype).min, np.iinfo(dtype).min + 1, a).astype(dtype)
    attrs = {} if op[1] is None else {"fmod": op[1]}
    check([helper.make_node(op[0], ["a", "b"], ["y"], **attrs)], [("a", a), ("b", b)], ["y"])


def test_int_division_signs():
    a = np.array([7, -7, 7, -7, 0, 1, -1, 2 ** 62 + 1, -2 ** 63, 2 ** 63 - 1], np.int64)
    b = np.array([2, 2, -2, -2, 5, -1, 3, -3, 7, -2 ** 63], np.int64)
    for op, attrs in (("Div", {}), ("Mod", {"fmod": 0}), ("Mod", {"fmod": 1})):
        check([helper.make_node(op, ["a", "b"], ["y"], **attrs)], [("a", a), ("b", b)], ["y"])


def test_float_mod():
    a = np.array([7.5, -7.5, 7.5, -7.5, np.nan, 1, np.inf, 3], np.float32)
    b = np.array([2, 2, -2, -2, 1, 0, 2, np.inf], np.float32)
    check([helper.make_node("Mod", ["a", "b"], ["y"], fmod=1)], [("a", a), ("b", b)], ["y"])


@pytest.mark.parametrize("dtype", INTS)
@pytest.mark.parametrize("op", ["Div", "Mod"])
def test_int_division_by_zero_is_an_error(op, dtype):
    """onnxruntime crashes (SIGFPE); rnnengine refuses, at run time and when folding."""
    a, b = np.array([4, 5], dtype), np.array([2, 0], dtype)
    gm = rnnengine.convert(make([helper.make_node(op, ["a", "b"], ["y"], name="idx")], [("a", a), ("b", b)],
                                ["y"], {"a", "b"}))
    with pytest.raises(ValueError, match=f"{op} node 'idx': an integer division or modulo by zero"):
        gm.run({"a": a, "b": b})
    with pytest.raises(UnsupportedError, match="by zero"):
        rnnengine.convert(make([helper.make_node(op, ["a", "b"], ["y"])], [("a", a), ("b", b)], ["y"], set()))
    m = np.array([np.iinfo(dtype).min], dtype)
    gm = rnnengine.convert(make([helper.make_node("Div", ["a", "b"], ["y"])], [("a", m), ("b", m)], ["y"],
                                {"a", "b"}))
    with pytest.raises(ValueError, match="overflows"):
        gm.run({"a": m, "b": np.array([-1], dtype)})


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(INTS), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
       bounds=st.sampled_from(["both", "min", "max"]))
def test_int_clip(data, dtype, shape, bounds):
    x = data.draw(int_arrays(dtype, shape))
    lo, hi = (np.array(v, dtype) for v in sorted(data.draw(st.lists(st.integers(-20, 20), min_size=2, max_size=2))))
    ins = {"both": ["x", "lo", "hi"], "min": ["x", "lo"], "max": ["x", "", "hi"]}[bounds]
    check([helper.make_node("Clip", ins, ["y"])], [("x", x)] + [(n, v) for n, v in (("lo", lo), ("hi", hi))
                                                                if n in ins], ["y"])


@SETTINGS
@given(data=st.data(), op=st.sampled_from(["Neg", "Abs"]), dtype=st.sampled_from(INTS),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
def test_int_unary(data, op, dtype, shape):
    x = data.draw(int_arrays(dtype, shape))
    check([helper.make_node(op, ["x"], ["y"])], [("x", x)], ["y"], modes=("runtime", "folded"))


# --- comparisons, logic, Where -------------------------------------------------------------

def any_arrays(dtype, shape):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        # few distinct values, so equal pairs happen; NaN, infinities and -0.0 among them
        return hnp.arrays(dtype, shape, elements=st.sampled_from([0.0, -0.0, 1.5, -2.0, 3.0, np.nan, np.inf,
                                                                  -np.inf, 1e30]))
    if dtype == np.bool_:
        return hnp.arrays(dtype, shape)
    if dtype == np.uint8:
        return hnp.arrays(dtype, shape, elements=st.sampled_from([0, 1, 7, 255]))
    info = np.iinfo(dtype)
    return hnp.arrays(dtype, shape, elements=st.sampled_from([0, 1, -1, 7, info.min, info.max, -7]))


@SETTINGS
@given(data=st.data(), op=st.sampled_from(["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]),
       dtype=st.sampled_from([np.float32, np.int64, np.int32, np.bool_]), shapes=two_shapes())
def test_compare(data, op, dtype, shapes):
    if dtype == np.bool_ and op != "Equal":
        dtype = np.int32  # onnxruntime orders only numbers
    a = data.draw(any_arrays(dtype, shapes.input_shapes[0]))
    b = data.draw(any_arrays(dtype, shapes.input_shapes[1]))
    check([helper.make_node(op, ["a", "b"], ["y"])], [("a", a), ("b", b)], ["y"])


@SETTINGS
@given(data=st.data(), op=st.sampled_from(["And", "Or", "Xor"]), shapes=two_shapes())
def test_logic(data, op, shapes):
    a = data.draw(hnp.arrays(np.bool_, shapes.input_shapes[0]))
    b = data.draw(hnp.arrays(np.bool_, shapes.input_shapes[1]))
    check([helper.make_node(op, ["a", "b"], ["y"]), helper.make_node("Not", ["y"], ["z"])],
          [("a", a), ("b", b)], ["y", "z"])


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.int64, np.int32, np.uint8]),
       shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=4))
def test_where(data, dtype, shapes):
    c = data.draw(hnp.arrays(np.bool_, shapes.input_shapes[0]))
    x = data.draw(any_arrays(dtype, shapes.input_shapes[1]))
    y = data.draw(any_arrays(dtype, shapes.input_shapes[2]))
    check([helper.make_node("Where", ["c", "x", "y"], ["z"])], [("c", c), ("x", x), ("y", y)], ["z"])


# --- Cast ----------------------------------------------------------------------------------

CAST_TO = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64, np.int32: TensorProto.INT32,
           np.bool_: TensorProto.BOOL}
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 3e9, -3e9, 1e20, -1e20, 2.0 ** 31, -2.0 ** 31, 2.0 ** 63, -2.0 ** 63,
                  -1.5, 2.7, -0.0, 0.0, 0.5, -0.5, 255.9, 1e-30]


@SETTINGS
@given(data=st.data(), src=st.sampled_from(list(CAST_TO)), dst=st.sampled_from(list(CAST_TO)),
       shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=6))
def test_cast(data, src, dst, shape):
    """Truncation toward 0; NaN, infinities and floats out of range give the minimum of the
    integer type, as onnxruntime on x86-64; NaN -> True; int64 -> float32 rounds once."""
    if src == np.float32:
        x = data.draw(hnp.arrays(np.float32, shape, elements=st.one_of(
            st.sampled_from(SPECIAL_FLOATS), st.floats(-1e10, 1e10, width=32))))
    elif src == np.bool_:
        x = data.draw(hnp.arrays(np.bool_, shape))
    else:
        x = data.draw(int_arrays(src, shape))
    check([helper.make_node("Cast", ["x"], ["y"], to=CAST_TO[dst])], [("x", x)], ["y"],
          modes=("runtime", "folded"))


def test_cast_to_uint8_in_range():
    x = np.array([0.0, 1.9, 254.5, 17.2], np.float32)
    check([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT8)], [("x", x)], ["y"],
          modes=("runtime", "folded"))
    i = np.array([0, 255, 256, -1, 1000], np.int64)  # low byte kept
    check([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT8)], [("x", i)], ["y"],
          modes=("runtime", "folded"))


# --- reductions, ArgMax, CumSum ------------------------------------------------------------

@SETTINGS
@given(data=st.data(), op=st.sampled_from(["ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd"]),
       dtype=st.sampled_from(INTS), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
       keepdims=st.integers(0, 1))
def test_int_reduce(data, op, dtype, shape, keepdims):
    """Sums stay within +-2^53, where onnxruntime (which adds through double) is exact;
    products within range."""
    lo, hi = (-3, 3) if op == "ReduceProd" else ((-2 ** 48, 2 ** 48) if dtype == np.int64 else (-2 ** 26, 2 ** 26))
    x = data.draw(hnp.arrays(dtype, shape, elements=st.integers(lo, hi)))
    axes = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                              unique_by=lambda a: a % len(shape)))
    check([helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)],
          [("x", x), ("axes", np.array(axes, np.int64))], ["y"], opset=18, modes=("mixed", "folded"))


@SETTINGS
@given(data=st.data(), op=st.sampled_from(["ArgMax", "ArgMin"]),
       dtype=st.sampled_from([np.float32, np.int64, np.int32]),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
       keepdims=st.integers(0, 1), last=st.integers(0, 1))
def test_argmax(data, op, dtype, shape, keepdims, last):
    """Ties (few distinct values) and NaN anywhere along the axis."""
    x = data.draw(any_arrays(dtype, shape))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check([helper.make_node(op, ["x"], ["y"], axis=axis, keepdims=keepdims, select_last_index=last)],
          [("x", x)], ["y"], modes=("runtime", "folded"))


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.int64, np.int32]),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
       exclusive=st.integers(0, 1), reverse=st.integers(0, 1))
def test_cumsum(data, dtype, shape, exclusive, reverse):
    if dtype == np.float32:
        x = data.draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=32)))
    else:
        x = data.draw(int_arrays(dtype, shape))  # sums wrap around in both
    axis = np.array(data.draw(st.integers(-len(shape), len(shape) - 1)), np.int64)
    check([helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=exclusive, reverse=reverse)],
          [("x", x), ("axis", axis)], ["y"], modes=("mixed", "folded"))


# --- ReverseSequence, Range ------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.int64, np.int32, np.bool_]),
       T=st.integers(1, 6), B=st.integers(1, 4), rest=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
       time_major=st.booleans())
def test_reverse_sequence(data, dtype, T, B, rest, time_major):
    shape = ((T, B) if time_major else (B, T)) + tuple(rest)
    x = data.draw(any_arrays(dtype, shape) if dtype != np.float32 else
                  hnp.arrays(dtype, shape, elements=st.floats(-10, 10, width=32)))
    lens = np.array(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), np.int64)
    attrs = {"time_axis": 0, "batch_axis": 1} if time_major else {"time_axis": 1, "batch_axis": 0}
    check([helper.make_node("ReverseSequence", ["x", "lens"], ["y"], **attrs)], [("x", x), ("lens", lens)], ["y"])


def test_reverse_sequence_bad_lengths():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    gm = rnnengine.convert(make([helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=1,
                                                  time_axis=0, name="rev")],
                                [("x", x), ("lens", np.array([1, 2, 3], np.int64))], ["y"], {"x", "lens"}))
    for bad in ([1, 5, 2], [1, -1, 2]):
        with pytest.raises(ValueError, match=r"ReverseSequence node 'rev': sequence_lens\[1\]"):
            gm.run({"x": x, "lens": np.array(bad, np.int64)})


def test_reverse_sequence_is_not_streamed():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    m = make([helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=1, time_axis=0, name="rev")],
             [("x", x), ("lens", np.array([1, 2, 3], np.int64))], ["y"], {"x"})
    with pytest.raises(rnnengine.ops.handlers.NotStreamableError, match="ReverseSequence node 'rev'"):
        rnnengine.convert(m).stream().step({"x": x})


@pytest.mark.parametrize("args", [(1, 10, 3), (10, 1, -3), (-5, 5, 1), (3, 3, 1), (5, 1, 1),
                                  (2 ** 40, 2 ** 40 + 7, 2), (1.5, 0.1, -0.3), (0.0, 1.0, 0.1), (-2.5, 3.0, 0.7)])
def test_range(args):
    dt = np.float32 if isinstance(args[0], float) else np.int64
    ins = [(n, np.array(v, dt)) for n, v in zip(("s", "l", "d"), args)]
    check([helper.make_node("Range", ["s", "l", "d"], ["y"])], ins, ["y"], modes=("folded",))


def test_range_with_runtime_inputs_is_refused():
    ins = [(n, np.array(v, np.int64)) for n, v in zip(("s", "l", "d"), (0, 5, 1))]
    m = make([helper.make_node("Range", ["s", "l", "d"], ["y"])], ins, ["y"], {"l"})
    with pytest.raises(UnsupportedError, match="Range node .*run-time values"):
        rnnengine.convert(m).run({"l": np.array(5, np.int64)})


# --- NaN behaviour of float ops ----------------------------------------------------------------

NAN_X = np.array([[1.0, np.nan, -2.0, 3.0], [np.nan, np.nan, np.nan, np.nan], [np.nan, 1.0, 2.0, -1.0],
                  [0.5, np.inf, np.nan, -np.inf], [2.0, 2.0, -1.0, 2.0]], np.float32)


@pytest.mark.parametrize("op,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("ThresholdedRelu", {"alpha": 0.2}),
                                      ("HardSigmoid", {}), ("Elu", {}), ("Softsign", {}), ("Softplus", {}),
                                      ("Sigmoid", {}), ("Tanh", {}), ("Abs", {}), ("Neg", {}), ("Floor", {}),
                                      ("Ceil", {}), ("Sqrt", {}), ("Exp", {}), ("Reciprocal", {})])
def test_unary_nan(op, attrs):
    check([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", NAN_X)], ["y"], modes=("runtime", "folded"))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_nan(op):
    b = np.array([np.nan, 0.0, 5.0, np.nan], np.float32)
    check([helper.make_node(op, ["a", "b"], ["y"])], [("a", NAN_X), ("b", b)], ["y"])
    check([helper.make_node(op, ["a", "b", "c"], ["y"])], [("a", NAN_X), ("b", b), ("c", NAN_X[::-1].copy())],
          ["y"])


def test_clip_nan():
    check([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
          [("x", NAN_X), ("lo", np.array(-1, np.float32)), ("hi", np.array(1.5, np.float32))], ["y"],
          modes=("mixed", "folded"))


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("axis", [0, 1])
def test_reduce_nan(op, axis):
    check([helper.make_node(op, ["x", "axes"], ["y"])], [("x", NAN_X), ("axes", np.array([axis], np.int64))],
          ["y"], opset=18, modes=("mixed", "folded"))


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axis", [0, 1])
def test_reduce_max_min_nan_propagates(op, axis):
    """A NaN among the values reduced gives NaN, as NumPy and the ONNX reference
    implementation (onnx.reference) do. onnxruntime has no one rule to match: its answer
    depends on its vectorisation (ReduceMax over [1, nan, 3] gives 3, over [1, nan, -2, 3]
    gives 1, over [nan, 1, 2, -1] NaN), so this compares with onnx.reference instead."""
    from onnx.reference import ReferenceEvaluator
    for mode in ("mixed", "folded"):
        m = make([helper.make_node(op, ["x", "axes"], ["y"])], [("x", NAN_X), ("axes", np.array([axis], np.int64))],
                 ["y"], {"x"} if mode == "mixed" else set(), opset=18)
        feeds = {"x": NAN_X} if mode == "mixed" else {}
        want = ReferenceEvaluator(m).run(None, feeds)[0]
        assert np.isnan(want).any()
        compare(rnnengine.convert(m).run(feeds)["y"], want, f"y ({mode})")


def test_nan_through_the_fast_paths():
    """Long contiguous arrays (several of the executor's blocks), NaN at random places, in
    Tanh/Sigmoid, Relu, Max/Min of same-shape operands, and max / min over the innermost axis."""
    from onnx.reference import ReferenceEvaluator
    r = np.random.default_rng(11)
    a, b = (r.standard_normal((3, 5000)).astype(np.float32) for _ in range(2))
    a[r.random(a.shape) < 0.01] = np.nan
    b[r.random(b.shape) < 0.01] = np.nan
    for op in ("Tanh", "Sigmoid", "Relu"):
        check([helper.make_node(op, ["a"], ["y"])], [("a", a)], ["y"], modes=("runtime",))
    for op in ("Max", "Min"):
        check([helper.make_node(op, ["a", "b"], ["y"])], [("a", a), ("b", b)], ["y"], modes=("runtime",))
    a[2] = r.standard_normal(5000)  # one row without NaN
    for op in ("ReduceMax", "ReduceMin"):
        m = make([helper.make_node(op, ["a", "axes"], ["y"])], [("a", a), ("axes", np.array([1], np.int64))], ["y"],
                 {"a"}, opset=18)
        want = ReferenceEvaluator(m).run(None, {"a": a})[0]
        assert np.isnan(want[:2]).all() and not np.isnan(want[2]).any()
        compare(rnnengine.convert(m).run({"a": a})["y"], want, op)


def test_topk_argmax_nan_long_rows():
    """Rows longer than a vector register, NaN scattered: the rules hold there too."""
    r = np.random.default_rng(7)
    x = r.standard_normal((3, 37)).astype(np.float32)
    x[r.random(x.shape) < 0.2] = np.nan
    x[1, 0] = np.nan
    for op in ("ArgMax", "ArgMin"):
        for last in (0, 1):
            check([helper.make_node(op, ["x"], ["y"], axis=1, select_last_index=last)], [("x", x)], ["y"],
                  modes=("runtime", "folded"))
    for largest in (0, 1):
        check([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=largest)],
              [("x", x), ("k", np.array([20], np.int64))], ["v", "i"], modes=("mixed", "folded"))


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_nan(op):
    check([helper.make_node(op, ["x"], ["y"])], [("x", NAN_X)], ["y"], modes=("runtime", "folded"))


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [0, 1])
def test_topk_nan(largest, axis):
    k = np.array([3], np.int64)
    check([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=axis, largest=largest)],
          [("x", NAN_X), ("k", k)], ["v", "i"], modes=("mixed", "folded"))


def test_topk_int64_beyond_float_precision():
    x = np.array([[2 ** 60 + 1, 2 ** 60, 2 ** 60 + 3, -5]], np.int64)
    for largest in (0, 1):
        check([helper.make_node("TopK", ["x", "k"], ["v", "i"], largest=largest)],
              [("x", x), ("k", np.array([4], np.int64))], ["v", "i"], modes=("mixed", "folded"))


# --- graphs as exporters write them ------------------------------------------------------------

def test_keras_style_mask_and_index_arithmetic():
    """Keras masking on int tokens (Equal / Not / Cast / Where), Keras 3 index arithmetic in
    front of a Gather, packed-sequence length arithmetic: all at run time."""
    tokens = np.array([[3, 0, 5, 9], [0, 0, 2, 1]], np.int64)
    emb = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    nodes = [helper.make_node("Equal", ["tok", "zero"], ["is_pad"]),
             helper.make_node("Not", ["is_pad"], ["mask"]),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["mask"], ["maski"], to=TensorProto.INT32),
             helper.make_node("ReduceSum", ["maski", "one"], ["lens"], keepdims=0),
             helper.make_node("Less", ["tok", "zero"], ["neg"]),
             helper.make_node("Add", ["tok", "ten"], ["wrapped"]),
             helper.make_node("Where", ["neg", "wrapped", "tok"], ["idx"]),
             helper.make_node("Gather", ["emb", "idx"], ["e"]),
             helper.make_node("Unsqueeze", ["maskf", "minus1"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["y"]),
             helper.make_node("ArgMax", ["y"], ["am"], axis=-1, keepdims=0),
             helper.make_node("Sub", ["lens", "one32"], ["last"])]
    check(nodes, [("tok", tokens), ("zero", np.array(0, np.int64)), ("one", np.array([1], np.int64)),
                  ("ten", np.array(10, np.int64)), ("emb", emb), ("minus1", np.array([-1], np.int64)),
                  ("one32", np.array(1, np.int32))], ["y", "lens", "am", "last"], opset=18,
          modes=("mixed", "folded"))


# --- the executor verifies what it runs ------------------------------------------------------------

def test_executor_refuses_inconsistent_instructions():
    """Instructions with an unknown dtype code, a kind the type does not have or a wrong
    parameter count stop with an error, never a crash."""
    a = np.arange(4, dtype=np.int64)
    out = np.zeros(4, np.int64)
    ptrs = np.array([_core.address(a), _core.address(a), _core.address(out)], np.int64)
    work = np.zeros(16, np.float32)

    def run(op, ip):
        word = [op, 0, 1, -1, -1, 2, -1, -1, -1, 0, len(ip), 0, 0, 0, 0, 0]
        prog = _core.Program(np.array([word], np.int64), np.array(ip, np.int64), np.zeros(0, np.float32), [],
                             tensor_dtypes=[1, 1, 1], tensor_counts=[4, 4, 4], work_floats=16)
        prog.run(ptrs, work)

    run(13, [1, 0, 1, 4, 1, 1])  # int64 Add: fine
    assert out.tolist() == [0, 2, 4, 6]
    for op, ip in [(13, [9, 0, 1, 4, 1, 1]),      # unknown dtype
                   (13, [1, 4, 1, 4, 1, 1]),      # Pow on int64
                   (13, [1, 15, 1, 4, 1, 1]),     # And on int64
                   (13, [1, 0, 2, 4, 1, 1]),      # rank 2 with the parameters of rank 1
                   (13, [1, 0, 9] + [1] * 27),    # rank 9
                   (14, [0, 0, 4]),               # Neg on float32 (UNARY does that)
                   (16, [0, 0, 1, 4, 0, 1, 4]),   # integer reduce of float32
                   (17, [1, 1, 0, 1, 0, 0]),      # ArgMax over an empty axis
                   (9, [1, 7, 4])]:               # Cast to an unknown type
        with pytest.raises(_core.GraphRunError, match="instruction 0"):
            run(op, ip)


def test_where_on_bools_against_the_onnx_reference():
    """onnxruntime has no bool Where kernel: compared with onnx.reference instead."""
    from onnx.reference import ReferenceEvaluator
    r = np.random.default_rng(3)
    c, x, y = r.random((3, 4)) < 0.5, r.random((1, 4)) < 0.5, r.random((3, 1)) < 0.5
    for runtime in ({"c", "x", "y"}, set()):
        m = make([helper.make_node("Where", ["c", "x", "y"], ["z"])], [("c", c), ("x", x), ("y", y)], ["z"], runtime)
        feeds = {n: v for n, v in (("c", c), ("x", x), ("y", y)) if n in runtime}
        compare(rnnengine.convert(m).run(feeds)["z"], ReferenceEvaluator(m).run(None, feeds)[0], "z")


def test_typed_ops_in_a_stream_equal_the_whole_sequence():
    """A mask built from streamed int tokens (time on axis 0): chunk by chunk equals one run."""
    tok = np.array([[3, 0], [0, 0], [5, 2], [9, 0], [0, 7], [1, 1], [0, 4]], np.int64)
    nodes = [helper.make_node("Equal", ["tok", "zero"], ["pad"]), helper.make_node("Not", ["pad"], ["keep"]),
             helper.make_node("Cast", ["keep"], ["k32"], to=TensorProto.INT32),
             helper.make_node("Mod", ["tok", "three"], ["m3"]),
             helper.make_node("Where", ["keep", "m3", "minus"], ["y"]),
             helper.make_node("Cast", ["k32"], ["kf"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tok", TensorProto.INT64, ["T", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None),
                           helper.make_tensor_value_info("kf", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                           numpy_helper.from_array(np.array(3, np.int64), "three"),
                           numpy_helper.from_array(np.array(-1, np.int64), "minus")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"tok": tok})
    gm = rnnengine.convert(m)
    whole = gm.run({"tok": tok})
    compare(whole["y"], want[0], "y")
    compare(whole["kf"], want[1], "kf")
    s = gm.stream()
    parts = [s.step({"tok": tok[i:i + 3]}) for i in range(0, len(tok), 3)]
    assert np.array_equal(np.concatenate([p["y"] for p in parts]), want[0])
    assert np.array_equal(np.concatenate([p["kf"] for p in parts]), want[1])


def test_new_ops_survive_a_weight_file(tmp_path):
    """ReverseSequence, CumSum, ArgMax and Mod stored in a weight file and loaded back run as
    before, and as onnxruntime."""
    x = np.random.default_rng(5).standard_normal((4, 3, 2)).astype(np.float32)
    lens = np.array([4, 1, 3], np.int64)
    nodes = [helper.make_node("ReverseSequence", ["x", "lens"], ["r"], batch_axis=1, time_axis=0),
             helper.make_node("CumSum", ["r", "ax"], ["c"], exclusive=1, reverse=1),
             helper.make_node("ArgMax", ["c"], ["y"], axis=2, keepdims=0, select_last_index=1),
             helper.make_node("Mod", ["lens", "two"], ["z"], fmod=0)]
    m = make(nodes, [("x", x), ("lens", lens), ("ax", np.array(0, np.int64)), ("two", np.array(-2, np.int64))],
             ["y", "z"], {"x", "lens"})
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "lens": lens})
    rnnengine.save(rnnengine.convert(m), str(tmp_path / "m.rnne"))
    got = rnnengine.load(str(tmp_path / "m.rnne")).run({"x": x, "lens": lens})
    compare(got["y"], want[0], "y")
    compare(got["z"], want[1], "z")
