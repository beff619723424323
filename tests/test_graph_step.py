"""A converted graph's stream call (GraphStream.feed / step through rnnengine._core.GraphStep):
the compiled per-call path gives what the checked path gives, bit for bit, carries explicit
state in two buffers without copying it, and hands every call it cannot prove fits (another
shape, dtype or layout, a bad token, a state replaced from outside, a busy stream, a weight
file changed on disk) to the checked path, which raises the same errors as before."""
import os
import threading
import time

import numpy as np
import pytest

import rnnengine
from rnnengine import _core
from rnnengine.cli import DEMO_CHARLM
from oracle import TOLERANCE
from rnnengine.errors import EngineError, FormatError

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus")
VAD = os.path.join(CORPUS, "torch_legacy_audio_vad_stateful_op14.onnx")      # x (1, 128), state -> stateN
TOKENS = os.path.join(CORPUS, "torch_legacy_token_lstm_logsoftmax_op14.onnx")  # ids (1, T): layer state


def _models():
    """(name, model, make the data inputs of one call (rng -> dict), stream.step or feed)."""
    vad = rnnengine.convert(VAD)
    lm = rnnengine.convert(DEMO_CHARLM)
    tok = rnnengine.convert(TOKENS)
    return [("vad", vad, lambda rng: {"x": rng.standard_normal((1, 128)).astype(np.float32)}, "feed"),
            ("charlm-feed", lm, lambda rng: {"tokens": rng.integers(0, 32, (1, 1))}, "feed"),
            ("charlm-step", lm, lambda rng: {"tokens": rng.integers(0, 32, (1,))}, "step"),
            ("tokens-step", tok, lambda rng: {"ids": rng.integers(0, 20, (1,))}, "step")]


MODELS = {name: (m, make, how) for name, m, make, how in _models()}


def _call(s, how, x, outputs=None):
    return getattr(s, how)(x, outputs=outputs)


def _counting(s):
    """Counts the calls that take the checked path (GraphStream._step)."""
    calls = [0]
    inner = s._step

    def counted(*a, **k):
        calls[0] += 1
        return inner(*a, **k)
    s._step = counted
    return calls


def _same_state(a, b):
    sa, sb = a.get_state(), b.get_state()
    for part in ("layers", "inputs"):
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            for u, v in zip(np.atleast_1d(sa[part][k]) if not isinstance(sa[part][k], tuple) else sa[part][k],
                            np.atleast_1d(sb[part][k]) if not isinstance(sb[part][k], tuple) else sb[part][k]):
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_calls_equal_checked_calls_bit_for_bit(name):
    """One stream takes the compiled path after its first call (counted: _step runs once), the
    other is forced through the checked path at every call; outputs and state are identical."""
    m, make, how = MODELS[name]
    rng = np.random.default_rng(1)
    xs = [make(rng) for _ in range(40)]
    fast, slow = m.stream(), m.stream()
    checked = _counting(fast)
    for x in xs:
        slow._fast = None  # the checked path every time
        a, b = _call(fast, how, x), _call(slow, how, x)
        assert a.keys() == b.keys() == set(m.outputs)
        for k in a:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
    assert checked[0] == 1, "the compiled path was not taken"
    _same_state(fast, slow)
    # a whole-sequence run gives the same (within float32 rounding: other kernels over T steps)
    if name == "vad":
        state = np.zeros((2, 1, 1, 16), np.float32)
        for x in xs:
            out = m.run({**x, "state": state})
            state = out["stateN"]
        np.testing.assert_allclose(fast.get_state()["inputs"]["state"], state, rtol=1e-5, atol=1e-6)


def test_explicit_state_alternates_between_two_buffers_and_outputs_are_copies():
    """The program writes the next state into the buffer the call before read: two arrays
    in all, none allocated per call; the stateN each call returns is its own array, which later
    calls leave alone."""
    m, make, how = MODELS["vad"]
    rng = np.random.default_rng(2)
    s = m.stream()
    ids, returned, states = set(), [], []
    for _ in range(12):
        out = _call(s, how, make(rng))
        ids.add(id(s._carried["state"]))
        returned.append(out["stateN"])
        states.append(s.get_state()["inputs"]["state"])
        assert not np.shares_memory(out["stateN"], s._carried["state"])
    assert len(ids) == 2
    for r, st in zip(returned, states):
        np.testing.assert_array_equal(r, st)
    assert not np.array_equal(states[-1], states[-2])  # (the state did move)


