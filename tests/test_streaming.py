"""Streams: step and chunk feeding equal whole-sequence runs; fork, reset, state get/set;
batches of streams; streams stepped from several threads at once."""
import threading

import numpy as np
import pytest

import rnnengine
from oracle import max_violation, stack_state, state_entries


def random_layer(kind, rng, I, H, **attrs):
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    D = 2 if attrs.get("direction") == "bidirectional" else 1
    W = (rng.standard_normal((D, G * H, I)) / np.sqrt(I)).astype(np.float32)
    R = (rng.standard_normal((D, G * H, H)) * 0.8 / np.sqrt(H)).astype(np.float32)
    B = (rng.standard_normal((D, 2 * G * H)) * 0.5).astype(np.float32)
    if kind == "LSTM":
        P = (rng.standard_normal((D, 3 * H)) * 0.5).astype(np.float32)
        return rnnengine.LSTM(W, R, B, P, **attrs)
    return getattr(rnnengine, kind)(W, R, B, **attrs)


def mixed_model(rng, I=5, H=(8, 6, 7), batch_first=False):
    """LSTM with peepholes -> GRU (linear_before_reset) -> RNN, all forward."""
    layers = [random_layer("LSTM", rng, I, H[0], clip=2.5),
              random_layer("GRU", rng, H[0], H[1], linear_before_reset=1),
              random_layer("RNN", rng, H[1], H[2], activations=["Softsign"])]
    return rnnengine.Model(layers, batch_first=batch_first)


def assert_close(a, b):
    assert a.shape == b.shape
    assert max_violation(a, b) <= 1.0, float(np.max(np.abs(a - b)))


