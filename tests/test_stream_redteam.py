"""Red-team checks of the streaming rule: for each graph, a stream made by
`rnnengine.convert(m).stream()` gives, chunk by chunk, exactly what `run()` gives on the whole
sequence (outputs concatenated along `stream.output_axes`, final values from the last call),
or `stream()` raises NotStreamableError naming the node. Tests that fail name a finding; the
others are behaviour checked and found right (regression tests)."""
import numpy as np

import pytest
from onnx import TensorProto, helper

import rnnengine
from rnnengine.ops.handlers import NotStreamableError
from rnnengine.verify import ort_session
from test_stream_rule import F, close, lstm_inits, model, rand

I64 = TensorProto.INT64


def vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def N(op, ins, outs, **kw):
    return helper.make_node(op, ins, outs, **kw)


def chunked(s, feeds, axes, sizes):
    """Feeds `feeds` (inputs in `axes` cut along that axis, the others whole) in chunks of
    `sizes` (cycled), then finish(); returns the list of outputs of every call."""
    name0 = next(iter(axes))
    T = feeds[name0].shape[axes[name0]]
    parts, t, k = [], 0, 0
    while t < T:
        n = sizes[k % len(sizes)]
        k += 1
        parts.append(s({nm: (np.take(a, range(t, min(T, t + n)), axis=axes[nm]) if nm in axes else a)
                        for nm, a in feeds.items()}))
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail)
    return parts


def joined(s, parts, name):
    ax = s.output_axes.get(name)
    if ax is None:
        return parts[-1][name]
    return np.concatenate([p[name] for p in parts if name in p], axis=ax)


def exact_or_refused(m, feeds, axes, sizes, node):
    """The rule: stream() refuses naming `node`, or every chunking in `sizes` gives the whole run."""
    gm = rnnengine.convert(m)
    whole = gm.run(feeds)
    try:
        gm.stream()
    except NotStreamableError as e:
        names = (node,) if isinstance(node, str) else node
        assert any(f"'{n}'" in str(e) for n in names), str(e)
        return None
    return streams_exactly(m, feeds, axes, sizes)


def streams_exactly(m, feeds, axes, sizes):
    gm = rnnengine.convert(m)
    whole = gm.run(feeds)
    for sz in sizes:
        s = gm.stream()
        parts = chunked(s, feeds, axes, sz)
        for name in whole:
            close(joined(s, parts, name), whole[name])
    return gm


def lstm_y(src="x", H=4, opset=13):
    squeeze = N("Squeeze", ["Y", "a1"], ["y"]) if opset >= 13 else N("Squeeze", ["Y"], ["y"], axes=[1])
    return [N("LSTM", [src, "W", "R", "B"], ["Y", "Yh"], hidden_size=H, name="lstm"), squeeze]


def base_inits(rng, I=3, H=4):
    return dict(lstm_inits(rng, I, H), a1=np.array([1], np.int64))


# --- findings --------------------------------------------------------------------------------

def test_slice_of_time_with_a_fixed_end_is_refused_or_exact():
    """x[:30] along time (truncation to a maximum length): at stream() the example length is
    23, so the slice looks like the whole axis and the stream is made; a 50-step sequence fed
    in chunks of 7 then gives 50 steps where the whole run gives 30."""
    rng = np.random.default_rng(0)
    inits = dict(base_inits(rng), s=np.array([0], np.int64), e=np.array([30], np.int64), ax=np.array([0], np.int64))
    m = model([N("Slice", ["x", "s", "e", "ax"], ["xs"], name="cut")] + lstm_y("xs"),
              [vi("x", ["T", 2, 3])], ["y"], inits)
    exact_or_refused(m, {"x": rand(rng, 50, 2, 3)}, {"x": 0}, [[7]], "cut")


def test_slice_of_the_last_k_steps_is_refused_or_exact():
    """x[-30:] along time: for the 23-step example the start clamps to 0 and the slice passes
    as the whole axis; on 50 steps the stream gives all 50, the whole run the last 30."""
    rng = np.random.default_rng(1)
    inits = dict(base_inits(rng), s=np.array([-30], np.int64), e=np.array([2 ** 62], np.int64),
                 ax=np.array([0], np.int64))
    m = model([N("Slice", ["x", "s", "e", "ax"], ["xs"], name="cut")] + lstm_y("xs"),
              [vi("x", ["T", 2, 3])], ["y"], inits)
    exact_or_refused(m, {"x": rand(rng, 50, 2, 3)}, {"x": 0}, [[7]], "cut")


def test_sequence_length_output_is_refused_or_exact():
    """An output computed from Shape(x) (an encoder's output length): the stream gives the
    last chunk's length (1) with output_axes None (a final value), the whole run 50."""
    rng = np.random.default_rng(2)
    nodes = lstm_y() + [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "z"], ["len"], axis=0, name="length")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["y", "len"], dict(base_inits(rng), z=np.array(0, np.int64)))
    exact_or_refused(m, {"x": rand(rng, 50, 2, 3)}, {"x": 0}, [[7]], ("length", "len"))


def pad_tail_conv(rng, add_input, last=False):
    """x -> (B, C, T) -> Pad 1 zero at the end of time -> Conv K=2 (no pads): the same length
    as x, but each output frame reads one frame ahead, like a conv with pads [0, 1]."""
    inits = dict(base_inits(rng), pads=np.array([0, 0, 0, 0, 0, 1], np.int64), Wc=rand(rng, 3, 3, 2) * 0.5,
                 m1=np.array(-1, np.int64))
    nodes = [N("Transpose", ["x"], ["xt"], perm=[1, 2, 0]),
             N("Pad", ["xt", "pads"], ["xp"], mode="constant", name="pad_end"),
             N("Conv", ["xp", "Wc"], ["c"], kernel_shape=[2], name="conv")]
    if add_input:
        nodes += [N("Add", ["c", "xt"], ["s"], name="add")]
    nodes += [N("Transpose", ["s" if add_input else "c"], ["st"], perm=[2, 0, 1])] + lstm_y("st")
    outs = ["y"]
    if last:
        nodes.append(N("Gather", ["Y", "m1"], ["last"], axis=0, name="last_step"))
        outs = ["y", "last"]
    return model(nodes, [vi("x", ["T", 2, 3])], outs, inits)