def test_calls_the_compiled_path_cannot_take_behave_as_before():
    m, make, how = MODELS["charlm-feed"]
    rng = np.random.default_rng(3)
    s = m.stream()
    for _ in range(3):
        _call(s, how, make(rng))
    ref = s.fork()
    tok = np.array([[7]], np.int64)
    want = ref.feed({"tokens": tok})
    # other integer types, byte orders and layouts: converted (astype, C order) as the checked
    # path converts them, the same numbers; a float for token ids is refused as before
    for given in (np.array([[7]], np.int32), np.array([[7]], ">i8"), np.array([[7, 7]], np.int64)[:, :1],
                  np.array([[7.0]], np.float32)):
        t = s.fork()
        if given.dtype.kind == "f":
            with pytest.raises(TypeError, match="'tokens' must be int64"):
                t.feed({"tokens": given})
            continue
        got = t.feed({"tokens": given})
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # a token outside the vocabulary: the checked path's error, naming the input; nothing changed
    t = s.fork()
    for bad in (96, -97, 10 ** 9):
        with pytest.raises(ValueError, match="input 'tokens' holds token index .* outside the vocabulary of 96"):
            t.feed({"tokens": np.array([[bad]], np.int64)})
    np.testing.assert_array_equal(t.feed({"tokens": tok})["logits"], want["logits"])
    # wrong shape, unknown output, carried state passed in, unknown input
    with pytest.raises(ValueError, match="'tokens' must have 2 dimensions"):
        s.feed({"tokens": np.array([7], np.int64)})
    with pytest.raises(ValueError, match="unknown outputs"):
        s.feed({"tokens": tok}, outputs=["nope"])
    with pytest.raises(ValueError, match="state the stream carries itself"):
        s.feed({"tokens": tok, "h0_0": np.zeros((1, 1, 192), np.float32)})
    with pytest.raises(ValueError, match="unknown input"):
        s.feed({"tokens": tok, "x": tok})
    # none of those moved the stream
    got = s.feed({"tokens": tok})
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_float64_and_strided_audio_give_the_float32_result():
    m, make, how = MODELS["vad"]
    rng = np.random.default_rng(12)
    a, b = m.stream(), m.stream()
    for _ in range(5):
        x = make(rng)["x"]
        wide = np.zeros((1, 256), np.float64)
        wide[:, ::2] = x
        for got, want in ((a.feed({"x": wide[:, ::2]}), b.feed({"x": x})), (a.feed(x.astype(np.float64)), b.feed(x))):
            np.testing.assert_array_equal(got["prob"] if isinstance(got, dict) else got[0],
                                          want["prob"] if isinstance(want, dict) else want[0])
    _same_state(a, b)


def test_a_busy_stream_refuses_the_compiled_call():
    m, make, how = MODELS["vad"]
    rng = np.random.default_rng(4)
    s = m.stream()
    _call(s, how, make(rng))
    before = s.get_state()["inputs"]["state"]
    assert s._busy.acquire(False)  # as another thread's call would hold it
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            _call(s, how, make(rng))
    finally:
        s._busy.release()
    np.testing.assert_array_equal(s.get_state()["inputs"]["state"], before)


