"""Opsets 7 to the newest the installed onnx defines: the per-op version table
(rnnengine/opsets.py) matches onnx.defs, models at opsets 22..newest convert and match
onnxruntime whole and streamed, and op versions rnnengine does not implement are refused
by name."""
import os

import numpy as np
import onnx
import onnx.defs
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.frontend import opsets
from rnnengine.frontend.converter import ConversionError
from rnnengine.ops import SEQUENCE_OPS
from rnnengine.ops.handlers import OPS

ort = pytest.importorskip("onnxruntime")
NEWEST = onnx.defs.onnx_opset_version()
KNOWN_OPS = sorted(set(OPS) | {"If", "Loop"} | set(SEQUENCE_OPS))


def _versions_in_effect(op):
    """The since_versions of op that some opset from MIN_OPSET to NEWEST uses."""
    out = set()
    for v in range(opsets.MIN_OPSET, NEWEST + 1):
        try:
            out.add(onnx.defs.get_schema(op, v, "").since_version)
        except onnx.defs.SchemaError:
            pass  # the op does not exist yet at opset v
    return out


def test_the_installed_onnx_is_new_enough_for_this_test():
    assert NEWEST >= 22


@pytest.mark.parametrize("op", KNOWN_OPS)
def test_version_table_matches_onnx_defs(op):
    # a new onnx release that adds a version of an op rnnengine runs fails here until the
    # version is reviewed and recorded (implemented or refused) in rnnengine/opsets.py
    want = _versions_in_effect(op)
    assert want, op
    assert set(opsets.VERSIONS[op]) == want, (op, sorted(want), sorted(opsets.VERSIONS[op]))
    assert all(isinstance(n, str) and n for n in opsets.VERSIONS[op].values())


def test_table_lists_only_known_ops_and_accepts_up_to_the_newest_opset():
    assert set(opsets.VERSIONS) == set(KNOWN_OPS)
    assert opsets.max_opset() == NEWEST


# --- models at opsets 22..newest ---------------------------------------------------------

