"""MaxPool / AveragePool (rnnengine/ops/handlers.py Pool, src_c/graph.c POOL1D): against
onnxruntime over strides, dilations, pads, auto_pad, ceil_mode and count_include_pad, in the
1-D form (N, C, L) and tf2onnx's (N, C, 1, L); NaN and infinities against PyTorch and a NumPy
reference (onnxruntime departs there, README "Departures"); refusals; the C verifier; streams
equal to the whole run at several chunk sizes."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from rnnengine.codes import OP_POOL1D
from rnnengine.errors import NotStreamableError, ProgramError, UnsupportedError
from rnnengine.verify import ort_session

F = TensorProto.FLOAT


def pool_model(op, shape, opset=19, outputs=("y",), **attrs):
    n = helper.make_node(op, ["x"], list(outputs), name="pool", **attrs)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", F, list(shape))],
                          [helper.make_tensor_value_info(o, F if o == "y" else TensorProto.INT64, None) for o in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def both(m, x):
    return rnnengine.convert(m).run({"x": x})["y"], ort_session(m).run(None, {"x": x})[0]


def reference(op, x, K, s=1, d=1, pads=(0, 0), ceil=False, include=False):
    """Pooling as the operator defines it, independently of the engine: each window's input
    taps in order, in float32 (NumPy's max / sum over a gathered window)."""
    N, C, L = x.shape
    pl, pr = pads
    span = d * (K - 1) + 1
    room = L + pl + pr - span
    Lout = (-(-room // s) if ceil else room // s) + 1
    if ceil and (Lout - 1) * s >= L + pl:
        Lout -= 1
    out = np.empty((N, C, Lout), np.float32)
    for j in range(Lout):
        pos = [j * s - pl + k * d for k in range(K)]
        real = [p for p in pos if 0 <= p < L]
        w = x[:, :, real]
        if op == "MaxPool":
            out[:, :, j] = np.max(w, axis=2)  # NaN propagates, as in PyTorch
        else:
            acc = np.zeros((N, C), np.float32)
            for k in range(len(real)):
                acc = acc + w[:, :, k]
            out[:, :, j] = acc / np.float32(sum(-pl <= p < L + pr for p in pos) if include else len(real))
    return out


GRID = [c for c in itertools.product(("MaxPool", "AveragePool"), (3, 8, 17), (1, 2, 3), (1, 2, 3), (1, 2),
                                     ((0, 0), (1, 0), (0, 1), (1, 2), (2, 2)), (0, 1), (0, 1))
        if max(c[5]) < c[2] and not (c[0] == "AveragePool" and c[4] > 1) and not (c[0] == "MaxPool" and c[7])]


@pytest.mark.parametrize("op,L,K,s,d,pads,ceil,inc", GRID)
def test_pool_equals_onnxruntime_and_the_reference(op, L, K, s, d, pads, ceil, inc):
    rng = np.random.default_rng(hash((op, L, K, s, d, pads, ceil, inc)) % 2**32)
    x = rng.standard_normal((2, 3, L)).astype(np.float32)
    attrs = dict(kernel_shape=[K], strides=[s], pads=list(pads), ceil_mode=ceil)
    if d > 1:
        attrs["dilations"] = [d]
    if op == "AveragePool":
        attrs["count_include_pad"] = inc
    m = pool_model(op, x.shape, **attrs)
    try:
        want = ort_session(m).run(None, {"x": x})[0]
    except Exception:  # noqa: BLE001 (onnxruntime refuses an input shorter than a window by a stride or more)
        with pytest.raises(UnsupportedError, match="too short"):
            rnnengine.convert(m).run({"x": x})
        return
    padded, span = L + sum(pads), d * (K - 1) + 1
    if span - s < padded < span:  # one partial window: onnxruntime pools it, rnnengine refuses
        with pytest.raises(UnsupportedError, match="partial window"):
            rnnengine.convert(m).run({"x": x})
        return
    got = rnnengine.convert(m).run({"x": x})["y"]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # the same sums in the same order: equal bits
    np.testing.assert_array_equal(got, reference(op, x, K, s, d, pads, bool(ceil), bool(inc)))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("auto_pad", ["VALID", "SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_equals_onnxruntime(op, auto_pad):
    rng = np.random.default_rng(7)
    for L, K, s in ((10, 3, 1), (11, 4, 2), (9, 3, 3), (12, 2, 2)):
        x = rng.standard_normal((1, 4, L)).astype(np.float32)
        m = pool_model(op, x.shape, kernel_shape=[K], strides=[s], auto_pad=auto_pad)
        got, want = both(m, x)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(["MaxPool", "AveragePool"]), L=st.integers(4, 40), K=st.integers(1, 4),
       s=st.integers(1, 4), pl=st.integers(0, 3), pr=st.integers(0, 3), inc=st.booleans(), seed=st.integers(0, 999),
       keras2=st.booleans())
def test_keras_forms_over_n_c_1_l_and_n_c_l_1_equal_onnxruntime(op, L, K, s, pl, pr, inc, seed, keras2):
    """tf2onnx writes Keras 3 MaxPooling1D / AveragePooling1D as a 2-D pool over (N, C, 1, L),
    Keras 2's over (N, C, L, 1)."""
    pl, pr = min(pl, K - 1), min(pr, K - 1)
    if L + pl + pr < K:
        return
    r = np.random.default_rng(seed)
    if keras2:
        x = r.standard_normal((2, 5, L, 1)).astype(np.float32) * 3
        attrs = dict(kernel_shape=[K, 1], strides=[s, 1], pads=[pl, 0, pr, 0])
    else:
        x = r.standard_normal((2, 5, 1, L)).astype(np.float32) * 3
        attrs = dict(kernel_shape=[1, K], strides=[1, s], pads=[0, pl, 0, pr])
    if op == "AveragePool":
        attrs["count_include_pad"] = int(inc)
    got, want = both(pool_model(op, x.shape, **attrs), x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_nan_and_infinities_propagate_as_in_pytorch():
    """A NaN in a window gives NaN (PyTorch, NumPy); a window of -inf gives -inf. onnxruntime
    1.32's MaxPool skips NaN and stops at -3.4e38 (pinned below: if it changes, README's
    "Departures" must change too); AveragePool agrees with onnxruntime."""
    x = np.arange(1, 25, dtype=np.float32).reshape(1, 2, 12)
    x[0, 0, 2] = np.nan
    x[0, 0, 6:9] = -np.inf
    x[0, 1, 4] = np.inf
    m = pool_model("MaxPool", x.shape, kernel_shape=[3], strides=[1])
    got, theirs = both(m, x)
    want = reference("MaxPool", x, 3)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0, 0, :3]).all() and got[0, 0, 6] == -np.inf and (got[0, 1, 2:5] == np.inf).all()
    try:
        import torch
        np.testing.assert_array_equal(got, torch.nn.functional.max_pool1d(torch.tensor(x), 3, 1).numpy())
    except ImportError:
        pass
    assert not np.isnan(theirs[0, 0, :3]).any() and theirs[0, 0, 6] == -np.finfo(np.float32).max
    m = pool_model("AveragePool", x.shape, kernel_shape=[3], strides=[2], pads=[1, 1])
    got, theirs = both(m, x)
    np.testing.assert_array_equal(got, theirs)
    np.testing.assert_array_equal(got, reference("AveragePool", x, 3, 2, 1, (1, 1)))


@pytest.mark.parametrize("op,shape,attrs,outputs,match", [
    ("MaxPool", (1, 2, 9), dict(kernel_shape=[3]), ("y", "idx"), "Indices"),
    ("MaxPool", (1, 2, 4, 9), dict(kernel_shape=[2, 3]), ("y",), "only 1-D pooling"),
    ("MaxPool", (1, 2, 1, 9), dict(kernel_shape=[1, 3], pads=[1, 0, 0, 0]), ("y",), "unit axis"),
    ("AveragePool", (1, 2, 9), dict(kernel_shape=[3], dilations=[2]), ("y",), "dilations"),
    ("MaxPool", (1, 2, 9), dict(kernel_shape=[2], strides=[3], dilations=[3], pads=[1, 1]), ("y",), None),
    ("MaxPool", (1, 2, 2), dict(kernel_shape=[2], dilations=[3], pads=[1, 1]), ("y",), "only padding"),
    ("MaxPool", (1, 2, 2), dict(kernel_shape=[3], strides=[2]), ("y",), "partial window"),
    ("AveragePool", (1, 2, 9), dict(kernel_shape=[3], ceil_mode=1, auto_pad="SAME_UPPER"), ("y",), "auto_pad"),
])
def test_what_is_refused_by_name(op, shape, attrs, outputs, match):
    m = pool_model(op, shape, outputs=outputs, **attrs)
    x = np.ones(shape, np.float32)
    if match is None:  # a dilated window that still reaches an input step: runs, equal to onnxruntime
        got, want = both(m, x * np.arange(shape[-1], dtype=np.float32))
        np.testing.assert_array_equal(got, want)
        return
    with pytest.raises(UnsupportedError, match=match) as e:
        rnnengine.convert(m).run({"x": x})
    assert "pool" in str(e.value)  # names the node


def test_pads_of_a_whole_kernel_are_refused_as_onnxruntime_refuses_them():
    with pytest.raises(UnsupportedError, match="smaller than the kernel"):
        rnnengine.convert(pool_model("MaxPool", (1, 2, 9), kernel_shape=[2], pads=[2, 0])).run(
            {"x": np.ones((1, 2, 9), np.float32)})


def _word(program_op, ip, n_in, n_out):
    """One hand-written POOL1D instruction (x: tensor 0, y: tensor 1), through the C verifier."""
    from rnnengine import _core
    W = _core.INSTR_WORDS
    word = [program_op] + [-1] * (W - 1)
    word[1], word[5] = 0, 1
    word[9], word[10], word[11], word[12] = 0, len(ip), 0, 0
    return _core.Program(np.array(word, np.int64).reshape(1, W), np.array(ip, np.int64), np.zeros(0, np.float32),
                         [], None, tensor_dtypes=[0, 0], tensor_counts=[n_in, n_out], work_floats=0)


@pytest.mark.parametrize("ip,n_in,n_out,match", [
    ([2, 8, 3, 3, 2, 1, 0, 0, 8, 0, 0, 8], 15, 6, "input has 15"),          # rows x L beyond the input
    ([2, 8, 3, 3, 2, 1, 0, 0, 8, 0, 0, 8], 16, 5, "output has 5"),          # beyond the output
    ([2, 8, 3, 3, 2, 1, 0, 0, 9, 0, 0, 8], 16, 6, "positions"),             # hi past L
    ([2, 8, 3, 3, 2, 1, 0, 5, 4, 0, 0, 8], 16, 6, "positions"),             # lo > hi
    ([2, 8, 3, 0, 2, 1, 0, 0, 8, 0, 0, 8], 16, 6, "kernel"),                # K = 0
    ([2, 8, 3, 3, 0, 1, 0, 0, 8, 0, 0, 8], 16, 6, "stride"),                # stride 0
    ([2, 8, 3, 3, 2, 1, 0, 0, 8, 7, 0, 8], 16, 6, "kind"),                  # unknown kind
    ([2, 8, 3, 3, 2**61, 1, 0, 0, 8, 0, 0, 8], 16, 6, "reach"),             # offsets overflow
    ([2, -8, 3, 3, 2, 1, 0, 0, 8, 0, 0, 8], 16, 6, "negative"),
    ([2, 8, 3, 3, 2, 1, 0, 0, 8, 0, 0], 16, 6, "parameters"),
])
def test_the_c_verifier_refuses_hostile_pool_instructions(ip, n_in, n_out, match):
    with pytest.raises(ProgramError, match=match):
        _word(OP_POOL1D, ip, n_in, n_out)


def test_a_well_formed_pool_instruction_runs():
    from rnnengine import _core
    prog = _word(OP_POOL1D, [2, 8, 3, 3, 2, 1, 0, 0, 8, 0, 0, 8], 16, 6)
    x = np.arange(16, dtype=np.float32)
    out = np.zeros(6, np.float32)
    prog.run(np.array([_core.address(a) for a in (x, out)], np.int64), np.zeros(1, np.float32))
    np.testing.assert_array_equal(out, [2, 4, 6, 10, 12, 14])


def conv_pool_lstm(rng, op, K, s, pads, ceil=0, inc=0, d=1, H=5, C=3, M=4):
    """x (B, C, T) -> Conv(K=3, causal) -> Relu -> pool along time -> (T', B, M) -> LSTM -> y,
    with the pool's output as a second output."""
    attrs = dict(kernel_shape=[K], strides=[s], pads=list(pads), ceil_mode=ceil)
    if d > 1:
        attrs["dilations"] = [d]
    if op == "AveragePool":
        attrs["count_include_pad"] = inc
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], kernel_shape=[3], pads=[2, 0]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node(op, ["r"], ["p"], name="pool_t", **attrs),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["pt", "W", "R", "B"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "ax1"], ["y"])]
    inits = {"Wc": rng.standard_normal((M, C, 3)).astype(np.float32) * 0.5, "bc": rng.standard_normal(M).astype(np.float32),
             "W": rng.standard_normal((1, 4 * H, M)).astype(np.float32) * 0.5,
             "R": rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.5,
             "B": rng.standard_normal((1, 8 * H)).astype(np.float32) * 0.1, "ax1": np.array([1], np.int64)}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", C, "T"])],
                          [helper.make_tensor_value_info(o, F, None) for o in ("y", "p")],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(["MaxPool", "AveragePool"]), K=st.integers(1, 4), s=st.integers(1, 3), d=st.integers(1, 2),
       pl=st.integers(0, 3), pr=st.integers(0, 3), inc=st.integers(0, 1), T=st.integers(6, 30),
       chunks=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 999))
