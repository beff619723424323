"""bench_model.py - `rnnengine bench`: one model, rnnengine beside onnxruntime, alternating.

Two measurements on the same random inputs:
  * streaming: one time step (or one chunk, for chunk-per-call models) per call, state
    carried; rnnengine keeps it in the stream, onnxruntime gets explicit state inputs fed
    back from its outputs (a model without state inputs is run one step at a time without
    state there: the same work, so the time compares, though not the values);
  * whole sequence: --seq time steps in one call.
Engines alternate within every repeat; medians and p99 of the per-call times are printed.
"""
from __future__ import annotations

import os
import time

import numpy as np

from rnnengine.cli.common import _is_weight_file, _kv, _load_any
from rnnengine.verify import ort_session, random_feeds, time_axes


def _time_calls(fn, n):
    ts = np.empty(n)
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        ts[k] = time.perf_counter() - t0
    return ts


def bench_model(args):
    model = _load_any(args.file)
    onnx_path = args.onnx or getattr(model, "onnx_source", None) or (None if _is_weight_file(args.file) else args.file)
    if onnx_path is None:
        raise ValueError("bench FILE: give the ONNX source with --onnx to compare with onnxruntime")
    sess = ort_session(onnx_path)
    ort_inputs = {i.name for i in sess.get_inputs()}
    out_names = [o.name for o in sess.get_outputs()]
    dims = _kv(args.dim, "--dim", int)
    feeds = random_feeds(model, dims, seed=0, states=False)
    pairs = model.state_pairs
    for a, _ in pairs:
        feeds[a] = model._zero_state(a, feeds)
    axes = time_axes(model, feeds)
    print(f"rnnengine bench: {os.path.basename(args.file)}, inputs "
          + ", ".join(f"{k}{v.shape}" for k, v in feeds.items())
          + (f", time axis {axes}" if axes else ", one chunk per call"), flush=True)

    def with_time(f, T):
        out = {}
        for name, arr in f.items():
            if name in axes:
                reps = -(-T // max(1, arr.shape[axes[name]]))
                arr = np.concatenate([arr] * reps, axis=axes[name])
                sl = [slice(None)] * arr.ndim
                sl[axes[name]] = slice(0, T)
                arr = np.ascontiguousarray(arr[tuple(sl)])
            out[name] = arr
        return out

    step_feeds = with_time(feeds, 1) if axes else feeds
    carried = {a for a, _ in pairs}
    stream = model.stream()
    user_feeds = {k: v for k, v in step_feeds.items() if k not in carried}
    ort_state = {a: step_feeds[a] for a in carried}

    def eng_step(_):
        stream(user_feeds)

    def ort_step(_):
        res = sess.run(None, {k: v for k, v in {**step_feeds, **ort_state}.items() if k in ort_inputs})
        if pairs:
            named = dict(zip(out_names, res))
            for a, o in pairs:
                ort_state[a] = named[o]

    seq_feeds = with_time(feeds, args.seq) if axes else feeds
    ort_seq = {k: v for k, v in seq_feeds.items() if k in ort_inputs}
    eng_seq = {k: v for k, v in seq_feeds.items() if k not in carried}

    results = {"rnnengine": {"step": [], "seq": []}, "onnxruntime": {"step": [], "seq": []}}
    eng_step(0), ort_step(0), model.run(eng_seq), sess.run(None, ort_seq)  # warm up (plans, allocations)
    for rep in range(args.repeats):
        order = [("rnnengine", eng_step, lambda _: model.run(eng_seq)),
                 ("onnxruntime", ort_step, lambda _: sess.run(None, ort_seq))]
        if rep % 2:
            order.reverse()
        for name, step, seq in order:
            results[name]["step"].append(_time_calls(step, args.steps))
            results[name]["seq"].append(_time_calls(seq, 3))
        print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)

    unit = f"per {'step' if axes else 'call'}"
    T = args.seq if axes else 1
    print(f"\n{'engine':<14}{'stream ' + unit + ' median':>26}{'p99':>12}{'whole sequence (T=%d)' % T:>26}")
    med = {}
    for name, r in results.items():
        st = np.concatenate(r["step"]) * 1e6
        sq = np.concatenate(r["seq"]) * 1e3
        med[name] = (np.median(st), np.median(sq))
        print(f"{name:<14}{np.median(st):>23.1f} us{np.percentile(st, 99):>9.1f} us{np.median(sq):>23.3f} ms")
    e, o = med["rnnengine"], med["onnxruntime"]
    print(f"\nrnnengine is {o[0] / e[0]:.2f}x onnxruntime streaming and {o[1] / e[1]:.2f}x on whole sequences")
    return 0
