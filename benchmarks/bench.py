"""Side-by-side speed of rnnengine, onnxruntime (plain run and IOBinding) and PyTorch
(when installed) on the same recurrent layers, in one run, alternating engines.

Streaming: batch 1, one time step per call, state carried between calls.
Sequence: whole sequences of T steps for batch 1 and 16.

For each case the lower bound per time step is measured on the spot: the larger of
(a) FLOPs / this machine's single-core SGEMM rate and (b) one BLAS matrix-vector product
over the exact weights (streaming: W and R; sequences: R only). Each engine's time is
reported with its fraction of that bound (bound / time: 1.0 would be at the limit).

    python benchmarks/bench.py            # full run
    python benchmarks/bench.py --quick    # under a minute
    python benchmarks/bench.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 1 thread unless said; before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

import rnnengine  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def timeit(fn, reps, inner):
    """Per-call times (seconds) of `inner` calls to fn, `reps` times."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return np.array(out)


def sgemm_peak(reps):
    n = 512
    a = np.asfortranarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    t = timeit(lambda: blas.sgemm(1.0, a, a), reps, 3)
    return 2 * n ** 3 / np.median(t)


def make_weights(kind, I, H, seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    W = (rng.standard_normal((1, G * H, I)) / np.sqrt(I)).astype(np.float32)
    R = (rng.standard_normal((1, G * H, H)) / np.sqrt(H)).astype(np.float32)
    B = (rng.standard_normal((1, 2 * G * H)) * 0.1).astype(np.float32)
    return W, R, B


def onnx_session(kind, W, R, B, with_state):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    G = GATES[kind]
    H = R.shape[2]
    I = W.shape[2]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"), numpy_helper.from_array(B, "B")]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I])]
    node_in = ["X", "W", "R", "B", ""]
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    if with_state:
        ins.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "N", H]))
        node_in.append("h0")
        if kind == "LSTM":
            ins.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, "N", H]))
            node_in.append("c0")
    node = helper.make_node(kind, node_in, outs, hidden_size=H)
    g = helper.make_graph([node], "b", ins, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    del G
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def layer_of(kind, W, R, B):
    return getattr(rnnengine, kind)(W, R, B)


def torch_module(kind, W, R, B):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    H, I = R.shape[2], W.shape[2]
    mod = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[kind](I, H)
    # ONNX gate order -> PyTorch: LSTM iofc -> ifgo, GRU zrh -> rzn
    G = GATES[kind]
    order = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}[kind]
    def perm(a):
        return np.concatenate([a[g * H:(g + 1) * H] for g in order])
    with torch.no_grad():
        mod.weight_ih_l0.copy_(torch.from_numpy(perm(W[0])))
        mod.weight_hh_l0.copy_(torch.from_numpy(perm(R[0])))
        mod.bias_ih_l0.copy_(torch.from_numpy(perm(B[0, :G * H])))
        mod.bias_hh_l0.copy_(torch.from_numpy(perm(B[0, G * H:])))
    return mod


