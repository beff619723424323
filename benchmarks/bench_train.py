"""Training throughput of rnnengine's C training path vs PyTorch on CPU, side by side in one
run (engines alternate), 1 and 2 threads: sequences per second for one optimiser step
(forward, backward through time, Adam) on

  * an LSTM I = H = 256, batch 32, T = 64, per-step regression (MSE);
  * a character LM of the demo's size (embedding 32, 2 x LSTM 192, vocabulary 95), batch 32,
    T = 64, softmax cross-entropy.

    python benchmarks/bench_train.py [--quick]

Threads: rnnengine's products go through OpenBLAS (threads set with threadpoolctl), PyTorch
uses torch.set_num_threads. PyTorch is needed (pip install torch==2.13.0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from rnnengine.train import Adam, Network, loss_and_grad  # noqa: E402
from rnnengine import _core  # noqa: E402


def ours_step(net, opt, x, y, task):
    net.grads[:] = 0
    logits, _ = net.forward(x)
    _, d = loss_and_grad(task, logits, y)
    net.backward(d)
    _core.clip_grad_norm(net.grads, 1.0)
    opt.step(net.params, net.grads)


def torch_setup(case):
    import torch
    if case == "lstm256":
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.r = torch.nn.LSTM(256, 256)
                self.o = torch.nn.Linear(256, 256)

            def forward(self, x):
                return self.o(self.r(x)[0])
        m = M()
        lossf = torch.nn.MSELoss()
    else:
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.e = torch.nn.Embedding(95, 32)
                self.r = torch.nn.LSTM(32, 192, num_layers=2)
                self.o = torch.nn.Linear(192, 95)

            def forward(self, x):
                return self.o(self.r(self.e(x))[0])
        m = M()
        ce = torch.nn.CrossEntropyLoss()
        lossf = lambda out, y: ce(out.reshape(-1, 95), y.reshape(-1))  # noqa: E731
    opt = torch.optim.Adam(m.parameters(), 1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = lossf(m(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits
    reps = 3 if a.quick else 8
    rng = np.random.default_rng(0)
    rows = []
    for case in ("lstm256", "charlm"):
        if case == "lstm256":
            net = Network("LSTM", 256, 256, 256, seed=0)
            x = rng.standard_normal((64, 32, 256)).astype(np.float32)
            y = rng.standard_normal((64, 32, 256)).astype(np.float32)
            task, tx, ty = "regress", torch.from_numpy(x), torch.from_numpy(y)
        else:
            net = Network("LSTM", 95, 192, 95, num_layers=2, embedding=32, seed=0)
            x = rng.integers(0, 95, (64, 32))
            y = rng.integers(0, 95, (64, 32))
            task, tx, ty = "lm", torch.from_numpy(x), torch.from_numpy(y)
        opt = Adam(net.size, 1e-3)
        tstep = torch_setup(case)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = {"rnnengine": [], "pytorch": []}
            with threadpool_limits(threads, user_api="blas"):
                ours_step(net, opt, x, y, task)
                tstep(tx, ty)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    ours_step(net, opt, x, y, task)
                    t1 = time.perf_counter()
                    tstep(tx, ty)
                    t2 = time.perf_counter()
                    times["rnnengine"].append(t1 - t0)
                    times["pytorch"].append(t2 - t1)
            ours, theirs = 32 / np.median(times["rnnengine"]), 32 / np.median(times["pytorch"])
            rows.append((case, threads, ours, theirs))
            print(f"{case} {threads} thread(s): rnnengine {ours:.1f} seq/s, pytorch {theirs:.1f} seq/s", file=sys.stderr)
    print("| model | threads | rnnengine seq/s | PyTorch seq/s | ratio |\n|---|---:|---:|---:|---:|")
    for case, th, o, t in rows:
        name = "LSTM I=H=256, batch 32, T=64 (MSE)" if case == "lstm256" else "char LM 32-192x2-95, batch 32, T=64"
        print(f"| {name} | {th} | {o:.1f} | {t:.1f} | {o / t:.2f}x |")


if __name__ == "__main__":
    main()
