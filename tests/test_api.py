"""One model type and one stream type: every way of making a model gives a rnnengine.Model
whose run / stream / step / feed / get_state / set_state / reset / fork follow one calling
convention, checked here on a layer stack, a converted graph and a weight file."""
import glob
import os

import numpy as np
import onnxruntime as ort
import pytest

import rnnengine
from oracle import max_violation
from rnnengine.frontend.layer_export import layers_to_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(1234)


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def lstm(I, H, D=1, **kw):
    return rnnengine.LSTM(f32(D, 4 * H, I), f32(D, 4 * H, H), f32(D, 8 * H), **kw)


def gru(I, H, D=1, **kw):
    return rnnengine.GRU(f32(D, 3 * H, I), f32(D, 3 * H, H), f32(D, 6 * H), **kw)


def rnn(I, H, D=1, **kw):
    return rnnengine.RNN(f32(D, H, I), f32(D, H, H), f32(D, 2 * H), **kw)


def ort_run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


STACKS = {
    "lstm": lambda: [lstm(3, 5)],
    "lstm_peephole_clip": lambda: [rnnengine.LSTM(f32(1, 16, 3), f32(1, 16, 4), f32(1, 32), f32(1, 12),
                                                  clip=0.8, input_forget=1)],
    "gru_lbr_then_lstm": lambda: [gru(3, 4, linear_before_reset=1), lstm(4, 6)],
    "bidirectional_gru_then_rnn_relu": lambda: [gru(3, 4, D=2, direction="bidirectional"),
                                                rnn(8, 5, activations=["Relu"])],
    "rnn_affine": lambda: [rnn(3, 4, activations=["Affine"], activation_alpha=[0.7], activation_beta=[0.1])],
    "lstm_custom_acts_bidirectional": lambda: [lstm(3, 4, D=2, direction="bidirectional",
                                                    activations=["HardSigmoid", "Tanh", "Softsign"] * 2,
                                                    activation_alpha=[0.3, 0.25], activation_beta=[0.4, 0.45])],
}


def test_every_source_gives_a_model_and_a_stream(tmp_path):
    layer_model = rnnengine.Model([lstm(3, 5)])
    path = str(tmp_path / "m.rnne")
    rnnengine.save(layer_model, path)
    converted = rnnengine.convert(layers_to_onnx(layer_model))
    loaded = rnnengine.load(path)
    for m in (layer_model, converted, loaded):
        assert isinstance(m, rnnengine.Model)
        assert isinstance(m.stream(), rnnengine.Stream)
        assert m.input_names == ["X"]
        assert m.threads >= 1 and m.weight_dtype in ("float32", "float16", "int8")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", sorted(STACKS))
def test_a_saved_layer_stack_loads_as_the_same_model(tmp_path, name, batch_first):
    """save() writes a layer stack as the ONNX graph of its layers; onnxruntime (on that
    graph), the layer stack and the loaded weight file agree."""
    model = rnnengine.Model(STACKS[name](), batch_first=batch_first)
    x = f32(2, 7, 3, scale=1.0) if batch_first else f32(7, 2, 3, scale=1.0)
    Y, _ = model.run(x)
    want = ort_run(layers_to_onnx(model), x)
    assert max_violation(Y, want) <= 1
    path = str(tmp_path / "m.rnne")
    rnnengine.save(model, path)
    loaded = rnnengine.load(path)
    assert loaded.outputs == ["Y"]
    assert max_violation(loaded.run(x), want) <= 1
    assert max_violation(loaded.run({"X": x})["Y"], want) <= 1


def test_save_refuses_what_onnx_cannot_hold(tmp_path):
    proj = rnnengine.Model([rnnengine.LSTM(f32(1, 16, 3), f32(1, 16, 2), projection=f32(1, 2, 4))])
    with pytest.raises(rnnengine.ConversionError, match="proj_size"):
        rnnengine.save(proj, str(tmp_path / "p.rnne"))
    h0 = {"layers": {"layer0": (f32(1, 1, 5), f32(1, 1, 5))}}
    init = rnnengine.Model([lstm(3, 5)], initial_state=h0)
    with pytest.raises(rnnengine.ConversionError, match="initial_state"):
        rnnengine.save(init, str(tmp_path / "i.rnne"))
    assert not os.path.exists(tmp_path / "p.rnne") and not os.path.exists(tmp_path / "i.rnne")


