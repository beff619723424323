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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads (PyTorch) must not spin

import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

import rnnengine  # noqa: E402
from rnnengine.frontend.torch_import import gate_permutation  # noqa: E402
from rnnengine.codes import GATES  # noqa: E402


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
    """This core's SGEMM rate (FLOP/s): the best of several large single-thread products."""
    n = 1024
    a = np.asfortranarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    t = timeit(lambda: blas.sgemm(1.0, a, a), max(3, reps // 2), 1)
    return 2 * n ** 3 / np.min(t)


def make_weights(kind, I, H, seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    W = (rng.standard_normal((1, G * H, I)) / np.sqrt(I)).astype(np.float32)
    R = (rng.standard_normal((1, G * H, H)) / np.sqrt(H)).astype(np.float32)
    B = (rng.standard_normal((1, 2 * G * H)) * 0.1).astype(np.float32)
    return W, R, B


def onnx_session(kind, W, R, B, with_state, threads=1):
    import onnxruntime as ort
    m = _onnx_bytes(kind, W, R, B, with_state)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # engines alternate in one process: onnxruntime's idle pool threads must not spin on the
    # core the next engine needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"])


def layer_of(kind, W, R, B):
    return getattr(rnnengine, kind)(W, R, B)


def torch_module(kind, W, R, B, threads=1):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    H, I = R.shape[2], W.shape[2]
    mod = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[kind](I, H)
    # ONNX gate order -> PyTorch: LSTM iofc -> ifgo, GRU zrh -> rzn
    G = GATES[kind]
    rows = gate_permutation(kind, H, source="onnx", target="torch")

    def perm(a):
        return a[rows]
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

        engines["onnxruntime+iobinding"] = _iobinding_stepper(sess, kind, x, I, H)
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


def bench_sequence(kind, I, H, T, batch, reps, peak, threads=1):
    W, R, B = make_weights(kind, I, H)
    G = GATES[kind]
    X = np.random.default_rng(2).standard_normal((T, batch, I)).astype(np.float32)
    res = {"case": f"sequence {kind} I={I} H={H} T={T} B={batch}" + (f" {threads} threads" if threads > 1 else ""),
           "kind": kind, "I": I, "H": H, "batch": batch, "T": T, "threads": threads}
    # bound per time step: FLOPs at the SGEMM peak; for batch 1 also one sgemv over R (a
    # batch-1 step cannot beat reading R once)
    flops = 2 * G * H * (I + H) * batch
    t_r = 0.0
    if batch == 1:
        Rf = np.asfortranarray(R[0])
        hv = np.zeros(H, np.float32)
        t_r = np.median(timeit(lambda: blas.sgemv(1.0, Rf, hv), reps, 50))
    res["bound_us"] = max(flops / peak, t_r) * 1e6

    engines = {}
    model = rnnengine.Model([layer_of(kind, W, R, B)], threads=threads)
    engines["rnnengine"] = lambda: model.run(X)
    if threads > 1:
        one = rnnengine.Model([layer_of(kind, W, R, B)])
        engines["rnnengine 1 thread"] = lambda: one.run(X)
    try:
        sess = onnx_session(kind, W, R, B, with_state=False, threads=threads)
        engines["onnxruntime"] = lambda: sess.run(None, {"X": X})
    except ImportError:
        pass
    mod = torch_module(kind, W, R, B, threads)
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


def bench_audio(kind, H, chunk, reps, peak):
    """Per-sample streaming of a tiny model (input 1), fed a chunk per call so the loop over
    samples runs in C; onnxruntime runs the same chunk as a sequence with the state in/out."""
    W, R, B = make_weights(kind, 1, H)
    G = GATES[kind]
    x = np.random.default_rng(3).standard_normal((chunk, 1, 1)).astype(np.float32)
    res = {"case": f"audio {kind} H={H} chunk={chunk} (per sample)", "kind": kind, "H": H, "batch": 1}
    res["bound_us"] = 2 * G * H * (1 + H) / peak * 1e6
    model = rnnengine.Model([layer_of(kind, W, R, B)])
    stream = model.stream()
    engines = {"rnnengine": lambda: stream.feed(x)}
    try:
        sess = onnx_session(kind, W, R, B, with_state=True)
        state = {"h0": np.zeros((1, 1, H), np.float32)}
        if kind == "LSTM":
            state["c0"] = np.zeros((1, 1, H), np.float32)

        def ort_chunk():
            out = sess.run(None, {"X": x, **state})
            state["h0"] = out[1]
            if kind == "LSTM":
                state["c0"] = out[2]
        engines["onnxruntime"] = ort_chunk
    except ImportError:
        pass
    times = {k: [] for k in engines}
    for _ in range(reps):
        for name, fn in engines.items():
            times[name].extend(timeit(fn, 1, 1) / chunk)
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def bench_streams64(kind, H, n, reps, peak):
    """n independent batch-1 streams stepped together with step_streams: the rate of the
    recurrent work (2*G*H*H*n FLOPs per step) against the SGEMM peak."""
    W, R, B = make_weights(kind, H, H)
    G = GATES[kind]
    model = rnnengine.Model([layer_of(kind, W, R, B)])
    streams = [model.stream() for _ in range(n)]
    x = np.random.default_rng(4).standard_normal((n, H)).astype(np.float32)
    out = np.empty((n, H), np.float32)
    t = timeit(lambda: rnnengine.step_streams(streams, x, out=out), reps, 20)
    rec_flops, all_flops = 2 * G * H * H * n, 2 * G * H * 2 * H * n
    res = {"case": f"{n} streams {kind} I=H={H} stepped together", "kind": kind, "H": H, "batch": n,
           "bound_us": all_flops / peak * 1e6,
           "recurrent_fraction_of_peak": rec_flops / np.median(t) / peak,
           "engines": {"rnnengine": {"median_us": float(np.median(t) * 1e6), "p99_us": float(np.percentile(t, 99) * 1e6)}}}
    sess = onnx_session(kind, W, R, B, with_state=True)
    st = {"h0": np.zeros((1, n, H), np.float32)}
    if kind == "LSTM":
        st["c0"] = np.zeros((1, n, H), np.float32)
    xo = x.reshape(1, n, H)
    to = timeit(lambda: sess.run(None, {"X": xo, **st}), reps, 20)
    res["engines"]["onnxruntime"] = {"median_us": float(np.median(to) * 1e6), "p99_us": float(np.percentile(to, 99) * 1e6)}
    return res


def bench_compact(kind, H, steps, reps, peak):
    """Batch-1 streaming with float32 / float16 / int8 packed weights against the float32
    bound (one sgemv over the float32 [W R]); the accuracy cost is the largest difference
    of the outputs from the float32 model over `steps` steps."""
    W, R, B = make_weights(kind, H, H)
    G = GATES[kind]
    xs = np.random.default_rng(5).standard_normal((steps, H)).astype(np.float32)
    WR = np.asfortranarray(np.concatenate([W[0], R[0]], axis=1))
    xh = np.zeros(2 * H, np.float32)
    t_gemv = np.median(timeit(lambda: blas.sgemv(1.0, WR, xh), reps, 20))
    res = {"case": f"stream {kind} I=H={H} compact weights", "kind": kind, "H": H, "batch": 1,
           "bound_us": max(2 * G * H * 2 * H / peak, t_gemv) * 1e6, "engines": {}, "max_abs_error": {}}
    ref = None
    models = {dt: rnnengine.Model([layer_of(kind, W, R, B)], weight_dtype=dt) for dt in ("float32", "float16", "int8")}
    for dt, m in models.items():
        s = m.stream()
        y = np.array([s.step(x) for x in xs])
        ref = y if ref is None else ref
        res["max_abs_error"][dt] = float(np.abs(y - ref).max())
    times = {dt: [] for dt in models}
    streams = {dt: m.stream() for dt, m in models.items()}
    outs = {dt: np.empty(H, np.float32) for dt in models}
    for _ in range(reps):
        for dt, s in streams.items():
            times[dt].extend(timeit(lambda: s.step(xs[0], out=outs[dt]), 1, 20))
    for dt, v in times.items():
        res["engines"][f"rnnengine {dt}"] = {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
    return res


def _ort_session_2threads(kind, W, R, B, spinning):
    """onnxruntime on the one-node model with state inputs, 2 intra-op threads; spinning:
    its idle threads may spin (its default) or must sleep."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(_onnx_bytes(kind, W, R, B), opts, providers=["CPUExecutionProvider"])


def _ort_stream_2threads(kind, W, R, B, x, spinning):
    """onnxruntime with 2 intra-op threads stepping one stream through IOBinding (state
    outputs bound as the next call's inputs)."""
    sess = _ort_session_2threads(kind, W, R, B, spinning)
    return _iobinding_stepper(sess, kind, x, W.shape[2], R.shape[2])


def _iobinding_stepper(sess, kind, x, I, H):
    """One stream step per call through IOBinding: the state outputs of a call are bound as
    the next call's inputs (two buffers each, swapped), x bound once."""
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
    return ort_io


def _onnx_bytes(kind, W, R, B, with_state=True):
    """The one-node model of onnx_session (with or without state inputs), serialised."""
    from onnx import TensorProto, helper, numpy_helper
    H, I = R.shape[2], W.shape[2]
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
    return m.SerializeToString()


def _alternate_in_phases(phases, reps, sample, warm=1):
    """{engine: times} for engine groups measured one phase after the other, the engines of a
    phase alternating (the order rotating each repetition, a 5 ms pause and untimed calls
    before each block). phases: callables returning {name: fn}, built only when their phase
    starts and dropped after it, so that no engine's threads live while another phase runs.
    Measured 2026-12-03 (2 vCPUs): with onnxruntime's two 2-thread sessions alive in the
    process (even idle, with the 5 ms pause), rnnengine's threads=2 lost its gain (GRU 512
    streaming 88.5 vs 87.4 us for threads=1, LSTM 512 124.2 vs 118.9); in a phase of its own
    it had it (64.4 / 56.6 vs 88 us, 74.8 vs 120): onnxruntime's pool threads hold the second
    core. sample(fn) -> list of per-call seconds."""
    times = {}
    for build in phases:
        engines = build()
        names = list(engines)
        for name in names:
            times.setdefault(name, [])
        for r in range(reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = engines[name]
                time.sleep(0.005)
                for _ in range(warm):  # untimed calls: a thread pool idle since the last engine wakes up
                    fn()
                times[name].extend(sample(fn))
        del engines
    return times


def bench_stream_threads(kind, H, reps, inner, peak):
    """2-thread batch-1 streaming (issue 12, part 4): one step per call, rnnengine with
    threads=2 (each step's products split by gate rows, src_c/pool.c) and threads=1, against
    onnxruntime with 2 intra-op threads through IOBinding, its idle threads spinning (its
    default) or not. rnnengine's two engines alternate in blocks of `inner` calls, then
    onnxruntime's two, in a phase of their own (_alternate_in_phases says why).

    The blocks must be long: measured 2026-12-03 (2 vCPUs, GRU 512, blocks of 300 after the
    other engine's block and a 5 ms pause), the median split step was 72.5 us over a block's
    first 25 calls and 46.3 us from the 50th on (one thread: 84.3 us throughout). The second
    core, idle for those ~10 ms, takes ~2 ms to come back to speed; blocks of 50 calls (the
    method until then) measured that transient (GRU 512: 1.40-1.52x one thread's speed where
    the steady state is 1.78-2.06x). A stream stepped back to back sees the steady state; one
    whose steps come far apart (live audio: a chunk every 32 ms) pays the worker's wake-up
    at every step, and the pool's timing (src_c/pool.c) then keeps the step on one thread
    if splitting does not gain."""
    I = H
    W, R, B = make_weights(kind, I, H)
    G = GATES[kind]
    x = np.random.default_rng(1).standard_normal(I).astype(np.float32)
    res = {"case": f"2-thread batch-1 streaming {kind} I=H={H}", "kind": kind, "I": I, "H": H, "batch": 1,
           "threads": 2, "bound_us": 2 * G * H * (I + H) / peak / 2 * 1e6}

    def ours():
        engines = {}
        for t in (2, 1):
            s = rnnengine.Model([layer_of(kind, W, R, B)], threads=t).stream()
            y = np.empty(H, np.float32)
            engines["rnnengine" if t == 2 else "rnnengine 1 thread"] = (lambda s=s, y=y: s.step(x, out=y))
        return engines

    def theirs():
        try:
            return {"onnxruntime+iobinding 2 threads": _ort_stream_2threads(kind, W, R, B, x, spinning=False),
                    "onnxruntime+iobinding 2 threads spinning": _ort_stream_2threads(kind, W, R, B, x, spinning=True)}
        except ImportError:
            return {}
    times = _alternate_in_phases([ours, theirs], reps, lambda fn: timeit(fn, 1, inner), warm=3)
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def bench_sequence_threads(kind, H, T, reps, peak):
    """2-thread batch-1 whole sequences (issue 12, part 4): rnnengine threads=2 (the input
    projection of the whole sequence split as a GEMM, each step's recurrent product by gate
    rows) and threads=1, then, in a phase of their own, onnxruntime with 2 intra-op threads,
    spinning or not (_alternate_in_phases)."""
    I = H
    W, R, B = make_weights(kind, I, H)
    G = GATES[kind]
    X = np.random.default_rng(2).standard_normal((T, 1, I)).astype(np.float32)
    res = {"case": f"2-thread batch-1 sequence {kind} I=H={H} T={T}", "kind": kind, "I": I, "H": H, "batch": 1,
           "T": T, "threads": 2, "bound_us": 2 * G * H * (I + H) / peak / 2 * 1e6}

    def ours():
        engines = {}
        for t in (2, 1):
            m = rnnengine.Model([layer_of(kind, W, R, B)], threads=t)
            engines["rnnengine" if t == 2 else "rnnengine 1 thread"] = (lambda m=m: m.run(X))
        return engines

    def theirs():
        engines = {}
        try:
            for spin in (False, True):
                sess = _ort_session_2threads(kind, W, R, B, spin)
                feeds = {"X": X, "h0": np.zeros((1, 1, H), np.float32)}
                if kind == "LSTM":
                    feeds["c0"] = np.zeros((1, 1, H), np.float32)
                engines["onnxruntime 2 threads" + (" spinning" if spin else "")] = (
                    lambda sess=sess, feeds=feeds: sess.run(None, feeds))
        except ImportError:
            pass
        return engines
    times = _alternate_in_phases([ours, theirs], reps, lambda fn: list(np.asarray(timeit(fn, 1, 1)) / T))
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def bench_threads_batch1(reps, peak, quick):
    """The issue-12 part-4 cases: batch 1 on two cores, streaming and whole sequences."""
    from rnnengine import _core
    # this script sets OMP_NUM_THREADS=1 (for BLAS and PyTorch), which rnnengine's pool also
    # reads: allow it two threads here
    _core.set_threads_limit(2)
    out = []
    for kind in ("LSTM", "GRU"):
        for H in ((512,) if quick else (512, 1024)):
            print(f"2-thread batch-1 streaming {kind} H={H} ...", file=sys.stderr, flush=True)
            # blocks of >= 20 ms: the first ~25 split steps after the second core idled (the
            # other engine's block and the pause) run slower (bench_stream_threads says)
            out.append(bench_stream_threads(kind, H, reps, 100 if H >= 1024 else 300, peak))
    for kind, H in ((("LSTM", 256),) if quick else (("LSTM", 256), ("LSTM", 512), ("GRU", 512))):
        print(f"2-thread batch-1 sequence {kind} H={H} ...", file=sys.stderr, flush=True)
        out.append(bench_sequence_threads(kind, H, 256, reps, peak))
    _core.set_threads_limit(0)
    return out


def bench_int8_vs_onnxruntime(H, steps, reps, inner=20):
    """Batch-1 LSTM streaming with compact weights beside onnxruntime's int8 LSTM
    (DynamicQuantizeLSTM, made by onnxruntime.quantization.quantize_dynamic from the same
    float32 model), each with its accuracy: the largest output difference from the float32
    model over `steps` steps of the same input. onnxruntime has no int8 GRU."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    W, R, B = make_weights("LSTM", H, H)
    xs = np.random.default_rng(6).standard_normal((steps, H)).astype(np.float32)
    res = {"case": f"stream LSTM I=H={H} int8 vs onnxruntime DynamicQuantizeLSTM", "kind": "LSTM", "H": H,
           "batch": 1, "bound_us": float("nan"), "engines": {}, "max_abs_error": {}}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as f:
            f.write(_onnx_bytes("LSTM", W, R, B))
        quantize_dynamic(src, dst, op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {k: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
                    for k, p in (("onnxruntime float32", src), ("onnxruntime int8", dst))}
        ops = [n.op_type for n in __import__("onnx").load(dst).graph.node]
        if "DynamicQuantizeLSTM" not in ops:
            raise RuntimeError(f"quantize_dynamic did not make a DynamicQuantizeLSTM: {ops}")

    def ort_stepper(sess):
        st = {"h0": np.zeros((1, 1, H), np.float32), "c0": np.zeros((1, 1, H), np.float32)}

        def step(x):
            y, h, c = sess.run(None, {"X": x.reshape(1, 1, H), **st})
            st["h0"], st["c0"] = h, c
            return y.reshape(H)
        return step
    steppers = {k: ort_stepper(s) for k, s in sessions.items()}
    models = {dt: rnnengine.Model([layer_of("LSTM", W, R, B)], weight_dtype=dt) for dt in ("float32", "float16", "int8")}
    for dt, m in models.items():
        s = m.stream()
        steppers[f"rnnengine {dt}"] = (lambda s: lambda x: s.step(x))(s)
    ref = None
    for name, fn in steppers.items():  # accuracy: each engine's outputs against rnnengine float32
        y = np.array([fn(x) for x in xs])
        if ref is None or name == "rnnengine float32":
            ref = y if name == "rnnengine float32" else ref
        res["max_abs_error"][name] = y
    ref = res["max_abs_error"]["rnnengine float32"]
    res["max_abs_error"] = {k: float(np.abs(v - ref).max()) for k, v in res["max_abs_error"].items()}
    times = {k: [] for k in steppers}
    for _ in range(reps):
        for name, fn in steppers.items():
            times[name].extend(timeit(lambda: fn(xs[0]), 1, inner))
    res["engines"] = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                      for k, v in times.items()}
    return res


def bench_compact_sequences(kind, H, T, reps):
    """Whole sequences at batch 1 (issue 12, part 3): rnnengine run() with float32 / float16 /
    int8 weights against onnxruntime's float32 operator and, for LSTM, its int8
    DynamicQuantizeLSTM (quantize_dynamic of the same float32 model), each engine's time per
    step with its accuracy: the largest output difference from onnxruntime float32 over the
    same T steps. onnxruntime has no int8 GRU (quantize_dynamic leaves a GRU float32), so the
    GRU case has no onnxruntime int8 engine."""
    import tempfile

    import onnxruntime as ort
    W, R, B = make_weights(kind, H, H)
    X = np.random.default_rng(7).standard_normal((T, 1, H)).astype(np.float32)
    res = {"case": f"sequence {kind} I=H={H} T={T} B=1 compact weights", "kind": kind, "H": H, "batch": 1, "T": T,
           "engines": {}, "max_abs_error": {}}
    # bound per step: one float32 sgemv over R (reading R once per step)
    Rf = np.asfortranarray(R[0])
    hv = np.zeros(H, np.float32)
    res["bound_us"] = float(np.median(timeit(lambda: blas.sgemv(1.0, Rf, hv), reps, 50)) * 1e6)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    engines = {}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as f:
            f.write(_onnx_bytes(kind, W, R, B, with_state=False))
        sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        engines["onnxruntime float32"] = (lambda s: lambda: s.run(None, {"X": X})[0])(sess)
        if kind == "LSTM":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(src, dst, op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8)
            ops = [n.op_type for n in __import__("onnx").load(dst).graph.node]
            if "DynamicQuantizeLSTM" not in ops:
                raise RuntimeError(f"quantize_dynamic did not make a DynamicQuantizeLSTM: {ops}")
            q = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])
            engines["onnxruntime int8 (DynamicQuantizeLSTM)"] = (lambda s: lambda: s.run(None, {"X": X})[0])(q)
        else:
            res["note"] = "onnxruntime has no int8 GRU (quantize_dynamic quantizes LSTM only)"
    for dt in ("float32", "float16", "int8"):
        m = rnnengine.Model([layer_of(kind, W, R, B)], weight_dtype=dt)
        engines[f"rnnengine {dt}"] = (lambda m: lambda: m.run(X)[0])(m)
    ref = engines["onnxruntime float32"]().reshape(T, H)
    for name, fn in engines.items():
        res["max_abs_error"][name] = float(np.abs(fn().reshape(T, H) - ref).max())
    times = {k: [] for k in engines}
    for _ in range(reps):
        for name, fn in engines.items():
            times[name].extend(timeit(fn, 1, 1) / T)
    # rnnengine float32 first, so the table's last column is time / rnnengine float32
    order = [k for k in engines if k.startswith("rnnengine")] + [k for k in engines if not k.startswith("rnnengine")]
    res["engines"] = {k: {"median_us": float(np.median(times[k]) * 1e6), "p99_us": float(np.percentile(times[k], 99) * 1e6)}
                      for k in order}
    return res


def bench_cold_start(H=512, layers=2, steps=200):
    """Time from loading a model file to the first step's output, and the first steps'
    latency against the steady state, for rnnengine (a weight file: load, stream, step) and
    onnxruntime (InferenceSession of the ONNX file, run). Each in a fresh Python process
    (the file in the page cache), so nothing is warm but the disk cache. Then a further
    stream's first step (a new session of a model in use; onnxruntime: one more run), and,
    on its own, the engine's import (``import rnnengine`` and its compiled core vs ``import
    onnxruntime``, NumPy already imported)."""
    import subprocess
    import tempfile
    W, R, B = make_weights("LSTM", H, H)
    model = rnnengine.Model([layer_of("LSTM", W, R, B) for _ in range(layers)])
    res = {"case": f"cold start LSTM I=H={H} x{layers}", "engines": {}}
    probe = r"""
import sys, time
import numpy as np
engine, path, H, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.full((1, H), 0.1, np.float32)
ti = time.perf_counter()  # the engine's import (numpy already imported): reported on its own
if engine == "rnnengine":
    import rnnengine
    import rnnengine._core  # the compiled core: imported here, not counted as loading the model
    t0 = time.perf_counter()
    m = rnnengine.load(path)
    s = m.stream()
    step = lambda: s.step(x)
    def again():  # a further stream of the same model (a new session): its first step
        s2 = m.stream()
        a = time.perf_counter(); s2.step(x); return time.perf_counter() - a
else:
    import onnxruntime as ort
    t0 = time.perf_counter()
    o = ort.SessionOptions(); o.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    step = lambda: sess.run(None, {name: x.reshape(1, 1, H)})
    def again():  # stateless: a new session's first step is a run like any other
        a = time.perf_counter(); step(); return time.perf_counter() - a
t_load = time.perf_counter() - t0
times = []
for _ in range(steps):
    a = time.perf_counter(); step(); times.append(time.perf_counter() - a)
print(t_load, *times, again(), t0 - ti)
"""
    with tempfile.TemporaryDirectory() as d:
        wpath, opath = os.path.join(d, "m.rnne"), os.path.join(d, "m.onnx")
        rnnengine.save(model, wpath)
        from rnnengine.frontend.layer_export import layers_to_onnx
        with open(opath, "wb") as f:
            f.write(layers_to_onnx(model).SerializeToString())
        runs: dict[str, list[list[float]]] = {"rnnengine": [], "onnxruntime": []}
        # byte code cached as an installed package has it (pip compiles it at install), so the
        # first, unmeasured round only writes the caches a PYTHONDONTWRITEBYTECODE would skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for k in range(6):  # alternate the engines' processes
            for engine, path in (("rnnengine", wpath), ("onnxruntime", opath)):
                out = subprocess.run([sys.executable, "-c", probe, engine, path, str(H), str(steps)],
                                     capture_output=True, text=True, check=True, env=env).stdout.split()
                if k:
                    runs[engine].append([float(v) for v in out])
        for engine, rs in runs.items():
            load = float(np.median([r[0] for r in rs]))
            first = float(np.median([r[1] for r in rs]))
            steady = float(np.median([np.median(r[1 + steps // 2:1 + steps]) for r in rs]))
            further = float(np.median([r[1 + steps] for r in rs]))
            imported = float(np.median([r[2 + steps] for r in rs]))
            res["engines"][engine] = {"load_ms": load * 1e3, "first_step_us": first * 1e6,
                                      "load_to_first_output_ms": (load + first) * 1e3,
                                      "steady_step_us": steady * 1e6, "first_over_steady": first / steady,
                                      "further_stream_first_step_us": further * 1e6, "import_ms": imported * 1e3}
    return res


def bench_memory(n=1000, H=256):
    """Resident memory growth of a fresh process that builds an H=256 LSTM and 1,000 streams
    and steps each once, against weights + n x state + 10%."""
    import subprocess
    code = f"""
import numpy as np, rnnengine
rnnengine.Model  # loads the compiled core (and SciPy's BLAS) now, so r0 includes them
def rss():  # resident set size now, bytes (Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
rng = np.random.default_rng(0)
W = rng.standard_normal((1, 4 * {H}, {H})).astype(np.float32); R = W.copy(); B = np.zeros((1, 8 * {H}), np.float32)
x = np.zeros({H}, np.float32)
r0 = rss()
m = rnnengine.Model([rnnengine.LSTM(W, R, B)])
del W, R
r1 = rss()
ss = [m.stream() for _ in range({n})]
for s in ss: s.step(x)
r2 = rss()
print(r0, r1, r2, m._stack.state_size(1) * 4)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    r0, r1, r2, state = map(int, out)
    weights = (4 * H * H * 2 + 8 * H) * 4
    return {"case": f"memory: {n} streams of an LSTM H={H}", "weights_bytes": weights, "state_bytes": state,
            "model_rss_bytes": r1 - r0, "streams_rss_bytes": r2 - r1,
            "budget_bytes": int((weights + n * state) * 1.1), "total_bytes": r2 - r0}


def bench_graph_models(reps):
    """Whole converted models from the test corpus, stepped as streams: a token model (one
    token per call) and an audio model with a conv front end (one chunk per call)."""
    here = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "corpus")
    results = []
    cases = [("torch_legacy_token_lstm_logsoftmax_op14.onnx", {"ids": np.array([[3]], np.int64)}, None),
             ("torch_legacy_audio_vad_stateful_op14.onnx",
              {"x": np.random.default_rng(6).standard_normal((1, 128)).astype(np.float32)},
              ("state", "stateN", np.zeros((2, 1, 1, 16), np.float32)))]
    import onnxruntime as ort
    for fname, feeds, pair in cases:
        path = os.path.join(here, fname)
        model = rnnengine.convert(path)
        stream = model.stream()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        st = {} if pair is None else {pair[0]: pair[2]}

        def ort_call():
            out = sess.run(None, {**feeds, **st})
            if pair is not None:
                st[pair[0]] = out[names.index(pair[1])]
        engines = {"rnnengine": lambda: stream(feeds), "onnxruntime": ort_call}
        times = {k: [] for k in engines}
        for _ in range(reps):
            for k, fn in engines.items():
                times[k].extend(timeit(fn, 1, 50))
        results.append({"case": f"converted model {fname} (per call)", "bound_us": float("nan"),
                        "engines": {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                                    for k, v in times.items()}})
    return results


def bench_silero(reps, chunks=625, block=25):
    """silero-vad as shipped on PyPI (when installed: pip install --no-deps silero-vad),
    streamed one 512-sample chunk (+ 64 samples of context) per call at 16 kHz, rnnengine
    (state carried by the stream) beside onnxruntime (one intra-op thread, the state passed
    back by hand); with the largest difference of the speech probability. Two rows:

    - alternating chunk by chunk: each engine's call follows the other's, so it starts with
      the other engine's weights in the core's caches (a service running the model among
      other work);
    - back to back: each engine runs `block` chunks in a row before the other takes the next
      `block` (its weights stay in the caches; a service streaming many sessions of one
      model), blocks alternating so machine noise hits both alike."""
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return []
    import onnxruntime as ort
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.onnx")
    model = rnnengine.convert(path, fixed_inputs={"sr": 16000})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(12)
    t = np.arange(chunks * 512) / 16000.0
    audio = ((0.05 + 0.5 * (np.sin(2 * np.pi * 1.3 * t) > 0)) * (0.6 * np.sin(2 * np.pi * 220 * t)
             + 0.3 * rng.standard_normal(t.size))).astype(np.float32)
    wins = [np.concatenate([np.zeros(64, np.float32), audio])[k * 512: k * 512 + 576][None].copy()
            for k in range(chunks)]
    sr = np.array(16000, np.int64)
    alternating = {"rnnengine": [], "onnxruntime": []}
    back_to_back = {"rnnengine": [], "onnxruntime": []}
    worst = 0.0
    for _ in range(reps):
        stream = model.stream()
        state = np.zeros((2, 1, 128), np.float32)
        for x in wins:  # the two alternate chunk by chunk
            t0 = time.perf_counter()
            p = stream.feed({"input": x}, outputs=["output"])["output"]
            t1 = time.perf_counter()
            q, state = sess.run(["output", "stateN"], {"input": x, "state": state, "sr": sr})
            t2 = time.perf_counter()
            alternating["rnnengine"].append(t1 - t0)
            alternating["onnxruntime"].append(t2 - t1)
            worst = max(worst, float(np.abs(p - q).max()))
        stream = model.stream()
        state = np.zeros((2, 1, 128), np.float32)
        for k0 in range(0, chunks, block):  # a block each, in turn
            got = []
            for x in wins[k0:k0 + block]:
                t0 = time.perf_counter()
                got.append(stream.feed({"input": x}, outputs=["output"])["output"])
                back_to_back["rnnengine"].append(time.perf_counter() - t0)
            for x, p in zip(wins[k0:k0 + block], got):
                t0 = time.perf_counter()
                q, state = sess.run(["output", "stateN"], {"input": x, "state": state, "sr": sr})
                back_to_back["onnxruntime"].append(time.perf_counter() - t0)
                worst = max(worst, float(np.abs(p - q).max()))

    def engines(times):
        return {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                for k, v in times.items()}
    return [{"case": "silero-vad per chunk (512 samples, 16 kHz), alternating chunk by chunk", "bound_us": float("nan"),
             "max_abs_diff": worst, "engines": engines(alternating)},
            {"case": f"silero-vad per chunk (512 samples, 16 kHz), back to back ({block} chunks each)",
             "bound_us": float("nan"), "max_abs_diff": worst, "engines": engines(back_to_back)}]


def bench_charlm(reps, steps=400):
    """The bundled character LM (rnnengine/data/demo_charlm.onnx, `rnnengine demo`) streamed
    one character per call, rnnengine beside onnxruntime (one intra-op thread, the states
    passed back by hand), alternating; with the largest difference of the logits."""
    import onnxruntime as ort
    from rnnengine.cli import DEMO_CHARLM
    model = rnnengine.convert(DEMO_CHARLM)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(DEMO_CHARLM, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    pairs = dict(model.state_pairs)
    inputs = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    tokens = np.random.default_rng(13).integers(0, 32, steps)
    times = {"rnnengine": [], "onnxruntime": []}
    worst = 0.0
    for _ in range(reps):
        stream = model.stream()
        state = {n: np.zeros(sh, np.float32) for n, sh in inputs.items() if n != "tokens"}
        for tk in tokens:
            tok = np.array([[tk]], np.int64)
            t0 = time.perf_counter()
            p = stream.feed({"tokens": tok}, outputs=["logits"])["logits"]
            t1 = time.perf_counter()
            res = dict(zip(names, sess.run(None, {"tokens": tok, **state})))
            t2 = time.perf_counter()
            for n in state:
                state[n] = res[pairs[n]]
            times["rnnengine"].append(t1 - t0)
            times["onnxruntime"].append(t2 - t1)
            worst = max(worst, float(np.abs(p - res["logits"]).max()))
    return [{"case": "demo char LM per character", "bound_us": float("nan"), "max_abs_diff": worst,
             "engines": {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
                         for k, v in times.items()}}]


def call_overhead(reps):
    """Python per-step cost of a stream of a trivial model (RNN 1 -> 1)."""
    m = rnnengine.Model([rnnengine.RNN(np.ones((1, 1, 1), np.float32), np.ones((1, 1, 1), np.float32) * 0.5)])
    s = m.stream()
    x = np.zeros(1, np.float32)
    y = np.empty(1, np.float32)
    t = timeit(lambda: s.step(x, out=y), reps, 2000)
    return float(np.median(t) * 1e6)


def table(results):
    lines = ["| case | bound µs | engine | median µs | p99 µs | bound / time | time / rnnengine's |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        if "engines" not in r:
            continue
        ours = r["engines"].get("rnnengine", next(iter(r["engines"].values())))["median_us"]
        for name, e in r["engines"].items():
            frac = r["bound_us"] / e["median_us"]
            lines.append(f"| {r['case']} | {r['bound_us']:.2f} | {name} | {e['median_us']:.2f} | {e['p99_us']:.2f} | "
                         f"{'' if np.isnan(frac) else f'{frac:.2f}'} | {e['median_us'] / ours:.2f}x |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("LSTM", "GRU")):
        rows = [r for r in results if r.get("kind") == kind and r["case"].startswith("stream ") and "compact" not in r["case"]]
        hs = [r["H"] for r in rows]
        for eng in ("rnnengine", "onnxruntime+iobinding", "onnxruntime", "pytorch"):
            ys = [r["engines"][eng]["median_us"] for r in rows if eng in r["engines"]]
            if len(ys) == len(hs) and ys:
                ax.plot(hs, ys, marker="o", label=eng)
        ax.plot(hs, [r["bound_us"] for r in rows], "k--", label="lower bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden size H (I = 64, 256, 512)")
        ax.set_ylabel("µs per step (batch 1, median)")
        ax.set_title(f"{kind}: streaming, one step per call")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (under a minute)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--plot", help="also draw per-step latency vs hidden size to this PNG (needs matplotlib)")
    a = p.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")  # BLAS threads: 1, whatever the environment says
    except ImportError:
        pass  # OPENBLAS_NUM_THREADS=1 above does the same for SciPy's OpenBLAS
    reps = 5 if a.quick else 15
    peak = sgemm_peak(reps)
    sizes = [(64, 128)] if a.quick else [(64, 128), (256, 256), (512, 512)]
    results = []

    def step(msg):
        print(msg, "...", file=sys.stderr, flush=True)
    for kind in ("LSTM", "GRU"):
        for I, H in sizes:
            step(f"streaming {kind} I={I} H={H}")
            results.append(bench_stream(kind, I, H, reps, 200 if H <= 256 else 50, peak))
    for kind in ("LSTM", "GRU"):
        for H in ((16,) if a.quick else (16, 64)):
            step(f"audio {kind} H={H}")
            results.append(bench_audio(kind, H, 1000, reps, peak))
    seq = [(256, 1), (256, 16)] if a.quick else [(256, 1), (1024, 1), (256, 16)]
    for kind in ("LSTM", "GRU"):
        for T, batch in seq:
            step(f"sequence {kind} T={T} B={batch}")
            results.append(bench_sequence(kind, 256, 256, T, batch, reps, peak))
    step("64 streams stepped together")
    results.append(bench_streams64("LSTM", 256, 64, reps, peak))
    for H in ((512,) if a.quick else (512, 1024)):
        step(f"compact weights H={H}")
        results.append(bench_compact("LSTM", H, 100, reps, peak))
    if (os.cpu_count() or 1) >= 2:
        # (batch 1 on two threads: bench_threads_batch1 below, in phases of its own and with
        # rnnengine's pool allowed two threads; this script's OMP_NUM_THREADS=1 caps it at one
        # elsewhere, so a batch-1 row here measured one thread against onnxruntime's two)
        for batch in ((16,) if a.quick else (16, 64)):
            step(f"2 threads, batch {batch}")
            results.append(bench_sequence("LSTM", 256, 256, 256, batch, reps, peak, threads=2))
        results.extend(bench_threads_batch1(reps, peak, a.quick))
    for H in ((256,) if a.quick else (256, 512, 1024)):
        step(f"int8 vs onnxruntime DynamicQuantizeLSTM, H={H}")
        results.append(bench_int8_vs_onnxruntime(H, 100, reps))
    for kind in ("LSTM", "GRU"):
        for H in ((512,) if a.quick else (512, 1024)):
            step(f"whole sequences with compact weights, {kind} H={H}")
            results.append(bench_compact_sequences(kind, H, 256, 3 if a.quick else 7))
    step("cold start")
    cold = bench_cold_start(steps=50 if a.quick else 200)
    if not a.quick:
        step("converted models")
        results.extend(bench_graph_models(reps))
    step("silero-vad and the demo char LM")
    results.extend(bench_silero(2 if a.quick else 5) + bench_charlm(2 if a.quick else 5))
    step("memory")
    mem = bench_memory()
    overhead = call_overhead(reps)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nmachine: {machine}; single-core SGEMM peak measured: {peak / 1e9:.1f} GFLOP/s\n")
    print(table(results))
    for r in results:
        if "recurrent_fraction_of_peak" in r:
            print(f"\n{r['case']}: recurrent work at {r['recurrent_fraction_of_peak']:.0%} of the SGEMM peak")
        if "max_abs_diff" in r:
            print(f"\n{r['case']}: largest |rnnengine - onnxruntime| of the output: {r['max_abs_diff']:.1e}")
        if "max_abs_error" in r and "T" in r:
            print(f"\n{r['case']}: max abs output difference from onnxruntime float32 over the {r['T']} steps: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_error"].items())
                  + (f" ({r['note']})" if "note" in r else ""))
        elif "max_abs_error" in r:
            print(f"\n{r['case']}: max abs output difference from rnnengine float32 over 100 steps: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_error"].items()))
    print(f"\nPython call overhead per stream step (trivial model): {overhead:.2f} us")
    print(f"{cold['case']} (fresh process, file in the page cache): " + "; ".join(
        f"{k}: import {v['import_ms']:.0f} ms, load {v['load_ms']:.1f} ms, first step {v['first_step_us']:.0f} us, load to first output "
        f"{v['load_to_first_output_ms']:.1f} ms, steady step {v['steady_step_us']:.0f} us "
        f"(first / steady {v['first_over_steady']:.1f}x), a further stream's first step "
        f"{v['further_stream_first_step_us']:.0f} us" for k, v in cold["engines"].items()))
    print(f"{mem['case']}: model {mem['model_rss_bytes'] / 1e6:.1f} MB, streams {mem['streams_rss_bytes'] / 1e6:.1f} MB, "
          f"total {mem['total_bytes'] / 1e6:.1f} MB; budget (weights + n x state + 10%) {mem['budget_bytes'] / 1e6:.1f} MB")
    if a.plot:
        plot(results, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "sgemm_gflops": peak / 1e9, "results": results, "memory": mem,
                       "call_overhead_us": overhead, "cold_start": cold}, f, indent=1)


if __name__ == "__main__":
    main()
