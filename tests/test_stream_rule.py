"""The streaming rule (rnnengine/streaming.py): a stream is made only when chunk-by-chunk
calls reproduce the whole-sequence run exactly; ops with a receptive field along time (Conv,
Pad) carry their context between calls; everything that mixes time steps is refused by name
when the stream is made."""
import re

import numpy as np

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import TOLERANCE
from rnnengine.ops.handlers import NotStreamableError
from rnnengine.verify import ort_session

F = TensorProto.FLOAT
TOL = TOLERANCE[np.float32]


def model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, F, None) for o in outputs],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8

    return m


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.abs(got - want) <= TOL["atol"] + TOL["rtol"] * np.abs(want)), np.abs(got - want).max()


def stream_in_chunks(gm, feeds, axis, sizes):
    """Feeds `feeds` along `axis` in chunks of the given sizes (cycled), then finish()."""
    s = gm.stream()
    T = next(iter(feeds.values())).shape[axis]
    parts, t, k = [], 0, 0
    while t < T:
        n = sizes[k % len(sizes)]
        k += 1
        parts.append(s({name: np.take(a, range(t, min(T, t + n)), axis=axis) for name, a in feeds.items()}))
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail)
    return s, parts


def streams_like_onnxruntime(m, feeds, chunks, axes, out, cat):
    """Converts m, checks its whole run of `feeds` against onnxruntime, streams the feeds in
    chunks along axis axes[name] of each input (then finish()), checks the stream's time axes
    are `axes` and the chunks' output `out`, joined along `cat`, equal the whole run."""
    gm = rnnengine.convert(m)
    whole = gm.run(feeds)[out]
    names = [o.name for o in m.graph.output]
    close(whole, ort_session(m).run(None, feeds)[names.index(out)])
    s = gm.stream()
    T = feeds[next(iter(axes))].shape[axes[next(iter(axes))]]
    parts, t, k = [], 0, 0
    while t < T:
        n = chunks[k % len(chunks)]
        k += 1
        parts.append(s({name: np.take(a, range(t, min(T, t + n)), axis=axes[name]) for name, a in feeds.items()}))
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail)
    assert s.time_axes == axes
    close(np.concatenate([p[out] for p in parts], axis=cat), whole)
    return s


def conv_front_end(rng, C, M, K, dil, stride, pads, group, pad_node, H=5):
    """x (B, C, T) [-> Pad along time] -> Conv -> Relu -> (T', B, M) -> GRU -> y, plus the conv
    output itself."""
    nodes, inits = [], {"Wc": rand(rng, M, C // group, K) * 0.5, "bc": rand(rng, M),
                        "W": rand(rng, 1, 3 * H, M) * 0.5, "R": rand(rng, 1, 3 * H, H) * 0.5,
                        "Bg": rand(rng, 1, 6 * H) * 0.1}
    src = "x"
    if pad_node is not None:
        inits["pads"] = np.array([0, 0, pad_node[0], 0, 0, pad_node[1]], np.int64)
        nodes.append(helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant", name="pad_t"))
        src = "xp"
    nodes += [helper.make_node("Conv", [src, "Wc", "bc"], ["c"], kernel_shape=[K], dilations=[dil],
                               strides=[stride], pads=list(pads), group=group, name="conv_t"),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("Transpose", ["r"], ["rt"], perm=[2, 0, 1]),
              helper.make_node("GRU", ["rt", "W", "R", "Bg"], ["Y"], hidden_size=H, linear_before_reset=1),
              helper.make_node("Squeeze", ["Y", "ax1"], ["y"])]
    inits["ax1"] = np.array([1], np.int64)
    return model(nodes, [helper.make_tensor_value_info("x", F, ["B", C, "T"])], ["y", "c"], inits)


@settings(max_examples=150, deadline=None)
@given(K=st.integers(1, 5), dil=st.integers(1, 3), stride=st.integers(1, 3), group=st.sampled_from([1, 2]),
       kind=st.sampled_from(["valid", "causal", "centred", "asymmetric", "pad_node", "lookahead"]),
       chunks=st.lists(st.integers(1, 7), min_size=1, max_size=4), T=st.integers(8, 30), seed=st.integers(0, 99))
def test_conv_front_end_streams_exactly(K, dil, stride, group, kind, chunks, T, seed):
    rng = np.random.default_rng(seed)
    span = dil * (K - 1)
    pads, pad_node = {"valid": (0, 0), "causal": (span, 0), "centred": (span // 2, span - span // 2),
                      "asymmetric": (1, 2), "pad_node": (0, 0), "lookahead": (0, span)}[kind], None
    if kind == "pad_node":  # causal padding written as a Pad node before the Conv (F.pad)
        pad_node = (span, 1)
    C, M = 4, 6
    m = conv_front_end(rng, C, M, K, dil, stride, pads, group, pad_node)
    x = rand(rng, 2, C, T + span)  # long enough for one window of a conv without padding
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})
    ort = ort_session(m).run(None, {"x": x})
    close(whole["y"], ort[0])
    close(whole["c"], ort[1])
    s, parts = stream_in_chunks(gm, {"x": x}, 2, chunks)
    # output j reads input steps up to j + span - 1 - (left padding, the Pad node's included)
    assert s.delay == max(0, span - pads[0] - (pad_node[0] if pad_node else 0)), (s.delay, pads, pad_node)
    close(np.concatenate([p["c"] for p in parts], axis=2), whole["c"])
    close(np.concatenate([p["y"] for p in parts], axis=0), whole["y"])


def test_causal_conv_emits_every_step_and_centred_conv_trails_by_its_right_padding():
    rng = np.random.default_rng(3)
    for pads, delay in (((4, 0), 0), ((2, 2), 2)):
        m = conv_front_end(rng, 3, 4, 3, 2, 1, pads, 1, None)
        gm = rnnengine.convert(m)
        x = rand(rng, 1, 3, 10)
        whole = gm.run({"x": x})
        s = gm.stream()
        assert s.delay == delay
        outs = [s({"x": x[:, :, t:t + 1]})["c"] for t in range(10)]
        assert [o.shape[2] for o in outs] == [0] * delay + [1] * (10 - delay)
        tail = s.finish().get("c", np.zeros((1, 4, 0), np.float32))  # {} when nothing is held back
        assert tail.shape[2] == delay
        close(np.concatenate(outs + [tail], axis=2), whole["c"])
        with pytest.raises(ValueError, match="finished"):
            s({"x": x[:, :, :1]})
        s.reset()
        close(np.concatenate([s({"x": x})["c"], s.finish().get("c", np.zeros((1, 4, 0)))], axis=2), whole["c"])


def tcn(rng, C, M, K1, K2, dil, pads1, pads2, tail=None):
    """A temporal convolution network that keeps no state (no recurrent layer, no state
    input): x (B, C, T) -> Conv -> Relu -> Conv [-> tail op] -> y."""
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], kernel_shape=[K1], pads=list(pads1), name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["y" if tail is None else "c2"], kernel_shape=[K2],
                              dilations=[dil], pads=list(pads2), name="conv2")]
    if tail is not None:
        nodes.append(tail)
    return model(nodes, [helper.make_tensor_value_info("x", F, ["B", C, "T"])], ["y"],
                 {"W1": rand(rng, M, C, K1) * 0.5, "b1": rand(rng, M), "W2": rand(rng, 2, M, K2) * 0.5})