def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def recurrent_model(opset, rng, I=5, H=6):
    """Batch-first x (B, T, I) -> LSTM -> GRU -> RNN -> MatMul + Add -> Softmax, with the
    glue an exporter writes (Transpose, Squeeze with an axes input)."""
    inits = [_init("axes1", np.array([1], np.int64))]

    def w(name, *shape):
        inits.append(_init(name, (rng.standard_normal(shape) * 0.4).astype(np.float32)))
        return name
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", w("W1", 1, 4 * H, I), w("R1", 1, 4 * H, H), w("B1", 1, 8 * H)],
                              ["y1", "h1", "c1"], hidden_size=H, name="lstm"),
             helper.make_node("Squeeze", ["y1", "axes1"], ["s1"]),
             helper.make_node("GRU", ["s1", w("W2", 1, 3 * H, H), w("R2", 1, 3 * H, H), w("B2", 1, 6 * H)],
                              ["y2", "h2"], hidden_size=H, linear_before_reset=1, name="gru"),
             helper.make_node("Squeeze", ["y2", "axes1"], ["s2"]),
             helper.make_node("RNN", ["s2", w("W3", 1, H, H), w("R3", 1, H, H), w("B3", 1, 2 * H)],
                              ["y3", "h3"], hidden_size=H, activations=["Tanh"], name="rnn"),
             helper.make_node("Squeeze", ["y3", "axes1"], ["s3"]),
             helper.make_node("MatMul", ["s3", w("Wo", H, 4)], ["m"]),
             helper.make_node("Add", ["m", w("bo", 4)], ["a"]),
             helper.make_node("Softmax", ["a"], ["p"], axis=-1),
             helper.make_node("Transpose", ["p"], ["y"], perm=[1, 0, 2])]
    g = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def glue_model(opset, rng, C=4, L=9):
    """x (B, C, L) through the non-recurrent ops whose inputs moved from attributes to
    inputs up to opset 18 (Pad axes, Reduce axes, Split num_outputs, Clip min/max, Slice
    steps, Unsqueeze axes), activations changed at opset 22 and shape arithmetic."""
    inits = []

    def c(name, arr):
        inits.append(_init(name, arr))
        return name
    K = 3
    nodes = [
        helper.make_node("Pad", ["x", c("pads", np.array([2, 1], np.int64)), c("pv", np.array(0.25, np.float32)),
                                 c("pax", np.array([2], np.int64))], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", c("cw", (rng.standard_normal((6, C, K)) * 0.5).astype(np.float32)),
                                  c("cb", rng.standard_normal(6).astype(np.float32))], ["cv"], pads=[0, 0]),
        helper.make_node("Elu", ["cv"], ["e1"], alpha=0.7),
        helper.make_node("HardSigmoid", ["e1"], ["e2"], alpha=0.3, beta=0.4),
        helper.make_node("Softplus", ["cv"], ["e3"]),
        helper.make_node("Softsign", ["cv"], ["e4"]),
        helper.make_node("ThresholdedRelu", ["cv"], ["e5"], alpha=0.2),
        helper.make_node("LeakyRelu", ["cv"], ["e6"], alpha=0.05),
        helper.make_node("Concat", ["e2", "e3", "e4", "e5", "e6"], ["cat"], axis=1),          # (B, 30, L')
        helper.make_node("Clip", ["cat", c("lo", np.array(-0.5, np.float32)), c("hi", np.array(1.5, np.float32))],
                         ["cl"]),
        helper.make_node("Slice", ["cl", c("st", np.array([1], np.int64)), c("en", np.array([30], np.int64)),
                                   c("ax", np.array([1], np.int64)), c("sp", np.array([2], np.int64))], ["sl"]),
        helper.make_node("Split", ["sl"], ["p1", "p2", "p3"], axis=1, num_outputs=3),          # 15 -> 5, 5, 5
        helper.make_node("Mul", ["p1", "p3"], ["mu"]),
        helper.make_node("Sub", ["mu", "p2"], ["su"]),
        helper.make_node("ReduceMean", ["su", c("rax", np.array([2], np.int64))], ["rm"], keepdims=0),  # (B, 5)
        helper.make_node("ReduceMax", ["su", c("rax2", np.array([-1], np.int64))], ["rx"], keepdims=0),
        helper.make_node("Gemm", ["rm", c("gw", (rng.standard_normal((3, 5)) * 0.5).astype(np.float32)),
                                  c("gb", rng.standard_normal(3).astype(np.float32))], ["gm"], transB=1),
        helper.make_node("Unsqueeze", ["gm", c("uax", np.array([1], np.int64))], ["un"]),       # (B, 1, 3)
        helper.make_node("Shape", ["un"], ["shp"], start=-1),
        helper.make_node("ConstantOfShape", ["shp"], ["ones"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
        helper.make_node("Add", ["un", "ones"], ["ad"]),
        helper.make_node("LogSoftmax", ["ad"], ["ls"], axis=-1),
        helper.make_node("Flatten", ["ls"], ["fl"], axis=1),
        helper.make_node("Concat", ["fl", "rx"], ["y"], axis=1),
    ]
    g = helper.make_graph(nodes, "glue", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", C, L])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _ort(model, feeds, fallback):
    """onnxruntime's outputs for model; when this onnxruntime cannot load the model's opset,
    those of ``fallback`` (the same graph at opset 21, whose ops mean the same: the table
    test above shows every version change from 22 on is types-only for them)."""
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        sess = ort.InferenceSession(fallback.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("opset", range(22, NEWEST + 1))
def test_recurrent_model_at_new_opsets_matches_onnxruntime_whole_and_streamed(opset):
    rng = np.random.default_rng(opset)
    model = recurrent_model(opset, np.random.default_rng(1))
    onnx.checker.check_model(model)
    x = (rng.standard_normal((3, 7, 5)) + 0.2).astype(np.float32)
    want = _ort(model, {"x": x}, recurrent_model(21, np.random.default_rng(1)))[0]
    gm = rnnengine.convert(model)
    assert max_violation(gm.run({"x": x})["y"], want) <= 1
    stream = gm.stream()
    got = np.concatenate([stream({"x": x[:, a:b]})["y"] for a, b in ((0, 3), (3, 4), (4, 7))], axis=1)
    assert max_violation(got, want) <= 1


@pytest.mark.parametrize("opset", range(22, NEWEST + 1))
def test_glue_ops_at_new_opsets_match_onnxruntime(opset):
    rng = np.random.default_rng(opset + 100)
    model = glue_model(opset, np.random.default_rng(2))
    onnx.checker.check_model(model)
    x = (rng.standard_normal((2, 4, 9)) + 0.1).astype(np.float32)
    want = _ort(model, {"x": x}, glue_model(21, np.random.default_rng(2)))[0]
    got = rnnengine.convert(model).run({"x": x})["y"]
    assert got.shape == want.shape
    assert max_violation(got, want) <= 1


# --- refusals ----------------------------------------------------------------------------

def test_unreviewed_op_version_is_refused_by_name(monkeypatch):
    # what a new onnx release with an LSTM-29 would look like: the version is missing from
    # the table, so the model is refused rather than run with LSTM-22 semantics
    table = dict(opsets.VERSIONS["LSTM"])
    del table[22]
    monkeypatch.setitem(opsets.VERSIONS, "LSTM", table)
    with pytest.raises(ConversionError, match=r"LSTM node 'lstm'.*LSTM changed at opset 22.*opset 2[2-9]"):
        rnnengine.convert(recurrent_model(NEWEST, np.random.default_rng(0)))
    # opset 21 uses LSTM-14, still in the table
    rnnengine.convert(recurrent_model(21, np.random.default_rng(0)))


def test_refused_version_names_op_node_opset_and_reason():
    data = helper.make_tensor_value_info("d", TensorProto.FLOAT, [3])
    node = helper.make_node("Scatter", ["d", "i", "u"], ["o"], name="sc")
    g = helper.make_graph([node], "g", [data], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3])],
                          [_init("i", np.array([0], np.int64)), _init("u", np.array([1.0], np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(ConversionError, match=r"Scatter node 'sc'.*opset 11.*deprecated"):
        rnnengine.convert(m)


def test_op_that_does_not_exist_at_the_opset_is_refused():
    node = helper.make_node("Range", ["a", "b", "c"], ["o"], name="r")
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("o", TensorProto.INT64, None)],
                          [_init(n, np.array(v, np.int64)) for n, v in (("a", 0), ("b", 5), ("c", 1))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    with pytest.raises(ConversionError, match=r"Range node 'r'.*does not exist at opset 9"):
        rnnengine.convert(m)


def test_opset_newer_than_the_installed_onnx_is_refused():
    m = recurrent_model(NEWEST, np.random.default_rng(0))
    m.opset_import[0].version = NEWEST + 1
    with pytest.raises(ConversionError, match=f"opset {NEWEST + 1} is not supported.*7 to {NEWEST}"):
        rnnengine.convert(m)


def test_float16_range_is_refused_at_the_opset_that_defines_it():
    if NEWEST < 27:
        pytest.skip("Range-27 (float16) is not defined by the installed onnx")
    node = helper.make_node("Range", ["a", "b", "c"], ["o"], name="r16")
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT16, None)],
                          [_init(n, np.array(v, np.float16)) for n, v in (("a", 0), ("b", 900), ("c", 0.3))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 27)])
    with pytest.raises(ConversionError, match=r"Range node 'r16'.*float16"):
        rnnengine.convert(m)


