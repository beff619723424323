"""bench_graph_threads.py - converted models: run() on 1 vs 2 threads (batch split), and
float32 vs float16 / int8 recurrent kernels, timed alternately in one process.

    python benchmarks/bench_graph_threads.py [--batch 64] [--repeats 7]

Models: silero-vad (if installed; 64 chunks of 576 samples with their state, one call) and
corpus LSTM models from tests/data/corpus (64 sequences of 100 steps). For each, every
variant is timed once per pass, passes alternate the variants (so machine load hits them
alike), and the median per variant is printed with its ratio to the first. The outputs of
the split run are compared with the one-thread run (max abs difference).
"""
from __future__ import annotations

import argparse
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
    # what the machine gives two threads right now: the layer stack's own split (Model(threads=2))
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


if __name__ == "__main__":
    main()