@settings(max_examples=60, deadline=None)
@given(K1=st.integers(1, 4), K2=st.integers(2, 4), dil=st.integers(1, 3),
       kind=st.sampled_from(["valid", "causal", "centred"]), chunks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       T=st.integers(14, 30), seed=st.integers(0, 99))
def test_a_stateless_convolution_network_streams_along_its_time_axis(K1, K2, dil, kind, chunks, T, seed):
    """No recurrent layer marks its time axis, yet a stream must not convolve each chunk
    alone (that gave chunks convolved without their neighbours, with no error: 1.5 off the
    whole run on a 2-conv model): its calls carry the frames the convolutions need."""
    rng = np.random.default_rng(seed)
    s1, s2 = K1 - 1, dil * (K2 - 1)
    pads = {"valid": ((0, 0), (0, 0)), "causal": ((s1, 0), (s2, 0)),
            "centred": ((s1 // 2, s1 - s1 // 2), (s2 // 2, s2 - s2 // 2))}[kind]
    s = streams_like_onnxruntime(tcn(rng, 3, 4, K1, K2, dil, *pads), {"x": rand(rng, 2, 3, T)}, chunks, {"x": 2},
                                 "y", 2)
    if kind == "causal":
        assert s.delay == 0


def test_a_stateless_network_without_context_along_an_axis_keeps_one_call_per_step():
    """Pooled over the axis (a classifier of fixed windows, one per call) or pointwise along
    it: nothing to carry, so the calls stay independent runs, as run() on each."""
    rng = np.random.default_rng(5)
    pooled = tcn(rng, 3, 4, 3, 2, 1, (0, 0), (0, 0),
                 tail=helper.make_node("ReduceMean", ["c2"], ["y"], axes=[2], keepdims=0, name="pool"))
    pointwise = model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, ["B", 3, "T"])],
                      ["y"], {})
    for m in (pooled, pointwise):
        gm = rnnengine.convert(m)
        s = gm.stream()
        assert s.time_axes == {}
        for T in (6, 9):
            x = rand(rng, 1, 3, T)
            close(s({"x": x})["y"], gm.run({"x": x})["y"])


def conv_lstm(rng, shape, pads=(0, 0), K=4, stride=2):
    """x -> Conv (K, stride) -> (T', B, 4) -> LSTM -> Y, x declared with `shape` (None: no
    shape at all, as some hand-made or converted graphs declare it)."""
    C, M, H = 3, 4, 5
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], kernel_shape=[K], strides=[stride], pads=list(pads),
                              name="conv"),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["ct", "W", "R"], ["Y"], hidden_size=H, name="lstm")]
    return model(nodes, [helper.make_tensor_value_info("x", F, shape)], ["Y"],
                 {"Wc": rand(rng, M, C, K), "W": rand(rng, 1, 4 * H, M) * 0.5, "R": rand(rng, 1, 4 * H, H) * 0.5})


