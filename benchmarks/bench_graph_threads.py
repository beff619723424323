"""bench_graph_threads.py - converted models: run() on 1 vs 2 threads (batch split), and
float32 vs float16 / int8 recurrent kernels, timed alternately in one process.

    python benchmarks/bench_graph_threads.py [--batch 64] [--repeats 7]

Then the per-step latency of a stream of an H=1024 LSTM converted and loaded from float16 /
int8 files, where a step is bound by reading the weights.

Models: silero-vad (if installed; 64 chunks of 576 samples with their state, one call) and
corpus LSTM models from tests/data/corpus (64 sequences of 100 steps). For each, every
variant is timed once per pass, passes alternate the variants (so machine load hits them
alike), and the median per variant is printed with its ratio to the first. The outputs of
the split run are compared with the one-thread run (max abs difference).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import os
import statistics
import tempfile
import time

import numpy as np

import rnnengine
from rnnengine import _core

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "tests", "data", "corpus")


def models(batch):
    spec = importlib.util.find_spec("silero_vad")
    if spec is not None:
        path = os.path.join(spec.submodule_search_locations[0], "data", "silero_vad.onnx")
        rng = np.random.default_rng(0)
        feeds = {"input": (rng.standard_normal((batch, 576)) * 0.1).astype(np.float32),
                 "state": np.zeros((2, batch, 128), np.float32)}
        yield "silero_vad", path, {"fixed_inputs": {"sr": 16000}}, feeds
    for name in ("keras2_tf2onnx_lstm_op17.onnx", "torch_dynamo_lstm_2layer_batchfirst_op18.onnx"):
        path = os.path.join(CORPUS, name)
        m = rnnengine.convert(path)
        rng = np.random.default_rng(1)
        feeds = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
                 for k, v in m.example_feeds(time=100, batch=batch).items()}
        yield name, path, {}, feeds


def timed(model, feeds, n):
    t0 = time.perf_counter()
    for _ in range(n):
        model.run(feeds)
    return (time.perf_counter() - t0) / n


def compare(label, variants, feeds, repeats):
    for m in variants.values():
        m.run(feeds)  # plans made and stacks packed before timing
    inner = max(1, int(0.05 / max(1e-6, timed(next(iter(variants.values())), feeds, 1))))
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, m in variants.items():
            times[k].append(timed(m, feeds, inner))
    base = statistics.median(times[next(iter(variants))])
    for k in variants:
        med = statistics.median(times[k])
        print(f"  {label:<8} {k:<22} {med * 1e3:9.3f} ms   x{base / med:5.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"rnnengine {rnnengine.__version__}, kernel level {_core.kernel_level()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; batch {args.batch}, "
          f"median of {args.repeats} alternating passes")
    # what the machine gives two threads right now: two NumPy matrix products at once, then
    # the layer stack's own split (Model(threads=2))
    a = np.random.default_rng(3).random((300, 300)).astype(np.float32)

    def products(_=None):
        for _ in range(100):
            a @ a
    seq, par = [], []
    with cf.ThreadPoolExecutor(2) as pool:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            products()
            products()
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(pool.map(products, range(2)))
            par.append(time.perf_counter() - t0)
    print(f"reference: two NumPy products in 2 threads vs one after the other: "
          f"x{statistics.median(seq) / statistics.median(par):.2f}")
    rng = np.random.default_rng(2)
    W, R = (rng.standard_normal((1, 512, 64)) * 0.1).astype(np.float32), \
        (rng.standard_normal((1, 512, 128)) * 0.1).astype(np.float32)
    x = rng.standard_normal((100, args.batch, 64)).astype(np.float32)
    print("reference: layer stack Model, LSTM H=128, 100 steps")

    class _Runs:  # Model.run(X) behind the GraphModel-like run(feeds) that compare() times
        def __init__(self, m):
            self.m = m

        def run(self, feeds):
            return self.m.run(feeds)
    compare("threads", {"1 thread": _Runs(rnnengine.Model([rnnengine.LSTM(W, R)])),
                        "2 threads": _Runs(rnnengine.Model([rnnengine.LSTM(W, R)], threads=2))}, x, args.repeats)
    tmp = tempfile.mkdtemp()
    for name, path, kw, feeds in models(args.batch):
        print(name)
        one = rnnengine.convert(path, **kw)
        two = rnnengine.convert(path, threads=2, **kw)
        a, b = one.run(feeds), two.run(feeds)
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        print(f"  split: {two.thread_split_reason or 'yes'}; max |2 threads - 1 thread| = {diff:.1e}")
        compare("threads", {"1 thread": one, "2 threads": two}, feeds, args.repeats)
        variants = {"float32": one}
        for dt in ("float16", "int8"):
            f = os.path.join(tmp, f"m.{dt}.rnne")
            rnnengine.save(one, f, dtype=dt)
            variants[f"load({dt} file)"] = rnnengine.load(f)
        compare("weights", variants, feeds, args.repeats)
    stream_steps(args.repeats)


def big_lstm(H=1024, I=256):
    """A one-LSTM ONNX model, H=1024: a streaming step is bound by reading R (16 MB in float32)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    W = (rng.standard_normal((1, 4 * H, I)) * 0.05).astype(np.float32)
    R = (rng.standard_normal((1, 4 * H, H)) * 0.03).astype(np.float32)
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=H)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, I])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def stream_steps(repeats):
    """Per-step latency of a stream of the H=1024 LSTM converted, and loaded from float16 /
    int8 weight files (the stored storage runs in the kernels)."""
    tmp = tempfile.mkdtemp()
    base = rnnengine.convert(big_lstm())
    variants = {"float32": base}
    for dt in ("float16", "int8"):
        f = os.path.join(tmp, f"big.{dt}.rnne")
        rnnengine.save(base, f, dtype=dt)
        variants[f"load({dt} file)"] = rnnengine.load(f)
        if dt == "int8":  # what load() did before: the stored values widened, float32 kernels
            variants["load(int8, as float32)"] = rnnengine.load(f, weight_dtype="float32")
    x = np.random.default_rng(5).standard_normal((1, 1, 256)).astype(np.float32)
    streams = {k: m.stream() for k, m in variants.items()}
    for s in streams.values():
        s({"x": x})
    times = {k: [] for k in streams}
    for _ in range(repeats):
        for k, s in streams.items():
            t0 = time.perf_counter()
            for _ in range(50):
                s({"x": x})
            times[k].append((time.perf_counter() - t0) / 50)
    print("stream step, LSTM H=1024 I=256, batch 1")
    b = statistics.median(times["float32"])
    for k, v in times.items():
        print(f"  {k:<22} {statistics.median(v) * 1e6:9.1f} us   x{b / statistics.median(v):5.2f}")


if __name__ == "__main__":
    main()
