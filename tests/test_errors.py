"""Bad input raises a clear exception naming what was expected and what came; nothing crashes."""
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from rnnengine.frontend.converter import ConversionError
from oracle import make_rnn_model, run_ort

rng = np.random.default_rng(0)
W = rng.standard_normal((1, 16, 3)).astype(np.float32)
R = rng.standard_normal((1, 16, 4)).astype(np.float32)
B = rng.standard_normal((1, 32)).astype(np.float32)


def lstm(**kw):
    return rnnengine.LSTM(W, R, B, **kw)


def test_weights_with_wrong_shapes_are_named():
    with pytest.raises(ValueError, match=r"R must have shape \(1, 16, 4\), got \(1, 16, 5\)"):
        rnnengine.LSTM(W, np.zeros((1, 16, 5), np.float32))
    with pytest.raises(ValueError, match=r"B must have shape \(1, 32\), got \(1, 31\)"):
        rnnengine.LSTM(W, R, np.zeros((1, 31), np.float32))
    with pytest.raises(ValueError, match=r"P must have shape \(1, 12\), got \(1, 4\)"):
        rnnengine.LSTM(W, R, B, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="W must have 3 dimensions, got shape"):
        rnnengine.LSTM(W[0], R)
    with pytest.raises(ValueError, match="direction='bidirectional' needs 2"):
        rnnengine.LSTM(W, R, direction="bidirectional")
    with pytest.raises(ValueError, match="hidden_size=5 but W has shape"):
        rnnengine.LSTM(W, R, hidden_size=5)
    with pytest.raises(ValueError, match=r"W must have shape \(1, 3\*hidden_size"):
        rnnengine.GRU(W[:, :14], R)


def test_missing_weights_and_bad_attributes():
    with pytest.raises(ValueError, match="W and R are required"):
        rnnengine.GRU(None, R)
    with pytest.raises(ValueError, match="unknown activation 'Swish'"):
        lstm(activations=["Sigmoid", "Swish", "Tanh"])
    with pytest.raises(ValueError, match="needs 3 activations"):
        lstm(activations=["Sigmoid", "Tanh"])
    with pytest.raises(ValueError, match="more values than the activations"):
        lstm(activations=["Sigmoid", "Tanh", "Tanh"], activation_alpha=[0.5])
    with pytest.raises(ValueError, match="direction must be one of"):
        lstm(direction="sideways")
    with pytest.raises(ValueError, match="clip must be a positive finite number"):
        lstm(clip=-1.0)
    with pytest.raises(ValueError, match="layout must be 0 or 1"):
        lstm(layout=2)
    with pytest.raises(ValueError, match="GRU has no input_forget"):
        rnnengine.GRU(W[:, :12], R[:, :12], input_forget=1)


def test_one_directions_activations_for_both_directions():
    # the Python layers' shorthand: 3 functions for a bidirectional LSTM mean the same 3, with
    # the same alpha / beta, in both directions (the review found the reverse direction's
    # HardSigmoid silently left at its default 0.2 / 0.5)
    r = np.random.default_rng(5)
    W2, R2 = (r.standard_normal((2, 16, k)).astype(np.float32) for k in (3, 4))
    x = r.standard_normal((4, 2, 3)).astype(np.float32)
    short = rnnengine.LSTM(W2, R2, direction="bidirectional", activations=["HardSigmoid", "Tanh", "Tanh"],
                           activation_alpha=[0.3], activation_beta=[0.4])
    full = rnnengine.LSTM(W2, R2, direction="bidirectional", activations=["HardSigmoid", "Tanh", "Tanh"] * 2,
                          activation_alpha=[0.3, 0.3], activation_beta=[0.4, 0.4])
    for a, b in zip(short(x), full(x)):
        np.testing.assert_array_equal(a, b)
    want = run_ort("LSTM", {"hidden_size": 4, "direction": "bidirectional",
                            "activations": ["HardSigmoid", "Tanh", "Tanh"] * 2, "activation_alpha": [0.3, 0.3],
                            "activation_beta": [0.4, 0.4]}, {"X": x, "W": W2, "R": R2})
    assert np.abs(short(x)[1] - want[1]).max() < 1e-5
    # an ONNX file must list 6 (onnxruntime refuses 3): refused by name, not guessed
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=4, direction="bidirectional", name="bi",
                            activations=["HardSigmoid", "Tanh", "Tanh"], activation_alpha=[0.3],
                            activation_beta=[0.4])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 2, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W2, "W"), numpy_helper.from_array(R2, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    with pytest.raises(ValueError, match=r"LSTM node 'bi': LSTM is bidirectional and lists 3 activations; the "
                                         r"operator takes 6 \(3 per direction, forward first\)"):
        rnnengine.convert(m).run({"X": x})


def test_activation_names_are_case_insensitive_like_onnxruntime():
    a = lstm(activations=["sigmoid", "TANH", "Tanh"])
    b = lstm()
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 3), np.float32), "must have 3 dimensions"),
    (np.zeros((5, 2, 3, 1), np.float32), "must have 3 dimensions"),
    (np.zeros((5, 2, 4), np.float32), "has 4 features per step"),
    (np.zeros((5, 2, 3), np.int64), "integer dtype int64"),
    (np.array([["a"]]), "float array, got dtype <U1"),
    (np.zeros((5, 2, 3), np.complex64), "float array, got dtype complex64"),
])
def test_bad_inputs_are_refused_by_name(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lstm()(bad)


def test_lengths_out_of_range_or_wrong_type():
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\] \(T = 5\), got \[6\]"):
        lstm()(x, sequence_lens=np.array([6, 1], np.int32))
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        lstm()(x, sequence_lens=np.array([-1, 1], np.int32))
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        lstm()(x, sequence_lens=np.array([1, 1, 1], np.int32))
    with pytest.raises(TypeError, match="integer array"):
        lstm()(x, sequence_lens=np.array([1.0, 2.0]))