@pytest.mark.parametrize("chunks", [[10], [2, 10], [1, 3, 5]])
def test_an_input_without_a_declared_shape_is_streamed_along_its_time_axis(chunks):
    """No declared shape names a symbolic axis, yet the stream must find the time axis (by
    probing every axis of the data): before, it took the calls as separate sequences and
    convolved each chunk alone (16 frames instead of 19, no error)."""
    rng = np.random.default_rng(2)
    streams_like_onnxruntime(conv_lstm(rng, None), {"x": rand(rng, 1, 3, 40)}, chunks, {"x": 2}, "Y", 0)


@pytest.mark.parametrize("B,chunk", [(1, 4), (1, 1), (2, 2), (2, 3)])
@pytest.mark.parametrize("names", [("B", "T", "S", "B"), ("unk__1", "unk__2", "unk__3", "unk__4")])
def test_one_time_length_named_by_two_symbols_is_streamed_along_both(names, B, chunk):
    """x (B, 3, T) -> causal Conv -> LSTM -> + z (S, B, 4): T and S must be equal, yet they
    are two symbols (tf2onnx names each input's dynamic axes apart, unk__N), so neither
    lengthened alone plans. Before: no time axis, each chunk convolved alone (0.51 off the
    whole run, no error). Now the axes of one fed length are probed together."""
    rng = np.random.default_rng(6)
    H = 4
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], kernel_shape=[3], pads=[2, 0], name="conv"),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["ct", "W", "R"], ["Y"], hidden_size=H, name="lstm"),
             helper.make_node("Squeeze", ["Y", "ax"], ["Ys"]),
             helper.make_node("Add", ["Ys", "z"], ["out"], name="add")]
    b, t, s_, b2 = names
    m = model(nodes, [helper.make_tensor_value_info("x", F, [b, 3, t]), helper.make_tensor_value_info("z", F, [s_, b2, H])],
              ["out"], {"Wc": rand(rng, 4, 3, 3), "W": rand(rng, 1, 4 * H, 4), "R": rand(rng, 1, 4 * H, H) * 0.5,
                        "ax": np.array([1], np.int64)})
    # (a first chunk as long as the batch: the batch and time axes of one fed length, tried
    # one per input; a chunk of 1: z's time axis broadcasts, found with x's all the same)
    streams_like_onnxruntime(m, {"x": rand(rng, B, 3, 12), "z": rand(rng, 12, B, H)}, [chunk], {"x": 2, "z": 0},
                             "out", 0)


@pytest.mark.parametrize("names", [("B", "T", "B", "T"), ("unk__1", "unk__2", "unk__3", "unk__4")])
def test_a_stateless_network_with_a_mask_named_apart_streams_along_both(names):
    """Conv -> * mask -> Conv, no state: the data's and the mask's time axes named by two
    symbols are found together (before: {}, each chunk convolved alone, 28.5 off)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], kernel_shape=[3], pads=[2, 0], name="conv1"),
             helper.make_node("Mul", ["c1", "mask"], ["cm"], name="mul"),
             helper.make_node("Conv", ["cm", "W2"], ["y"], kernel_shape=[3], pads=[2, 0], name="conv2")]
    m = model(nodes, [helper.make_tensor_value_info("x", F, [names[0], 3, names[1]]),
                      helper.make_tensor_value_info("mask", F, [names[2], 1, names[3]])], ["y"],
              {"W1": rand(rng, 4, 3, 3), "W2": rand(rng, 2, 4, 3)})
    feeds = {"x": rand(rng, 1, 3, 12), "mask": (rng.random((1, 1, 12)) > 0.3).astype(np.float32)}
    streams_like_onnxruntime(m, feeds, [4], {"x": 2, "mask": 2}, "y", 2)


def test_a_stateless_network_pooling_beside_a_convolution_output_is_refused():
    """y = Conv(x) grows with the time axis, g = mean of x over it: taken call by call, y's
    chunks would be convolved alone (5.1 off, no error); streamed, g cannot be: refused."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["y"], kernel_shape=[3], pads=[2, 0], name="conv1"),
             helper.make_node("ReduceMean", ["x"], ["g"], axes=[2], keepdims=0, name="pool")]
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["B", 3, "T"])], ["y", "g"], {"W1": rand(rng, 4, 3, 3)})
    gm = rnnengine.convert(m)
    gm.run({"x": rand(rng, 1, 3, 12)})
    with pytest.raises(NotStreamableError, match="'pool'.*outputs grow along the input axes.*call run"):
        gm.stream()({"x": rand(rng, 1, 3, 4)})


