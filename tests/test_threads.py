"""Batch-1 steps and sequences split over threads by gate rows (src_c/pool.c): the results
are bit-identical to one thread, the workers really take part, concurrent callers and fork()
are safe, and the pool costs no CPU while idle."""
import os
import threading
import time

import numpy as np
import pytest

import rnnengine
from rnnengine import _core
from rnnengine.codes import GATES


@pytest.fixture(autouse=True)
def two_threads_even_tiny():
    """Two threads whatever this machine has, and every product split (tiny test sizes
    are below the measured threshold)."""
    old = _core.threads_limit()
    _core.set_threads_limit(2)
    _core.set_threads_min_macs(0)
    adaptive = _core.set_threads_adaptive(False)  # every product split, however busy the machine
    yield
    _core.set_threads_adaptive(adaptive)
    _core.set_threads_min_macs(-1)
    _core.set_threads_limit(old)


def layer(kind, I, H, direction="forward", seed=0, lbr=0, peep=False, clip=None):
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    G = GATES[kind]
    W = rng.standard_normal((D, G * H, I)).astype(np.float32) * 0.4
    R = rng.standard_normal((D, G * H, H)).astype(np.float32) * 0.4
    B = rng.standard_normal((D, 2 * G * H)).astype(np.float32) * 0.3
    kw = {"direction": direction}
    if clip is not None:
        kw["clip"] = clip
    if kind == "LSTM":
        P = rng.standard_normal((D, 3 * H)).astype(np.float32) * 0.3 if peep else None
        return rnnengine.LSTM(W, R, B, P, **kw)
    if kind == "GRU":
        return rnnengine.GRU(W, R, B, linear_before_reset=lbr, **kw)
    return rnnengine.RNN(W, R, B, **kw)


CASES = [("LSTM", 0, False), ("LSTM", 0, True), ("GRU", 0, False), ("GRU", 1, False), ("RNN", 0, False)]


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"max diff {np.nanmax(np.abs(a - b))}"


def leaves(state):
    """The arrays of a state, in a fixed order, whatever its nesting (dicts, lists, tuples)."""
    if isinstance(state, dict):
        return [a for k in sorted(state) for a in leaves(state[k])]
    if isinstance(state, (list, tuple)):
        return [a for e in state for a in leaves(e)]
    return [np.asarray(state)]


def states_equal(s1, s2):
    l1, l2 = leaves(s1), leaves(s2)
    assert len(l1) == len(l2) and l1
    for a, b in zip(l1, l2):
        same_bits(a, b)