def test_pad_at_the_end_of_time_delays_like_a_lookahead_conv():
    """Pad(end=1) along time then a K=2 conv == a conv with pads [0, 1], which the stream
    treats as a delay of 1. Emitted by emit_pad, the held-back frame is not counted as a lag
    (emit_pad keeps x.lag), so Add(conv, x) combines frames one step apart: chunks of 2 give
    a max error of 0.97, no error raised (chunks of 1: 49 steps instead of 50; chunks of 7:
    an UnsupportedError at the call). The conv-with-pads form is delayed correctly."""
    rng = np.random.default_rng(3)
    m = pad_tail_conv(rng, add_input=True)
    x = rand(rng, 50, 2, 3)
    exact_or_refused(m, {"x": x}, {"x": 0}, [[2], [1], [7], [50]], "add")


def test_last_step_after_a_pad_tail_conv_is_refused_or_exact():
    """Y[-1] after Pad(end=1) + conv: the rule refuses the last step of a delayed series (a
    chunk may hold none), but the Pad's delay is not counted, so the stream is made and a
    1-step chunk (which yields no frame yet) fails in C: GraphRunError 'Gather: index -1 at
    position 0 is outside [-0, 0)'."""
    rng = np.random.default_rng(4)
    m = pad_tail_conv(rng, add_input=False, last=True)
    exact_or_refused(m, {"x": rand(rng, 20, 2, 3)}, {"x": 0}, [[1], [3]], "last_step")


def time_loop_model(rng, trip, H=4):
    """An RNN written as an ONNX Loop over time (tf2onnx style): h = tanh(x[i] W + h R), the
    trip count computed from Shape(x), h carried, every h a scan output."""
    body = helper.make_graph(
        [N("Gather", ["x", "i"], ["xi"], axis=0), N("MatMul", ["xi", "Wl"], ["a"]), N("MatMul", ["h", "Rl"], ["b"]),
         N("Add", ["a", "b"], ["ab"]), N("Tanh", ["ab"], ["hn"]), N("Identity", ["hn"], ["sc"]),
         N("Identity", ["c"], ["co"])],
        "body", [vi("i", [], I64), vi("c", [], TensorProto.BOOL), vi("h", [2, H])],
        [vi("co", [], TensorProto.BOOL), vi("hn", [2, H]), vi("sc", [2, H])])
    nodes = [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "z"], ["T"], axis=0)]
    nodes += [N("Identity", ["T"], ["M"])] if trip == "T" else [N("Sub", ["T", "one"], ["M"], name="trip")]
    nodes.append(N("Loop", ["M", "", "h0"], ["hT", "ys"], body=body, name="loop"))
    inits = dict(Wl=rand(rng, 3, H) * 0.5, Rl=rand(rng, H, H) * 0.5, z=np.array(0, np.int64),
                 one=np.array(1, np.int64), h0=np.zeros((2, H), np.float32))
    return model(nodes, [vi("x", ["T", 2, 3])], ["ys", "hT"], inits)


def test_loop_over_time_with_trip_count_T_minus_1_is_refused_or_exact():
    """Loop trip count Shape(x)[0] - 1 (the last step left out): each chunk leaves out its own
    last step. Chunks of 2 over 50 steps: 25 scan steps instead of 49 and the final h 1.11
    off, no error; chunks of 7 end with a 1-step chunk: 'a loop that runs 0 times'."""
    rng = np.random.default_rng(5)
    m = time_loop_model(rng, "T-1")
    exact_or_refused(m, {"x": rand(rng, 50, 2, 3)}, {"x": 0}, [[2], [7]], "loop")


def test_output_axes_stay_right_after_a_one_step_chunk():
    """y reshaped to (1, T, B, H) (target [1, -1, B, H]): for a 1-step chunk the reshape rule
    takes the first candidate axis of length 1 (axis 0) as time, so stream.output_axes says 0
    after such a chunk (1 for longer ones): joined along it the outputs have shape
    (50, 1, 2, 4) instead of (1, 50, 2, 4)."""
    rng = np.random.default_rng(6)
    nodes = lstm_y() + [N("Reshape", ["y", "tgt"], ["y4"], name="r4")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["y4"], dict(base_inits(rng), tgt=np.array([1, -1, 2, 4], np.int64)))
    exact_or_refused(m, {"x": rand(rng, 50, 2, 3)}, {"x": 0}, [[1], [7]], "r4")


def test_reshape_with_a_leading_one_then_squeeze_streams_one_step_chunks():
    """x (T, B, I) -> Reshape [1, -1, B, I] -> Squeeze(0) -> LSTM streams for chunks > 1, but a
    1-step chunk takes axis 0 as time (see above) and the call then raises
    NotStreamableError at Squeeze 'sq0' (squeezes away the time axis) in the middle of the
    stream, after outputs were given: stream() made it, so every chunking must work."""
    rng = np.random.default_rng(7)
    inits = dict(base_inits(rng), tgt=np.array([1, -1, 2, 3], np.int64), a0=np.array([0], np.int64))
    nodes = [N("Reshape", ["x", "tgt"], ["x4"], name="r4"), N("Squeeze", ["x4", "a0"], ["x3"], name="sq0")] + lstm_y("x3")
    m = model(nodes, [vi("x", ["T", 2, 3])], ["y"], inits)
    exact_or_refused(m, {"x": rand(rng, 20, 2, 3)}, {"x": 0}, [[3, 1], [1]], "sq0")