def test_a_probe_refused_by_a_limit_refuses_the_stream_and_is_not_remembered():
    """A stateless conv net whose whole run fits the limits but whose longer probe does not:
    the time axis cannot be told, so the stream is refused naming the limit (before: {}, the
    chunks convolved alone, 15.5 off); the answer is not kept, so the same model under the
    library's limits streams along its time axis."""
    import rnnengine.limits as L
    rng = np.random.default_rng(0)
    m = tcn(rng, 3, 4, 3, 3, 1, (2, 0), (2, 0))
    x = rand(rng, 2, 3, 20)
    tight = rnnengine.Limits(max_tensor_elements=200)
    gm = rnnengine.convert(m, limits=tight)
    gm.run({"x": x})
    with pytest.raises(rnnengine.LimitError, match="cannot tell which input axes are time"):
        gm.stream()({"x": x[:, :, :4]})
    gm = rnnengine.convert(m)
    with L.using(tight):
        with pytest.raises(rnnengine.LimitError):
            gm.stream()({"x": x[:, :, :4]})
    whole = gm.run({"x": x})["y"]
    s, parts = stream_in_chunks(gm, {"x": x}, 2, [4])
    assert s.time_axes == {"x": 2}
    close(np.concatenate([p["y"] for p in parts], axis=2), whole)


def test_probing_an_undeclared_input_stays_small():
    """Every axis of an input declared without a shape is probed, but a batch axis stops at
    the first longer probe and one that does not plan is not tried longer: x (50000, 1, 4)
    through ConstantOfShape(Shape(x)) peaked at 1.6 GB of folded constants, now a few MB;
    inputs no recurrent layer reads are not probed for its time axis (64 of them: 1,547 plans
    and 20 s before, 7 plans now)."""
    import tracemalloc
    rng = np.random.default_rng(0)
    H = 3
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["k"], value=helper.make_tensor("v", F, [1], [1.0])),
             helper.make_node("Add", ["x", "k"], ["xk"]),
             helper.make_node("LSTM", ["xk", "W", "R"], ["Y"], hidden_size=H, name="lstm")]
    extra = [helper.make_node("ReduceSum", [f"e{i}"], [f"r{i}"], keepdims=0) for i in range(16)]
    m = model(nodes + extra, [helper.make_tensor_value_info("x", F, None)] +
              [helper.make_tensor_value_info(f"e{i}", F, None) for i in range(16)], ["Y"] + [f"r{i}" for i in range(16)],
              {"W": rand(rng, 1, 4 * H, 4), "R": rand(rng, 1, 4 * H, H)})
    gm = rnnengine.convert(m)
    feeds = {"x": rand(rng, 50000, 1, 4), **{f"e{i}": np.zeros((2,) * 6, np.float32) for i in range(16)}}
    plans = [0]
    real = gm.plan

    def counted(*a, **k):
        plans[0] += 1
        return real(*a, **k)
    gm.plan = counted
    tracemalloc.start()
    try:
        assert gm.time_axes(feeds) == {"x": 0}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, peak
    assert plans[0] <= 12, plans[0]




def test_probing_many_inputs_of_one_length_tries_a_bounded_number_of_unions():
    """40 undeclared rank-6 inputs of one length beside an LSTM over a fixed-shape input:
    nothing is time, so the axes of one length are tried together, one per input; the
    candidates are capped (enumerating them all is exponential: 6**40 ways for 40 inputs)."""
    from rnnengine.runtime.graph import _TimeAxes
    rng = np.random.default_rng(0)
    H, n = 3, 40
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=H, name="lstm")] + \
        [helper.make_node("ReduceSum", [f"e{i}"], [f"r{i}"], keepdims=0) for i in range(n)]
    m = model(nodes, [helper.make_tensor_value_info("x", F, [5, 1, 4])] +
              [helper.make_tensor_value_info(f"e{i}", F, None) for i in range(n)], ["Y"] + [f"r{i}" for i in range(n)],
              {"W": rand(rng, 1, 4 * H, 4), "R": rand(rng, 1, 4 * H, H)})
    gm = rnnengine.convert(m)
    feeds = {"x": rand(rng, 5, 1, 4), **{f"e{i}": np.zeros((2,) * 6, np.float32) for i in range(n)}}
    probe = _TimeAxes(gm, feeds, rnnengine.limits.resolve(None))
    assert len(probe.unions()) == _TimeAxes.MAX_UNIONS
    assert gm.time_axes(feeds) == {}


def test_a_first_chunk_that_cannot_tell_the_time_axis_is_refused():
    """A first chunk that reaches the LSTM as no frame, with every longer probe refused by a
    resource limit: the time axis cannot be told, so the call raises (before: {}, and the
    chunks ran as separate sequences)."""
    rng = np.random.default_rng(4)
    m = conv_lstm(rng, None, pads=(3, 3), K=8, stride=4)
    x = rand(rng, 1, 3, 1)
    assert rnnengine.convert(m).plan({"x": x}).recurrent[0]["T"] == 0
    gm = rnnengine.convert(m, limits=rnnengine.Limits(max_tensor_elements=300))
    with pytest.raises(rnnengine.LimitError, match="cannot tell which input axes are time: .*max_tensor_elements"):
        gm.stream()({"x": x})
    s = rnnengine.convert(m).stream()  # the library's limits: the probes plan, and the axis is found
    s({"x": x})
    assert s.time_axes == {"x": 2}