@pytest.fixture(scope="module")
def pair():
    """The same two-layer network as a layer stack and as a converted graph."""
    layer_model = rnnengine.Model([gru(3, 4), lstm(4, 6)])
    return layer_model, rnnengine.convert(layers_to_onnx(layer_model))


def test_run_returns_the_kind_it_is_given(pair):
    layer_model, graph_model = pair
    x = f32(6, 2, 3, scale=1.0)
    Y, state = layer_model.run(x)
    out = layer_model.run({"X": x})
    assert set(out) == {"Y", "state"}
    np.testing.assert_array_equal(out["Y"], Y)
    g = graph_model.run(x)
    assert isinstance(g, np.ndarray)
    np.testing.assert_array_equal(graph_model.run({"X": x})["Y"], g)
    assert max_violation(g, Y) <= 1


@pytest.mark.parametrize("which", [0, 1])
def test_step_feed_and_state_follow_one_convention(pair, which):
    """step() takes one step without a time axis, feed() a chunk; both give what the whole
    run gives; get_state/set_state/fork/reset round-trip, for both runtimes."""
    model = pair[which]
    x = f32(9, 2, 3, scale=1.0)
    whole = model.run(x)
    whole = whole[0] if isinstance(whole, tuple) else whole
    s = model.stream(batch_size=2)
    assert s.delay == 0
    got = [s.step(x[0])]
    got.append(s.feed(x[1:4]))
    saved = s.get_state()
    fork = s.fork()
    got.append(s.step({"X": x[4]})["Y"][None])
    got.append(s.feed({"X": x[5:]})["Y"])
    y = np.concatenate([got[0][None]] + got[1:])
    assert max_violation(y, whole) <= 1
    # the fork and a stream restored from the saved state continue identically
    np.testing.assert_array_equal(fork.feed(x[4:]), y[4:])
    other = model.stream(batch_size=2)
    other.set_state(saved)
    np.testing.assert_array_equal(other.feed(x[4:]), y[4:])
    s.reset()
    np.testing.assert_array_equal(s.feed(x), y)


def test_graph_stream_keeps_the_batch_size_it_was_made_with(pair):
    s = pair[1].stream(batch_size=3)
    with pytest.raises(ValueError, match="batch_size=3"):
        s.feed(f32(4, 2, 3))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pair[1].stream(batch_size=0)


def test_step_streams_takes_any_streams(pair):
    layer_model, graph_model = pair
    xs = f32(2, 1, 3, scale=1.0)
    fast = rnnengine.step_streams([layer_model.stream(), layer_model.stream()], xs[:, 0])
    slow = rnnengine.step_streams([graph_model.stream(), graph_model.stream()], xs)
    assert fast.shape == (2, 6) and slow.shape == (2, 1, 6)
    assert max_violation(slow[:, 0], fast) <= 1
    with pytest.raises(TypeError, match="not a Stream"):
        rnnengine.step_streams([graph_model.stream(), object()], xs)


def test_graph_run_takes_lengths_and_state_by_keyword():
    """lengths= feeds the input behind sequence_lens, state= the explicit state inputs;
    both equal passing them in the dict."""
    path = os.path.join(HERE, "data", "corpus", "torch_packed_lstm_op17.onnx")
    if not os.path.exists(path):
        path = next(p for p in sorted(glob.glob(os.path.join(HERE, "data", "corpus", "*.onnx")))
                    if "pack" in p)
    model = rnnengine.convert(path)
    feeds = model.example_feeds(time=6, batch=3)
    lens_name = next(n for n in feeds if feeds[n].dtype.kind == "i" and feeds[n].ndim == 1)
    feeds[lens_name] = np.array([6, 2, 4], feeds[lens_name].dtype)
    data = {n: (rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f" else a)
            for n, a in feeds.items()}
    want = model.run(data)
    rest = {n: a for n, a in data.items() if n != lens_name}
    got = model.run(rest, lengths=data[lens_name])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="given twice"):
        model.run(data, lengths=data[lens_name])