def test_explicit_state_from_two_threads_is_never_torn():
    """Concurrent calls on one stream with explicit state: each either runs whole or raises,
    and the state equals the successful calls run one after another."""
    m, make, how = MODELS["vad"]
    x = make(np.random.default_rng(5))
    s = m.stream()
    ok, busy = [0], [0]
    lock = threading.Lock()

    def run(barrier):
        barrier.wait()
        for _ in range(300):
            try:
                s.feed(x)
                with lock:
                    ok[0] += 1
            except RuntimeError:
                with lock:
                    busy[0] += 1
    for _ in range(20):
        barrier = threading.Barrier(3)
        threads = [threading.Thread(target=run, args=(barrier,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if busy[0]:
            break
    serial = m.stream()
    for _ in range(ok[0]):
        serial.feed(x)
    _same_state(s, serial)


def test_state_replaced_from_outside_is_the_state_the_next_call_reads():
    """set_state, reset, fork and a batcher writing _carried all replace the arrays the
    compiled call bound: the next call reads the new state."""
    m, make, how = MODELS["vad"]
    rng = np.random.default_rng(6)
    a = m.stream()
    for _ in range(4):
        _call(a, how, make(rng))
    other = m.stream()
    for _ in range(7):
        _call(other, how, make(rng))
    x = make(rng)
    b = m.stream()
    b.set_state(other.get_state())
    want = _call(b, how, x)
    a.set_state(other.get_state())
    np.testing.assert_array_equal(_call(a, how, x)["prob"], want["prob"])
    # the batcher's way: the carried array replaced in place of the dict entry
    a._carried["state"] = other.get_state()["inputs"]["state"]
    np.testing.assert_array_equal(_call(a, how, x)["prob"], want["prob"])
    a.reset()
    np.testing.assert_array_equal(_call(a, how, x)["prob"], _call(m.stream(), how, x)["prob"])
    f = a.fork()
    y = make(rng)
    np.testing.assert_array_equal(_call(f, how, y)["prob"], _call(a, how, y)["prob"])


def test_layer_state_replaced_from_outside_is_read_by_the_next_call():
    m, make, how = MODELS["tokens-step"]
    rng = np.random.default_rng(7)
    a, other = m.stream(), m.stream()
    for _ in range(3):
        _call(a, how, make(rng))
    for _ in range(5):
        _call(other, how, make(rng))
    x = make(rng)
    b = m.stream()
    b.set_state(other.get_state())
    want = _call(b, how, x)["logp"]
    a.set_state(other.get_state())
    np.testing.assert_array_equal(_call(a, how, x)["logp"], want)


def test_arrays_in_and_out_and_step_without_the_time_axis():
    lm = MODELS["charlm-feed"][0]
    s, t = lm.stream(), lm.stream()
    for k in range(5):
        tok = np.array([k + 3], np.int64)
        got = s.step(tok)  # one array in: the outputs in model.outputs order
        want = t.feed({"tokens": tok[None]})
        assert isinstance(got, tuple) and len(got) == len(lm.outputs)
        for g, name in zip(got, lm.outputs):
            axis = s.output_axes[name]  # logits along time (its axis of 1 dropped); final states not
            np.testing.assert_array_equal(g, want[name] if axis is None else np.squeeze(want[name], axis))
        assert got[0].shape == (1, 96) and got[1].shape == (1, 1, 192)
        alone = s.fork().step(tok, outputs=["logits"])
        assert isinstance(alone, np.ndarray) and alone.shape == (1, 96)
        twice = s.fork().step(tok, outputs=["logits", "logits"])
        assert isinstance(twice, tuple) and len(twice) == 2
    assert s.finish() == ()  # arrays in, arrays out: nothing held back


def test_a_look_ahead_conv_keeps_what_finish_needs():
    """A centred conv trails its input; after many equal chunks through the compiled call,
    finish() still returns the held-back frames (the last call's inputs are kept)."""
    from test_stream_rule import close, conv_front_end
    rng = np.random.default_rng(8)
    gm = rnnengine.convert(conv_front_end(rng, 3, 4, 3, 1, 1, (1, 1), 1, None))
    x = rng.standard_normal((1, 3, 40)).astype(np.float32)
    whole = gm.run({"x": x})
    for chunk in (2, 1):
        s = gm.stream()
        checked = _counting(s)
        outs = [s.feed({"x": x[:, :, t:t + chunk]}) for t in range(0, 40, chunk)]  # (not C order)
        assert checked[0] < 40 // chunk  # the compiled call ran some of them
        outs.append(s.finish())
        close(np.concatenate([o["c"] for o in outs], axis=2), whole["c"])
        close(np.concatenate([o["y"] for o in outs], axis=0), whole["y"])
    s = gm.stream()  # step(): the same, a step at a time
    outs = [s.step({"x": x[:, :, t]}) for t in range(40)]
    tail = s.finish()
    got = np.stack([o["c"] for o in outs if o["c"].ndim == 2], axis=2)
    close(np.concatenate([got, tail["c"]], axis=2), whole["c"])


def test_copied_state_gives_what_the_in_place_state_gives():
    """A paired output the program cannot write in place (not a buffer of its own) is copied
    after the run: forced here for every pair, the numbers are the same."""
    m, make, how = MODELS["charlm-feed"]
    rng = np.random.default_rng(9)
    xs = [make(rng) for _ in range(6)]
    a, b = m.stream(), m.stream()
    _call(a, how, xs[0])
    _call(b, how, xs[0])
    plan = b._fast.plan
    args = list(b._step_args(plan, {**xs[0], **b._carried}))
    args[7] = [st[:4] + (-1,) + st[5:] for st in args[7]]  # every state copied, none in place
    b._fast = b._steps[id(plan)] = _core.GraphStep(*args)
    for x in xs[1:]:
        ra, rb = _call(a, how, x), _call(b, how, x)
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
    _same_state(a, b)


def test_graph_step_checks_its_tables_against_the_program():
    m, make, how = MODELS["vad"]
    s = m.stream()
    x = make(np.random.default_rng(10))
    _call(s, how, x)
    plan = s._fast.plan
    good = s._step_args(plan, {**x, **s._carried})
    _core.GraphStep(*good)

    def broken(k, fn):
        args = list(good)
        args[k] = fn(args[k])
        return args
    with pytest.raises(EngineError, match="does not fill tensor"):
        _core.GraphStep(*broken(6, lambda ins: [ins[0][:3] + ((1, 64), (1, 64)) + ins[0][5:]]))
    with pytest.raises(EngineError, match="names tensor"):
        _core.GraphStep(*broken(6, lambda ins: [ins[0][:1] + (10 ** 6,) + ins[0][2:]]))
    with pytest.raises(EngineError, match="bound twice"):  # the input bound where the state is
        _core.GraphStep(*broken(6, lambda ins: [ins[0][:1] + (good[7][0][1], np.float32, (2, 1, 1, 16),
                                                             (2, 1, 1, 16), 0)]))
    with pytest.raises(EngineError, match="not bound"):
        _core.GraphStep(*broken(4, lambda bufs: dict(list(bufs.items())[1:])))
    with pytest.raises(EngineError, match="larger than tensor"):
        _core.GraphStep(*broken(9, lambda outs: [o[:4] + ((1, 10 ** 4), (1, 10 ** 4)) if o[1] >= 0 else o
                                                  for o in outs]))
    with pytest.raises(EngineError, match="workspace"):
        _core.GraphStep(*broken(5, lambda w: 1))


def test_a_mapped_weight_file_rewritten_after_compiled_calls_is_refused(tmp_path):
    """load(mmap=True): the compiled call fstat-s the file as the checked path did; rewritten
    in place (same size, a later time), the next call raises FormatError naming it."""
    m, make, how = MODELS["vad"]
    path = str(tmp_path / "vad.rnne")
    rnnengine.save(m, path)
    with open(path, "rb") as f:
        data = f.read()
    mapped = rnnengine.load(path, mmap=True)
    s = mapped.stream()
    x = make(np.random.default_rng(11))
    for _ in range(3):
        _call(s, how, x)
    assert s._fast is not None
    before = os.stat(path).st_mtime_ns
    time.sleep(0.02)
    with open(path, "r+b") as f:  # the same bytes written again: only the time changes
        f.write(data)
    if os.stat(path).st_mtime_ns == before:
        os.utime(path, ns=(before + 10 ** 7, before + 10 ** 7))
    with pytest.raises(FormatError, match="truncated or rewritten on disk after it was loaded"):
        _call(s, how, x)
    with pytest.raises(FormatError, match="truncated or rewritten"):
        s.step(x)


def test_a_transpose_that_moves_only_axes_of_one_is_no_copy():
    """The char LM moves each layer's Y (T, D, B, H) to (T, B, D, H): with D = 1 the same
    elements in the same order, planned as a view (no instruction), for any batch; a transpose
    of (T, B) with both longer than 1 stays a copy. All give onnxruntime's numbers."""
    from rnnengine.verify import ort_session
    import onnx
    lm = rnnengine.convert(DEMO_CHARLM)
    sess = ort_session(onnx.load(DEMO_CHARLM))
    rng = np.random.default_rng(13)
    for B in (1, 3):
        tokens = rng.integers(0, 96, (5, B))
        zeros = {n: np.zeros((1, B, 192), np.float32) for n in ("h0_0", "c0_0", "h0_1", "c0_1")}
        got = lm.run({"tokens": tokens, **zeros})
        plan = lm.plan({"tokens": tokens, **zeros})
        assert not any("Transpose" in (lab or "") for lab in plan.program.labels)
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"tokens": tokens, **zeros})))
        for k in got:
            np.testing.assert_allclose(got[k], want[k], **TOLERANCE[np.float32])
    from test_stream_rule import model
    from onnx import TensorProto, helper
    m = model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 3, 2], name="t")],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 4, 1])], ["y"], {})
    gm = rnnengine.convert(m)
    x = rng.standard_normal((3, 1, 4, 1)).astype(np.float32)
    assert [lab for lab in gm.plan({"x": x}).program.labels] == []  # (3, 4) keep their order
    np.testing.assert_array_equal(gm.run({"x": x})["y"], x.transpose(1, 0, 3, 2))
    m = model([helper.make_node("Transpose", ["x"], ["y"], perm=[2, 1, 0], name="t")],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 4])], ["y"], {})
    gm = rnnengine.convert(m)
    x = rng.standard_normal((3, 1, 4)).astype(np.float32)
    assert len(gm.plan({"x": x}).program.labels) == 1  # (3, 4) -> (4, 3): a copy
    np.testing.assert_array_equal(gm.run({"x": x})["y"], x.transpose(2, 1, 0))


def test_a_stream_is_freed_when_its_last_reference_goes():
    """The bound call refers to its stream weakly: no reference cycle keeps a dropped stream's
    buffers alive until the cyclic garbage collector runs."""
    import gc
    import weakref
    m, make, how = MODELS["vad"]
    s = m.stream()
    for _ in range(2):
        _call(s, how, make(np.random.default_rng(14)))
    assert s._fast is not None
    ref = weakref.ref(s)
    gc.disable()
    try:
        del s
        assert ref() is None
    finally:
        gc.enable()
