"""Where splitting a batch-1 step over two threads starts to pay (the threshold of
src_c/pack.c, RNN_PAR_MIN_MACS_DEFAULT): streaming steps of LSTM / GRU / RNN with I = H,
threads=2 with every product split (threshold 0, per-product timing off) against
threads=1, side by side in one process, alternating in blocks. The product size printed is the recurrent product's
multiply-adds, G*H*H (the input projection of a step has the same size here).

    python benchmarks/bench_threads.py                 # H = 32 .. 1024
    python benchmarks/bench_threads.py --sizes 64,128  # chosen sizes
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import rnnengine  # noqa: E402
from rnnengine import _core  # noqa: E402
from rnnengine.codes import GATES  # noqa: E402


def layer(kind, H):
    rng = np.random.default_rng(0)
    G = GATES[kind]
    W = (rng.standard_normal((1, G * H, H)) / np.sqrt(H)).astype(np.float32)
    R = (rng.standard_normal((1, G * H, H)) / np.sqrt(H)).astype(np.float32)
    return getattr(rnnengine, kind)(W, R, np.zeros((1, 2 * G * H), np.float32))


def per_call_us(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,48,64,96,128,192,256,384,512,1024")
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    _core.set_threads_limit(2)
    _core.set_threads_min_macs(0)  # split everything: the measurement decides
    _core.set_threads_adaptive(False)  # and always: the raw cost and gain of a split
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| cell | H | product MACs | 1 thread us | 2 threads us | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("LSTM", "GRU", "RNN"):
        for H in map(int, a.sizes.split(",")):
            lay = layer(kind, H)
            streams = {t: rnnengine.Model([lay], threads=t).stream() for t in (1, 2)}
            x = np.ones(H, np.float32)
            y = np.empty(H, np.float32)
            inner = max(10, 200000 // (GATES[kind] * H * H // 16 + 1000))
            times = {1: [], 2: []}
            for _ in range(a.reps):
                for t, s in streams.items():
                    times[t].append(per_call_us(lambda s=s: s.step(x, out=y), inner))
            one, two = np.median(times[1]), np.median(times[2])
            print(f"| {kind} | {H} | {GATES[kind] * H * H} | {one:.1f} | {two:.1f} | {one / two:.2f}x |", flush=True)
    _core.set_threads_min_macs(-1)
    _core.set_threads_adaptive(True)


if __name__ == "__main__":
    main()