def test_graph_state_keyword_equals_state_inputs_in_the_dict():
    demo = os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_lstm.onnx")
    model = rnnengine.convert(demo)
    feeds = model.example_feeds(time=5, batch=1)
    names = [a for a, _ in model.state_pairs]
    data = {n: rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f" else a
            for n, a in feeds.items()}
    want = model.run(data)
    got = model.run({n: a for n, a in data.items() if n not in names}, state={n: data[n] for n in names})
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="not state input"):
        model.run({n: a for n, a in data.items() if n not in names}, state={"nope": data[names[0]]})


def test_every_error_shares_one_base():
    for name in ("UnsupportedError", "ConversionError", "NotStreamableError", "LimitError", "OpsetError",
                 "FormatError", "GraphRunError", "ProgramError", "EngineError", "OnnxRuntimeError"):
        cls = getattr(rnnengine, name)
        assert issubclass(cls, rnnengine.RnnEngineError), name
    from rnnengine import _core
    assert _core.ProgramError is rnnengine.ProgramError and _core.EngineError is rnnengine.EngineError


def test_step_first_on_a_model_without_a_time_axis():
    """silero-vad takes one fixed-size chunk per call (no time axis): step() is feed(), also
    as the very first call (its time axes cannot be guessed before a call)."""
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None:
        pytest.skip("silero-vad is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "data", "silero_vad.onnx")
    model = rnnengine.convert(path, fixed_inputs={"sr": 16000})
    xs = f32(3, 1, 576, scale=0.1)
    a, b = model.stream(), model.stream()
    for x in xs:
        np.testing.assert_array_equal(a.step({"input": x})["output"], b.feed({"input": x})["output"])
    assert a.time_axes == {}


def test_step_first_refuses_when_the_time_axis_cannot_be_told():
    """A graph without declared shapes: a first step() cannot know where the time axis goes,
    so it asks for a chunk rather than guessing. A chunk tells it (every axis of the data is
    probed), and later steps place it there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    W, R = f32(1, 16, 3), f32(1, 16, 4)
    g = helper.make_graph([helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=4)], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    model = rnnengine.convert(m)
    s = model.stream()
    with pytest.raises(ValueError, match="feed"):
        s.step(f32(2, 3))
    xs = f32(5, 2, 3)
    y = s.feed(xs[:4])
    assert y.shape == (4, 1, 2, 4)
    assert s.time_axes == {"X": 0}
    last = s.step(xs[4])
    assert last.shape == (1, 2, 4)
    np.testing.assert_allclose(np.concatenate([y, last[None]]), model.run(xs), rtol=1e-5, atol=1e-6)


def test_threads_keep_the_return_convention_and_layer_streams_refuse_by_name(pair):
    _, graph_model = pair
    x = f32(4, 8, 3, scale=1.0)
    one = graph_model.run(x)
    graph_model.threads = 2
    try:
        two = graph_model.run(x)
    finally:
        graph_model.threads = 1
    assert isinstance(two, np.ndarray) and max_violation(two, one) <= 1
    bidir = rnnengine.Model([gru(3, 4, D=2, direction="bidirectional")])
    with pytest.raises(rnnengine.NotStreamableError, match="forward"):
        bidir.stream()


# --- one state structure (rnnengine.State) for every stream ------------------------------------

def _same_structure(a, b):
    """Both states have the same keys everywhere and arrays of the same shapes and dtype."""
    assert set(a) == set(b) == {"layers", "inputs", "context"}
    assert sorted(a["layers"]) == sorted(b["layers"]) and sorted(a["inputs"]) == sorted(b["inputs"])
    for k, u in a["layers"].items():
        v = b["layers"][k]
        assert isinstance(u, tuple) == isinstance(v, tuple), k
        for p, q in zip(u if isinstance(u, tuple) else (u,), v if isinstance(v, tuple) else (v,)):
            assert p.shape == q.shape and p.dtype == q.dtype == np.float32, (k, p.shape, q.shape)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_layer_stack_and_its_saved_graph_share_one_state_structure(tmp_path, batch):
    """The state of a layer-stack stream and of the stream of the same model saved and loaded
    (a graph) have one structure, the same keys and shapes; each continues from the other's."""
    layers = [lstm(3, 5), gru(5, 4), rnn(4, 6)]
    stack = rnnengine.Model(layers)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(stack, path)
    graph = rnnengine.load(path)
    X = f32(12, batch, 3, scale=1.0)
    s1, s2 = stack.stream(batch), graph.stream(batch)
    y1, y2 = s1.feed(X[:5]), s2.feed(X[:5])
    assert max_violation(y2, y1) <= 1
    st1, st2 = s1.get_state(), s2.get_state()
    _same_structure(st1, st2)
    assert sorted(st1["layers"]) == ["layer0", "layer1", "layer2"]
    h, c = st1["layers"]["layer0"]
    assert h.shape == c.shape == (1, batch, 5) and st1["layers"]["layer1"].shape == (1, batch, 4)
    for k in st1["layers"]:
        for p, q in zip(np.atleast_1d(st1["layers"][k]) if not isinstance(st1["layers"][k], tuple)
                        else st1["layers"][k], st2["layers"][k] if isinstance(st2["layers"][k], tuple)
                        else np.atleast_1d(st2["layers"][k])):
            assert max_violation(q, p) <= 1, k
    # the whole-sequence run from the same state, as the reference for both continuations
    want, _ = stack.run(X[5:], state=st1)
    # a graph stream (fresh: never run) takes the layer stack's state, and vice versa
    g = graph.stream(batch, state=st1)
    assert max_violation(g.feed(X[5:]), want) <= 1
    s = stack.stream(batch, state=st2)
    assert max_violation(s.feed(X[5:]), want) <= 1
    # so does a graph stream that has run (its shapes are known: checked at once)
    s2.set_state(st1)
    assert max_violation(s2.feed(X[5:]), want) <= 1


def test_a_graph_stream_checks_a_state_set_before_its_first_call_against_the_model(tmp_path):
    """Before the first call the graph stream does not know its layers' shapes yet: a state
    with the wrong shapes is refused at the first call, naming the entry, and nothing runs."""
    stack = rnnengine.Model([lstm(3, 5)])
    path = str(tmp_path / "m.rnne")
    rnnengine.save(stack, path)
    graph = rnnengine.load(path)
    good = stack.stream(2).get_state()
    h, c = good["layers"]["layer0"]
    bad = {"layers": {"layer0": (h, np.concatenate([c, c], axis=2))}}  # c of 10 floats per row, h of 5
    s = graph.stream(2, state=bad)
    with pytest.raises(ValueError, match=r"state\['layers'\]\['layer0'\]"):
        s.feed(f32(4, 2, 3))
    with pytest.raises(ValueError, match=r"state\['layers'\]\['layer0'\] of an LSTM layer must be a pair \(h, c\)"):
        rnnengine.Model([lstm(3, 5)]).stream(2, state={"layers": {"layer0": h}})


def test_graph_states_of_loops_and_convolutions_are_arrays_of_their_shapes():
    """Every entry of a converted graph's state has the shape the node holds: a conv front
    end's kept frames (batch, channels, frames), a recurrent layer's (h, c)/h; set_state of
    get_state continues exactly (bit for bit), also through the bytes."""
    path = os.path.join(HERE, "data", "corpus", "torch_dynamo_conv_causal_lstm_op18.onnx")
    m = rnnengine.convert(path)
    name = m.input_names[0]
    spec = next(i for i in m.inputs if i["name"] == name)
    s = m.stream()
    ax = s.time_axes.get(name)
    shape = [d if isinstance(d, int) else 2 for d in spec["shape"]]
    shape[ax] = 7
    x = f32(*shape, scale=1.0)
    s.feed({name: x})
    st = s.get_state()
    convs = [k for k in st["layers"] if k.startswith("conv:")]
    recs = [k for k in st["layers"] if not k.startswith("conv:")]
    assert convs and recs, sorted(st["layers"])
    for k in convs:
        assert isinstance(st["layers"][k], np.ndarray) and st["layers"][k].ndim == 3 and st["layers"][k].shape[0] == 2
    for k in recs:
        h, c = st["layers"][k]
        assert h.ndim == 3 and h.shape == c.shape and h.shape[1] == 2
    other = m.stream()
    other.feed({name: x})  # same batch, known shapes
    other.set_state(st)
    a, b = s.feed({name: x}), other.feed({name: x})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    third = m.stream()
    rnnengine.state_from_bytes(third, rnnengine.state_to_bytes(s))
    fourth = m.stream(state=s.get_state())
    c1, c2 = third.feed({name: x}), fourth.feed({name: x})
    for k in c1:
        np.testing.assert_array_equal(c1[k], c2[k])