def test_initial_state_shapes():
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"initial_h must have shape \(1, 2, 4\)"):
        lstm()(x, initial_h=np.zeros((1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="initial_c is an LSTM input"):
        rnnengine.GRU(W[:, :12], R[:, :12])(x, initial_c=np.zeros((1, 2, 4), np.float32))


def test_non_contiguous_and_float64_inputs_are_accepted_correctly():
    x = rng.standard_normal((6, 2, 8)).astype(np.float64)
    view = x[:, :, ::2][:, :, :3]  # strided float64 view
    assert not view.flags.c_contiguous
    got = lstm()(view)
    want = lstm()(np.ascontiguousarray(view, dtype=np.float32))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # and Fortran-ordered weights
    layer = rnnengine.LSTM(np.asfortranarray(W), np.asfortranarray(R), B)
    np.testing.assert_array_equal(layer(view)[0], got[0])


def test_model_stack_mismatch_and_state_errors():
    with pytest.raises(ValueError, match=r"layers\[1\].*takes input_size 3, but layers\[0\] gives 4"):
        rnnengine.Model([lstm(), lstm()])
    with pytest.raises(TypeError, match="not an LSTM/GRU/RNN layer"):
        rnnengine.Model([lstm(), "GRU"])
    with pytest.raises(ValueError, match="at least one layer"):
        rnnengine.Model([])
    m = rnnengine.Model([lstm()])
    with pytest.raises(TypeError, match=r"state must be a dict \{'layers': \{'layer0': \(h, c\)\}\}.*got list"):
        m.run(np.zeros((2, 1, 3), np.float32), state=[])
    with pytest.raises(ValueError, match=r"state\['layers'\]\['layer0'\] of an LSTM layer must be a pair \(h, c\)"):
        m.run(np.zeros((2, 1, 3), np.float32), state={"layers": {"layer0": np.zeros((1, 1, 4), np.float32)}})
    with pytest.raises(ValueError, match=r"state\['layers'\]\['layer0'\] c must have shape \(1, 1, 4\)"):
        m.run(np.zeros((2, 1, 3), np.float32),
              state={"layers": {"layer0": (np.zeros((1, 1, 4), np.float32), np.zeros((1, 2, 4), np.float32))}})


def test_stream_input_errors():
    m = rnnengine.Model([lstm()])
    s = m.stream(batch_size=2)
    with pytest.raises(ValueError, match=r"step\(\) expects x of shape \(2, 3\), got \(3,\)|needs x of shape \(2, 3\)"):
        s.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        s.step(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="feed\\(\\) expects xs"):
        s.feed(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        s.step(np.zeros((2, 3), np.float32), out=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"step\(\): x must be a float array .* got dtype int64"):
        s.step(np.zeros((2, 3), np.int64))
    with pytest.raises(TypeError, match=r"feed\(\): xs must be a float array .* got dtype <U1"):
        s.feed([["a"]])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        m.stream(batch_size=0)
    with pytest.raises(ValueError, match="state vector must have"):
        s.set_state_vector(np.zeros(3))
    other = rnnengine.Model([lstm()]).stream()
    one = m.stream()
    with pytest.raises(ValueError, match="belongs to another model"):
        rnnengine.step_streams([one, other], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="appears twice"):
        rnnengine.step_streams([one, one], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="batch_size 1"):
        rnnengine.step_streams([s], np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="not a Stream"):
        rnnengine.step_streams([one, "x"], np.zeros((2, 3), np.float32))


def test_empty_time_or_batch():
    layer = lstm()
    Y, Yh, Yc = layer(np.zeros((0, 2, 3), np.float32))
    assert Y.shape == (0, 1, 2, 4) and Yh.shape == (1, 2, 4)
    Y, Yh, Yc = layer(np.zeros((3, 0, 3), np.float32))
    assert Y.shape == (3, 1, 0, 4)


# --- ONNX files ------------------------------------------------------------------------
def one_node_file(tmp_path, kind="LSTM", **attrs):
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    m = make_rnn_model(kind, dict(hidden_size=4, **attrs), {"X": x, "W": W, "R": R})
    # make W and R initializers
    g = m.graph
    keep = [i for i in g.input if i.name == "X"]
    del g.input[:]
    g.input.extend(keep)
    g.initializer.extend([numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    return path, x


def test_load_onnx_is_a_deprecated_alias_of_convert(tmp_path):
    path, x = one_node_file(tmp_path, clip=1.5)
    with pytest.warns(DeprecationWarning, match="convert"):
        model = rnnengine.load_onnx(str(path))
    assert isinstance(model, rnnengine.Model)
    Y = model.run({"X": x})["Y"]
    want = run_ort("LSTM", {"hidden_size": 4, "clip": 1.5}, {"X": x, "W": W, "R": R})
    np.testing.assert_allclose(Y, want[0], atol=1e-5)
    np.testing.assert_array_equal(Y, rnnengine.convert(str(path)).run({"X": x})["Y"])


def test_convert_refuses_unknown_attribute_op_and_domain(tmp_path):
    path, _ = one_node_file(tmp_path)
    m = onnx.load(str(path))
    m.graph.node[0].attribute.append(helper.make_attribute("peephole_mode", 1))
    with pytest.raises(ValueError, match=r"LSTM node .*attribute\(s\) \['peephole_mode'\] not supported"):
        rnnengine.convert(m)
    m = onnx.load(str(path))
    m.graph.node.append(helper.make_node("Det", ["Y"], ["Z"], name="head"))
    with pytest.raises(ValueError, match="Det node 'head'"):
        rnnengine.convert(m)
    m = onnx.load(str(path))
    m.graph.node[0].domain = "com.microsoft"
    with pytest.raises(ValueError, match="com.microsoft"):
        rnnengine.convert(m)


def test_convert_refuses_non_constant_weights_and_garbage(tmp_path):
    x = np.zeros((3, 2, 3), np.float32)
    m = make_rnn_model("LSTM", {"hidden_size": 4}, {"X": x, "W": W, "R": R})
    with pytest.raises(ValueError, match="LSTM node .*input W must be a constant"):
        rnnengine.convert(m).run({"X": x, "W": W, "R": R})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError):
        rnnengine.convert(str(bad))
    with pytest.raises(FileNotFoundError):
        rnnengine.convert(str(tmp_path / "missing.onnx"))


def test_convert_refuses_layout_attribute_at_opset13(tmp_path):
    path, _ = one_node_file(tmp_path, layout=0)
    m = onnx.load(str(path))
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 13))
    with pytest.raises(ValueError, match=r"attribute\(s\) \['layout'\] not supported"):
        rnnengine.convert(m)


def test_convert_bidirectional_stack_through_transpose_reshape_glue():
    """Y (T, 2, B, H) -> Transpose(0, 2, 1, 3) -> Reshape(0, 0, -1) -> next layer."""
    H, I = 4, 3
    Wa = rng.standard_normal((2, 3 * H, I)).astype(np.float32)
    Ra = rng.standard_normal((2, 3 * H, H)).astype(np.float32) * 0.5
    Wb = rng.standard_normal((1, 4 * H, 2 * H)).astype(np.float32) * 0.5
    Rb = rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.5
    inits = [numpy_helper.from_array(a, n) for a, n in ((Wa, "Wa"), (Ra, "Ra"), (Wb, "Wb"), (Rb, "Rb"))]
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape"))
    nodes = [helper.make_node("GRU", ["X", "Wa", "Ra"], ["Y1"], name="gru", hidden_size=H,
                              direction="bidirectional", linear_before_reset=1),
             helper.make_node("Transpose", ["Y1"], ["Y1t"], name="t", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Y1t", "shape"], ["X2"], name="r"),
             helper.make_node("LSTM", ["X2", "Wb", "Rb"], ["Y2"], name="lstm", hidden_size=H)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])],
                          [helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    import onnxruntime as ort
    x = rng.standard_normal((6, 2, I)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    model = rnnengine.convert(m)
    Y = model.run(x)
    np.testing.assert_allclose(Y, want, atol=1e-5)
    # a permutation that mixes the directions' features differently is run as written
    m.graph.node[1].attribute[0].ints[:] = [0, 1, 2, 3]
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(rnnengine.convert(m).run(x), want, atol=1e-5)


# --- conversion refusals -------------------------------------------------------------------
def proj_size_lstm(P=2, H=4, I=3, state_as="input"):
    """The shape of what the PyTorch dynamo exporter writes for nn.LSTM(proj_size=P): an ONNX
    LSTM with hidden_size H whose initial state (and the consumer of Y_h) has size P."""
    Wp = rng.standard_normal((1, 4 * H, I)).astype(np.float32)
    Rp = rng.standard_normal((1, 4 * H, H)).astype(np.float32)
    head = rng.standard_normal((P, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(Wp, "W"), numpy_helper.from_array(Rp, "R"),
             numpy_helper.from_array(head, "head")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])]
    if state_as == "input":
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "B", P]))
    else:
        inits.append(numpy_helper.from_array(np.zeros((1, 2, P), np.float32), "h0"))
    nodes = [helper.make_node("LSTM", ["X", "W", "R", "", "", "h0"], ["Y", "Y_h"], name="/lstm/LSTM",
                              hidden_size=H),
             helper.make_node("MatMul", ["Y_h", "head"], ["out"], name="/head/MatMul")]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("state_as", ["input", "initializer"])