@pytest.mark.parametrize("kind,lbr,peep", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_sequence_split_by_gate_rows_is_bit_identical(kind, lbr, peep, direction, dtype):
    # odd sizes: panels of 16 columns straddle the gate blocks; two layers, the second
    # reading the first's (D*H) output
    H, I, T = 37, 13, 9
    D = 2 if direction == "bidirectional" else 1
    layers = [layer(kind, I, H, direction, 1, lbr, peep, clip=2.5),
              layer(kind, D * H, 21, direction, 2, lbr, peep)]
    one = rnnengine.Model(layers, weight_dtype=dtype)
    two = rnnengine.Model(layers, weight_dtype=dtype, threads=2)
    X = np.random.default_rng(3).standard_normal((T, 1, I)).astype(np.float32)
    X[4, 0, 2] = np.nan  # NaN reaches the same outputs either way
    for B, lens in ((1, None), (3, np.array([9, 4, 0], np.int32))):  # 3 < 2 * threads: gate split
        XB = np.repeat(X, B, axis=1) * np.linspace(1, -1, B, dtype=np.float32)[None, :, None]
        Y1, s1 = one.run(XB, lengths=lens)
        Y2, s2 = two.run(XB, lengths=lens)
        same_bits(Y1, Y2)
        states_equal(s1, s2)
    assert np.isnan(Y2).any()


@pytest.mark.parametrize("kind,lbr,peep", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_stream_steps_split_by_gate_rows_are_bit_identical(kind, lbr, peep, dtype):
    H, I = 53, 19
    layers = [layer(kind, I, H, seed=4, lbr=lbr, peep=peep), layer(kind, H, 29, seed=5, lbr=lbr, peep=peep)]
    s1 = rnnengine.Model(layers, weight_dtype=dtype).stream()
    s2 = rnnengine.Model(layers, weight_dtype=dtype, threads=2).stream()
    xs = np.random.default_rng(6).standard_normal((40, I)).astype(np.float32)
    for x in xs:
        same_bits(s1.step(x), s2.step(x))
    same_bits(s1.feed(xs[:7]), s2.feed(xs[:7]))
    states_equal(s1.get_state(), s2.get_state())


def test_projected_lstm_split_is_bit_identical():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mod = torch.nn.LSTM(11, 45, proj_size=19, num_layers=2)
    one, two = rnnengine.from_torch(mod), rnnengine.from_torch(mod)
    two.threads = 2
    X = np.random.default_rng(7).standard_normal((6, 1, 11)).astype(np.float32)
    Y1, s1 = one.run(X)
    Y2, s2 = two.run(X)
    same_bits(Y1, Y2)
    states_equal(s1, s2)
    a, b = one.stream(), two.stream()
    for x in X[:, 0]:
        same_bits(a.step(x), b.step(x))


def test_the_workers_take_part():
    """The bit-identity tests above would pass serially too: check that the other thread
    really computes chunks (worker_chunks counts them)."""
    m = rnnengine.Model([layer("LSTM", 64, 128)], threads=2)
    s = m.stream()
    x = np.ones(64, np.float32)
    before = _core.threads_worker_chunks()
    for _ in range(5000):
        s.step(x)
        if _core.threads_worker_chunks() > before:
            break
    assert _core.threads_worker_chunks() > before


def test_threads_one_never_uses_the_pool():
    m = rnnengine.Model([layer("GRU", 32, 96)])
    s = m.stream()
    before = _core.threads_worker_chunks()
    for _ in range(300):
        s.step(np.ones(32, np.float32))
    assert _core.threads_worker_chunks() == before


def test_many_python_threads_stepping_their_own_streams():
    """The pool serves one call at a time; the others run on their own threads. No
    deadlock, and every stream gets exactly what it would get alone."""
    layers = [layer("LSTM", 24, 67, seed=8)]
    one = rnnengine.Model(layers)
    two = rnnengine.Model(layers, threads=2)
    n, steps = 6, 150
    xs = np.random.default_rng(9).standard_normal((n, steps, 24)).astype(np.float32)
    want = [np.stack([s.step(x) for x in xs[k]]) for k, s in enumerate([one.stream() for _ in range(n)])]
    got = [None] * n
    errors = []

    def work(k):
        try:
            s = two.stream()
            got[k] = np.stack([s.step(x) for x in xs[k]])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a stepping thread hung"
    assert not errors
    for k in range(n):
        same_bits(want[k], got[k])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_runs_threaded_steps():
    m = rnnengine.Model([layer("GRU", 16, 80, seed=10)], threads=2)
    s = m.stream()
    x = np.ones(16, np.float32)
    for _ in range(50):
        s.step(x)  # the pool exists and its worker is running in the parent
    want = rnnengine.Model([layer("GRU", 16, 80, seed=10)]).stream()
    for _ in range(50):
        want.step(x)
    pid = os.fork()
    if pid == 0:  # child: a new pool on demand; exit code 0 only when the step matches
        code = 1
        try:
            code = 0 if np.array_equal(s.step(x), want.step(x)) else 2
        finally:
            os._exit(code)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in a threaded step")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def pool_threads_cpu():
    """CPU seconds used so far by the pool's workers (threads named rnnengine-pool), and how
    many there are (Linux /proc)."""
    ticks, n = 0, 0
    for tid in os.listdir("/proc/self/task"):
        try:
            if open(f"/proc/self/task/{tid}/comm").read().strip() != "rnnengine-pool":
                continue
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
        n += 1
    return ticks / os.sysconf("SC_CLK_TCK"), n


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_idle_pool_uses_no_cpu():
    """Workers spin briefly (50 us) after a job, then sleep: a warm pool left idle burns
    no CPU time."""
    s = rnnengine.Model([layer("LSTM", 64, 128)], threads=2).stream()
    for _ in range(300):
        s.step(np.ones(64, np.float32))
    time.sleep(0.05)  # past the spin window
    t0, n = pool_threads_cpu()
    assert n >= 1, "no pool worker thread found"
    time.sleep(1.0)
    used = pool_threads_cpu()[0] - t0
    assert used <= 0.02, f"the idle pool used {used:.3f} s of CPU in 1 s: it spins"


def test_limit_follows_the_environment(monkeypatch):
    cpus = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 16)
    monkeypatch.delenv("RNNENGINE_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _core.set_threads_limit(0) == cpus  # 0: back to the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1,1")  # a nested list: its first entry
    assert _core.set_threads_limit(0) == 1
    monkeypatch.setenv("RNNENGINE_NUM_THREADS", "64")  # first, but capped by the CPUs
    assert _core.set_threads_limit(0) == cpus
    assert _core.set_threads_limit(3) == 3
    assert _core.set_threads_limit(100) == 16


def test_adaptive_choice_between_split_and_one_thread_keeps_the_bits():
    """With the per-product timing on (the default), calls switch between the split and
    the one-thread way as the timings say; either way the bits are those of one thread."""
    _core.set_threads_adaptive(True)
    layers = [layer("GRU", 31, 75, seed=11, lbr=1), layer("LSTM", 75, 41, seed=12)]
    a = rnnengine.Model(layers).stream()
    b = rnnengine.Model(layers, threads=2).stream()
    xs = np.random.default_rng(13).standard_normal((400, 31)).astype(np.float32)
    for x in xs:
        same_bits(a.step(x), b.step(x))
    X = xs[:50, None, :]
    same_bits(rnnengine.Model(layers).run(X)[0], rnnengine.Model(layers, threads=2).run(X)[0])


def test_converted_graphs_split_their_recurrent_products_too(tmp_path):
    """A converted graph (here a layer stack saved and loaded, and a corpus export) with
    threads=2: its batch-1 stream and run() split each recurrent product by gate rows,
    bit-identical to threads=1, and the other thread takes part."""
    import os
    stack = rnnengine.Model([layer("LSTM", 24, 37, seed=3), layer("GRU", 37, 21, seed=4, lbr=1)])
    path = str(tmp_path / "m.rnne")
    rnnengine.save(stack, path)
    corpus = os.path.join(os.path.dirname(__file__), "data", "corpus", "torch_dynamo_lstm_2layer_batchfirst_op18.onnx")
    for one, two in ((rnnengine.load(path), rnnengine.load(path, threads=2)),
                     (rnnengine.convert(corpus), rnnengine.convert(corpus, threads=2))):
        assert two.threads == 2
        name = one.input_names[0]
        spec = next(i for i in one.inputs if i["name"] == name)
        rng = np.random.default_rng(9)
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        s1, s2 = one.stream(), two.stream()
        ax = s1.time_axes[name]
        shape[ax] = 6
        x = rng.standard_normal(shape).astype(np.float32)
        for k, v in one.run({name: x}).items():
            np.testing.assert_array_equal(two.run({name: x})[k], v)
        # the worker may be late on a busy machine (the caller then takes every chunk): step
        # until it has taken part, comparing every output on the way
        before = _core.threads_worker_chunks()
        for _ in range(2000):
            a, b = s1.feed({name: x}), s2.feed({name: x})
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
            if _core.threads_worker_chunks() > before:
                break
        assert _core.threads_worker_chunks() > before
