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


def _kv(items, what, cast=str):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = cast(v)
    return out


def _value(v):
    """--input values: a .npy file, or a number / comma-separated numbers."""
    if v.endswith(".npy"):
        return np.load(v)
    try:
        parts = [float(x) if any(c in x for c in ".eE") else int(x) for x in v.split(",")]
    except ValueError:
        raise ValueError(f"--input value {v!r} is neither a .npy file nor numbers") from None
    return np.array(parts[0] if len(parts) == 1 else parts)


def _is_weight_file(path):
    from . import fileformat
    with open(path, "rb") as f:
        return f.read(len(fileformat.MAGIC)) == fileformat.MAGIC


def _load_any(path, fixed=None):
    """A weight file, or an ONNX file converted in memory."""
    from . import convert
    from .store import load
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if _is_weight_file(path):
        if fixed:
            raise ValueError("--input NAME=VALUE fixes inputs at conversion; this file is already converted")
        return load(path)
    return convert(path, fixed_inputs=fixed)


def _progress(msg, t0):
    print(f"[{time.perf_counter() - t0:6.2f}s] {msg}", flush=True)


def cmd_convert(args):
    from .converter import convert_model
    from .graph import GraphModel
    from .store import save
    t0 = time.perf_counter()
    fixed = {k: _value(v) for k, v in _kv(args.input, "--input").items()}
    pairs = list(_kv(args.state, "--state").items()) if args.state else None
    _progress(f"reading and folding {args.model}", t0)
    graph, tensors, meta = convert_model(args.model, fixed, pairs)
    model = GraphModel(graph, tensors, meta)
    n_params = sum(int(t.size) for t in tensors.values())
    _progress(f"{len(graph['nodes'])} nodes after folding, {n_params:,} constants; "
              f"state pairs: {graph['state_pairs'] or 'none'}", t0)
    _progress(f"writing {args.output} ({args.dtype} weights)", t0)
    save(model, args.output, args.dtype)
    src, dst = os.path.getsize(args.model), os.path.getsize(args.output)
    _progress(f"done: {dst:,} bytes ({dst / src:.2f}x the ONNX file's {src:,})", t0)
    return 0