def test_conv_pool_lstm_streams_equal_the_whole_run(op, K, s, d, pl, pr, inc, T, chunks, seed):
    """Streamed chunk by chunk (chunks of 0 steps included), then finish(): the pool's output and
    the LSTM's equal the whole run bit for bit; the whole run equals onnxruntime."""
    if op == "AveragePool":
        d = 1
    pl, pr = min(pl, K - 1), min(pr, K - 1)
    if max(chunks) == 0:
        chunks = chunks + [1]
    rng = np.random.default_rng(seed)
    m = conv_pool_lstm(rng, op, K, s, (pl, pr), inc=inc, d=d)
    x = rng.standard_normal((2, 3, T)).astype(np.float32)
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})
    theirs = ort_session(m).run(None, {"x": x})
    np.testing.assert_array_equal(whole["p"], theirs[1])
    np.testing.assert_allclose(whole["y"], theirs[0], rtol=1e-5, atol=1e-5)
    s_ = gm.stream()
    parts, t, k = [], 0, 0
    while t < T:
        n = chunks[k % len(chunks)]
        k += 1
        parts.append(s_({"x": x[:, :, t:t + n]}))
        t += n
    tail = s_.finish()
    if tail:
        parts.append(tail)
    np.testing.assert_array_equal(np.concatenate([p["p"] for p in parts], axis=2), whole["p"])
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts], axis=0), whole["y"])