def test_proj_size_lstm_is_refused_at_conversion_naming_node_and_shapes(state_as):
    m = proj_size_lstm(state_as=state_as)
    shape = r"\(1, B, 2\)" if state_as == "input" else r"\(1, 2, 2\)"
    with pytest.raises(ConversionError,
                       match=r"LSTM node '/lstm/LSTM': hidden_size is 4 but initial_h 'h0' has shape "
                             + shape + r" \(last dimension 2, expected 4\).*proj_size"):
        rnnengine.convert(m)


def test_state_output_declared_with_another_size_is_refused():
    m = proj_size_lstm(P=4)  # initial state consistent ...
    m.graph.value_info.append(helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "B", 2]))
    with pytest.raises(ConversionError, match=r"Y_h 'Y_h' has shape \(1, B, 2\)"):
        rnnengine.convert(m)


# --- set_state checks the structure it is given ------------------------------------------------
import os  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus")


def test_layer_stack_stream_set_state_errors_name_the_entry():
    g = rnnengine.GRU(rng.standard_normal((1, 12, 4)).astype(np.float32),
                      rng.standard_normal((1, 12, 4)).astype(np.float32))
    m = rnnengine.Model([lstm(), g])
    s = m.stream(batch_size=2)
    s.step(rng.standard_normal((2, 3)).astype(np.float32))
    before = s.get_state_vector()
    saved = s.get_state()
    assert set(saved) == {"layers", "inputs", "context"} and saved["inputs"] == {} and saved["context"] == {}
    (h, c), hg = saved["layers"]["layer0"], saved["layers"]["layer1"]

    def st(*entries, **parts):
        return {"layers": dict(zip(("layer0", "layer1"), entries)), **parts}
    cases = [
        ([(h, c), hg], TypeError, r"state must be a dict \{'layers': \{'layer0': \(h, c\), 'layer1': h\}\}.*got list "
                                  r"\(a per-layer list as PyTorch's is not taken"),
        ({"layers": [(h, c), hg]}, TypeError, r"state\['layers'\] must be a dict"),
        ({"Layers": {}}, ValueError, r"unknown key\(s\) \['Layers'\]"),
        (st((h, c)), ValueError, r"state\['layers'\] is missing \['layer1'\]"),
        ({"layers": {"layer0": (h, c), "layer1": hg, "layer2": hg}}, ValueError,
         r"state\['layers'\] has \['layer2'\], which this model does not have"),
        (st((h, c), hg, inputs={"h0": h}), ValueError, r"state\['inputs'\] has \['h0'\], but a layer stack has no explicit"),
        (st((h,), hg), ValueError, r"state\['layers'\]\['layer0'\] of an LSTM layer must be a pair \(h, c\) of arrays "
                                   r"\(1, 2, 4\), got a tuple of 1"),
        (st((h, c), (hg, hg)), ValueError, r"state\['layers'\]\['layer1'\] of a GRU layer is h alone, an array \(1, 2, 4\)"),
        (st((h[:, :1], c), hg), ValueError, r"state\['layers'\]\['layer0'\] h must have shape \(1, 2, 4\) "
                                           r"\(directions, batch, hidden\), got \(1, 1, 4\)"),
        (st((h, c.astype(np.int32)), hg), TypeError, r"state\['layers'\]\['layer0'\] c must be a float array"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            s.set_state(bad)
        np.testing.assert_array_equal(s.get_state_vector(), before)  # nothing changed


def test_graph_stream_set_state_refuses_bad_structures_and_changes_nothing():
    m = rnnengine.convert(os.path.join(CORPUS, "torch_legacy_lstm_2layer_batchfirst_op14.onnx"))
    s = m.stream()
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    s({"x": x})
    saved = s.get_state()
    keys = sorted(saved["layers"])
    assert saved["inputs"] == {} and len(keys) == 2  # one per LSTM layer
    h, c = saved["layers"][keys[0]]  # (h, c) of an LSTM layer: (num_directions, batch, hidden)
    assert h.shape == c.shape and h.shape[:2] == (1, 2)
    vec = h
    cases = [
        ([vec], TypeError, r"state must be a dict \{'layers'"),
        ({"layer": saved["layers"]}, ValueError, r"unknown key\(s\) \['layer'\]"),
        ({"layers": {**saved["layers"], "/other/LSTM_output_0": vec}}, ValueError,
         r"state\['layers'\] has \['/other/LSTM_output_0'\], which this stream does not hold"),
        ({"layers": {keys[0]: vec}}, ValueError, r"state\['layers'\] is missing \['" + keys[1] + r"'\].*reset\(\)"),
        ({}, ValueError, "is missing"),
        ({"layers": {**saved["layers"], keys[0]: (h, c[:, :1])}}, ValueError,
         re.escape(f"state['layers'][{keys[0]!r}] c must have shape {tuple(c.shape)} (as this stream holds it), got "
                   f"(1, 1, {c.shape[2]}): the state is of another batch size")),
        ({"layers": {**saved["layers"], keys[0]: h}}, ValueError, r"must be a pair \(h, c\) of arrays"),
        ({"layers": {**saved["layers"], keys[0]: (h, c, c)}}, ValueError, r"must be \(h, c\) for an LSTM layer or one array, got a tuple of 3"),
        ({"layers": {**saved["layers"], keys[0]: (h, c.astype(np.int64))}}, TypeError, r"\] c must be a float32 array, got int64"),
        ({"layers": saved["layers"], "inputs": {"h0": vec}}, ValueError, r"\['h0'\], which is not state input"),
    ]
    y_next = s({"x": x})["y"]
    s.set_state(saved)
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            s.set_state(bad)
    # the failed calls changed nothing: the stream continues from `saved`
    np.testing.assert_array_equal(s({"x": x})["y"], y_next)


def test_graph_stream_set_state_checks_explicit_state_inputs():
    m = rnnengine.convert(os.path.join(CORPUS, "keras2_tf2onnx_lstm_state_io_op17.onnx"))
    assert [a for a, _ in m.state_pairs] == ["h0", "c0"]
    h = rng.standard_normal((2, 8)).astype(np.float32)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    s = m.stream()
    for bad, exc, msg in [
        ({"inputs": {"h0": h}}, ValueError, r"state\['inputs'\] is missing \['c0'\]"),
        ({"inputs": {"h0": h, "c0": h, "x": x}}, ValueError, r"\['x'\], which is not state input"),
        ({"inputs": {"h0": h, "c0": h[:, :7]}}, ValueError, r"state\['inputs'\]\['c0'\] must have shape \(batch, 8\), got \(2, 7\)"),
        ({"inputs": {"h0": h, "c0": h.astype(np.int64)}}, TypeError, r"state\['inputs'\]\['c0'\] must be float32, got int64"),
        ({"inputs": [h, h]}, TypeError, r"state\['inputs'\] must be a dict"),
    ]:
        with pytest.raises(exc, match=msg):
            s.set_state(bad)
    s.set_state({"inputs": {"h0": h, "c0": h}})
    out = s({"x": x})
    want = m.run({"x": x, "h0": h, "c0": h})
    for k in want:
        assert np.abs(out[k] - want[k]).max() <= 1e-5
    with pytest.raises(ValueError, match=r"has shape \(3, 8\) but this stream carries 'h0' of shape \(2, 8\)"):
        s.set_state({"inputs": {"h0": np.zeros((3, 8), np.float32), "c0": np.zeros((3, 8), np.float32)}})


# --- shape mistakes in converted models are worded in the user's terms ------------------------
def corpus_model(name):
    return rnnengine.convert(os.path.join(CORPUS, name))


@pytest.mark.parametrize("name", ["torch_legacy_lstm_2layer_batchfirst_op14.onnx",
                                  "keras2_tf2onnx_lstm_state_io_op17.onnx",
                                  "torch_dynamo_gru_2layer_batchfirst_initstate_op18.onnx"])
def test_wrong_rank_and_features_name_the_input_and_its_axes(name):
    m = corpus_model(name)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    s = m.stream()
    for run in (m.run, s):
        with pytest.raises(ValueError, match=r"^input 'x' must have 3 dimensions \(batch, time, 6 features\), "
                                             r"got shape \(5, 6\); a batch of one still needs its batch axis"):
            run({"x": x[0]})
        with pytest.raises(ValueError, match=r"^input 'x' has 7 features per step, the model takes 6: shape "
                                             r"\(batch, time, 6 features\), got \(2, 5, 7\)$"):
            run({"x": np.concatenate([x, x[..., :1]], axis=-1)})
        with pytest.raises(TypeError, match=r"^input 'x' must be float32, got int64 \(shape \(2, 5, 6\)\)$"):
            run({"x": x.astype(np.int64)})


def test_stream_batch_change_is_named_in_the_users_terms():
    for name, feed in [("torch_legacy_lstm_2layer_batchfirst_op14.onnx", "x"),
                       ("torch_legacy_token_lstm_logsoftmax_op14.onnx", "ids"),
                       ("keras3_tf2onnx_gru_reset_after_op17.onnx", "x"),       # a Loop carrying state
                       ("keras2_tf2onnx_lstm_state_io_op17.onnx", "x"),         # state as graph I/O
                       ("torch_dynamo_gru_2layer_batchfirst_initstate_op18.onnx", "x")]:
        m = corpus_model(name)
        x = rng.standard_normal((2, 4, 6)).astype(np.float32) if feed == "x" else \
            rng.integers(0, 20, (2, 4)).astype(np.int64)
        s = m.stream()
        s({feed: x})
        more = np.concatenate([x, x[:1]])
        with pytest.raises(ValueError, match=rf"^input '{feed}' has batch 3 \(shape \(3, 4(, 6)?\)\) but this stream "
                                             r"was started with batch 2 \(shape \(2, 4(, 6)?\)\): a stream keeps "
                                             r"its batch size"):
            s({feed: more})
        s({feed: x[:, :1]})  # another chunk length is fine
    # explicit state given to set_state before the first call
    m = corpus_model("torch_legacy_audio_vad_stateful_op14.onnx")
    s = m.stream()
    s.set_state({"inputs": {"state": np.zeros((2, 1, 2, 16), np.float32)}})
    with pytest.raises(ValueError, match=r"^input 'x' has batch 3 \(shape \(3, 128\)\) but this stream's state "
                                         r"'state' is for batch 2 \(shape \(2, 1, 2, 16\)\)"):
        s({"x": np.zeros((3, 128), np.float32)})


def test_inputs_sharing_a_batch_must_agree():
    m = corpus_model("torch_legacy_packed_lstm_sorted_op14.onnx")
    x = rng.standard_normal((3, 5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^input 'lens' has batch 2 \(shape \(2,\)\) but input 'x' has batch 3 "
                                         r"\(shape \(3, 5, 6\)\)$"):
        m.run({"x": x, "lens": np.array([5, 4], np.int64)})
    m = corpus_model("torch_legacy_audio_vad_stateful_op14.onnx")
    with pytest.raises(ValueError, match=r"^input 'state' has batch 3 .* but input 'x' has batch 2"):
        m.run({"x": np.zeros((2, 128), np.float32), "state": np.zeros((2, 1, 3, 16), np.float32)})
    with pytest.raises(ValueError, match=r"^input 'state' must have size 16 in dimension 3: shape "
                                         r"\(2, 1, batch, 16\), got \(2, 1, 2, 15\)$"):
        m.run({"x": np.zeros((2, 128), np.float32), "state": np.zeros((2, 1, 2, 15), np.float32)})


def test_tf2onnx_state_io_stream_sizes_its_state_from_the_data():
    """h0/c0 have their own batch symbol: a stream fed only x still carries a state of x's
    batch, and equals the whole run with zero state."""
    m = corpus_model("keras2_tf2onnx_lstm_state_io_op17.onnx")
    x = rng.standard_normal((3, 6, 6)).astype(np.float32)
    s = m.stream()
    parts = [s({"x": x[:, t:t + 2]}) for t in range(0, 6, 2)]
    z = np.zeros((3, 8), np.float32)
    want = m.run({"x": x, "h0": z, "c0": z})
    assert np.abs(np.concatenate([p["lstm_2"] for p in parts], axis=1) - want["lstm_2"]).max() <= 1e-5
    assert np.abs(parts[-1]["lstm_2_1"] - want["lstm_2_1"]).max() <= 1e-5
    assert np.abs(m.run({"x": x})["lstm_2"] - want["lstm_2"]).max() == 0


def test_token_ids_outside_the_vocabulary_name_the_input():
    m = corpus_model("torch_legacy_token_lstm_logsoftmax_op14.onnx")
    ids = rng.integers(0, 20, (2, 5)).astype(np.int64)
    ids[1, 3] = 20
    for run in (m.run, m.stream()):
        with pytest.raises(ValueError, match=r"^input 'ids' holds token index 20, outside the vocabulary of 20 "
                                             r"\(ids 0..19"):
            run({"ids": ids})
    ids[1, 3] = -20  # ONNX Gather counts negative ids from the end, as onnxruntime does
    import onnxruntime as ort
    src = os.path.join(CORPUS, "torch_legacy_token_lstm_logsoftmax_op14.onnx")
    want = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert np.abs(m.run({"ids": ids})["logp"] - want).max() <= 1e-5


def test_layer_state_of_another_batch_given_to_set_state_is_named_at_the_call():
    m = corpus_model("torch_legacy_lstm_2layer_batchfirst_op14.onnx")
    s = m.stream()
    s({"x": rng.standard_normal((2, 3, 6)).astype(np.float32)})
    other = m.stream()
    other.set_state(s.get_state())  # a fresh stream takes it; its size is checked at the call
    with pytest.raises(ValueError, match=r"^input 'x' has batch 3 \(shape \(3, 3, 6\)\) but this stream's state "
                                         r"is for batch 2: a stream keeps its batch size"):
        other({"x": rng.standard_normal((3, 3, 6)).astype(np.float32)})


def test_a_state_input_or_output_paired_twice_is_refused():
    """Each carried state is one input fed back from one output: state_pairs naming an input
    (or an output) twice are refused at conversion, naming it (a weight file saying so is
    refused when loaded: tests/data/fuzz/regressions/fuzz_weights/state-pair-named-twice)."""
    import os
    path = os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_lstm.onnx")
    with pytest.raises(rnnengine.ConversionError, match=r"input\(s\) \['h0_0'\] more than once"):
        rnnengine.convert(path, state_pairs=[("h0_0", "hN_0"), ("h0_0", "hN_1")])
    with pytest.raises(rnnengine.ConversionError, match=r"output\(s\) \['hN_0'\] more than once"):
        rnnengine.convert(path, state_pairs=[("h0_0", "hN_0"), ("c0_0", "hN_0")])


def test_a_graph_input_declared_twice_is_refused_and_an_output_listed_twice_is_kept():
    """Two declarations of one input name (which would a feed be checked against?) are refused
    at conversion, as onnxruntime refuses them ("Duplicate definition-site"); a weight file
    saying so is refused when loaded (tests/data/fuzz/regressions/fuzz_weights/input-declared-twice,
    an IndexError before). An output listed twice is valid ONNX (onnxruntime returns it twice):
    it converts, saves and loads."""
    import tempfile

    from onnx import TensorProto, helper

    def model(inputs, outputs):
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", inputs, outputs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m
    x23 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    x_b34 = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    with pytest.raises(rnnengine.ConversionError, match=r"declares the input\(s\) \['x'\] more than once"):
        rnnengine.convert(model([x23, x_b34], [y]))
    twice = rnnengine.convert(model([x23], [y, y]))
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/m.rnne"
        rnnengine.save(twice, path)
        back = rnnengine.load(path)
        x = rng.standard_normal((2, 3)).astype(np.float32)
        assert back.outputs == ["y", "y"]
        np.testing.assert_array_equal(back.run({"x": x})["y"], np.maximum(x, 0))


@pytest.mark.parametrize("target", [[2**63 - 1, -1, 8], [2**62 + 1, 4, -1]])
def test_reshape_sizes_whose_int64_product_wraps_around_are_refused(target):
    """Reshape's target shape is checked with exact products: in int64, (2**63 - 1) * 8 wraps to
    -8, and [2**63 - 1, -1, 8] then seemed to hold 4,232 elements (-1 became -529), so the
    output view crashed NumPy at run time (fuzz: output-view-dim-2e63-unminimised). Refused,
    naming the node; a shape that fits still reshapes as onnxruntime does."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 23, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "s"], ["y"], name="bad")]
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array(target, np.int64), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(rnnengine.UnsupportedError, match=r"Reshape node 'bad': cannot reshape \(2, 23, 8\)"):
        rnnengine.convert(m).run({"x": np.zeros((2, 23, 8), np.float32)})
    import onnxruntime as ort
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([46, -1], np.int64), "s"))
    feed = {"x": rng.standard_normal((2, 23, 8)).astype(np.float32)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(rnnengine.convert(m).run(feed)["y"], want)


def test_names_that_are_not_utf8_text_are_refused_naming_the_field():
    """protobuf returns a string field holding invalid UTF-8 as bytes; the converter refuses such
    a name where it stands (fuzz: an attribute name, a TypeError while sorting attribute names
    before) instead of carrying bytes into the graph. The bytes are patched into a valid model's
    serialisation (the protobuf API itself refuses to set them)."""
    def patched(old, new):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        g = helper.make_graph([helper.make_node("LeakyRelu", ["x"], ["y"], name="lr", alpha=0.5)], "g", [x], [y])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        data = m.SerializeToString()
        assert data.count(old) == 1 and len(old) == len(new)
        back = onnx.ModelProto()
        back.ParseFromString(data.replace(old, new))
        return back
    with pytest.raises(ConversionError, match=r"an attribute name of node 'lr' is not valid UTF-8 text: b'al\\xffha'"):
        rnnengine.convert(patched(b"alpha", b"al\xffha"))
    with pytest.raises(ConversionError, match=r"the op type of node 'lr' is not valid UTF-8 text"):
        rnnengine.convert(patched(b"LeakyRelu", b"Leaky\xfeelu"))
    with pytest.raises(ConversionError, match=r"the name of a graph input is not valid UTF-8 text"):
        rnnengine.convert(patched(b"Z\x13\n\x01x", b"Z\x13\n\x01\xff"))


def test_convert_takes_bytes_and_refuses_external_data_it_cannot_place(tmp_path):
    # a serialized model converts like its file; its external data (weights in a file beside the
    # model) is read only from a path: a ModelProto or bytes has no directory, and reading the
    # name from the working directory would put whatever file is there into the weights
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2) + 1, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.array([[1.0, -2.0]], np.float32)
    want = x @ (np.arange(4, dtype=np.float32).reshape(2, 2) + 1)
    np.testing.assert_array_equal(rnnengine.convert(m.SerializeToString()).run({"x": x})["y"], want)
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    np.testing.assert_array_equal(rnnengine.convert(str(path)).run({"x": x})["y"], want)
    unloaded = onnx.load(str(path), load_external_data=False)
    for source in (unloaded, unloaded.SerializeToString()):
        with pytest.raises(ConversionError, match=r"initializer 'w': its data is in an external file; convert the "
                                                  r"model from its path"):
            rnnengine.convert(source)
    with pytest.raises(ConversionError, match=r"the bytes given \(5\) are not a serialized ONNX model"):
        rnnengine.convert(b"\xff\xff\xff\xff\xff")


@pytest.mark.parametrize("acts, alpha, beta, refused", [
    (["Affine"], None, None, "Affine needs its alpha"),
    (["Affine"], [0.5], None, "Affine needs its beta"),
    (["ScaledTanh"], [2.0], None, "ScaledTanh needs its beta"),
    (["ThresholdedRelu"], None, None, "ThresholdedRelu needs its alpha"),
    (["HardSigmoid"], None, None, None),   # defaults onnxruntime and the ONNX op agree on
    (["LeakyRelu"], None, None, None),
    (["Elu"], None, None, None),
    (["Affine"], [0.5], [0.1], None),
])
def test_activation_values_left_out_are_refused_where_onnxruntime_and_onnx_disagree(acts, alpha, beta, refused):
    # found by the differential fuzzer (tools/fuzz/diff_onnx.py): onnxruntime's recurrent ops
    # take 0 for a missing Affine / ScaledTanh / ThresholdedRelu value, the ONNX operators of
    # those names 1.0; rnnengine took the latter, silently differing from onnxruntime (15.2 off)
    r = np.random.default_rng(9)
    W1, R1 = (r.standard_normal((1, 4, k)).astype(np.float32) * 0.8 for k in (3, 4))
    x = r.standard_normal((3, 2, 3)).astype(np.float32)
    attrs = {"hidden_size": 4, "activations": acts}
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    if beta is not None:
        attrs["activation_beta"] = beta
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y"], name="rnn", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 2, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W1, "W"), numpy_helper.from_array(R1, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    if refused:
        with pytest.raises(ValueError, match=f"RNN node 'rnn'.*activation {refused} given"):
            rnnengine.convert(m).run({"X": x})
        with pytest.raises(ValueError, match=f"activation {refused} given"):
            rnnengine.RNN(W1, R1, activations=acts, activation_alpha=alpha, activation_beta=beta)
        return
    want = run_ort("RNN", attrs, {"X": x, "W": W1, "R": R1})[0]
    np.testing.assert_allclose(rnnengine.convert(m).run({"X": x})["Y"], want, atol=1e-6)


@pytest.mark.parametrize("op, attrs", [("ReduceMean", {"keepdims": 4}), ("ReduceSum", {"keepdims": -1}),
                                       ("ArgMax", {"select_last_index": 2}), ("CumSum", {"reverse": 3})])
def test_a_flag_attribute_other_than_0_or_1_is_refused(op, attrs):
    # found by the differential fuzzer: ReduceMean keepdims=4 ran keeping the axis (a truth
    # test) where onnxruntime drops it (keepdims == 1): shape (1, 3, 4) against (3, 4)
    ins = ["x", "ax"] if op == "CumSum" else ["x"]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "ax")] if op == "CumSum" else []
    g = helper.make_graph([helper.make_node(op, ins, ["y"], name="n", **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    name = next(iter(attrs))
    with pytest.raises(ValueError, match=rf"{op} node 'n': attribute {name} must be 0 or 1"):
        rnnengine.convert(m).run({"x": np.ones((2, 3, 4), np.float32)})


def test_a_layer_with_layout_1_in_a_model_is_refused():
    # review: Model([LSTM(..., layout=1)]) read (B, T, I) input as (T, B, I): 0.18 off, no error
    r = np.random.default_rng(8)
    lstm1 = rnnengine.LSTM(r.standard_normal((1, 16, 3)).astype(np.float32),
                           r.standard_normal((1, 16, 4)).astype(np.float32), layout=1)
    with pytest.raises(ValueError, match=r"layers\[0\] has layout=1 \(batch first\).*Model\(layers, batch_first=True\)"):
        rnnengine.Model([lstm1])
    x = r.standard_normal((2, 5, 3)).astype(np.float32)  # (B, T, I)
    for layer in (lstm1, rnnengine.LSTM(lstm1.W, lstm1.R)):  # batch_first=True: the layer's layout agrees
        np.testing.assert_allclose(rnnengine.Model([layer], batch_first=True).run(x)[0], lstm1(x)[0][:, :, 0, :],
                                   atol=1e-6)


@pytest.mark.parametrize("op", ["Split", "Concat", "Softmax", "LogSoftmax", "ArgMax", "CumSum", "TopK"])
def test_an_axis_of_a_scalar_is_refused_by_name(op):
    # the weights fuzz hunt (on 7919b26): a Split of a scalar raised IndexError (shape[axis]);
    # the same for every op taking an axis, at run time
    extra = {"CumSum": [np.array(0, np.int64)], "TopK": [np.array([1], np.int64)]}.get(op, [])
    inits = [numpy_helper.from_array(v, f"c{k}") for k, v in enumerate(extra)]
    outs = ["y", "i"] if op == "TopK" else ["y"]
    attrs = {"axis": 0} if op == "Concat" else {}
    g = helper.make_graph([helper.make_node(op, ["x"] + [f"c{k}" for k in range(len(extra))], outs, name="n", **attrs)],
                          "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                          [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(ValueError, match=rf"{op} node 'n': takes an axis \(-?\d\) of its input, which is a scalar"):
        rnnengine.convert(m).run({"x": np.array(1.5, np.float32)})