def test_explicit_state_input_used_beside_the_recurrence_is_refused_or_exact():
    """h0/c0 paired with hn/cn, and h0 also added to every step of Y (y = Y + h0): in the
    whole run h0 is the initial state; in a stream it is the previous call's hn, so y is
    0.47 off (chunks of 5) with no error. The elementwise rule does not look at `carried`."""
    rng = np.random.default_rng(8)
    ins = [vi("x", ["T", "B", 3]), vi("h0", [1, "B", 4]), vi("c0", [1, "B", 4])]
    nodes = [N("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4, name="lstm"),
             N("Add", ["Y", "h0"], ["y"], name="resid")]
    m = model(nodes, ins, ["y", "hn", "cn"], lstm_inits(rng, 3, 4))
    assert sorted(rnnengine.convert(m).state_pairs) == [("c0", "cn"), ("h0", "hn")]
    exact_or_refused(m, {"x": rand(rng, 12, 2, 3)}, {"x": 0}, [[5], [1]], "resid")


def masked_model(rng, pool):
    """x (T, B, 3) times a padding mask (T, B), both fed along time, -> LSTM [-> mean over time]."""
    nodes = [N("Unsqueeze", ["mask", "a2"], ["m3"]), N("Mul", ["x", "m3"], ["xm"], name="apply_mask"),
             N("LSTM", ["xm", "W", "R", "B"], ["Yl" if pool else "Y"], hidden_size=4, name="lstm")]
    if pool:
        nodes.append(N("ReduceMean", ["Yl"], ["Y"], axes=[0], keepdims=1, name="pool"))
    inits = dict(lstm_inits(rng, 3, 4), a2=np.array([2], np.int64))
    return model(nodes, [vi("x", ["T", "B", 3]), vi("mask", ["T", "B"])], ["Y"], inits, opset=13)


def test_mean_over_time_is_refused_when_a_mask_input_shares_the_time_axis():
    """Two inputs along time (data and its padding mask, as real exports have): time_axes()
    lengthens one input at a time, the other no longer broadcasts, the plan fails and
    `except Exception: continue` (graph.py, GraphModel.time_axes) finds no time axis at all.
    The stream is then made as a one-step-per-call model and nothing is checked: a
    ReduceMean over time is not refused, and chunks of 5 give a result 0.26 off, no error."""
    rng = np.random.default_rng(9)
    m = masked_model(rng, pool=True)
    x, mask = rand(rng, 12, 2, 3), (rng.random((12, 2)) > 0.3).astype(np.float32)
    exact_or_refused(m, {"x": x, "mask": mask}, {"x": 0, "mask": 0}, [[5]], "pool")


def test_masked_lstm_streams_along_time():
    """Same cause: for x * mask -> LSTM the stream reports time_axes {} and output_axes
    {'Y': None} (a final value) although Y runs along time; joined as the stream says, the
    result is the last chunk (2, 1, 2, 4) instead of (12, 1, 2, 4)."""
    rng = np.random.default_rng(10)
    m = masked_model(rng, pool=False)
    x, mask = rand(rng, 12, 2, 3), (rng.random((12, 2)) > 0.3).astype(np.float32)
    gm = exact_or_refused(m, {"x": x, "mask": mask}, {"x": 0, "mask": 0}, [[5], [1]], "lstm")
    if gm is not None:
        assert gm.stream().time_axes == {"x": 0, "mask": 0}


def test_pad_to_a_multiple_of_the_length_is_refused_when_the_stream_is_made():
    """Pad the end of time to a multiple of 4, pads computed from Shape(x) (front ends that
    frame audio do this). For the 23-step example the pad is 1 step, emit_pad takes it
    (emit_streaming sends Pad along time to emit_pad, which never looks at tdep) and the
    stream is made; the check 'its parameters depend on the sequence length' only fires in
    conv_or_pad_without_time, i.e. for a chunk whose length is already a multiple of 4 or at
    finish() (0 steps): NotStreamableError in the middle of the stream, after outputs were
    given (chunks of 5: at finish(); chunks of 8: at the first call)."""
    rng = np.random.default_rng(11)
    inits = dict(base_inits(rng), z=np.array([0], np.int64), four=np.array([4], np.int64),
                 three=np.array([3], np.int64), zz=np.array([0, 0, 0], np.int64), z2=np.array([0, 0], np.int64))
    nodes = [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "z"], ["T"], axis=0),
             N("Add", ["T", "three"], ["t3"]), N("Div", ["t3", "four"], ["q"]), N("Mul", ["q", "four"], ["T4"]),
             N("Sub", ["T4", "T"], ["e"]), N("Concat", ["zz", "e", "z2"], ["pads"], axis=0),
             N("Pad", ["x", "pads"], ["xp"], mode="constant", name="pad_to_4")] + lstm_y("xp")
    m = model(nodes, [vi("x", ["T", 2, 3])], ["y"], inits)
    x = rand(rng, 50, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["y"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[5], [8]], "pad_to_4")


def test_a_loop_not_over_time_starts_from_its_constants_in_every_call():
    """A Loop with a fixed trip count (3, not the length) whose float carried value starts
    from constant zeros (acc += b), added to every step of Y. Planner.loop (graph.py) makes
    every float loop-carried value that starts from a constant stream state in any stream,
    not only in loops over time (`if self.streaming:` before `stream_state`), so the second
    call starts from 3b and ends at 6b: 19.0 off with chunks of 5, no error."""
    rng = np.random.default_rng(12)
    body = helper.make_graph([N("Add", ["acc", "bl"], ["accn"]), N("Identity", ["c"], ["co"])], "body",
                             [vi("i", [], I64), vi("c", [], TensorProto.BOOL), vi("acc", [1, 4])],
                             [vi("co", [], TensorProto.BOOL), vi("accn", [1, 4])])
    inits = dict(base_inits(rng), bl=rand(rng, 4), acc0=np.zeros((1, 4), np.float32), three=np.array(3, np.int64))
    nodes = lstm_y() + [N("Loop", ["three", "", "acc0"], ["accT"], body=body, name="refine"),
                        N("Add", ["y", "accT"], ["z"], name="add_acc")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["z"], inits)
    x = rand(rng, 20, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["z"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[5], [1]], "refine")


@pytest.mark.parametrize("pick", ["Gather", "Slice"])
def test_last_step_survives_an_empty_chunk(pick):
    """y = Y[-1] streams as a final value, and an LSTM stream takes empty chunks (its Y_h is
    kept). After the whole sequence, a call with 0 steps: Gather(Y, -1) fails in C
    (GraphRunError 'Gather: index -1 at position 0 is outside [-0, 0)'); Slice(Y, -1:)
    returns an empty (0, 1, 2, 4) array as the final value instead of (1, 1, 2, 4). Now both
    refuse that call by name."""
    rng = np.random.default_rng(13)
    inits = dict(base_inits(rng), m1=np.array(-1, np.int64), sm1=np.array([-1], np.int64),
                 big=np.array([2 ** 62], np.int64), ax0=np.array([0], np.int64))
    last = N("Gather", ["Y", "m1"], ["last"], axis=0, name="last_step") if pick == "Gather" else \
        N("Slice", ["Y", "sm1", "big", "ax0"], ["last"], name="last_step")
    m = model(lstm_y() + [last], [vi("x", ["T", 2, 3])], ["last"], inits)
    gm = rnnengine.convert(m)
    x = rand(rng, 10, 2, 3)
    whole = gm.run({"x": x})
    s = gm.stream()
    assert s.output_axes["last"] is None
    close(s({"x": x[:4]})["last"] * 0 + s({"x": x[4:]})["last"], whole["last"])
    # a chunk with no steps has no last step: refused by name, never an empty or stale value
    with pytest.raises(NotStreamableError, match="'last_step'.*no steps"):
        s({"x": x[10:]})