def test_a_stream_refuses_ceil_mode_with_a_stride_and_takes_it_without():
    rng = np.random.default_rng(0)
    with pytest.raises(NotStreamableError, match="ceil_mode"):
        rnnengine.convert(conv_pool_lstm(rng, "MaxPool", 3, 2, (0, 0), ceil=1)).stream()(
            {"x": np.ones((1, 3, 4), np.float32)})
    m = conv_pool_lstm(rng, "MaxPool", 3, 1, (1, 0), ceil=1)  # stride 1: ceil_mode changes nothing
    x = rng.standard_normal((1, 3, 9)).astype(np.float32)
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})
    s = gm.stream()
    parts = [s({"x": x[:, :, t:t + 2]})["p"] for t in range(0, 9, 2)]
    tail = s.finish()
    if tail:
        parts.append(tail["p"])
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), whole["p"])


@pytest.mark.parametrize("K,s,T,match", [
    (4, 2, 3, "partial window"),  # onnxruntime pools the 3 steps as one partial window
    (4, 1, 2, "too short"),       # onnxruntime refuses it
])
def test_a_stream_shorter_than_one_window_fails_at_finish_as_the_whole_run_does(K, s, T, match):
    rng = np.random.default_rng(1)
    m = conv_pool_lstm(rng, "AveragePool", K, s, (0, 0))
    x = rng.standard_normal((1, 3, T)).astype(np.float32)
    gm = rnnengine.convert(m)
    with pytest.raises(UnsupportedError, match=match):
        gm.run({"x": x})
    st_ = gm.stream()
    st_({"x": x})
    with pytest.raises(UnsupportedError, match=match):
        st_.finish()


