"""Many live streams: N sessions stepped through rnnengine.Batcher vs N streams stepped on
their own (each by its own thread, as a service without the batcher would), and vs onnxruntime
with the state passed back by hand, same model, same threads; steps per second and per-step
latency, engines alternated in one run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_batcher.py [--sessions 64] [--steps 200] [--hidden 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import rnnengine  # noqa: E402
from rnnengine.runtime.batcher import Batcher  # noqa: E402


def run_threads(n, steps, body):
    """n threads, each calling body(i, k) for k in range(steps); returns (seconds, latencies)."""
    lat = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def work(i):
        barrier.wait()
        for k in range(steps):
            t0 = time.perf_counter()
            body(i, k)
            lat[i].append(time.perf_counter() - t0)
    th = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in th:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in th:
        t.join()
    return time.perf_counter() - t0, np.concatenate([np.array(x) for x in lat])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--asyncio", action="store_true",
                    help="one asyncio event loop serving every session (await astep) against the same loop "
                         "stepping each session's own stream in turn")
    ap.add_argument("--charlm", action="store_true",
                    help="the bundled character LM (a converted graph with explicit h/c state) instead of an LSTM")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    if a.charlm:
        model = rnnengine.convert(os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx"))
        xs = [[{"tokens": np.array([t], np.int64)} for t in row]
              for row in rng.integers(0, 60, size=(a.sessions, a.steps))]
        what = "demo char LM (converted graph, 2x LSTM 192, explicit state)"
    else:
        I = H = a.hidden
        W = (rng.standard_normal((1, 4 * H, I)) * 0.05).astype(np.float32)
        R = (rng.standard_normal((1, 4 * H, H)) * 0.05).astype(np.float32)
        model = rnnengine.Model([rnnengine.LSTM(W, R)])
        xs = rng.standard_normal((a.sessions, a.steps, I)).astype(np.float32)
        what = f"LSTM I=H={H}"
    print(f"{what}, {a.sessions} sessions x {a.steps} steps, one thread per session, "
          f"{os.cpu_count()} cores; medians over {a.repeats} alternating repeats")
    if a.asyncio:
        return run_asyncio(model, xs, a)
    cores = os.cpu_count() or 1
    # the batcher's one scheduler thread runs each batched step; with the model's threads it
    # splits that step's products over the cores (the streams of "own streams" use every core
    # through their own threads)
    wide = rnnengine.Model(model.layers, threads=cores) if not a.charlm and cores > 1 else None
    ort_step = None if a.charlm else onnxruntime_stepper(W, R, H)
    names = ["own streams", "batcher"] + ([f"batcher, model threads={cores}"] if wide else []) + \
        (["onnxruntime session per client"] if ort_step else [])
    res = {k: [] for k in names}
    lats = {k: [] for k in names}
    for _ in range(a.repeats):
        streams = [model.stream() for _ in range(a.sessions)]
        sec, lat = run_threads(a.sessions, a.steps, lambda i, k: streams[i].step(xs[i][k]))
        res["own streams"].append(a.sessions * a.steps / sec)
        lats["own streams"].append(lat)
        with Batcher(model, max_batch=a.sessions, max_wait_us=200) as b:
            sessions = [b.open() for _ in range(a.sessions)]
            sec, lat = run_threads(a.sessions, a.steps, lambda i, k: sessions[i].step(xs[i][k]))
            res["batcher"].append(a.sessions * a.steps / sec)
            lats["batcher"].append(lat)
            batches = b.counters["batches"]
        print(f"  batcher: {b.counters['steps'] / batches:.1f} steps per batched call on average")
        if wide is not None:
            with Batcher(wide, max_batch=a.sessions, max_wait_us=200) as b:
                sessions = [b.open() for _ in range(a.sessions)]
                sec, lat = run_threads(a.sessions, a.steps, lambda i, k: sessions[i].step(xs[i][k]))
                res[names[2]].append(a.sessions * a.steps / sec)
                lats[names[2]].append(lat)
        if ort_step is not None:
            steppers = [ort_step() for _ in range(a.sessions)]
            sec, lat = run_threads(a.sessions, a.steps, lambda i, k: steppers[i](xs[i][k]))
            res[names[-1]].append(a.sessions * a.steps / sec)
            lats[names[-1]].append(lat)
    base = np.median(res["own streams"])
    print("| engine | steps/s | median latency us | p99 latency us | throughput vs own streams |")
    print("|---|---:|---:|---:|---:|")
    for k in res:
        lat = np.concatenate(lats[k]) * 1e6
        print(f"| {k} | {np.median(res[k]):,.0f} | {np.median(lat):.0f} | {np.percentile(lat, 99):.0f} | "
              f"{np.median(res[k]) / base:.2f}x |")


def onnxruntime_stepper(W, R, H):
    """A factory of per-client onnxruntime steppers (one InferenceSession each, 1 intra-op
    thread, not spinning), the state passed out and back in by hand; None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    I = W.shape[2]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, I]),
           helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, H]),
           helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, H])]
    node = helper.make_node("LSTM", ["X", "W", "R", "", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=H)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y", "Y_h", "Y_c")]
    g = helper.make_graph([node], "b", ins, outs, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    data = m.SerializeToString()

    def make():
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])
        st = {"h0": np.zeros((1, 1, H), np.float32), "c0": np.zeros((1, 1, H), np.float32)}

        def step(x):
            y, st["h0"], st["c0"] = sess.run(None, {"X": x.reshape(1, 1, I), **st})
            return y
        return step
    return make


def run_asyncio(model, xs, a):
    import asyncio
    rates = {"own streams, in turn": [], "batcher (await astep)": []}
    for _ in range(a.repeats):
        streams = [model.stream() for _ in range(a.sessions)]
        t0 = time.perf_counter()
        for k in range(a.steps):
            for i in range(a.sessions):
                streams[i].step(xs[i][k])
        rates["own streams, in turn"].append(a.sessions * a.steps / (time.perf_counter() - t0))

        async def main(b):
            sessions = [b.open() for _ in range(a.sessions)]

            async def one(i):
                for k in range(a.steps):
                    await sessions[i].astep(xs[i][k])
            await asyncio.gather(*(one(i) for i in range(a.sessions)))
        with Batcher(model, max_batch=a.sessions, max_wait_us=500) as b:
            t0 = time.perf_counter()
            asyncio.run(main(b))
            rates["batcher (await astep)"].append(a.sessions * a.steps / (time.perf_counter() - t0))
            print(f"  batcher: {b.counters['steps'] / max(b.counters['batches'], 1):.1f} steps per batched call")
    base = np.median(rates["own streams, in turn"])
    print("| engine (one asyncio loop) | steps/s | vs own streams |")
    print("|---|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {np.median(v):,.0f} | {np.median(v) / base:.2f}x |")


if __name__ == "__main__":
    main()