def lstm_inits(rng, I, H, D=1):
    return {"W": rand(rng, D, 4 * H, I), "R": rand(rng, D, 4 * H, H), "B": rand(rng, D, 8 * H)}


def refused(m, node, why):
    gm = rnnengine.convert(m)
    gm.run({k: v for k, v in _feeds(m).items()})  # the whole-sequence run works
    with pytest.raises(NotStreamableError, match=f"not streamable: .*'{node}'.*{why}"):
        gm.stream()


def _feeds(m):
    rng = np.random.default_rng(0)
    out = {}
    for i in m.graph.input:
        dims = [d.dim_value if d.dim_value else 3 for d in i.type.tensor_type.shape.dim]
        out[i.name] = rand(rng, *dims)
    return out


def test_mean_pooling_over_time_is_refused():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=4, name="lstm"),
             helper.make_node("ReduceMean", ["Y"], ["y"], axes=[0], keepdims=0, name="pool")]
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", "B", 3])], ["y"], lstm_inits(rng, 3, 4))
    refused(m, "pool", "over the time axis")


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_backward_recurrences_are_refused_even_with_explicit_state(direction):
    rng = np.random.default_rng(2)
    D = 2 if direction == "bidirectional" else 1
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["Y", "hn"], hidden_size=4,
                              direction=direction, name="gru")]
    inits = {"W": rand(rng, D, 12, 3), "R": rand(rng, D, 12, 4), "B": rand(rng, D, 24)}
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", "B", 3]),
                      helper.make_tensor_value_info("h0", F, [D, "B", 4])], ["Y", "hn"], inits)
    gm = rnnengine.convert(m)
    assert gm.state_pairs == [("h0", "hn")]
    with pytest.raises(NotStreamableError, match=f"not streamable: GRU node 'gru': direction '{direction}'"):
        gm.stream()


def test_softmax_over_time_and_reshape_of_time_into_features_are_refused():
    rng = np.random.default_rng(4)
    base = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=4, name="lstm")]
    inp = [helper.make_tensor_value_info("x", F, ["T", 2, 3])]
    m = model(base + [helper.make_node("Softmax", ["Y"], ["y"], axis=0, name="sm")], inp, ["y"],
              lstm_inits(rng, 3, 4), opset=13)
    refused(m, "sm", "over the time axis")
    inits = dict(lstm_inits(rng, 3, 4), shape=np.array([1, -1], np.int64))
    m = model(base + [helper.make_node("Reshape", ["Y", "shape"], ["y"], name="flat")], inp, ["y"], inits)
    refused(m, "flat", "mixing time")


def test_positions_counted_from_the_chunk_length_are_refused():
    """Range(0, T) restarts at every chunk: adding positions to the input is refused."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["T"], axis=0),
             helper.make_node("Cast", ["T"], ["Tf"], to=F),
             helper.make_node("Range", ["fzero", "Tf", "fone"], ["pos"], name="positions"),
             helper.make_node("Unsqueeze", ["pos", "axes12"], ["pos3"]),
             helper.make_node("Add", ["x", "pos3"], ["xp"]),
             helper.make_node("LSTM", ["xp", "W", "R", "B"], ["Y"], hidden_size=4, name="lstm")]
    inits = dict(lstm_inits(rng, 3, 4), zero=np.array(0, np.int64), fzero=np.array(0, np.float32),
                 fone=np.array(1, np.float32), axes12=np.array([1, 2], np.int64))
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", 2, 3])], ["Y"], inits)
    refused(m, "positions", "positions would restart")


def test_dividing_by_the_sequence_length_is_refused():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=4, name="lstm"),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["T"], axis=0),
             helper.make_node("Cast", ["T"], ["Tf"], to=F),
             helper.make_node("Div", ["Y", "Tf"], ["y"], name="per_len")]
    inits = dict(lstm_inits(rng, 3, 4), zero=np.array(0, np.int64))
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", 2, 3])], ["y"], inits)
    refused(m, "per_len", "sequence length as a value")


def test_last_step_of_a_forward_layer_streams_as_its_final_state():
    """y = Y[-1] (a classifier on the last step) streams: after the whole sequence the last
    chunk's value is the whole run's."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=4, name="lstm"),
             helper.make_node("Gather", ["Y", "last"], ["y"], axis=0, name="last_step")]
    inits = dict(lstm_inits(rng, 3, 4), last=np.array(-1, np.int64))
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", 2, 3])], ["y"], inits)
    gm = rnnengine.convert(m)
    x = rand(rng, 9, 2, 3)
    whole = gm.run({"x": x})
    s = gm.stream()
    for t0 in range(0, 9, 4):
        last = s({"x": x[t0:t0 + 4]})["y"]
    close(last, whole["y"])
    # the first step is not the same in every chunk
    inits["last"] = np.array(0, np.int64)
    m = model([nodes[0], helper.make_node("Gather", ["Y", "last"], ["y"], axis=0, name="first_step")],
              [helper.make_tensor_value_info("x", F, ["T", 2, 3])], ["y"], inits)
    refused(m, "first_step", "picks steps")