def test_stacked_model_equals_layers_run_one_after_another():
    """A multi-layer bidirectional stack equals chaining the single ONNX-op layers."""
    rng = np.random.default_rng(1)
    l1 = random_layer("GRU", rng, 4, 6, direction="bidirectional")
    l2 = random_layer("LSTM", rng, 12, 5, direction="bidirectional")
    l3 = random_layer("RNN", rng, 10, 3, direction="reverse")
    model = rnnengine.Model([l1, l2, l3])
    T, B = 9, 3
    X = rng.standard_normal((T, B, 4)).astype(np.float32)
    lens = np.array([9, 4, 1], np.int32)
    Y, state = model.run(X, lengths=lens)
    x = X
    finals = []
    for layer in (l1, l2, l3):
        outs = layer(x, sequence_lens=lens)
        y = outs[0]  # (T, D, B, H)
        finals.append(outs[1:])
        x = y.transpose(0, 2, 1, 3).reshape(T, B, -1)
    assert_close(Y, x)
    for st, fin in zip(state_entries(state), finals):
        h = st[0] if isinstance(st, tuple) else st
        # rows of length > 0 (all here) carry their last valid step's state
        assert_close(h, fin[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_stepping_1000_steps_equals_whole_sequence(batch_first):
    rng = np.random.default_rng(2)
    model = mixed_model(rng, batch_first=batch_first)
    T, B = 1000, 2
    X = rng.standard_normal((T, B, model.input_size)).astype(np.float32)
    Xr = X.transpose(1, 0, 2).copy() if batch_first else X
    Y, final = model.run(Xr)
    Y = Y.transpose(1, 0, 2) if batch_first else Y
    stream = model.stream(batch_size=B)
    stepped = np.stack([stream.step(X[t]) for t in range(T)])
    assert_close(stepped, Y)
    for a, b in zip(state_entries(stream.get_state()), state_entries(final)):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert_close(u, v)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_random_chunking_equals_whole_sequence(seed):
    rng = np.random.default_rng(seed)
    model = mixed_model(rng)
    T = 1000
    X = rng.standard_normal((T, 1, model.input_size)).astype(np.float32)
    Y, _ = model.run(X)
    stream = model.stream()
    parts, t = [], 0
    while t < T:
        n = int(rng.integers(1, 60))
        parts.append(stream.feed(X[t:t + n]))
        t += n
    assert_close(np.concatenate(parts), Y)


def test_feed_2d_chunk_for_batch_one_and_empty_chunk():
    rng = np.random.default_rng(6)
    model = mixed_model(rng)
    X = rng.standard_normal((20, model.input_size)).astype(np.float32)
    Y, _ = model.run(X[:, None, :])
    s = model.stream()
    assert s.feed(X[:0]).shape == (0, model.output_size)
    assert_close(s.feed(X), Y[:, 0, :])


def test_fork_reset_and_state_roundtrip():
    rng = np.random.default_rng(7)
    model = mixed_model(rng)
    X = rng.standard_normal((30, 1, model.input_size)).astype(np.float32)
    s = model.stream()
    s.feed(X[:10])
    saved = s.get_state()
    child = s.fork()
    a = s.feed(X[10:])
    b = child.feed(X[10:])
    np.testing.assert_array_equal(a, b)  # same state, same arithmetic -> identical
    # the fork is independent: moving the parent did not move the child, and vice versa
    s.set_state(saved)
    np.testing.assert_array_equal(s.feed(X[10:]), a)
    s.reset()
    Y, _ = model.run(X)
    np.testing.assert_array_equal(s.feed(X), Y)
    # set_state from the output of run() continues a sequence exactly
    Y1, st = model.run(X[:10])
    s2 = model.stream(state=st)
    assert_close(s2.feed(X[10:]), Y[10:])


def test_model_initial_state_is_where_streams_start_and_reset_to():
    rng = np.random.default_rng(8)
    base = mixed_model(rng)
    init = [(rng.standard_normal((1, 1, 8)).astype(np.float32),
             rng.standard_normal((1, 1, 8)).astype(np.float32)),
            rng.standard_normal((1, 1, 6)).astype(np.float32),
            rng.standard_normal((1, 1, 7)).astype(np.float32)]
    model = rnnengine.Model(base.layers, initial_state=stack_state(init))
    X = rng.standard_normal((12, 2, model.input_size)).astype(np.float32)
    def rep(a):
        return np.repeat(a, 2, axis=1)

    bstate = [(rep(init[0][0]), rep(init[0][1])), rep(init[1]), rep(init[2])]
    Y_explicit, _ = base.run(X, state=stack_state(bstate))
    Y_default, _ = model.run(X)
    np.testing.assert_array_equal(Y_default, Y_explicit)
    s = model.stream(batch_size=2)
    s.feed(X[:5])
    s.reset()
    np.testing.assert_array_equal(s.feed(X), Y_explicit)


@pytest.mark.parametrize("n", [7, 20])  # 20 rows take the BLAS path for the recurrent product
def test_batch_of_streams_equals_streams_run_alone(n):
    rng = np.random.default_rng(9)
    model = mixed_model(rng)
    T = 25
    X = rng.standard_normal((T, n, model.input_size)).astype(np.float32)
    together = [model.stream() for _ in range(n)]
    alone = [model.stream() for _ in range(n)]
    # give the streams different histories first
    for i in range(n):
        pre = rng.standard_normal((i + 1, model.input_size)).astype(np.float32)
        together[i].feed(pre)
        alone[i].feed(pre)
    for t in range(T):
        out = rnnengine.step_streams(together, X[t])
        for i in range(n):
            assert_close(out[i], alone[i].step(X[t, i]))
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.get_state_vector(), b.get_state_vector(), rtol=1e-5, atol=1e-6)


def test_step_streams_subset_and_order():
    """Any subset of a model's streams, in any order, can be stepped together."""
    rng = np.random.default_rng(10)
    model = mixed_model(rng)
    streams = [model.stream() for _ in range(5)]
    ref = [s.fork() for s in streams]
    x = rng.standard_normal((3, model.input_size)).astype(np.float32)
    pick = [4, 0, 2]
    out = rnnengine.step_streams([streams[i] for i in pick], x)
    for row, i in enumerate(pick):
        assert_close(out[row], ref[i].step(x[row]))
    np.testing.assert_array_equal(streams[1].get_state_vector(), ref[1].get_state_vector())


def test_threads_stepping_their_own_streams_match_sequential_runs():
    rng = np.random.default_rng(11)
    model = mixed_model(rng, H=(64, 48, 32))
    n_threads, T = 4, 300
    inputs = [rng.standard_normal((T, model.input_size)).astype(np.float32) for _ in range(n_threads)]
    sequential = []
    for x in inputs:
        s = model.stream()
        sequential.append(np.stack([s.step(x[t]) for t in range(T)]))
    results = [None] * n_threads
    barrier = threading.Barrier(n_threads)

    def work(k):
        s = model.stream()
        barrier.wait()
        results[k] = np.stack([s.step(inputs[k][t]) for t in range(T)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        np.testing.assert_array_equal(got, want)


def test_stream_refuses_models_that_need_the_future():
    rng = np.random.default_rng(12)
    model = rnnengine.Model([random_layer("GRU", rng, 3, 4, direction="bidirectional")])
    with pytest.raises(ValueError, match="direction 'forward'.*bidirectional"):
        model.stream()
    model = rnnengine.Model([random_layer("GRU", rng, 3, 4, direction="reverse")])
    with pytest.raises(ValueError, match="reverse"):
        model.stream()


def test_threads_split_batch_rows_and_match_one_thread():
    """Model(threads=2) runs each half of the batch on its own thread through the whole
    sequence; results match the one-thread run to float32 rounding (the input projection's
    BLAS call sees fewer rows), lengths and initial states included."""
    rng = np.random.default_rng(21)
    I, H, T, B = 12, 16, 30, 9
    W = rng.standard_normal((2, 4 * H, I)).astype(np.float32) * 0.3
    R = rng.standard_normal((2, 4 * H, H)).astype(np.float32) * 0.3
    W2 = rng.standard_normal((1, 3 * H, 2 * H)).astype(np.float32) * 0.3
    R2 = rng.standard_normal((1, 3 * H, H)).astype(np.float32) * 0.3
    layers = [rnnengine.LSTM(W, R, direction="bidirectional"), rnnengine.GRU(W2, R2)]
    X = rng.standard_normal((B, T, I)).astype(np.float32)
    lens = rng.integers(0, T + 1, B)
    one = rnnengine.Model(layers, batch_first=True)
    two = rnnengine.Model(layers, batch_first=True, threads=2)
    st = [(rng.standard_normal((2, B, H)).astype(np.float32), rng.standard_normal((2, B, H)).astype(np.float32)),
          rng.standard_normal((1, B, H)).astype(np.float32)]
    y1, s1 = one.run(X, lengths=lens, state=stack_state(st))
    y2, s2 = two.run(X, lengths=lens, state=stack_state(st))
    assert np.abs(y1 - y2).max() <= 1e-5
    for a, b in zip(state_entries(s1), state_entries(s2)):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert np.abs(u - v).max() <= 1e-5
    with pytest.raises(ValueError, match="threads"):
        rnnengine.Model(layers, threads=0)
    with pytest.raises(ValueError, match="weight_dtype"):
        rnnengine.Model(layers, weight_dtype="bfloat16")


def _hammer(step, n_threads=4, n_steps=400, max_rounds=20):
    """Calls step() from several threads at once, n_steps per thread per round, in rounds
    until some calls overlapped (on a loaded machine one round may run the threads one after
    another); returns (successes, RuntimeErrors, calls)."""
    import threading
    ok, busy, other = [0], [0], []
    lock = threading.Lock()

    def run(start):
        start.wait()
        for _ in range(n_steps):
            try:
                step()
                with lock:
                    ok[0] += 1
            except RuntimeError as e:
                assert "another thread" in str(e)
                with lock:
                    busy[0] += 1
            except Exception as e:  # anything else is a failure of the test
                other.append(e)
    calls = 0
    for _ in range(max_rounds):
        start = threading.Barrier(n_threads)
        threads = [threading.Thread(target=run, args=(start,)) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        calls += n_threads * n_steps
        assert not other, other
        if busy[0]:
            break
    return ok[0], busy[0], calls


def test_one_stream_used_from_two_threads_raises_and_never_tears_its_state():
    """Measured before the guard: 15-32% of concurrent steps silently lost. Now a concurrent
    call raises RuntimeError, and the state equals the successful steps run one by one."""
    rng = np.random.default_rng(11)
    H, I = 64, 32
    lstm = rnnengine.LSTM(rng.standard_normal((1, 4 * H, I)).astype(np.float32) * 0.1,
                          rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.1)
    model = rnnengine.Model([lstm])
    x = rng.standard_normal((1, I)).astype(np.float32)
    s = model.stream()
    ok, busy, calls = _hammer(lambda: s.step(x))
    serial = model.stream()
    for _ in range(ok):
        serial.step(x)
    np.testing.assert_array_equal(s.get_state_vector(), serial.get_state_vector())
    assert ok + busy == calls and busy > 0 and ok > 0


def test_one_graph_stream_used_from_two_threads_raises_and_never_tears_its_state():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(12)
    H, I = 16, 8
    inits = [numpy_helper.from_array((rng.standard_normal(sh) * 0.2).astype(np.float32), n)
             for n, sh in (("W", (1, 4 * H, I)), ("R", (1, 4 * H, H)))]
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=H)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, I])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    gm = rnnengine.convert(m)
    x = rng.standard_normal((1, 1, I)).astype(np.float32)
    s = gm.stream()
    ok, busy, calls = _hammer(lambda: s({"x": x}), n_steps=200)
    serial = gm.stream()
    for _ in range(ok):
        serial({"x": x})
    for k, v in serial.get_state()["layers"].items():
        np.testing.assert_array_equal(s.get_state()["layers"][k], v)
    assert ok + busy == calls and busy > 0 and ok > 0