def test_thread_split_of_a_pooled_batch_equals_one_thread():
    rng = np.random.default_rng(2)
    m = conv_pool_lstm(rng, "MaxPool", 3, 2, (1, 1))
    x = rng.standard_normal((8, 3, 20)).astype(np.float32)
    one = rnnengine.convert(m).run({"x": x})
    two = rnnengine.convert(m, threads=2).run({"x": x})
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


def test_weight_file_round_trip(tmp_path):
    """A pool in a saved model: the weight file's graph loads (its nodes checked against the
    op schemas without onnx) and streams as the converted model does."""
    rng = np.random.default_rng(6)
    m = conv_pool_lstm(rng, "AveragePool", 3, 2, (1, 1), inc=1)
    x = rng.standard_normal((2, 3, 15)).astype(np.float32)
    gm = rnnengine.convert(m)
    path = str(tmp_path / "pool.rnne")
    rnnengine.save(gm, path)
    back = rnnengine.load(path)
    for k, v in gm.run({"x": x}).items():
        np.testing.assert_array_equal(back.run({"x": x})[k], v)
    s = back.stream()
    parts = [s({"x": x[:, :, t:t + 4]})["p"] for t in range(0, 15, 4)]
    tail = s.finish()
    if tail:
        parts.append(tail["p"])
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), gm.run({"x": x})["p"])