def bench_stream(kind, I, H, reps, inner, peak):
    W, R, B = make_weights(kind, I, H)
    G = GATES[kind]
    x = np.random.default_rng(1).standard_normal(I).astype(np.float32)
    res = {"case": f"stream {kind} I={I} H={H}", "kind": kind, "I": I, "H": H, "batch": 1}
    # bound: FLOPs / peak and one sgemv over [W R]
    WR = np.asfortranarray(np.concatenate([W[0], R[0]], axis=1))
    xh = np.concatenate([x, np.zeros(H, np.float32)])
    t_gemv = np.median(timeit(lambda: blas.sgemv(1.0, WR, xh), reps, inner))
    flops = 2 * G * H * (I + H)
    res["bound_us"] = max(flops / peak, t_gemv) * 1e6

    engines = {}
    model = rnnengine.Model([layer_of(kind, W, R, B)])
    stream = model.stream()
    y = np.empty(model.output_size, np.float32)
    engines["rnnengine"] = lambda: stream.step(x, out=y)

    try:
        sess = onnx_session(kind, W, R, B, with_state=True)
        feeds = {"X": x.reshape(1, 1, I), "h0": np.zeros((1, 1, H), np.float32)}
        if kind == "LSTM":
            feeds["c0"] = np.zeros((1, 1, H), np.float32)
        state = {}

        def ort_plain():
            out = sess.run(None, {**feeds, **state})
            state["h0"] = out[1]
            if kind == "LSTM":
                state["c0"] = out[2]
        engines["onnxruntime"] = ort_plain

        import onnxruntime as ort
        xv = ort.OrtValue.ortvalue_from_numpy(x.reshape(1, 1, I))
        hs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, H), np.float32)) for _ in range(2)]
        cs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, H), np.float32)) for _ in range(2)]
        yv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 1, H), np.float32))
        flip = [0]

        def ort_io():
            a, b = flip[0], 1 - flip[0]
            io = sess.io_binding()
            io.bind_ortvalue_input("X", xv)
            io.bind_ortvalue_input("h0", hs[a])
            io.bind_ortvalue_output("Y", yv)
            io.bind_ortvalue_output("Y_h", hs[b])
            if kind == "LSTM":
                io.bind_ortvalue_input("c0", cs[a])
                io.bind_ortvalue_output("Y_c", cs[b])
            sess.run_with_iobinding(io)
            flip[0] = b
        engines["onnxruntime+iobinding"] = ort_io
    except ImportError:
        pass

    mod = torch_module(kind, W, R, B)
    if mod is not None:
        import torch
        tx = torch.from_numpy(x.reshape(1, 1, I))
        tstate = [None]

        def torch_step():
            with torch.no_grad():
                _, tstate[0] = mod(tx, tstate[0])
        engines["pytorch"] = torch_step

    times = {k: [] for k in engines}
    for _ in range(reps):  # alternate engines so machine noise hits all alike
        for name, fn in engines.items():
            times[name].extend(timeit(fn, 1, inner))
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def bench_sequence(kind, I, H, T, batch, reps, peak):
    W, R, B = make_weights(kind, I, H)
    G = GATES[kind]
    X = np.random.default_rng(2).standard_normal((T, batch, I)).astype(np.float32)
    res = {"case": f"sequence {kind} I={I} H={H} T={T} B={batch}", "kind": kind, "I": I, "H": H, "batch": batch, "T": T}
    Rf = np.asfortranarray(R[0])
    hb = np.zeros((H, batch), np.float32, order="F")
    if batch == 1:
        t_r = np.median(timeit(lambda: blas.sgemv(1.0, Rf, hb[:, 0]), reps, 50))
    else:
        t_r = np.median(timeit(lambda: blas.sgemm(1.0, Rf, hb), reps, 50))
    flops = 2 * G * H * (I + H) * batch
    res["bound_us"] = max(flops / peak, t_r) * 1e6  # per time step

    engines = {}
    model = rnnengine.Model([layer_of(kind, W, R, B)])
    engines["rnnengine"] = lambda: model.run(X)
    try:
        sess = onnx_session(kind, W, R, B, with_state=False)
        engines["onnxruntime"] = lambda: sess.run(None, {"X": X})
    except ImportError:
        pass
    mod = torch_module(kind, W, R, B)
    if mod is not None:
        import torch
        tX = torch.from_numpy(X)

        def torch_run():
            with torch.no_grad():
                mod(tX)
        engines["pytorch"] = torch_run
    times = {k: [] for k in engines}
    for _ in range(reps):
        for name, fn in engines.items():
            times[name].extend(timeit(fn, 1, 1) / T)
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def table(results):
    lines = ["| case | bound µs/step | engine | median µs/step | p99 | fraction of bound | rnnengine speed-up |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        ours = r["engines"]["rnnengine"]["median_us"]
        for name, e in r["engines"].items():
            lines.append(f"| {r['case']} | {r['bound_us']:.2f} | {name} | {e['median_us']:.2f} | {e['p99_us']:.2f} | "
                         f"{r['bound_us'] / e['median_us']:.2f} | {e['median_us'] / ours:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (under a minute)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    reps = 5 if a.quick else 15
    peak = sgemm_peak(reps)
    sizes = [(64, 128)] if a.quick else [(64, 128), (256, 256), (512, 512)]
    results = []
    for kind in ("LSTM", "GRU"):
        for I, H in sizes:
            print(f"streaming {kind} I={I} H={H} ...", file=sys.stderr)
            results.append(bench_stream(kind, I, H, reps, 200 if H <= 256 else 50, peak))
    seq = [(256, 1), (256, 16)] if a.quick else [(256, 1), (1024, 1), (256, 16)]
    for kind in ("LSTM", "GRU"):
        for T, batch in seq:
            print(f"sequence {kind} T={T} B={batch} ...", file=sys.stderr)
            results.append(bench_sequence(kind, 256, 256, T, batch, reps, peak))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nmachine: {machine}; single-core SGEMM peak measured: {peak / 1e9:.1f} GFLOP/s\n")
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "sgemm_gflops": peak / 1e9, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
