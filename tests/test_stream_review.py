"""Streams that were accepted and answered differently from the whole run (a read-only review
of the streaming rules, twelfth session). Each graph is either refused by name when the stream
is made or fed, or streamed equal to run() at every chunking; run() itself equals onnxruntime.

- the chunk's length minus one as a Slice end (x[:T - 1]) was taken for the whole time axis;
- the chunk's length as an index or a split size on a feature axis was not refused;
- a Reshape [0, 0, 0] on a 1-step chunk put time on the first axis that fit (a Conv after it
  then took time for its batch and dropped its carried context);
- a time axis bounded by a 40-row position table failed the longer probes and was taken for
  no time axis: every chunk ran as its own sequence (positions restarting at 0)."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.errors import NotStreamableError
from rnnengine.verify import ort_session

I, H = 3, 4


def _model(nodes, x_shape, inits, outputs=("Y", "Yh")):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _lstm(rng, i):
    return {"W": (rng.standard_normal((1, 4 * H, i)) * .5).astype(np.float32),
            "R": (rng.standard_normal((1, 4 * H, H)) * .5).astype(np.float32),
            "B": (rng.standard_normal((1, 8 * H)) * .1).astype(np.float32)}


def _length(nodes):
    """Tlen = Shape(x)[0:1] (time is axis 0 of x (T, 1, F)), then nodes."""
    return [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Gather", ["shp", "i0"], ["Tlen"], axis=0)] + nodes


def _streamed(gm, x, sizes, axis):
    s = gm.stream()
    parts, t, k = [], 0, 0
    while t < x.shape[axis]:
        n = sizes[k % len(sizes)]
        k += 1
        parts.append(s.feed({"x": np.take(x, range(t, min(t + n, x.shape[axis])), axis=axis)}))
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail)
    return s, parts


def _check_run(m, x):
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})
    for name, want in zip([o.name for o in m.graph.output], ort_session(m).run(None, {"x": x})):
        assert max_violation(whole[name], want) <= 1, name
    return gm, whole


CASES = {
    "slice_end_length_minus_one": (
        lambda: _length([helper.make_node("Sub", ["Tlen", "one"], ["Tm1"]),
                         helper.make_node("Slice", ["x", "zero", "Tm1", "zero"], ["xs"]),
                         helper.make_node("LSTM", ["xs", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]), I),
    "gather_feature_at_length_minus_one": (
        lambda: _length([helper.make_node("Sub", ["Tlen", "one"], ["Tm1"]),
                         helper.make_node("Gather", ["x", "Tm1"], ["g"], axis=2),
                         helper.make_node("LSTM", ["g", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]), 1),
    "slice_features_to_length": (
        lambda: _length([helper.make_node("Slice", ["x", "zero", "Tlen", "two"], ["s"]),
                         helper.make_node("ReduceSum", ["s", "two"], ["r"], keepdims=1),
                         helper.make_node("LSTM", ["r", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]), 1),
    "split_features_at_length": (
        lambda: _length([helper.make_node("Sub", ["F", "Tlen"], ["rest"]),
                         helper.make_node("Concat", ["Tlen", "rest"], ["sizes"], axis=0),
                         helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=2),
                         helper.make_node("ReduceSum", ["a", "two"], ["r"], keepdims=1),
                         helper.make_node("LSTM", ["r", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]), 1),
    "position_table_of_40_rows": (
        lambda: [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Gather", ["shp", "s0"], ["Tsc"], axis=0),
                 helper.make_node("Range", ["z", "Tsc", "o"], ["pos"]),
                 helper.make_node("Gather", ["pe", "pos"], ["pe_t"], axis=0),
                 helper.make_node("Unsqueeze", ["pe_t", "one"], ["pe3"]),
                 helper.make_node("Add", ["x", "pe3"], ["xp"]),
                 helper.make_node("LSTM", ["xp", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)], I),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stream_that_would_use_the_chunk_length_is_refused(case):
    rng = np.random.default_rng(0)
    make, lstm_in = CASES[case]
    F = 32 if lstm_in == 1 else I
    inits = dict(i0=np.array([0], np.int64), s0=np.array(0, np.int64), one=np.array([1], np.int64),
                 zero=np.array([0], np.int64), two=np.array([2], np.int64), F=np.array([F], np.int64),
                 z=np.array(0, np.int64), o=np.array(1, np.int64),
                 pe=rng.standard_normal((40, I)).astype(np.float32), **_lstm(rng, lstm_in))
    m = _model(make(), ["T", 1, F], inits)
    x = rng.standard_normal((10, 1, F)).astype(np.float32)
    gm, _ = _check_run(m, x)
    for sizes in ((1,), (2,), (3,), (7,), (10,), (2, 5, 1, 3)):
        with pytest.raises(NotStreamableError):
            _streamed(gm, x, sizes, 0)


def test_a_reshape_of_a_one_step_chunk_keeps_time_where_it_goes():
    # x (1, 1, T) -> Reshape [0, 0, 0] -> causal Conv: a 1-step chunk is (1, 1, 1), where every
    # axis fits; time must stay on axis 2, the Conv's, with its carried context
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["x", "shp"], ["xr"]),
             helper.make_node("Conv", ["xr", "w", "b"], ["c"], kernel_shape=[3], pads=[2, 0])]
    m = _model(nodes, [1, 1, "T"], dict(shp=np.array([0, 0, 0], np.int64),
                                        w=rng.standard_normal((3, 1, 3)).astype(np.float32),
                                        b=rng.standard_normal(3).astype(np.float32)), outputs=("c",))
    x = rng.standard_normal((1, 1, 12)).astype(np.float32)
    gm, whole = _check_run(m, x)
    for sizes in ((1,), (4, 1, 7), (2,), (5,)):
        s, parts = _streamed(gm, x, sizes, 2)
        assert s.time_axes == {"x": 2} and s.output_axes["c"] == 2, sizes
        got = np.concatenate([p["c"] for p in parts], axis=2)
        assert got.shape == whole["c"].shape and np.allclose(got, whole["c"], rtol=1e-6, atol=1e-6), sizes


def test_a_slice_to_the_length_itself_still_streams():
    # the exact length (Shape -> Gather, no arithmetic) as a Slice end is the whole time axis
    rng = np.random.default_rng(0)
    nodes = _length([helper.make_node("Slice", ["x", "zero", "Tlen", "zero"], ["xs"]),
                     helper.make_node("LSTM", ["xs", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)])
    m = _model(nodes, ["T", 1, I], dict(i0=np.array([0], np.int64), zero=np.array([0], np.int64), **_lstm(rng, I)))
    x = rng.standard_normal((10, 1, I)).astype(np.float32)
    gm, whole = _check_run(m, x)
    for sizes in ((1,), (3,), (2, 5, 1, 3)):
        s, parts = _streamed(gm, x, sizes, 0)
        got = np.concatenate([p["Y"] for p in parts], axis=0)
        assert np.allclose(got, whole["Y"], rtol=1e-5, atol=1e-6) and \
            np.allclose(parts[-1]["Yh"], whole["Yh"], rtol=1e-5, atol=1e-6), sizes


def _loop_counter_model(start):
    """A Loop over time (trip count T) carrying k from `start`, + 1 per step, stacking 2 x[i];
    then Slice(ys, 0, k) -> LSTM. k ends at T + start: the length only when start is 0."""
    rng = np.random.default_rng(0)
    V = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Add", ["k_in", "one"], ["k_out"]), helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Gather", ["x", "i"], ["xi"], axis=0), helper.make_node("Add", ["xi", "xi"], ["yi"])],
        "body", [V("i", TensorProto.INT64, []), V("c_in", TensorProto.BOOL, []), V("k_in", TensorProto.INT64, [1])],
        [V("c_out", TensorProto.BOOL, []), V("k_out", TensorProto.INT64, [1]), V("yi", TensorProto.FLOAT, ["B", I])],
        [numpy_helper.from_array(np.array([1], np.int64), "one")])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "i0", "i1"], ["T1"]),
             helper.make_node("Squeeze", ["T1", "i0"], ["T"]),
             helper.make_node("Loop", ["T", "true", "k0"], ["kf", "ys"], body=body),
             helper.make_node("Slice", ["ys", "i0", "kf", "i0"], ["ycut"]),
             helper.make_node("LSTM", ["ycut", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]
    return _model(nodes, ["T", 1, I], dict(i0=np.array([0], np.int64), i1=np.array([1], np.int64),
                                           k0=np.array([start], np.int64), true=np.array(True), **_lstm(rng, I)))


@pytest.mark.parametrize("start", [-1, 0])
def test_a_loop_counter_is_the_length_only_when_it_counts_from_zero(start):
    # review of this session's change: after a loop over time every carried integer was marked
    # as the chunk's length, so Slice(ys, 0, k) with k = T - 1 was taken for the whole axis and
    # each chunk lost a step; k counted from 0 (k = T) still streams
    m = _loop_counter_model(start)
    x = np.random.default_rng(1).standard_normal((7, 1, I)).astype(np.float32)
    gm, whole = _check_run(m, x)
    for sizes in ((1,), (2,), (3,), (2, 5)):
        if start:
            with pytest.raises(NotStreamableError):
                _streamed(gm, x, sizes, 0)
            continue
        s, parts = _streamed(gm, x, sizes, 0)
        got = np.concatenate([p["Y"] for p in parts], axis=0)
        assert got.shape == whole["Y"].shape and np.allclose(got, whole["Y"], rtol=1e-5, atol=1e-6), sizes


def test_a_reshape_to_a_cast_shape_after_a_look_ahead_conv_streams():
    # review of this session's change: a chunk the centred conv holds back (no output steps yet)
    # reshaped its target through the int8 length mask as indices (every axis set to the probe)
    rng = np.random.default_rng(0)
    F, C = 4, 6
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["xt", "Wc"], ["y"], pads=[1, 1]),
             helper.make_node("Shape", ["y"], ["s"]), helper.make_node("Cast", ["s"], ["s2"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["y", "s2"], ["z"]),
             helper.make_node("Transpose", ["z"], ["zt"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["zt", "W", "R", "B"], ["Y", "Yh"], hidden_size=H)]
    m = _model(nodes, ["B", "T", F], dict(Wc=(rng.standard_normal((C, F, 3)) * .3).astype(np.float32), **_lstm(rng, C)))
    x = rng.standard_normal((2, 7, F)).astype(np.float32)
    gm, whole = _check_run(m, x)
    for sizes in ((1,), (2,), (3,), (7,)):
        s, parts = _streamed(gm, x, sizes, 1)
        got = np.concatenate([p["Y"] for p in parts if "Y" in p], axis=s.output_axes["Y"])
        assert got.shape == whole["Y"].shape and np.allclose(got, whole["Y"], rtol=1e-5, atol=1e-6), sizes


def test_a_time_axis_fixed_by_a_reshape_to_the_example_length_is_refused():
    # review: torch.onnx.export(dynamo=True) of a time-major nn.LSTM reshapes Y to the example's
    # length, [6, -1, H]. A first chunk of 3 planned (3 x 2 rows reshape to (6, 1, H)), longer and
    # shorter ones did not, and the stream ran with no time axis: each chunk (6, 1, 5) where the
    # whole run gives (6, 2, 5), without an error.
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y4"], hidden_size=H),
             helper.make_node("Squeeze", ["Y4", "one"], ["Y3"]),
             helper.make_node("Reshape", ["Y3", "fixed"], ["Y"])]
    m = _model(nodes, ["T", "B", I], dict(one=np.array([1], np.int64), fixed=np.array([6, -1, H], np.int64),
                                          **_lstm(rng, I)), outputs=("Y",))
    x = rng.standard_normal((6, 2, I)).astype(np.float32)
    gm, whole = _check_run(m, x)
    assert whole["Y"].shape == (6, 2, H)
    for sizes in ((3,), (2,), (1,)):
        with pytest.raises(rnnengine.RnnEngineError):
            _streamed(gm, x, sizes, 0)