def test_finish_continues_from_the_explicit_state_of_the_last_call():
    """Conv with pads [1, 1] (delay 1) -> LSTM whose h0/c0 are paired with hn/cn. Every call
    is exact, but finish() runs the held-back frame from the state *before* the last call:
    GraphStream.finish builds its feeds from self._last, whose carried entries are the arrays
    fed to the last call (now the spare buffers), not self._carried. Y's last step, hn and cn
    are 0.59 / 0.59 / 1.38 off (one chunk of 15 + finish), no error. The same graph with the
    state kept inside the stream is exact."""
    rng = np.random.default_rng(14)
    inits = dict(lstm_inits(rng, 3, 4), Wc=rand(rng, 3, 3, 3) * 0.5)
    ins = [vi("x", ["B", 3, "T"]), vi("h0", [1, "B", 4]), vi("c0", [1, "B", 4])]
    nodes = [N("Conv", ["x", "Wc"], ["c"], kernel_shape=[3], pads=[1, 1], name="conv"),
             N("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             N("LSTM", ["ct", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4, name="lstm")]
    m = model(nodes, ins, ["Y", "hn", "cn"], inits)
    assert sorted(rnnengine.convert(m).state_pairs) == [("c0", "cn"), ("h0", "hn")]
    exact_or_refused(m, {"x": rand(rng, 2, 3, 15)}, {"x": 2}, [[20], [5], [1], [4, 7]], "lstm")


def test_loop_over_time_reading_a_delayed_series_beside_the_input_is_refused_or_exact():
    """A Loop over time (trip count Shape(ct)[0]) reads x[i] and ct[i], where ct is a conv with
    pads [0, 2] (delay 2) of x: same length in the whole run. Inside the loop the two Gathers
    just set p.loop_timing in turn (streaming.gather) and their values have no time axis, so
    nothing sees that ct trails x by 2 steps. Chunks of 5 over 20 steps: the 18 steps given
    before finish() are 1.79 off (x[i] meets ct[i - 2]), no error; finish() then fails in C
    (GraphRunError 'Gather: index 0 ... outside [-0, 0)'). With the trip count from x the
    first call fails in C."""
    rng = np.random.default_rng(15)
    H = 4
    body = helper.make_graph(
        [N("Gather", ["x", "i"], ["xi"], axis=0), N("Gather", ["ct", "i"], ["ci"], axis=0), N("Add", ["xi", "ci"], ["s"]),
         N("MatMul", ["s", "Wl"], ["a"]), N("MatMul", ["h", "Rl"], ["b"]), N("Add", ["a", "b"], ["ab"]),
         N("Tanh", ["ab"], ["hn"]), N("Identity", ["hn"], ["sc"]), N("Identity", ["c"], ["co"])],
        "body", [vi("i", [], I64), vi("c", [], TensorProto.BOOL), vi("h", [2, H])],
        [vi("co", [], TensorProto.BOOL), vi("hn", [2, H]), vi("sc", [2, H])])
    nodes = [N("Transpose", ["x"], ["xt"], perm=[1, 2, 0]),
             N("Conv", ["xt", "Wc"], ["cv"], kernel_shape=[3], pads=[0, 2], name="conv"),
             N("Transpose", ["cv"], ["ct"], perm=[2, 0, 1]),
             N("Shape", ["ct"], ["sh"]), N("Gather", ["sh", "z"], ["T"], axis=0),
             N("Loop", ["T", "", "h0"], ["hT", "ys"], body=body, name="loop")]
    inits = dict(Wl=rand(rng, 3, H) * 0.5, Rl=rand(rng, H, H) * 0.5, z=np.array(0, np.int64),
                 h0=np.zeros((2, H), np.float32), Wc=rand(rng, 3, 3, 3) * 0.5)
    m = model(nodes, [vi("x", ["T", 2, 3])], ["ys", "hT"], inits)
    x = rand(rng, 20, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["ys"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[5]], "loop")


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("red", ["ReduceSum", "ReduceProd", "ReduceMax"])
def test_length_reduced_from_a_shape_vector_and_used_as_a_value_is_refused(red, keepdims):
    """T = ReduceProd(Shape(x)[0:1]) (how tf2onnx multiplies shape entries), y = Y / T. The
    reduce rule (streaming.py, `reduce`) treats the constant shape vector as data without time:
    keepdims=1 drops its tdep mask, so Div does not see the length and the stream is made,
    0.12 off with chunks of 4, no error; keepdims=0 computes `x.t - sum(... a < x.t)` with
    x.t None: TypeError '<' not supported between 'int' and 'NoneType' (swallowed by
    GraphStream._decide, so stream() is made and the first call raises it). Via Gather
    instead of a reduction, 'per_len' is refused (test_dividing_by_the_sequence_length)."""
    rng = np.random.default_rng(16)
    inits = dict(base_inits(rng), s0=np.array([0], np.int64), s1=np.array([1], np.int64))
    nodes = lstm_y() + [N("Shape", ["x"], ["sh"]), N("Slice", ["sh", "s0", "s1"], ["t1"]),
                        N(red, ["t1"], ["T"], keepdims=keepdims, name="tlen"),
                        N("Cast", ["T"], ["Tf"], to=F), N("Div", ["y", "Tf"], ["z"], name="per_len")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["z"], inits, opset=13)
    x = rand(rng, 12, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["z"], ort_session(m).run(None, {"x": x})[0])
    gm = rnnengine.convert(m)
    try:
        gm.stream()
    except NotStreamableError as e:
        assert "'per_len'" in str(e) or "'tlen'" in str(e), str(e)
        return
    s = gm.stream()
    parts = chunked(s, {"x": x}, {"x": 0}, [4])
    close(joined(s, parts, "z"), gm.run({"x": x})["z"])


def test_sequence_lens_behind_a_lookahead_conv_is_refused_or_exact():
    """Conv with pads [1, 1] (delay 1) -> LSTM with sequence_lens from the graph input `lens`.
    Per chunk the README says lens counts the valid steps of each row *in this chunk* (of x),
    but the LSTM sees the conv's frames, one fewer in the first call: chunks of 4 with
    lens = clip(L - t0, 0, 4) fail in C at the first call (GraphRunError 'sequence_lens[0] = 4
    lies outside [0, T = 3]'). stream() should refuse sequence_lens behind a delaying op (or
    shift the lengths by the delay)."""
    rng = np.random.default_rng(17)
    inits = dict(lstm_inits(rng, 3, 4), Wc=rand(rng, 3, 3, 3) * 0.5)
    nodes = [N("Conv", ["x", "Wc"], ["c"], kernel_shape=[3], pads=[1, 1], name="conv"),
             N("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             N("LSTM", ["ct", "W", "R", "B", "lens"], ["Y", "Yh", "Yc"], hidden_size=4, name="lstm")]
    m = model(nodes, [vi("x", [3, 3, "T"]), vi("lens", [3], TensorProto.INT32)], ["Y", "Yh"], inits)
    gm = rnnengine.convert(m)
    x, lens = rand(rng, 3, 3, 12), np.array([12, 7, 3], np.int32)
    whole = gm.run({"x": x, "lens": lens})
    ort = ort_session(m).run(None, {"x": x, "lens": lens})
    close(whole["Y"], ort[0])
    try:
        s = gm.stream()
    except NotStreamableError as e:
        assert "'lstm'" in str(e) or "'conv'" in str(e), str(e)
        return
    parts = [s({"x": x[:, :, t0:t0 + 4], "lens": np.clip(lens - t0, 0, 4).astype(np.int32)}) for t0 in range(0, 12, 4)]
    parts.append(s.finish())
    close(np.concatenate([p["Y"] for p in parts if "Y" in p], axis=0), whole["Y"])
    close(parts[-1]["Yh"], whole["Yh"])


def test_paired_state_output_that_is_not_the_final_state_is_refused_or_exact():
    """h0 -> GRU, hn = Tanh(Y_h) (paired h0=hn by the converter). The stream feeds hn back as
    the next call's h0, so the recurrence restarts from tanh(h) instead of h: Y 0.22 off and
    hn 0.05 off (chunks of 5), no error. Nothing checks that a paired output is the final
    state of the layer the paired input initialises (with hn = Y_h it is exact)."""
    rng = np.random.default_rng(18)
    inits = {"W": rand(rng, 1, 12, 3), "R": rand(rng, 1, 12, 4), "B": rand(rng, 1, 24)}
    nodes = [N("GRU", ["x", "W", "R", "B", "", "h0"], ["Y", "Yh"], hidden_size=4, name="gru"),
             N("Tanh", ["Yh"], ["hn"], name="squash")]
    m = model(nodes, [vi("x", ["T", "B", 3]), vi("h0", [1, "B", 4])], ["Y", "hn"], inits)
    assert rnnengine.convert(m).state_pairs == [("h0", "hn")]
    exact_or_refused(m, {"x": rand(rng, 12, 2, 3)}, {"x": 0}, [[5]], ("gru", "hn"))


@pytest.mark.parametrize("via", ["Split", "Expand", "Transpose"])
def test_length_passed_through_split_expand_or_transpose_and_used_as_a_value_is_refused(via):
    """The same with the length taken out of Shape(x) by Split, or a [T] slice Expand-ed to
    (1, 1, 1) (as lengths vectors are built) or Transpose-d: the rules `split`, `expand` and
    `transpose` (streaming.py) set the outputs' time information without carrying the tdep
    mask of a constant input, so Div(Y, T) is not refused: 0.095 off with chunks of 4."""
    rng = np.random.default_rng(19)
    inits = dict(base_inits(rng), s0=np.array([0], np.int64), s1=np.array([1], np.int64),
                 one3=np.array([1, 1, 1], np.int64))
    mid = {"Split": [N("Split", ["sh"], ["T1", "B1", "F1"], axis=0, name="tlen")],
           "Expand": [N("Slice", ["sh", "s0", "s1"], ["t1"]), N("Expand", ["t1", "one3"], ["T1"], name="tlen")],
           "Transpose": [N("Slice", ["sh", "s0", "s1"], ["t1"]), N("Transpose", ["t1"], ["T1"], perm=[0], name="tlen")]}[via]
    nodes = lstm_y() + [N("Shape", ["x"], ["sh"])] + mid + [N("Cast", ["T1"], ["Tf"], to=F),
                                                           N("Div", ["y", "Tf"], ["z"], name="per_len")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["z"], inits, opset=13)
    x = rand(rng, 12, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["z"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[4]], "per_len")


def lstm_cell_loop(rng, pool, H=4):
    """tf2onnx-style: a Loop over Shape(x)[0] whose body runs a 1-step LSTM node on x[i] with
    the loop-carried h, c; every h a scan output [-> mean over time]."""
    body = helper.make_graph(
        [N("Gather", ["x", "i"], ["xi"], axis=0), N("Unsqueeze", ["xi", "ax0"], ["x1"]),
         N("LSTM", ["x1", "W", "R", "B", "", "h", "c"], ["Y", "hn", "cn"], hidden_size=H, name="cell"),
         N("Squeeze", ["hn", "ax0"], ["sc"]), N("Identity", ["cond"], ["co"])],
        "body", [vi("i", [], I64), vi("cond", [], TensorProto.BOOL), vi("h", [1, 2, H]), vi("c", [1, 2, H])],
        [vi("co", [], TensorProto.BOOL), vi("hn", [1, 2, H]), vi("cn", [1, 2, H]), vi("sc", [2, H])])
    nodes = [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "z"], ["T"], axis=0),
             N("Loop", ["T", "", "h0", "c0"], ["hT", "cT", "ys"], body=body, name="loop")]
    outs = ["ys", "hT", "cT"]
    if pool:
        nodes.append(N("ReduceMean", ["ys"], ["pooled"], axes=[0], keepdims=0, name="pool"))
        outs = ["pooled"]
    inits = dict(lstm_inits(rng, 3, H), z=np.array(0, np.int64), ax0=np.array([0], np.int64),
                 h0=np.zeros((1, 2, H), np.float32), c0=np.zeros((1, 2, H), np.float32))
    return model(nodes, [vi("x", ["T", 2, 3])], outs, inits)


def test_mean_over_a_loop_of_lstm_cells_is_refused():
    """A Loop over time running a 1-step LSTM node per iteration: GraphModel.time_axes asks
    that lengthening an input keep the number of recurrent records (`len(ts) == len(ts2)`),
    but the unrolled loop adds one record per step, so no time axis is found (time_axes {}).
    The stream is then made as one step per call with nothing checked: a ReduceMean over
    time is not refused, 0.30 off with chunks of 5, no error."""
    rng = np.random.default_rng(34)
    m = lstm_cell_loop(rng, pool=True)
    x = rand(rng, 12, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["pooled"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[5]], "pool")


def test_loop_of_lstm_cells_streams_along_time():
    """Same cause: for the loop alone, time_axes is {} and output_axes['ys'] is None (a final
    value) though ys runs along time: joined as the stream says, ys is the last chunk
    (2, 2, 4) instead of (12, 2, 4); hT / cT are right."""
    rng = np.random.default_rng(35)
    m = lstm_cell_loop(rng, pool=False)
    x = rand(rng, 12, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["ys"], ort_session(m).run(None, {"x": x})[0])
    gm = exact_or_refused(m, {"x": x}, {"x": 0}, [[5], [1]], "loop")
    if gm is not None:
        assert gm.stream().time_axes == {"x": 0}


def test_initial_state_computed_from_the_paired_input_is_refused_or_exact():
    """h0 -> Mul 0.5 -> GRU initial_h, hn = Y_h paired with h0. `propagate` marks any value
    computed from carried inputs alone as carried, so recurrent_check accepts it; the stream
    then starts each call from 0.5 * (last hn) where the whole run continues from hn: Y 0.46
    off with chunks of 5, no error."""
    rng = np.random.default_rng(36)
    inits = {"W": rand(rng, 1, 12, 3), "R": rand(rng, 1, 12, 4), "B": rand(rng, 1, 24),
             "half": np.array(0.5, np.float32)}
    nodes = [N("Mul", ["h0", "half"], ["h0s"], name="scale"),
             N("GRU", ["x", "W", "R", "B", "", "h0s"], ["Y", "hn"], hidden_size=4, name="gru")]
    m = model(nodes, [vi("x", ["T", "B", 3]), vi("h0", [1, "B", 4])], ["Y", "hn"], inits)
    assert rnnengine.convert(m).state_pairs == [("h0", "hn")]
    exact_or_refused(m, {"x": rand(rng, 12, 2, 3)}, {"x": 0}, [[5]], "gru")


def test_loop_counter_used_as_a_value_in_a_loop_over_time_is_refused_or_exact():
    """A Loop over time whose body adds 0.1 * i (the iteration number: a step position) to
    each scan output. In a stream the loop restarts at i = 0 in every chunk (Planner.loop binds
    the counter as a plain constant; only Gather(x, i) is understood), so positions restart
    like Range's, which is refused: here ys is 1.0 off with chunks of 5, no error."""
    rng = np.random.default_rng(37)
    H = 4
    body = helper.make_graph(
        [N("Gather", ["x", "i"], ["xi"], axis=0), N("MatMul", ["xi", "Wl"], ["a"]), N("MatMul", ["h", "Rl"], ["b"]),
         N("Add", ["a", "b"], ["ab"]), N("Tanh", ["ab"], ["hn"]),
         N("Cast", ["i"], ["if"], to=F), N("Mul", ["if", "tenth"], ["pos"]), N("Add", ["hn", "pos"], ["sc"], name="add_step"),
         N("Identity", ["c"], ["co"])],
        "body", [vi("i", [], I64), vi("c", [], TensorProto.BOOL), vi("h", [2, H])],
        [vi("co", [], TensorProto.BOOL), vi("hn", [2, H]), vi("sc", [2, H])])
    nodes = [N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "z"], ["T"], axis=0),
             N("Loop", ["T", "", "h0"], ["hT", "ys"], body=body, name="loop")]
    inits = dict(Wl=rand(rng, 3, H) * 0.5, Rl=rand(rng, H, H) * 0.5, z=np.array(0, np.int64),
                 h0=np.zeros((2, H), np.float32), tenth=np.array(0.1, np.float32))
    m = model(nodes, [vi("x", ["T", 2, 3])], ["ys", "hT"], inits)
    x = rand(rng, 12, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["ys"], ort_session(m).run(None, {"x": x})[0])
    exact_or_refused(m, {"x": x}, {"x": 0}, [[5]], ("loop", "add_step"))