def test_rows_sorted_by_length_at_run_time_are_refused():
    """pack_padded_sequence(enforce_sorted=False) sorts the batch by length inside the graph:
    with per-chunk lengths the order can change between chunks (measured: up to 0.14 off), so
    the stream is refused; the sorted export streams and matches."""
    import os
    here = os.path.join(os.path.dirname(__file__), "data", "corpus")
    with pytest.raises(NotStreamableError, match="order computed from the data"):
        rnnengine.convert(os.path.join(here, "torch_legacy_packed_lstm_unsorted_op14.onnx")).stream()
    gm = rnnengine.convert(os.path.join(here, "torch_legacy_packed_gru_sorted_op14.onnx"))
    rng = np.random.default_rng(8)
    x, lens = rand(rng, 3, 7, 6), np.array([7, 5, 2], np.int64)
    whole = gm.run({"x": x, "lens": lens})
    s = gm.stream()
    ys = []
    for t0 in range(0, 7, 3):  # lengths per chunk: the valid steps of each row in the chunk
        ys.append(s({"x": x[:, t0:t0 + 3], "lens": np.clip(lens - t0, 0, min(3, 7 - t0))})["y"])
    close(np.concatenate(ys, axis=1), whole["y"])
    assert np.all(np.concatenate(ys, axis=1)[2, 2:] == 0)  # past its length a row outputs zeros


