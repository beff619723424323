"""The `rnnengine` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

DEMO_MODEL = os.path.join(os.path.dirname(__file__), "data", "demo_lstm.onnx")
TOLERANCE = 1e-5


def _ort_session(path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("rnnengine demo compares with onnxruntime, which is not installed: "
                         "pip install 'rnnengine[verify]' (or pip install onnxruntime)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def cmd_demo(args):
    from . import load_onnx

    path = args.model or DEMO_MODEL
    model = load_onnx(path)
    info = model.onnx_info
    sess = _ort_session(path)
    desc = ", ".join(f"{l.kind} {l.input_size}->{l.hidden_size}" for l in model.layers)
    print(f"rnnengine demo: streaming {os.path.basename(path)} ({desc}) one step per call,")
    print("side by side with onnxruntime (state passed in and out of every session.run).\n")

    rng = np.random.default_rng(args.seed)
    T = args.steps
    t = np.arange(T, dtype=np.float32)[:, None]
    freqs = rng.uniform(0.05, 0.5, model.input_size).astype(np.float32)
    xs = (np.sin(t * freqs) + 0.1 * rng.standard_normal((T, model.input_size))).astype(np.float32)

    if not info["state_inputs"]:
        raise SystemExit("the demo needs a model whose state is a graph input and output")
    stream = model.stream(batch_size=1)
    ort_state = {name: np.zeros((1, 1, model.layers[k].hidden_size), np.float32)
                 for k, _, name in info["state_inputs"]}
    out_names = [o.name for o in sess.get_outputs()]
    state_out = {}  # graph output name that carries each state input's next value
    for k, slot, name in info["state_inputs"]:
        want = ("hN_" if slot == "initial_h" else "cN_") + str(k)
        state_out[name] = want if want in out_names else None
    if any(v is None for v in state_out.values()):
        raise SystemExit("the demo model must output its final states (hN_k, cN_k)")

    show = min(3, model.output_size)
    print(f"{'step':>4}  {'rnnengine y[:%d]' % show:<30}{'onnxruntime y[:%d]' % show:<30}max|diff|")
    worst = 0.0
    t_eng, t_ort = [], []
    y = np.empty(model.output_size, np.float32)
    for step in range(T):
        x = xs[step]
        t0 = time.perf_counter()
        stream.step(x, out=y)
        t1 = time.perf_counter()
        feeds = {info["input"]: x.reshape(1, 1, -1), **ort_state}
        res = sess.run(None, feeds)
        t2 = time.perf_counter()
        t_eng.append(t1 - t0)
        t_ort.append(t2 - t1)
        named = dict(zip(out_names, res))
        for name, out in state_out.items():
            ort_state[name] = named[out]
        y_ort = named[info["output"]].reshape(-1)
        diff = float(np.abs(y - y_ort).max())
        worst = max(worst, diff)
        if step < args.show or step == T - 1:
            fmt = lambda v: " ".join(f"{a:+.5f}" for a in v[:show])
            print(f"{step:>4}  {fmt(y):<30}{fmt(y_ort):<30}{diff:.1e}")
        elif step == args.show:
            print("   ...")
    me, mo = np.median(t_eng) * 1e6, np.median(t_ort) * 1e6
    print(f"\nper-step time (median of {T}): rnnengine {me:.1f} us, onnxruntime {mo:.1f} us "
          f"({mo / me:.1f}x)")
    ok = worst <= TOLERANCE
    print(f"max abs difference over {T} steps: {worst:.2e} (tolerance {TOLERANCE:g}) "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def build_parser():
    p = argparse.ArgumentParser(prog="rnnengine",
                                description="Fast, faithful CPU inference for recurrent networks from ONNX.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="stream the bundled model step by step beside onnxruntime",
                       description="Streams a small bundled 2-layer LSTM one time step per call, "
                                   "prints its outputs beside onnxruntime's and the per-step time "
                                   "of both; exits 1 if they differ by more than 1e-5.")
    d.add_argument("--steps", type=int, default=200, help="time steps to stream (default 200)")
    d.add_argument("--show", type=int, default=8, help="steps to print (default 8)")
    d.add_argument("--seed", type=int, default=0, help="seed of the demo input signal")
    d.add_argument("--model", help="another ONNX file to stream (state as graph inputs/outputs)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps must be at least 1")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rnnengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
