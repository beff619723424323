"""Sequence lengths in streams (README, "Sequence lengths in streams"): a graph input feeding
an LSTM/GRU/RNN's sequence_lens means, per call, each row's valid steps in that chunk
(clip(L - t0, 0, n) for a row of whole length L). Chunk by chunk the stream must give
onnxruntime's whole run: Y joined along time, and the last call's Y_h / Y_c, for rows that end
in an earlier chunk (their state carries on) and rows of length 0 (a zero final state, as a
whole run gives), from no initial state, a constant one, or state inputs the stream feeds
back (state_pairs). Constant lengths count the whole sequence and are refused by name.
(Found by a red-team review: before, the last call gave the constant initial state, or 0, for
such rows, and constant lengths were applied anew to every chunk.)"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.ops.handlers import NotStreamableError
from rnnengine.verify import ort_session

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def lens_model(kind, rng, B, I, H, init, lens_const=None):
    """X (T, B, I) -> kind with sequence_lens -> Y, Y_h (, Y_c). init: "none", "const"
    (initializers), "input" (graph inputs h0 / c0, which the converter pairs with Y_h / Y_c)."""
    g = GATES[kind]
    inits = {"W": rng.standard_normal((1, g * H, I)) * 0.6, "R": rng.standard_normal((1, g * H, H)) * 0.6,
             "Bias": rng.standard_normal((1, 2 * g * H)) * 0.3}
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", B, I])]
    if lens_const is None:
        inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [B]))
    else:
        inits["L"] = np.asarray(lens_const, np.int32)
    states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
    if init == "const":
        for s in states:
            inits[s] = rng.standard_normal((1, B, H)) + 0.5
    elif init == "input":
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, B, H]) for s in states]
    ins = ["X", "W", "R", "Bias", "L"] + (states if init != "none" else [])
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(kind, ins, outs, hidden_size=H, name="rec")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                    for o in outs],
                              [numpy_helper.from_array(np.asarray(a, np.float32 if n != "L" else np.int32), n)
                               for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m, outs, states


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), init=st.sampled_from(["none", "const", "input"]),
       T=st.integers(1, 9), lens=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_streamed_lengths_equal_the_whole_run(kind, init, T, lens, chunks, seed):
    rng = np.random.default_rng(seed)
    B, I, H = len(lens), 3, 4
    L = np.minimum(np.array(lens, np.int32), T)
    m, outs, states = lens_model(kind, rng, B, I, H, init)
    X = rng.standard_normal((T, B, I)).astype(np.float32)
    feeds = {"X": X, "L": L}
    s0 = {n: (rng.standard_normal((1, B, H)) * 0.8).astype(np.float32) for n in states} if init == "input" else {}
    want = dict(zip(outs, ort_session(m).run(None, {**feeds, **s0})))
    gm = rnnengine.convert(m)
    if init == "input":
        assert sorted(gm.state_pairs) == sorted(zip(states, outs[1:]))
    whole = gm.run({**feeds, **s0})
    for o in outs:
        assert max_violation(whole[o], want[o]) <= 1, o
    s = gm.stream()
    if s0:
        s.set_state({"inputs": s0})
    ys, t, k, last = [], 0, 0, None
    while t < T:
        n = min(chunks[k % len(chunks)], T - t)
        k += 1
        last = s({"X": X[t:t + n], "L": np.clip(L - t, 0, n).astype(np.int32)})
        ys.append(last["Y"])
        t += n
    assert max_violation(np.concatenate(ys), want["Y"]) <= 1
    for o in outs[1:]:  # the final state: rows that ended early carry theirs, empty rows give 0
        assert max_violation(last[o], want[o]) <= 1, (o, L.tolist(), last[o], want[o])


def test_a_row_of_length_zero_gives_a_zero_final_state_from_a_constant_initial_state():
    # the review's case: initial_h / initial_c initializers, lengths [3, 0], chunks of 2
    rng = np.random.default_rng(0)
    m, outs, _ = lens_model("LSTM", rng, 2, 3, 2, "const")
    X = rng.standard_normal((4, 2, 3)).astype(np.float32)
    L = np.array([3, 0], np.int32)
    want = dict(zip(outs, ort_session(m).run(None, {"X": X, "L": L})))
    assert np.all(want["Y_h"][0, 1] == 0) and np.all(want["Y_c"][0, 1] == 0)
    s = rnnengine.convert(m).stream()
    for t0 in (0, 2):
        out = s({"X": X[t0:t0 + 2], "L": np.clip(L - t0, 0, 2).astype(np.int32)})
    for o in ("Y_h", "Y_c"):
        assert max_violation(out[o], want[o]) <= 1, o
    # the flags are part of the stream's state: a fork continues them, get/set_state carry them
    st_ = s.get_state()
    assert st_["layers"]["Y:started"].tolist() == [1.0, 0.0]
    other = rnnengine.convert(m).stream()
    other.set_state(st_)
    got = other({"X": X[:1], "L": np.zeros(2, np.int32)})
    for o in ("Y_h", "Y_c"):
        assert max_violation(got[o], want[o]) <= 1, o


def test_a_row_that_ends_early_keeps_its_final_state_through_paired_state_inputs():
    # the review's case: h0 / c0 inputs paired with Y_h / Y_c, lengths [6, 2], chunks of 2:
    # row 1's length is 0 in the last two calls; its final state must not become 0
    rng = np.random.default_rng(0)
    m, outs, states = lens_model("LSTM", rng, 2, 3, 2, "input")
    X = rng.standard_normal((6, 2, 3)).astype(np.float32)
    L = np.array([6, 2], np.int32)
    z = np.zeros((1, 2, 2), np.float32)
    want = dict(zip(outs, ort_session(m).run(None, {"X": X, "L": L, "h0": z, "c0": z})))
    s = rnnengine.convert(m).stream()
    for t0 in (0, 2, 4):
        out = s({"X": X[t0:t0 + 2], "L": np.clip(L - t0, 0, 2).astype(np.int32)})
    assert np.abs(want["Y_h"][0, 1]).max() > 1e-3
    for o in ("Y_h", "Y_c"):
        assert max_violation(out[o], want[o]) <= 1, o


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_constant_lengths_are_refused_in_a_stream_but_run_whole(kind):
    # constant lengths count the whole sequence's steps: a stream would apply them to every
    # chunk (it computed steps 3 and 4 of a [2, 2] model fed chunks of 3)
    rng = np.random.default_rng(1)
    m, outs, _ = lens_model(kind, rng, 2, 3, 2, "none", lens_const=[2, 2])
    X = rng.standard_normal((6, 2, 3)).astype(np.float32)
    gm = rnnengine.convert(m)
    want = ort_session(m).run(None, {"X": X})
    assert max_violation(gm.run({"X": X})["Y"], want[0]) <= 1
    with pytest.raises(NotStreamableError, match=r"node 'rec': its sequence_lens are constants counting the "
                                                  r"whole sequence's steps"):
        gm.stream()({"X": X[:3]})


def test_integer_feeds_are_never_wrapped():
    # NumPy's default int64 fed to an int32 input: converted only when it fits; 2**32 + 2 ran
    # silently as 2 before (the review's case), in run() and in a stream's per-call fast path
    rng = np.random.default_rng(2)
    m, outs, _ = lens_model("LSTM", rng, 2, 3, 2, "none")
    X = rng.standard_normal((4, 2, 3)).astype(np.float32)
    gm = rnnengine.convert(m)
    fits = gm.run({"X": X, "L": np.array([2, 4])})  # int64 that fits: converted
    want = ort_session(m).run(None, {"X": X, "L": np.array([2, 4], np.int32)})
    assert max_violation(fits["Y_h"], want[1]) <= 1
    with pytest.raises(ValueError, match=r"input 'L' is int32: its values 4..4294967298 \(given as int64\) do not fit"):
        gm.run({"X": X, "L": np.array([2**32 + 2, 4])})
    s = gm.stream()
    for k in range(3):  # the first call plans; later calls take the bound fast path
        s({"X": X[k:k + 1], "L": np.array([1, 1])})
    with pytest.raises(ValueError, match=r"do not fit"):
        s({"X": X[3:4], "L": np.array([2**32 + 1, 1])})
    with pytest.raises(ValueError, match=r"input 'X' is float32: values given as float64 overflow it"):
        s({"X": np.full((1, 2, 3), 1e300), "L": np.array([1, 1])})
    same = s.fork()
    got = s({"X": X[3:4].astype(np.float64), "L": np.array([1, 1])})  # float64 that fits: rounded, runs
    np.testing.assert_array_equal(got["Y_h"], same({"X": X[3:4], "L": np.array([1, 1], np.int32)})["Y_h"])


def test_int64_sequence_lens_in_the_file_are_refused_like_onnxruntime():
    # the operator's sequence_lens are int32 (T1); onnxruntime refuses an int64 one at load
    rng = np.random.default_rng(3)
    m, outs, _ = lens_model("GRU", rng, 2, 3, 2, "none")
    m.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    X = rng.standard_normal((4, 2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"GRU node 'rec': sequence_lens must be int32 \(2,\), got int64"):
        rnnengine.convert(m).run({"X": X, "L": np.array([2**32 + 2, 4], np.int64)})


@pytest.mark.parametrize("offset", [0, -1])
def test_lengths_computed_from_the_chunk_stream_only_when_they_are_its_length(offset):
    # review of this change: lengths = Expand(Shape(X)[0], [B]) (every row runs the whole chunk)
    # are plan-time constants equal to each chunk's length: streamed exactly, not refused as
    # constant lengths; T - 1 is not the chunk's length and is refused
    rng = np.random.default_rng(9)
    B, I, H = 2, 3, 4
    inits = {"W": rng.standard_normal((1, 3 * H, I)).astype(np.float32),
             "R": rng.standard_normal((1, 3 * H, H)).astype(np.float32),
             "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
             "off": np.array(offset, np.int64)}
    nodes = [helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["t"], axis=0),
             helper.make_node("Add", ["t", "off"], ["t2"]),
             helper.make_node("Gather", ["s", "i1"], ["b"], axis=0), helper.make_node("Unsqueeze", ["b", "ax0"], ["bb"]),
             helper.make_node("Expand", ["t2", "bb"], ["l64"]), helper.make_node("Cast", ["l64"], ["L"], to=TensorProto.INT32),
             helper.make_node("GRU", ["X", "W", "R", "", "L"], ["Y", "Y_h"], hidden_size=H, name="rec")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", B, I])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y", "Y_h")],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    gm = rnnengine.convert(m)
    X = rng.standard_normal((6, B, I)).astype(np.float32)
    want = ort_session(m).run(None, {"X": X})
    assert max_violation(gm.run({"X": X})["Y"], want[0]) <= 1
    if offset:
        with pytest.raises(NotStreamableError, match=r"its sequence_lens are constants"):
            gm.stream()({"X": X[:3]})
        return
    s = gm.stream()
    parts = [s({"X": X[k:k + 3]}) for k in (0, 3)]
    assert max_violation(np.concatenate([p["Y"] for p in parts]), want[0]) <= 1
    assert max_violation(parts[-1]["Y_h"], want[1]) <= 1


def test_whole_sequence_lengths_fed_to_a_stream_are_refused_in_the_users_terms():
    # the packed-sequence export as users bring it: a stream told the whole sequences' lengths
    # (not each chunk's valid steps) is refused by the recurrent node, and the error names the
    # input and the rule, on the first call and on a later one that takes the compiled fast
    # path; the state is left as it was. (The check is C's: the review of the fifteenth session
    # found a Python pre-check refusing valid calls, with two time inputs or an int input
    # named like a length.)
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "corpus", "torch_legacy_packed_lstm_sorted_op14.onnx")
    gm = rnnengine.convert(path)
    x = np.random.default_rng(4).standard_normal((3, 9, 6)).astype(np.float32)
    lens = np.array([9, 6, 2])
    whole = gm.run({"x": x, "lens": lens})
    with pytest.raises(ValueError, match=r"sequence_lens\[0\] = 9 lies outside \[0, T = 3\]: in a stream, input "
                                         r"'lens' counts each row's valid steps in this chunk.*clip\(L - t0, 0, n\)"):
        gm.stream()({"x": x[:, :3], "lens": lens})
    s = gm.stream()
    outs = []
    for t0 in (0, 3, 6):
        if t0 == 6:  # the same shapes as the call before: the fast path
            with pytest.raises(ValueError, match=r"sequence_lens\[0\] = 9 lies outside.*input 'lens' counts"):
                s({"x": x[:, 6:9], "lens": lens})
        outs.append(s({"x": x[:, t0:t0 + 3], "lens": np.clip(lens - t0, 0, 3)}))
    assert np.array_equal(np.concatenate([o["y"] for o in outs], axis=1), whole["y"])
    assert np.array_equal(outs[-1]["h_n"], whole["h_n"])