def test_initial_state_fed_at_every_call_is_refused_and_paired_state_streams():
    """An initial state that is a graph input without a paired output would restart the
    recurrence in every chunk; paired with its next-state output the stream carries it."""
    rng = np.random.default_rng(9)
    inits = lstm_inits(rng, 3, 4)
    inputs = [helper.make_tensor_value_info("x", F, ["T", "B", 3]), helper.make_tensor_value_info("h0", F, [1, "B", 4])]
    m = model([helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0"], ["Y"], hidden_size=4, name="lstm")],
              inputs, ["Y"], inits)
    gm = rnnengine.convert(m)
    assert gm.state_pairs == []
    with pytest.raises(NotStreamableError, match="'lstm'.*fed anew at every call"):
        gm.stream()
    # h fed back but c not: c would restart at every call (measured 0.26 off before this check)
    m = model([helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0"], ["Y", "hn"], hidden_size=4, name="lstm")],
              inputs, ["Y", "hn"], inits)
    gm = rnnengine.convert(m)
    assert gm.state_pairs == [("h0", "hn")]
    with pytest.raises(NotStreamableError, match="'lstm'.*initial_h is state fed back.*initial_c is not"):
        gm.stream()
    inputs.append(helper.make_tensor_value_info("c0", F, [1, "B", 4]))
    m = model([helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4,
                                name="lstm")], inputs, ["Y", "hn", "cn"], inits)
    gm = rnnengine.convert(m)
    assert sorted(gm.state_pairs) == [("c0", "cn"), ("h0", "hn")]
    x, h0, c0 = rand(rng, 8, 2, 3), rand(rng, 1, 2, 4), rand(rng, 1, 2, 4)
    whole = gm.run({"x": x, "h0": h0, "c0": c0})
    s = gm.stream()
    s.set_state({"inputs": {"h0": h0, "c0": c0}})
    ys = [s({"x": x[t0:t0 + 3]}) for t0 in range(0, 8, 3)]
    close(np.concatenate([y["Y"] for y in ys]), whole["Y"])
    close(ys[-1]["hn"], whole["hn"])
    close(ys[-1]["cn"], whole["cn"])


# --- random graphs: a stream is either refused or exact ----------------------------------------

OPS = ["lstm", "gru_reverse", "rnn_bidirectional", "tanh", "matmul", "softmax", "reduce_mean", "conv",
       "slice_time", "concat", "add_bias", "pad_time", "swap_time_batch", "gather_last"]


def random_graph(rng, ops, T_sym="T"):
    """x (T, B, 3) through the chosen ops, each keeping a (T, B, F) layout (time first)."""
    nodes, inits, F_ = [], {}, 3
    cur = "x"
    for k, op in enumerate(ops):
        o, name = f"v{k}", f"n{k}_{op}"
        if op in ("lstm", "gru_reverse", "rnn_bidirectional"):
            kind, direction = {"lstm": ("LSTM", "forward"), "gru_reverse": ("GRU", "reverse"),
                               "rnn_bidirectional": ("RNN", "bidirectional")}[op]
            D, H, G = (2 if direction == "bidirectional" else 1), 4, {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
            inits.update({f"W{k}": rand(rng, D, G * H, F_) * 0.5, f"R{k}": rand(rng, D, G * H, H) * 0.5,
                          f"B{k}": rand(rng, D, 2 * G * H) * 0.1, f"s{k}": np.array([0, 0, -1], np.int64)})
            nodes += [helper.make_node(kind, [cur, f"W{k}", f"R{k}", f"B{k}"], [o + "y"], hidden_size=H,
                                       direction=direction, name=name),
                      helper.make_node("Transpose", [o + "y"], [o + "t"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [o + "t", f"s{k}"], [o])]
            F_ = D * H
        elif op == "tanh":
            nodes.append(helper.make_node("Tanh", [cur], [o], name=name))
        elif op == "add_bias":
            inits[f"b{k}"] = rand(rng, F_)
            nodes.append(helper.make_node("Add", [cur, f"b{k}"], [o], name=name))
        elif op == "matmul":
            inits[f"M{k}"] = rand(rng, F_, 5) * 0.5
            nodes.append(helper.make_node("MatMul", [cur, f"M{k}"], [o], name=name))
            F_ = 5
        elif op == "softmax":
            nodes.append(helper.make_node("Softmax", [cur], [o], axis=int(rng.integers(0, 3)), name=name))
        elif op == "reduce_mean":
            ax = int(rng.integers(0, 3))
            nodes.append(helper.make_node("ReduceMean", [cur], [o], axes=[ax], keepdims=1, name=name))
            F_ = 1 if ax == 2 else F_
        elif op == "conv":
            K, st_ = int(rng.integers(1, 4)), 1
            pl, pr = int(rng.integers(0, K)), int(rng.integers(0, K))
            inits[f"C{k}"] = rand(rng, F_, F_, K) * 0.5
            nodes += [helper.make_node("Transpose", [cur], [o + "a"], perm=[1, 2, 0]),
                      helper.make_node("Conv", [o + "a", f"C{k}"], [o + "c"], kernel_shape=[K], pads=[pl, pr],
                                       strides=[st_], name=name),
                      helper.make_node("Transpose", [o + "c"], [o], perm=[2, 0, 1])]
        elif op == "slice_time":
            inits.update({f"a{k}": np.array([1], np.int64), f"e{k}": np.array([2 ** 62], np.int64),
                          f"x{k}": np.array([0], np.int64)})
            nodes.append(helper.make_node("Slice", [cur, f"a{k}", f"e{k}", f"x{k}"], [o], name=name))
        elif op == "pad_time":
            mode = str(rng.choice(["constant", "reflect", "edge"]))
            b, e = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            inits[f"p{k}"] = np.array([b, 0, 0, e, 0, 0], np.int64)
            nodes.append(helper.make_node("Pad", [cur, f"p{k}"], [o], mode=mode, name=name))
        elif op == "swap_time_batch":  # the next layer runs over the batch axis
            nodes.append(helper.make_node("Transpose", [cur], [o], perm=[1, 0, 2], name=name))
        elif op == "gather_last":  # the last step, kept as a step of length 1
            inits[f"g{k}"] = np.array([-1], np.int64)
            nodes.append(helper.make_node("Gather", [cur, f"g{k}"], [o], axis=0, name=name))
        elif op == "concat":
            nodes += [helper.make_node("Tanh", [cur], [o + "h"]),
                      helper.make_node("Concat", [cur, o + "h"], [o], axis=int(rng.integers(0, 3)), name=name)]
            if nodes[-1].attribute[0].i == 2:
                F_ *= 2
        cur = o
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return model(nodes, [helper.make_tensor_value_info("x", F, [T_sym, 2, 3])], ["y"], inits, opset=13)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4), seed=st.integers(0, 10 ** 6),
       chunks=st.lists(st.integers(1, 5), min_size=1, max_size=3))
@example(ops=["conv", "gather_last", "lstm"], seed=2, chunks=[2])  # (a run of 2 steps fails as the call does)
def test_random_graphs_stream_exactly_or_are_refused(ops, seed, chunks):
    if not any(o in ("lstm", "gru_reverse", "rnn_bidirectional") for o in ops):
        ops = ["lstm"] + ops  # a recurrent layer makes the time axis
    rng = np.random.default_rng(seed)
    m = random_graph(rng, ops)
    x = rand(rng, 11, 2, 3)
    gm = rnnengine.convert(m)
    try:
        want = ort_session(m).run(None, {"x": x})[0]
    except Exception:  # an invalid graph (e.g. reflect padding longer than a mean over time left)
        return
    whole = gm.run({"x": x})
    close(whole["y"], want)
    try:
        s = gm.stream()
    except NotStreamableError as e:
        assert any(f"_{o}'" in str(e) for o in ops), str(e)  # names one of the nodes
        return
    if not s.time_axes:
        # nothing reaches a recurrence's time axis (e.g. a mean over the input first): the
        # model takes one fixed step per call, so a call is a step, not a piece of a sequence
        try:
            want_step = gm.run({"x": x[:chunks[0]]})["y"]
        except (rnnengine.ops.handlers.UnsupportedError, rnnengine.GraphRunError) as e:
            # e.g. reflect padding longer than the chunk; Y[-1] of a conv's zero frames (a
            # Gather index out of range when it runs): the call fails as the run does
            with pytest.raises(type(e), match=re.escape(str(e))):
                s({"x": x[:chunks[0]]})
            return
        close(s({"x": x[:chunks[0]]})["y"], want_step)
        return
    parts, t, k = [], 0, 0
    while t < 11:
        parts.append(s({"x": x[t:t + chunks[k % len(chunks)]]}))
        t += chunks[k % len(chunks)]
        k += 1
    tail = s.finish()
    if tail:
        parts.append(tail)
    axis = s.output_axes["y"]
    got = parts[-1]["y"] if axis is None else np.concatenate([p["y"] for p in parts], axis=axis)
    close(got, whole["y"])


def test_a_rank_0_constant_output_keeps_its_shape_in_a_stream():
    # found by the differential fuzzer (tools/fuzz/diff_onnx.py): a stream returned a scalar
    # constant output as shape (1,) (np.ascontiguousarray makes rank 0 rank 1); run() gave ()
    rng = np.random.default_rng(4)
    H = 3
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["Y"], hidden_size=H),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(7, np.int64)))]
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["T", 2, 4])], ["Y", "k"],
              {"W": rand(rng, 1, 3 * H, 4), "R": rand(rng, 1, 3 * H, H)})
    m.graph.output[1].type.tensor_type.elem_type = TensorProto.INT64
    gm = rnnengine.convert(m)
    x = rand(rng, 5, 2, 4)
    want = ort_session(m).run(None, {"x": x})
    assert gm.run({"x": x})["k"].shape == want[1].shape == ()
    s = gm.stream()
    outs = [s({"x": x[a:b]}) for a, b in ((0, 2), (2, 3), (3, 5))]  # the first call plans; later ones are bound
    for o in outs:
        assert o["k"].shape == () and o["k"] == 7
    assert s.step({"x": x[0]})["k"].shape == ()
    close(np.concatenate([o["Y"] for o in outs]), want[0])


