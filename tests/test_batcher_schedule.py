"""The session batcher under schedules nobody wrote by hand: hypothesis draws sessions that
join and leave at random, step concurrently in bursts, fork, reset, save and restore their
state and feed chunks; each session's outputs must equal what its own stream gives for the
same calls, bit for bit (oracle.BATCHED_ATOL). And a stress run: 1,000 sessions driven by 16
threads plus asyncio tasks, random bursts, sessions closed and reopened on the way: no lost
step, no crossed state (each session's outputs are its own sequence's, checked against a
whole-sequence run), memory bounded, time bounded."""
import asyncio
import concurrent.futures as cf
import os
import re
import resource
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnengine
from oracle import BATCHED_ATOL, max_violation
from rnnengine.runtime.batcher import Batcher, SessionClosedError

rng = np.random.default_rng(2026)
I, H = 7, 13  # odd sizes: not multiples of any SIMD width


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def stack_model():
    return rnnengine.Model([rnnengine.LSTM(f32(1, 4 * H, I), f32(1, 4 * H, H), f32(1, 8 * H)),
                            rnnengine.GRU(f32(1, 3 * H, H), f32(1, 3 * H, H), f32(1, 6 * H),
                                          linear_before_reset=True)])


@pytest.fixture(scope="module")
def token_model():
    return rnnengine.convert(os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx"))


POOL = cf.ThreadPoolExecutor(8)


def close_enough(got, want):
    """Within BATCHED_ATOL (0: the same bits; NaN where NaN)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    if got.size:
        diff = np.abs(got.astype(np.float64) - want)
        worst = float(np.max(np.where(np.isnan(got) & np.isnan(want), 0.0, np.nan_to_num(diff, nan=np.inf))))
        assert worst <= BATCHED_ATOL, f"a batched session is {worst:.3g} off the same session alone"


class Mirror:
    """The sessions of one batcher and, beside each, its own stream (the reference)."""

    def __init__(self, model, batcher, make_input, out_of):
        self.model, self.b, self.make_input, self.out_of = model, batcher, make_input, out_of
        self.live = []  # [session, reference stream, saved (session state, reference state) or None]

    def open(self):
        self.live.append([self.b.open(), self.model.stream(), None])

    def round(self, picks, bursts):
        """The picked sessions step concurrently, each a burst of steps in order."""
        work = [(self.live[k], [self.make_input() for _ in range(n)]) for k, n in zip(picks, bursts)]
        got = list(POOL.map(lambda w: [self.out_of(w[0][0].step(x)) for x in w[1]], work))
        for (entry, xs), ys in zip(work, got):
            want = [self.out_of(entry[1].step(x)) for x in xs]
            close_enough(np.stack(ys), np.stack(want))

    def act(self, what, k):
        s, ref, saved = self.live[k]
        if what == "close":
            s.close()
            assert s.closed
            with pytest.raises(SessionClosedError):
                s.step(self.make_input())
            del self.live[k]
        elif what == "fork":
            self.live.append([s.fork(), ref.fork(), None])
        elif what == "reset":
            s.reset()
            ref.reset()
        elif what == "save":
            self.live[k][2] = (s.get_state(), ref.get_state())
        elif what == "restore" and saved is not None:
            try:
                ref.set_state(saved[1])
            except ValueError as e:  # (a graph's state saved before its first call, restored after it)
                with pytest.raises(ValueError, match=re.escape(str(e).split(" (")[0])):
                    s.set_state(saved[0])
                return
            s.set_state(saved[0])


def drive(mirror, data, feed=None):
    for _ in range(3):
        mirror.open()
    for _ in range(data.draw(st.integers(4, 14), label="operations")):
        if not mirror.live:
            mirror.open()
        what = data.draw(st.sampled_from(["round", "round", "round", "open", "close", "fork", "reset", "save",
                                          "restore"] + (["feed"] if feed else [])))
        n = len(mirror.live)
        if what == "round":
            picks = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
            bursts = data.draw(st.lists(st.integers(1, 4), min_size=len(picks), max_size=len(picks)))
            mirror.round(picks, bursts)
        elif what == "open":
            mirror.open()
        elif what == "feed":
            k, T = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 5))
            feed(mirror.live[k], T)
        else:
            mirror.act(what, data.draw(st.integers(0, n - 1)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data(), max_batch=st.sampled_from([1, 3, 64]), threads=st.sampled_from([1, 2]))
def test_random_schedules_of_a_layer_stack_match_each_session_alone(stack_model, data, max_batch, threads):
    with Batcher(stack_model, max_batch=max_batch, max_wait_us=300, threads=threads) as b:
        mirror = Mirror(stack_model, b, lambda: f32(I, scale=1.0), lambda y: y)

        def feed(entry, T):
            xs = f32(T, I, scale=1.0)
            close_enough(entry[0].feed(xs), entry[1].feed(xs))
        drive(mirror, data, feed)
        assert b.sessions == len(mirror.live)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_schedules_of_a_converted_token_model_match_each_session_alone(token_model, data):
    with Batcher(token_model, max_wait_us=2000, batch_graphs=True) as b:
        mirror = Mirror(token_model, b, lambda: {"tokens": rng.integers(0, 60, size=(1,)).astype(np.int64)},
                        lambda y: y["logits"])
        drive(mirror, data)
        assert b.graph_batching is None, b.graph_batching


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_thousand_sessions_from_16_threads_and_asyncio_tasks():
    model = rnnengine.Model([rnnengine.LSTM(f32(1, 4 * H, I), f32(1, 4 * H, H), f32(1, 8 * H))])
    n_thread_sessions, n_async_sessions, n_threads = 800, 200, 16

    def one_pass(seed):
        r = np.random.default_rng(seed)
        inputs = {}  # session key -> list of rows stepped, in order
        outputs = {}
        lock = threading.Lock()
        with Batcher(model, max_batch=64, max_wait_us=500, max_queue=256) as b:
            def thread_work(t):
                rt = np.random.default_rng(seed * 100 + t)
                mine = {}
                for j in range(n_thread_sessions // n_threads):
                    mine[(t, j)] = b.open()
                for _ in range(150):
                    key = list(mine)[rt.integers(len(mine))]
                    if rt.random() < 0.05:  # leave, and a new session takes the key's place
                        mine[key].close()
                        with lock:
                            inputs[key + (len(inputs),)] = inputs.pop(key, [])
                            outputs[key + (len(outputs),)] = outputs.pop(key, [])
                        mine[key] = b.open()
                        continue
                    xs = rt.standard_normal((int(rt.integers(1, 9)), I)).astype(np.float32)
                    ys = [mine[key].step(x) for x in xs]
                    with lock:
                        inputs.setdefault(key, []).extend(xs)
                        outputs.setdefault(key, []).extend(ys)

            async def async_work():
                sessions = [b.open() for _ in range(n_async_sessions)]

                async def one(i):
                    ra = np.random.default_rng(seed * 1000 + i)
                    for _ in range(int(ra.integers(1, 6))):
                        xs = ra.standard_normal((int(ra.integers(1, 9)), I)).astype(np.float32)
                        for x in xs:
                            y = await sessions[i].astep(x)
                            inputs.setdefault(("a", i), []).append(x)
                            outputs.setdefault(("a", i), []).append(y)
                        await asyncio.sleep(0)
                await asyncio.gather(*(one(i) for i in range(n_async_sessions)))
            th = [threading.Thread(target=thread_work, args=(t,)) for t in range(n_threads)]
            th.append(threading.Thread(target=lambda: asyncio.run(async_work())))
            for x in th:
                x.start()
            for x in th:
                x.join(timeout=120)
            assert not any(x.is_alive() for x in th), "the stress run did not finish within 2 minutes"
            counters = b.counters
        total = sum(len(v) for v in inputs.values())
        assert counters["steps"] == total  # no lost step, none doubled
        assert counters["largest_batch"] > 1
        for key, xs in inputs.items():  # no crossed state: each its own sequence, run whole
            if xs:
                want = model.run(np.stack(xs)[:, None, :])[0][:, 0, :]
                assert max_violation(np.stack(outputs[key]), want) <= 1, key
        return total

    t0 = time.monotonic()
    one_pass(1)
    before = rss_mb()
    steps = one_pass(2)
    grown = rss_mb() - before
    assert steps > 8_000
    assert grown < 50, f"RSS grew {grown:.1f} MB over a second pass of 1,000 sessions"
    assert time.monotonic() - t0 < 240


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), batch_graphs=st.sampled_from([True, False]))
def test_random_schedules_of_silero_vad_match_each_session_alone(data, batch_graphs):
    """A state that is not contiguous per row once joined ((2, n, 128)): see
    test_batcher.test_graph_sessions_batched_then_alone_keep_their_own_state."""
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None:
        pytest.skip("silero-vad is not installed")
    graph = _silero(os.path.join(spec.submodule_search_locations[0], "data", "silero_vad.onnx"))
    with Batcher(graph, max_wait_us=2000, batch_graphs=batch_graphs) as b:
        mirror = Mirror(graph, b, lambda: {"input": f32(1, 576, scale=0.1)}, lambda y: y["output"])
        drive(mirror, data)


_SILERO = {}


def _silero(path):
    if path not in _SILERO:
        _SILERO[path] = rnnengine.convert(path, fixed_inputs={"sr": 16000})
    return _SILERO[path]