def cmd_inspect(args):
    from .store import load
    model = load(args.file)
    wf = model.file
    print(f"{args.file}: rnnengine weight file version {wf.version}, {os.path.getsize(args.file):,} bytes")
    for k in sorted(wf.metadata):
        print(f"  {k} = {wf.metadata[k]}")
    print("inputs:")
    for i in model.inputs:
        print(f"  {i['name']}: {i['dtype']} {i['shape']}")
    print("outputs:")
    for o in model.graph["outputs"]:
        print(f"  {o['name']}: {o['dtype']} {o['shape']}")
    print(f"state carried by streams: {', '.join(f'{a} <- {b}' for a, b in model.state_pairs) or 'none (only recurrent layers hold state)'}")
    print("layers:")
    for n in model.graph["nodes"]:
        shapes = [f"{x}{tuple(model.tensors[x].shape)}" for x in n["inputs"] if x in model.tensors]
        attrs = {k: v for k, v in n.get("attrs", {}).items() if not isinstance(v, (dict, np.ndarray))}
        print(f"  {n['op']:<12} {n.get('name') or '':<28} {' '.join(shapes)} {attrs if attrs else ''}")
    total = 0
    by_dtype = {}
    for name in wf.names:
        info = wf.info(name)
        total += int(np.prod(info["shape"])) if info["shape"] else 1
        by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + info["nbytes"]
    print(f"parameters: {total:,}; stored bytes by dtype: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_dtype.items())))
    return 0


def _print_report(rep):
    for part, title in (("whole", "whole sequence"), ("stream", "streamed"), ("vs_float32", "vs float32 file")):
        errs = rep.get(part)
        if errs is None:
            if part == "stream":
                print(f"  {title}: {rep['stream_note']}")
            continue
        note = f" ({rep['stream_note']})" if part == "stream" else ""
        print(f"  {title}{note}:")
        for name, e in errs.items():
            if "shape" in e:
                print(f"    {name:<24} SHAPE MISMATCH {e['shape'][0]} vs {e['shape'][1]}")
            else:
                print(f"    {name:<24} max abs {e['abs']:.2e}   max rel {e['rel']:.2e}")


def cmd_verify(args):
    from . import convert
    from .store import load
    from .verify import TOLERANCE, verify
    t0 = time.perf_counter()
    given = {k: _value(v) for k, v in _kv(args.input, "--input").items()}
    dims = _kv(args.dim, "--dim", int)
    # scalar --input values are fixed at conversion (so If nodes that test them fold), as
    # `convert --input` does; onnxruntime still receives them as inputs
    baked = {k: v for k, v in given.items() if np.ndim(v) == 0}
    ref = None
    if args.model:
        _progress(f"loading {args.model}", t0)
        model = load(args.model)
        baked = {k: np.asarray(v) for k, v in (model.metadata.get("source.fixed_inputs") or {}).items()}
        dtype = model.metadata.get("general.weight_dtype", "float32")
        if dtype != "float32":
            ref = convert(args.onnx, fixed_inputs=baked or None)
    else:
        _progress(f"converting {args.onnx}", t0)
        model = convert(args.onnx, fixed_inputs=baked or None)
        dtype = "float32"
    names = {i["name"] for i in model.inputs}
    feeds = {k: v for k, v in given.items() if k in names}
    _progress("running rnnengine and onnxruntime on random inputs", t0)
    rep = verify(model, args.onnx, dims, feeds, seed=args.seed, ref=ref, ort_extra=baked)
    print("inputs: " + ", ".join(f"{k}{tuple(v)}" for k, v in rep["inputs"].items()))
    _print_report(rep)
    if dtype == "float32":
        tol = args.tolerance or TOLERANCE["float32"]
        bad = [n for part in ("whole", "stream") for n, e in (rep.get(part) or {}).items() if not e["rel"] <= tol]
    else:
        tol = args.tolerance or TOLERANCE[dtype]
        bad = [n for n, e in rep["vs_float32"].items() if not e["rel"] <= tol]
    print(f"{'OK' if not bad else 'FAILED'}: tolerance {tol:g} ({dtype})" + (f"; over it: {bad}" if bad else ""))
    return 0 if not bad else 1


def _stream_run(model, feeds, chunk):
    from .verify import feed_in_chunks, input_roles, join_chunks, time_axes
    axes = time_axes(model, feeds)
    if not axes:
        raise ValueError("--stream: no input has a time axis the recurrent layers run over")
    parts, T = feed_in_chunks(model.stream(), feeds, axes, chunk, roles=input_roles(model))
    return join_chunks(parts, T)


def cmd_run(args):
    model = _load_any(args.file)
    given = {}
    for item in args.input:
        if "=" in item:
            k, v = item.split("=", 1)
            given[k] = np.load(v) if v.endswith(".npy") else _value(v)
        else:
            names = model.feed_names
            if len(names) != 1:
                raise ValueError(f"the model has inputs {names}: use --input NAME=FILE.npy")
            given[names[0]] = np.load(item)
    t0 = time.perf_counter()
    out = _stream_run(model, given, args.stream) if args.stream else model.run(given)
    dt = time.perf_counter() - t0
    if args.output.endswith(".npz"):
        np.savez(args.output, **out)
        saved = ", ".join(f"{k}{v.shape}" for k, v in out.items())
    else:
        name = args.output_name or model.outputs[0]
        if name not in out:
            raise ValueError(f"no output {name!r}; outputs: {list(out)}")
        np.save(args.output, out[name])
        saved = f"{name}{out[name].shape}"
    print(f"{args.output}: {saved} ({dt * 1e3:.2f} ms{', streamed in chunks of %d' % args.stream if args.stream else ''})")
    return 0


def cmd_bench(args):
    from .bench_model import bench_model
    return bench_model(args)


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

    c = sub.add_parser("convert", help="convert an ONNX model into an rnnengine weight file",
                       description="Converts MODEL.onnx (folding constants and glue, checking every op and "
                                   "attribute) into a compact, memory-mappable weight file (docs/FORMAT.md).")
    c.add_argument("model", metavar="MODEL.onnx")
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="weight file to write")
    c.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32",
                   help="storage of the weight matrices (default float32; int8 has one scale per row)")
    c.add_argument("--input", action="append", metavar="NAME=VALUE",
                   help="fix an input to a constant at conversion (e.g. sr=16000), repeatable")
    c.add_argument("--state", action="append", metavar="IN=OUT",
                   help="pair a state input with the output that carries its next value, when the "
                        "automatic pairing cannot tell (repeatable)")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="show a weight file's layers, shapes, state and sizes",
                       description="Prints the metadata, inputs, outputs, state pairs, layers with weight "
                                   "shapes and attributes, parameter count and stored sizes of a weight file.")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="check a conversion against onnxruntime on random inputs",
                       description="Converts MODEL.onnx (or loads --model OUT), runs rnnengine and onnxruntime "
                                   "on the same random valid inputs (token ids within the vocabulary, lengths "
                                   "within the time axis, floats elsewhere), whole-sequence and streamed, and "
                                   "prints the max abs and relative error per output. Exits 1 above tolerance. "
                                   "For float16/int8 files the error against the float32 conversion is checked "
                                   "against the bound documented in docs/FORMAT.md.")
    v.add_argument("onnx", metavar="MODEL.onnx")
    v.add_argument("--model", metavar="OUT", help="a weight file converted from MODEL.onnx to check instead")
    v.add_argument("--input", action="append", metavar="NAME=VALUE|NAME=FILE.npy",
                   help="use this value for an input instead of a random one (repeatable)")
    v.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a symbolic dimension (default: 2 for batch-like names, 5 otherwise)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tolerance", type=float, help="override the tolerance")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("run", help="run a model on .npy inputs",
                       description="Runs FILE (a weight file or an ONNX file) on the inputs and saves the "
                                   "outputs: one output to a .npy file, all of them to a .npz file.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--input", action="append", required=True, metavar="x.npy|NAME=x.npy")
    r.add_argument("-o", "--output", required=True, metavar="y.npy|y.npz")
    r.add_argument("--output-name", help="which output to save to a .npy file (default: the first)")
    r.add_argument("--stream", type=int, metavar="CHUNK",
                   help="feed the input through a stream, CHUNK time steps per call")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="per-step latency and throughput beside onnxruntime",
                       description="Measures per-step streaming latency and whole-sequence throughput of "
                                   "rnnengine and onnxruntime on the same model, alternating engines.")
    b.add_argument("file", metavar="FILE|MODEL.onnx")
    b.add_argument("--onnx", help="the ONNX source of a weight file (for the onnxruntime side)")
    b.add_argument("--dim", action="append", metavar="NAME=SIZE", help="sizes of symbolic dimensions")
    b.add_argument("--steps", type=int, default=200, help="streamed steps per repeat (default 200)")
    b.add_argument("--seq", type=int, default=256, help="whole-sequence length (default 256)")
    b.add_argument("--repeats", type=int, default=5)
    b.set_defaults(func=cmd_bench)
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
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"rnnengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