def test_outputs_computed_from_the_fed_back_state_are_refused():
    # found by the differential fuzzer: an output computed from a state input (here a Slice,
    # then a Relu of it) was, in a stream, the state as each call began, where the whole run
    # reads the initial state once; and such a value combined with the time steps after a
    # computation (not a plain move) slipped past the check that refuses the moved one
    rng = np.random.default_rng(5)
    H = 3
    base = [helper.make_node("GRU", ["x", "W", "R", "", "", "h0"], ["Y", "hn"], hidden_size=H),
            helper.make_node("Squeeze", ["Y", "ax1"], ["y"])]
    inits = {"W": rand(rng, 1, 3 * H, 4), "R": rand(rng, 1, 3 * H, H), "ax1": np.array([1], np.int64)}
    ins = [helper.make_tensor_value_info("x", F, ["T", 2, 4]), helper.make_tensor_value_info("h0", F, [1, 2, H])]
    x = rand(rng, 5, 2, 4)
    for extra, outs, what in (
            ([helper.make_node("Relu", ["h0"], ["r0"])], ["y", "hn", "r0"], r"output node 'r0': is computed from the state"),
            ([helper.make_node("Relu", ["h0"], ["r0"]), helper.make_node("Squeeze", ["r0", "ax0"], ["r1"]),
              helper.make_node("Add", ["y", "r1"], ["z"])], ["z", "hn"], r"Add node .*combines the state fed back")):
        m = model(base + extra, ins, outs, {**inits, "ax0": np.array([0], np.int64)})
        gm = rnnengine.convert(m)
        assert gm.state_pairs == [("h0", "hn")]
        h0 = rand(rng, 1, 2, H)
        whole = gm.run({"x": x, "h0": h0})
        close(whole[outs[0]], ort_session(m).run(None, {"x": x, "h0": h0})[0])
        with pytest.raises(NotStreamableError, match=what):
            gm.stream()({"x": x[:2]})


@pytest.mark.parametrize("K, hop, pads, first", [(64, 129, (0, 0), 70), (256, 128, (128, 128), 16)])
def test_a_stateless_strided_conv_streams_from_a_short_first_chunk(K, hop, pads, first):
    # review: one longer probe (70 -> 140 samples) gave no more frames behind a hop of 129, so
    # the axis was taken for no time and each call ran as its own sequence (9.6 off, or 17
    # frames for run()'s 9); the probes now go longer until the outputs grow
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[K], strides=[hop], pads=list(pads)),
             helper.make_node("Mul", ["c", "c"], ["y"])]
    m = model(nodes, [helper.make_tensor_value_info("x", F, ["B", 1, "T"])], ["y"], {"W": rand(rng, 5, 1, K)})
    gm = rnnengine.convert(m)
    x = rand(rng, 1, 1, first + 6 * hop + 17)
    whole = gm.run({"x": x})["y"]
    close(whole, ort_session(m).run(None, {"x": x})[0])
    s = gm.stream()
    parts, t = [], 0
    for n in [first] + [hop] * 100:
        if t >= x.shape[2]:
            break
        parts.append(s({"x": x[:, :, t:t + n]})["y"])
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail["y"])
    assert s.time_axes == {"x": 2}
    close(np.concatenate(parts, axis=2), whole)
