"""bench_memory.py - private memory per worker process serving one weight file (issue 14 part 1).

Starts 1..N worker processes that each load the same weight file and run it (so every packed
weight is built and touched), then reads /proc/PID/smaps_rollup of every worker while all of
them are alive: USS (Private_Clean + Private_Dirty: what the process alone holds, freed when it
exits) and PSS (its share of every page, shared pages divided among the processes mapping
them). RSS is not reported: it counts shared pages once per process.

    python benchmarks/bench_memory.py                      # LSTM H=1024 x 2 layers, float32 + int8
    python benchmarks/bench_memory.py --hidden 512 --workers 3 --modes mmap shared

Each worker is a fresh Python (`python -c`), so its memory includes the interpreter, NumPy and
the extension. To isolate the model, every measurement is made twice with the same number of
workers: with the model, and with a tiny model of the same kind (H=8, same storage, same
mode: same imports and code paths). "model USS / PSS per worker" is the difference of the
two, per worker: the private memory (USS) and the share of all memory (PSS) the model's
weights cost each worker. The issue's target: for 2 or more workers, each worker's model USS
(and the growth of the group's total PSS per added worker) at most 10% of the weight bytes.
One worker alone has every page of a mapped file to itself, so its USS counts the file too.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER = r"""
import sys, os, numpy as np
import rnnengine
path, mode, hidden, inp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kw = {"read": {}, "mmap": {"mmap": True}, "shared": {"shared": True}}[mode]
model = rnnengine.load(path, **kw)
x = np.random.default_rng(0).standard_normal((3, 2, inp)).astype(np.float32)
y = model.run(x)           # a whole sequence: packs / maps every layer
s = model.stream(batch_size=1)
s.step(x[0, :1])           # a stream step: the streaming plan too
print("ready", flush=True)
sys.stdin.readline()           # held alive until the parent has measured every worker
"""


def smaps(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def measure(path: str, mode: str, n: int, hidden: int, inp: int) -> list[tuple[int, int]]:
    """(USS kB, PSS kB) of each of n workers alive together."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    # the workers start beside the weight file, not in a source checkout (whose rnnengine/
    # has no compiled core when the package is installed rather than built in place)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, path, mode, str(hidden), str(inp)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                              cwd=os.path.dirname(os.path.abspath(path)))
             for _ in range(n)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed ({mode}): {line!r}")
        time.sleep(0.2)
        res = []
        for p in procs:
            s = smaps(p.pid)
            res.append((s["Private_Clean"] + s["Private_Dirty"], s["Pss"]))
        return res
    finally:
        for p in procs:
            try:
                p.stdin.write("\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass
        for p in procs:
            p.wait()


def make_file(path: str, hidden: int, inp: int, layers: int, dtype: str) -> int:
    """An LSTM stack of random weights saved as `dtype`; returns the file's size in bytes."""
    import rnnengine
    rng = np.random.default_rng(1)
    stack = []
    for li in range(layers):
        i = inp if li == 0 else hidden
        s = 1.0 / np.sqrt(hidden)
        stack.append(rnnengine.LSTM((rng.standard_normal((1, 4 * hidden, i)) * s).astype(np.float32),
                                    (rng.standard_normal((1, 4 * hidden, hidden)) * s).astype(np.float32),
                                    (rng.standard_normal((1, 8 * hidden)) * s).astype(np.float32)))
    rnnengine.save(rnnengine.Model(stack), path, dtype=dtype)
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--input", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int8"])
    ap.add_argument("--modes", nargs="+", default=["read", "mmap", "shared"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(f"LSTM H={args.hidden} I={args.input} x {args.layers} layers; {args.workers} workers at most")
        print("| file (weight bytes) | mode | workers | model USS per worker MB | (% of weights) | "
              "model PSS per worker MB | total PSS growth per added worker (% of weights) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for dtype in args.dtypes:
            path = os.path.join(d, f"lstm_{dtype}.rnne")
            size = make_file(path, args.hidden, args.input, args.layers, dtype)
            tiny = os.path.join(d, f"tiny_{dtype}.rnne")
            make_file(tiny, 8, args.input, args.layers, dtype)
            for mode in args.modes:
                if mode == "shared":  # the first load writes the cache; measure the steady state
                    measure(path, mode, 1, args.hidden, args.input)
                    measure(tiny, mode, 1, 8, args.input)
                first_pss = None
                for n in range(1, args.workers + 1):
                    big = measure(path, mode, n, args.hidden, args.input)
                    small = measure(tiny, mode, n, 8, args.input)
                    uss = (sum(u for u, _ in big) - sum(u for u, _ in small)) / n  # kB per worker
                    pss_total = sum(p for _, p in big) - sum(p for _, p in small)
                    if first_pss is None:
                        first_pss, growth = pss_total, "-"
                    else:
                        growth = f"{(pss_total - first_pss) / (n - 1) * 1024 / size * 100:.1f}%"
                    print(f"| {dtype} ({size / 2**20:.1f} MB) | {mode} | {n} | {uss / 1024:.1f} | "
                          f"{uss * 1024 / size * 100:.1f}% | {pss_total / n / 1024:.1f} | {growth} |", flush=True)

if __name__ == "__main__":
    main()