# --- the review of the fourteenth session ------------------------------------------------------

@pytest.mark.parametrize("op,attrs,match", [
    ("MaxPool", dict(kernel_shape=[3], dilations=[2], auto_pad="SAME_UPPER"), "dilation 2"),  # ort: [3,4,5,6,5]
    ("AveragePool", dict(kernel_shape=[1], strides=[4], auto_pad="SAME_UPPER"), "negative padding"),  # ort crops
])
def test_auto_pad_same_that_onnxruntime_sizes_its_own_way_is_refused(op, attrs, match):
    with pytest.raises(UnsupportedError, match=match):
        rnnengine.convert(pool_model(op, (1, 2, 12), **attrs)).run({"x": np.ones((1, 2, 12), np.float32)})


def test_conv_auto_pad_same_with_a_stride_beyond_the_kernel_is_refused():
    """onnxruntime pads by -3 (crops: windows at 1, 5, 9) where TensorFlow pads by 0 (0, 4, 8);
    rnnengine answered TensorFlow's, silently unlike onnxruntime."""
    w = np.ones((1, 1, 1), np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1], strides=[4],
                                            auto_pad="SAME_UPPER")], "g",
                          [helper.make_tensor_value_info("x", F, [1, 1, 12])], [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 12)
    assert ort_session(m).run(None, {"x": x})[0].ravel().tolist() == [1, 5, 9]
    with pytest.raises(UnsupportedError, match="conv.*negative padding"):
        rnnengine.convert(m).run({"x": x})