# --- checked and found right ---------------------------------------------------------------

def test_loop_over_time_with_trip_count_T_streams_exactly():
    rng = np.random.default_rng(20)
    m = time_loop_model(rng, "T")
    x = rand(rng, 30, 2, 3)
    gm = streams_exactly(m, {"x": x}, {"x": 0}, [[7], [1], [2, 5]])
    close(gm.run({"x": x})["ys"], ort_session(m).run(None, {"x": x})[0])


def test_sequence_lens_final_states_of_rows_that_ended_in_earlier_chunks():
    """Per-chunk lengths clip(L - t0, 0, n): a row whose length ended in an earlier chunk keeps
    its Y_h / Y_c in later chunks (0 valid steps), as the whole run's Y_h / Y_c."""
    rng = np.random.default_rng(21)
    nodes = [N("LSTM", ["x", "W", "R", "B", "lens"], ["Y", "Yh", "Yc"], hidden_size=4, name="lstm")]
    m = model(nodes, [vi("x", ["T", 3, 3]), vi("lens", [3], TensorProto.INT32)], ["Y", "Yh", "Yc"],
              lstm_inits(rng, 3, 4))
    gm = rnnengine.convert(m)
    x, lens = rand(rng, 9, 3, 3), np.array([9, 5, 2], np.int32)
    whole = gm.run({"x": x, "lens": lens})
    ort = ort_session(m).run(None, {"x": x, "lens": lens})
    for k, name in enumerate(("Y", "Yh", "Yc")):
        close(whole[name], ort[k])
    s = gm.stream()
    outs = [s({"x": x[t0:t0 + 3], "lens": np.clip(lens - t0, 0, 3).astype(np.int32)}) for t0 in range(0, 9, 3)]
    assert s.finish() == {}
    close(np.concatenate([o["Y"] for o in outs]), whole["Y"])
    close(outs[-1]["Yh"], whole["Yh"])
    close(outs[-1]["Yc"], whole["Yc"])


