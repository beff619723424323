"""Training throughput of rnnengine's C training path vs PyTorch on CPU, side by side in one
run (engines alternate), 1 and 2 threads: sequences per second for one optimiser step
(forward, backward through time, gradient-norm clip, Adam) on

  * an LSTM I = H = 256, batch 32, T = 64, per-step regression (MSE);
  * a character LM of the demo's size (embedding 32, 2 x LSTM 192, vocabulary 95), batch 32,
    T = 64, softmax cross-entropy;
  * a GRU I = H = 256, batch 32, T = 64, per-step regression (MSE).

    python benchmarks/bench_train.py [--quick] [--why]

Memory: glibc is told to keep freed memory in the heap (steady_heap(), see there), so neither
engine pays page faults per step and the order of the cases does not change the result.

Threads: rnnengine's ``threads=N`` splits the batch rows over N threads, each calling BLAS
with one thread (threadpoolctl); PyTorch uses torch.set_num_threads(N). --why also prints
the rate (GFLOP/s) of each large product of the LSTM 256 step through SciPy's OpenBLAS (what
rnnengine calls), torch.mm, and rnnengine's packed-panel kernel (the operand packed once, as a
training pass does for R), one thread, alternating; and of the char LM's per-step products.
PyTorch and threadpoolctl are needed (pip install torch==2.13.0 threadpoolctl).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def steady_heap():
    """Both engines allocate tens of MB per step (PyTorch its activations and gradients; on
    our side NumPy temporaries). With glibc's defaults, a large block freed goes back to the
    kernel and the next step's page faults it in again, and how often depends on what ran
    before in the process: PyTorch's char LM measured 288 seq/s run alone and 352 after the
    LSTM case, with the same code. Keeping freed memory in the heap (mallopt: no mmap below
    256 MB, no trimming below 512 MB) gives each engine its steady state regardless of order
    (PyTorch's char LM: 371 seq/s, run alone or after the others)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to set
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))

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
    if case in ("lstm256", "gru256"):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.r = (torch.nn.LSTM if case == "lstm256" else torch.nn.GRU)(256, 256)
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


NAMES = {"lstm256": "LSTM I=H=256, batch 32, T=64 (MSE)", "charlm": "char LM 32-192x2-95, batch 32, T=64",
         "gru256": "GRU I=H=256, batch 32, T=64 (MSE)"}


def why(reps):
    """GFLOP/s of the LSTM-256 step's large products: OpenBLAS (SciPy), torch.mm, packed kernel."""
    import torch
    from scipy.linalg import blas
    rng = np.random.default_rng(1)
    shapes = [("input projection X @ W^T", 2048, 1024, 256), ("dW = dA^T @ X (also dR)", 1024, 256, 2048),
              ("dX = dA @ W", 2048, 256, 1024), ("head X @ W^T", 2048, 256, 256),
              ("recurrent h @ R^T (per step)", 32, 1024, 256), ("recurrent dA @ R (per step)", 32, 256, 1024),
              ("char LM h @ R^T (per step)", 32, 768, 192), ("char LM dA @ R (per step)", 32, 192, 768)]
    print("| product (M x N x K) | OpenBLAS GFLOP/s | torch.mm GFLOP/s | packed kernel GFLOP/s |\n|---|---:|---:|---:|")
    for name, M, N, K in shapes:
        A = rng.standard_normal((M, K)).astype(np.float32)
        Bm = rng.standard_normal((K, N)).astype(np.float32)
        At, Bt = torch.from_numpy(A), torch.from_numpy(Bm)
        BT = np.ascontiguousarray(Bm.T)
        Cp = np.zeros((M, N), np.float32)
        inner = max(1, int(2e8 // (2 * M * N * K)))  # ~0.1 s of work per sample
        fns = {"blas": lambda: blas.sgemm(1.0, Bm.T, A.T),  # column-major C^T = B^T A^T
               "torch": lambda: torch.mm(At, Bt),
               # B packed once per sample, then `inner` products (as a pass packs R once)
               "packed": lambda: _core.train_packed_gemm_repeat(A, BT, Cp, inner)}
        t = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(1 if k == "packed" else inner):
                    f()
                t[k].append((time.perf_counter() - t0) / inner)
        r = {k: 2.0 * M * N * K / np.median(v) / 1e9 for k, v in t.items()}
        print(f"| {name} ({M} x {N} x {K}) | {r['blas']:.0f} | {r['torch']:.0f} | {r['packed']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--why", action="store_true", help="also the products' GFLOP/s (one thread)")
    ap.add_argument("--cases", default="lstm256,charlm,gru256")
    a = ap.parse_args(argv)
    print(f"glibc heap kept between steps: {steady_heap()}", file=sys.stderr)
    import torch
    from threadpoolctl import threadpool_limits
    reps = 3 if a.quick else 8
    rng = np.random.default_rng(0)
    rows = []
    if a.why:
        torch.set_num_threads(1)
        with threadpool_limits(1, user_api="blas"):
            why(reps)
    for case in a.cases.split(","):
        if case in ("lstm256", "gru256"):
            net = Network("LSTM" if case == "lstm256" else "GRU", 256, 256, 256, seed=0)
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
            net.threads = threads
            times = {"rnnengine": [], "pytorch": []}
            # rnnengine's threads are its own batch split: BLAS runs one thread inside each
            with threadpool_limits(1, user_api="blas"):
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
    print("| model | threads | rnnengine seq/s | PyTorch seq/s | ratio | rnnengine 2 vs 1 thread |\n"
          "|---|---:|---:|---:|---:|---:|")
    one = {case: o for case, th, o, _ in rows if th == 1}
    for case, th, o, t in rows:
        scale = f"{o / one[case]:.2f}x" if th > 1 and case in one else ""
        print(f"| {NAMES[case]} | {th} | {o:.1f} | {t:.1f} | {o / t:.2f}x | {scale} |")


if __name__ == "__main__":
    main()