@pytest.mark.parametrize("const", [False, True])
def test_a_huge_kernel_reads_only_its_input_taps(const):
    """kernel_shape 1e11 (1e8 folded) with pads K - 1: one input tap per window; the kernel and
    the folding walked every tap (a hang)."""
    import time
    K = 10**8 if const else 10**11
    c = np.arange(1, 4, dtype=np.float32).reshape(1, 1, 3)
    nodes = [helper.make_node("MaxPool", ["c" if const else "x"], ["y"], name="pool", kernel_shape=[K], pads=[K - 1, 0])]
    g = helper.make_graph(nodes, "g", [] if const else [helper.make_tensor_value_info("x", F, [1, 1, 3])],
                          [helper.make_tensor_value_info("y", F, None)], [numpy_helper.from_array(c, "c")] if const else [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    feeds = {} if const else {"x": c}
    t = time.perf_counter()
    got = rnnengine.convert(m).run(feeds)["y"]
    assert time.perf_counter() - t < 20
    np.testing.assert_array_equal(got, ort_session(m).run(None, feeds)[0])


def test_a_stream_whose_first_chunk_is_refused_finds_its_time_axis_from_the_next():
    """A first chunk too short for pool2's window raised, and the stream kept 'no time axis'
    for good: every later chunk ran as a sequence of its own."""
    nodes = [helper.make_node("MaxPool", ["x"], ["o0"], name="pool0", kernel_shape=[2], pads=[1, 1]),
             helper.make_node("MaxPool", ["o0"], ["o1"], name="pool1", kernel_shape=[1], strides=[6]),
             helper.make_node("MaxPool", ["o1"], ["o2"], name="pool2", kernel_shape=[3], strides=[6], dilations=[2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", 3, "T"])],
                          [helper.make_tensor_value_info(o, F, None) for o in ("o0", "o1", "o2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    gm = rnnengine.convert(m)
    x = np.random.default_rng(0).standard_normal((2, 3, 80)).astype(np.float32)
    s = gm.stream()
    with pytest.raises(UnsupportedError):
        s({"x": x[:, :, :2]})
    parts = [s({"x": x[:, :, 2:40]}), s({"x": x[:, :, 40:]}), s.finish()]
    assert s.time_axes == {"x": 2}
    whole = gm.run({"x": x[:, :, 2:]})  # the refused chunk was not taken
    for k in ("o0", "o1"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts if k in p], axis=2), whole[k])


def test_keras2_form_with_a_unit_kernel_streams_one_step_at_a_time():
    """(N, C, T, 1), kernel [1, 1], strides [2, 1]: a one-step chunk (N, C, 1, 1) fits both 4-D
    forms; the stream's time axis decides (it raised at the second call)."""
    m = pool_model("MaxPool", ["B", 3, "T", 1], kernel_shape=[1, 1], strides=[2, 1])
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 1)).astype(np.float32)
    gm = rnnengine.convert(m)
    s = gm.stream()
    parts = [s({"x": x[:, :, :2]})["y"]] + [s({"x": x[:, :, t:t + 1]})["y"] for t in range(2, 9)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), gm.run({"x": x})["y"])


def test_folding_an_empty_4d_constant():
    c = np.zeros((0, 3, 1, 5), np.float32)
    nodes = [helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[1, 2]),
             helper.make_node("Add", ["p", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("z", F, [1])], [helper.make_tensor_value_info("y", F, None)],
                          [numpy_helper.from_array(c, "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    z = {"z": np.zeros(1, np.float32)}
    assert rnnengine.convert(m).run(z)["y"].shape == ort_session(m).run(None, z)[0].shape == (0, 3, 1, 4)