def test_explicit_lstm_state_streams_in_one_step_chunks():
    rng = np.random.default_rng(22)
    ins = [vi("x", ["T", "B", 3]), vi("h0", [1, "B", 4]), vi("c0", [1, "B", 4])]
    m = model([N("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4, name="lstm")],
              ins, ["Y", "hn", "cn"], lstm_inits(rng, 3, 4))
    streams_exactly(m, {"x": rand(rng, 12, 2, 3)}, {"x": 0}, [[1], [5], [12], [40]])


def test_pad_opset18_with_axes_on_time_streams_exactly():
    rng = np.random.default_rng(23)
    inits = dict(base_inits(rng), pads=np.array([2, 1], np.int64), axp=np.array([0], np.int64),
                 cv=np.array(0.5, np.float32))
    m = model([N("Pad", ["x", "pads", "cv", "axp"], ["xp"], mode="constant", name="padt")] + lstm_y("xp"),
              [vi("x", ["T", 2, 3])], ["y"], inits, opset=18)
    x = rand(rng, 20, 2, 3)
    close(rnnengine.convert(m).run({"x": x})["y"], ort_session(m).run(None, {"x": x})[0])
    streams_exactly(m, {"x": x}, {"x": 0}, [[3], [1], [30]])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("K", [2, 4])
def test_conv_auto_pad_streams_exactly(auto_pad, K):
    rng = np.random.default_rng(24)
    inits = dict(base_inits(rng), Wc=rand(rng, 3, 3, K) * 0.5)
    nodes = [N("Transpose", ["x"], ["xt"], perm=[1, 2, 0]),
             N("Conv", ["xt", "Wc"], ["c"], kernel_shape=[K], auto_pad=auto_pad,
                               dilations=[2 if auto_pad == "VALID" else 1], name="conv"),
             N("Transpose", ["c"], ["ct"], perm=[2, 0, 1])] + lstm_y("ct")
    m = model(nodes, [vi("x", ["T", 2, 3])], ["y", "c"], inits)
    x = rand(rng, 20, 2, 3)
    ort = ort_session(m).run(None, {"x": x})
    whole = rnnengine.convert(m).run({"x": x})
    close(whole["y"], ort[0])
    close(whole["c"], ort[1])
    streams_exactly(m, {"x": x}, {"x": 0}, [[1], [3, 5], [25]])


def test_reduce_over_all_axes_and_softmax_opset11_over_time_are_refused():
    rng = np.random.default_rng(25)
    m = model(lstm_y() + [N("ReduceSum", ["y"], ["r"], keepdims=1, name="rsum")], [vi("x", ["T", 2, 3])], ["r"],
              base_inits(rng), opset=18)
    with pytest.raises(NotStreamableError, match="'rsum'"):
        rnnengine.convert(m).stream()
    # opset 11: Squeeze takes its axes as an attribute (an input from opset 13)
    nodes = lstm_y(opset=11) + [N("Transpose", ["y"], ["yb"], perm=[1, 0, 2]),
                                N("Softmax", ["yb"], ["sm"], axis=1, name="sm")]
    m = model(nodes, [vi("x", ["T", 2, 3])], ["sm"], base_inits(rng), opset=11)
    with pytest.raises(NotStreamableError, match="'sm'"):
        rnnengine.convert(m).stream()
    nodes[-1] = N("Softmax", ["yb"], ["sm"], axis=2, name="sm")  # over features only: streams
    m = model(nodes, [vi("x", ["T", 2, 3])], ["sm"], base_inits(rng), opset=11)
    streams_exactly(m, {"x": rand(rng, 9, 2, 3)}, {"x": 0}, [[2], [1]])


def test_fork_get_state_set_state_and_empty_chunks_mid_stream_with_conv_context():
    from test_stream_rule import conv_front_end
    rng = np.random.default_rng(26)
    for pads in [(2, 2), (4, 0), (0, 4)]:
        gm = rnnengine.convert(conv_front_end(rng, 4, 6, 3, 2, 2, pads, 2, None))
        x = rand(rng, 2, 4, 40)
        whole = gm.run({"x": x})
        s = gm.stream()
        head = [s({"x": x[:, :, :7]}), s({"x": x[:, :, 7:7]})]
        saved, f = s.get_state(), s.fork()
        runs = {"orig": [s({"x": x[:, :, 7:20]}), s({"x": x[:, :, 20:]}), s.finish()],
                "fork": [f({"x": x[:, :, 7:8]}), f({"x": x[:, :, 8:]}), f.finish()]}
        s.reset()
        s.set_state(saved)
        runs["set_state"] = [s({"x": x[:, :, 7:33]}), s({"x": x[:, :, 33:]}), s.finish()]
        for parts in runs.values():
            for name, ax in (("c", 2), ("y", 0)):
                close(np.concatenate([p[name] for p in head + parts if name in p], axis=ax), whole[name])


def test_layout1_lstm_with_explicit_batch_first_state_streams_exactly():
    rng = np.random.default_rng(27)
    ins = [vi("x", ["B", "T", 3]), vi("h0", ["B", 1, 4]), vi("c0", ["B", 1, 4])]
    m = model([N("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4, layout=1,
                 name="lstm")], ins, ["Y", "hn", "cn"], lstm_inits(rng, 3, 4))
    gm = rnnengine.convert(m)
    assert sorted(gm.state_pairs) == [("c0", "cn"), ("h0", "hn")]
    assert gm.stream().time_axes == {"x": 1}
    streams_exactly(m, {"x": rand(rng, 2, 13, 3)}, {"x": 1}, [[5], [1], [20]])


def test_two_layer_state_sliced_from_one_tensor_streams_exactly():
    """PyTorch num_layers=2 export: h0/c0 (2, B, H) sliced per layer, hn/cn concatenated."""
    rng = np.random.default_rng(28)
    i1, i2 = lstm_inits(rng, 3, 4), lstm_inits(rng, 4, 4)
    inits = {"W1": i1["W"], "R1": i1["R"], "B1": i1["B"], "W2": i2["W"], "R2": i2["R"], "B2": i2["B"],
             "s0": np.array([0], np.int64), "s1": np.array([1], np.int64), "s2": np.array([2], np.int64),
             "ax0": np.array([0], np.int64), "a1": np.array([1], np.int64)}
    nodes = [N("Slice", ["h0", "s0", "s1", "ax0"], ["h01"]), N("Slice", ["h0", "s1", "s2", "ax0"], ["h02"]),
             N("Slice", ["c0", "s0", "s1", "ax0"], ["c01"]), N("Slice", ["c0", "s1", "s2", "ax0"], ["c02"]),
             N("LSTM", ["x", "W1", "R1", "B1", "", "h01", "c01"], ["Y1", "hn1", "cn1"], hidden_size=4, name="l1"),
             N("Squeeze", ["Y1", "a1"], ["y1"]),
             N("LSTM", ["y1", "W2", "R2", "B2", "", "h02", "c02"], ["Y2", "hn2", "cn2"], hidden_size=4, name="l2"),
             N("Concat", ["hn1", "hn2"], ["hn"], axis=0), N("Concat", ["cn1", "cn2"], ["cn"], axis=0)]
    m = model(nodes, [vi("x", ["T", "B", 3]), vi("h0", [2, "B", 4]), vi("c0", [2, "B", 4])], ["Y2", "hn", "cn"], inits)
    assert sorted(rnnengine.convert(m).state_pairs) == [("c0", "cn"), ("h0", "hn")]
    streams_exactly(m, {"x": rand(rng, 11, 2, 3)}, {"x": 0}, [[4], [1], [11]])


def test_empty_chunks_keep_lstm_outputs_and_final_state():
    rng = np.random.default_rng(29)
    gm = rnnengine.convert(model(lstm_y(), [vi("x", ["T", 2, 3])], ["y", "Yh"], base_inits(rng)))
    x = rand(rng, 12, 2, 3)
    whole = gm.run({"x": x})
    s = gm.stream()
    a, e, b = s({"x": x[:5]}), s({"x": x[5:5]}), s({"x": x[5:]})
    assert e["y"].shape == (0, 2, 4)
    close(e["Yh"], a["Yh"])
    close(np.concatenate([a["y"], e["y"], b["y"]]), whole["y"])
    close(b["Yh"], whole["Yh"])


def test_batch_size_change_between_calls_is_an_error():
    rng = np.random.default_rng(30)
    x = rand(rng, 6, 2, 3)
    gm = rnnengine.convert(model(lstm_y(), [vi("x", ["T", "B", 3])], ["y"], base_inits(rng)))
    s = gm.stream()
    s({"x": x[:3]})
    with pytest.raises(ValueError, match="keeps its batch size"):
        s({"x": x[3:, :1]})
    ins = [vi("x", ["T", "B", 3]), vi("h0", [1, "B", 4]), vi("c0", [1, "B", 4])]
    m = model([N("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "hn", "cn"], hidden_size=4, name="lstm")],
              ins, ["Y", "hn", "cn"], lstm_inits(rng, 3, 4))
    s = rnnengine.convert(m).stream()
    s({"x": x[:3]})
    with pytest.raises(Exception, match="keeps its batch size"):
        s({"x": x[3:, :1]})


def test_embedding_expanded_over_time_from_the_input_shape_streams_exactly():
    """A per-sequence vector (speaker embedding) Expand-ed to Shape(x) and concatenated on features."""
    rng = np.random.default_rng(31)
    inits = dict(lstm_inits(rng, 6, 4), a1=np.array([1], np.int64))
    nodes = [N("Shape", ["x"], ["sh"]), N("Expand", ["e", "sh"], ["er"], name="rep"),
             N("Concat", ["x", "er"], ["xe"], axis=2)] + lstm_y("xe")
    m = model(nodes, [vi("x", ["T", "B", 3]), vi("e", [1, "B", 3])], ["y"], inits)
    gm = rnnengine.convert(m)
    assert gm.stream().time_axes == {"x": 0}
    streams_exactly(m, {"x": rand(rng, 10, 2, 3), "e": rand(rng, 1, 2, 3)}, {"x": 0}, [[3], [1]])


def test_batch_first_head_flattening_time_with_batch_one_streams_exactly():
    """layout=1 LSTM, Y reshaped to (T, H) for a Gemm (batch fixed to 1), reshaped back with
    Shape(x)[0:2]."""
    rng = np.random.default_rng(32)
    inits = dict(lstm_inits(rng, 3, 4), Wg=rand(rng, 4, 5), bg=rand(rng, 5), f2=np.array([-1, 4], np.int64),
                 s0=np.array([0], np.int64), s2=np.array([2], np.int64), o5=np.array([5], np.int64))
    nodes = [N("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=4, layout=1, name="lstm"),
             N("Reshape", ["Y", "f2"], ["y2"], name="flat"), N("Gemm", ["y2", "Wg", "bg"], ["g"], name="gemm"),
             N("Shape", ["x"], ["sh"]), N("Slice", ["sh", "s0", "s2"], ["bt"]), N("Concat", ["bt", "o5"], ["shp"], axis=0),
             N("Reshape", ["g", "shp"], ["out"], name="unflat")]
    m = model(nodes, [vi("x", [1, "T", 3])], ["out"], inits)
    streams_exactly(m, {"x": rand(rng, 1, 10, 3)}, {"x": 1}, [[3], [1], [12]])


@pytest.mark.parametrize("p1,s1,p2,s2,K", [((1, 1), 2, (1, 1), 2, 3), ((0, 2), 2, (2, 0), 3, 3),
                                           ((0, 4), 1, (1, 3), 2, 5), ((2, 2), 3, (0, 0), 1, 1)])
def test_two_strided_lookahead_convs_then_gru_stream_exactly(p1, s1, p2, s2, K):
    rng = np.random.default_rng(33)
    H = 4
    inits = {"W1": rand(rng, 4, 3, K) * 0.5, "W2": rand(rng, 6, 2, K) * 0.5, "b2": rand(rng, 6),
             "W": rand(rng, 1, 3 * H, 6) * 0.5, "R": rand(rng, 1, 3 * H, H) * 0.5, "B": rand(rng, 1, 6 * H) * 0.1,
             "a1": np.array([1], np.int64)}
    nodes = [N("Conv", ["x", "W1"], ["c1"], kernel_shape=[K], pads=list(p1), strides=[s1], name="conv1"),
             N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "W2", "b2"], ["c2"], kernel_shape=[K], pads=list(p2), strides=[s2], group=2, name="conv2"),
             N("Transpose", ["c2"], ["ct"], perm=[2, 0, 1]),
             N("GRU", ["ct", "W", "R", "B"], ["Y", "Yh"], hidden_size=H, name="gru"), N("Squeeze", ["Y", "a1"], ["y"])]
    m = model(nodes, [vi("x", ["B", 3, "T"])], ["y", "c2", "Yh"], inits)
    x = rand(rng, 2, 3, 37)
    ort = ort_session(m).run(None, {"x": x})
    whole = rnnengine.convert(m).run({"x": x})
    for k, name in enumerate(("y", "c2", "Yh")):
        close(whole[name], ort[k])
    streams_exactly(m, {"x": x}, {"x": 2}, [[1], [3, 5], [2], [100]])