def control_model(opset, rng, I=4, H=3):
    """x (B, T, I) -> If on x's width (decided when planning) choosing between two LSTMs,
    then a Loop with a constant trip count that adds the LSTM output scaled by the
    iteration number: If and Loop at the opset's versions."""
    def lstm_branch(tag):
        W = numpy_helper.from_array((rng.standard_normal((1, 4 * H, I)) * 0.5).astype(np.float32), f"{tag}W")
        R = numpy_helper.from_array((rng.standard_normal((1, 4 * H, H)) * 0.5).astype(np.float32), f"{tag}R")
        nodes = [helper.make_node("Transpose", ["x"], [f"{tag}xt"], perm=[1, 0, 2]),
                 helper.make_node("LSTM", [f"{tag}xt", f"{tag}W", f"{tag}R"], [f"{tag}y", "", ""], hidden_size=H,
                                  name=f"{tag}lstm"),
                 helper.make_node("Squeeze", [f"{tag}y", "ax1"], [f"{tag}out"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}out", TensorProto.FLOAT, None)],
                                 [W, R])
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["h", "fi"], ["hi"]),
         helper.make_node("Add", ["acc", "hi"], ["acc2"]),
         helper.make_node("Identity", ["cond"], ["cond2"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond2", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "two"], ["width"], axis=0),
             helper.make_node("Equal", ["width", "I"], ["cond"]),
             helper.make_node("If", ["cond"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b")),
             helper.make_node("Mul", ["h", "zero"], ["acc0"]),
             helper.make_node("Loop", ["trips", "true", "acc0"], ["y"], body=body, name="loop")]
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("two", np.array(2, np.int64)), ("I", np.array(I, np.int64)), ("ax1", np.array([1], np.int64)),
        ("zero", np.array(0, np.float32)), ("trips", np.array(3, np.int64)), ("true", np.array(True)))]
    g = helper.make_graph(nodes, "control", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "B", H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("opset", range(22, NEWEST + 1))
def test_if_and_loop_at_new_opsets_match_onnxruntime(opset):
    model = control_model(opset, np.random.default_rng(5))
    onnx.checker.check_model(model)
    x = (np.random.default_rng(opset).standard_normal((2, 6, 4)) + 0.2).astype(np.float32)
    want = _ort(model, {"x": x}, control_model(21, np.random.default_rng(5)))[0]
    got = rnnengine.convert(model).run({"x": x})["y"]
    assert np.abs(want).max() > 0.1
    assert max_violation(got, want) <= 1


def test_convert_follows_the_table_for_a_single_lstm(monkeypatch):
    # a one-node LSTM at the newest opset (LSTM-22) matches onnxruntime, and an unreviewed
    # version is refused by name
    from oracle import make_rnn_model
    rng = np.random.default_rng(9)
    ins = {"X": rng.standard_normal((5, 2, 3)).astype(np.float32),
           "W": (rng.standard_normal((1, 16, 3)) * 0.5).astype(np.float32),
           "R": (rng.standard_normal((1, 16, 4)) * 0.5).astype(np.float32)}
    m = make_rnn_model("LSTM", {"hidden_size": 4}, ins, opset=NEWEST)
    for name in ("W", "R"):
        m.graph.initializer.append(numpy_helper.from_array(ins[name], name))
        m.graph.input.remove(next(i for i in m.graph.input if i.name == name))
    m.ir_version = 10
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": ins["X"]})
    Y = rnnengine.convert(m).run({"X": ins["X"]})["Y"]
    assert max_violation(Y, want[0]) <= 1
    table = dict(opsets.VERSIONS["LSTM"])
    del table[22]
    monkeypatch.setitem(opsets.VERSIONS, "LSTM", table)
    with pytest.raises(ValueError, match=r"LSTM node .*LSTM changed at opset 22"):
        rnnengine.convert(m)


@pytest.mark.parametrize("opset", [7, 11, 13, NEWEST])
@pytest.mark.parametrize("runtime", [False, True])
def test_clip_with_an_absent_bound_clips_infinity_like_onnxruntime(opset, runtime):
    # an omitted min / max means the type's largest value (Clip-6 attribute defaults,
    # Clip-11 on: numeric_limits<float>::max()), so +inf becomes FLT_MAX, not inf
    if opset < 11:
        node = helper.make_node("Clip", ["x"], ["y"], min=-1.0, name="clip")
        inits = []
    else:
        node = helper.make_node("Clip", ["x", "lo"], ["y"], name="clip")
        inits = [_init("lo", np.array(-1.0, np.float32))]
    x = np.array([np.inf, -np.inf, np.nan, 3e38, -2.0, 0.5], np.float32)
    if not runtime:  # folded at conversion: x is a constant
        inits.append(_init("x", x))
    g = helper.make_graph([node], "g", [] if not runtime else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    feeds = {"x": x} if runtime else {}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    if runtime:
        got = rnnengine.convert(m).run(feeds)["y"]
    else:
        from rnnengine.frontend.converter import convert_model
        got = convert_model(m)[1]["y"]   # folded at conversion (the graph has no input to run)
    assert want[0] == np.finfo(np.float32).max
    np.testing.assert_array_equal(got, want)


def test_the_schema_table_is_what_onnx_defs_says():
    """rnnengine/frontend/schemas.py (what loading a weight file checks nodes against, without
    importing onnx) is exactly tools/gen_op_schemas.py's output for the installed onnx."""
    import importlib.util
    import rnnengine.frontend.schemas as table
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gen_op_schemas", os.path.join(root, "tools", "gen_op_schemas.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(table.__file__) as f:
        assert f.read() == gen.render(), "stale: run python tools/gen_op_schemas.py"


def test_loading_a_weight_file_does_not_import_onnx(tmp_path):
    """A weight file is checked against the schema table: the cold start of a service that
    loads one does not pay for importing onnx (nor the converter, nor training)."""
    import subprocess
    import sys
    import numpy as np
    import rnnengine
    path = str(tmp_path / "m.rnne")
    rng = np.random.default_rng(0)
    rnnengine.save(rnnengine.Model([rnnengine.GRU(rng.standard_normal((1, 12, 3)).astype(np.float32),
                                                  rng.standard_normal((1, 12, 4)).astype(np.float32))]), path)
    code = ("import sys, numpy as np, rnnengine; m = rnnengine.load(sys.argv[1]); "
            "m.stream().step(np.zeros((1, 3), np.float32)); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('onnx', 'torch') "
            "or k in ('rnnengine.frontend.converter', 'rnnengine.train.fit')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
