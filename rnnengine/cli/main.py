"""The `rnnengine` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from rnnengine._version import __version__
from rnnengine.cli.common import _is_weight_file, _kv, _load_any
from rnnengine.errors import NotStreamableError, OnnxRuntimeError
from rnnengine.codes import RECURRENT_OPS

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "demo_lstm.onnx")  # load_onnx's test model
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


DEMO_CHARLM = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "demo_charlm.onnx")


def cmd_demo(args):
    """Streams the bundled character LSTM (trained by rnnengine itself) one character per
    call, beside onnxruntime fed its state by hand; prints the text it writes, the
    per-character time of both and the largest difference of their next-character
    probabilities."""
    import json

    import onnx

    from rnnengine import convert
    path = args.model or DEMO_CHARLM
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if "rnnengine.vocab" not in meta:
        raise ValueError(f"{path} has no 'rnnengine.vocab' metadata: the demo streams a character model "
                         "exported by rnnengine train --export")
    vocab = json.loads(meta["rnnengine.vocab"])
    index = {ch: k for k, ch in enumerate(vocab)}
    model = convert(path)
    sess = _ort_session(path)
    out_names = [o.name for o in sess.get_outputs()]
    state_names = [i.name for i in sess.get_inputs() if i.name != "tokens"]
    shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    ort_state = {n: np.zeros(shapes[n], np.float32) for n in state_names}
    pairs = dict(model.state_pairs)
    layers = [n for n in model.graph["nodes"] if n["op"] in RECURRENT_OPS]
    desc = f"{layers[0]['op']} {len(layers)}x{layers[0]['attrs'].get('hidden_size')}" if layers else "?"
    print(f"rnnengine demo: streaming {os.path.basename(path)} ({desc}, {len(vocab)} characters) one "
          "character per call,\nbeside onnxruntime (its state passed in and out of every session.run).")
    if meta.get("rnnengine.notes"):
        print(f"model: {meta['rnnengine.notes']}")
    prompt = "".join(ch for ch in args.prompt if ch in index) or vocab[0]
    stream = model.stream()
    rng = np.random.default_rng(args.seed)
    text, worst, t_eng, t_ort = prompt, 0.0, [], []
    feed = [index[ch] for ch in prompt]
    shown, nxt = 0, 0
    print(f"\n{'step':>4} {'char':>5}  {'rnnengine top-3':<36}{'onnxruntime top-3':<36}max|dp|")
    total = len(feed) + args.steps
    for step in range(total):
        tok = np.array([[feed[step] if step < len(feed) else nxt]], np.int64)
        t0 = time.perf_counter()
        logits = stream({"tokens": tok})["logits"].reshape(-1)
        t1 = time.perf_counter()
        res = dict(zip(out_names, sess.run(None, {"tokens": tok, **ort_state})))
        t2 = time.perf_counter()
        for n in state_names:
            ort_state[n] = res[pairs.get(n, n.replace("0_", "N_"))]
        t_eng.append(t1 - t0)
        t_ort.append(t2 - t1)
        p, q = _softmax(logits), _softmax(res["logits"].reshape(-1))
        diff = float(np.abs(p - q).max())
        worst = max(worst, diff)
        if args.temperature <= 0:
            nxt = int(np.argmax(p))
        else:
            z = np.log(np.maximum(p, 1e-30)) / args.temperature
            z = np.exp(z - z.max())
            nxt = int(rng.choice(len(p), p=z / z.sum()))
        if step >= len(feed) - 1 and step < total - 1:
            text += vocab[nxt]
        if shown < args.show:
            fmt = lambda v: " ".join(f"{vocab[k]!r}:{v[k]:.3f}" for k in np.argsort(-v)[:3])  # noqa: E731
            print(f"{step:>4} {vocab[int(tok[0, 0])]!r:>5}  {fmt(p):<36}{fmt(q):<36}{diff:.1e}")
            shown += 1
    print(f"\n--- text (prompt {prompt!r}, then {args.steps} characters sampled at temperature {args.temperature}) ---")
    print(text)
    print("---")
    me, mo = np.median(t_eng) * 1e6, np.median(t_ort) * 1e6
    print(f"per-character time (median of {total}): rnnengine {me:.1f} us, onnxruntime {mo:.1f} us ({mo / me:.1f}x)")
    ok = worst <= TOLERANCE
    print(f"max |p_rnnengine - p_onnxruntime| of the next-character probabilities over {total} steps: "
          f"{worst:.2e} (tolerance {TOLERANCE:g}) {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _value(v):
    """--input values: a .npy file, or a number / comma-separated numbers."""
    if v.endswith(".npy"):
        return np.load(v)
    try:
        parts = [float(x) if any(c in x for c in ".eE") else int(x) for x in v.split(",")]
    except ValueError:
        raise ValueError(f"--input value {v!r} is neither a .npy file nor numbers") from None
    return np.array(parts[0] if len(parts) == 1 else parts)


def _progress(msg, t0):
    print(f"[{time.perf_counter() - t0:6.2f}s] {msg}", flush=True)


def cmd_convert(args):
    from rnnengine.frontend.converter import convert_model
    from rnnengine.runtime.graph import GraphModel
    from rnnengine.format.store import save
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
    from rnnengine.format.store import load
    model = load(args.file)
    wf = model.file
    ckpt = getattr(model, "network", None)
    what = "training checkpoint (a weight file)" if ckpt else "weight file"
    print(f"{args.file}: rnnengine {what} version {wf.version}, {os.path.getsize(args.file):,} bytes")
    if ckpt:
        md, c = wf.metadata, ckpt.config
        sc = md.get("train.optimizer_state") or {}
        extra = md.get("train.extra") or {}
        print(f"  network: {c['kind']} {c['num_layers']}x{c['hidden_size']}"
              f"{' bidirectional' if c['bidirectional'] else ''}, input {c['input_size']}"
              f"{', embedding %d' % c['embedding'] if c['embedding'] else ''}, output {c['output_size']}")
        print(f"  training: {md.get('train.optimizer')} at step {sc.get('t')}, lr {sc.get('lr')}, "
              f"position {md.get('train.pos')}"
              + (f", vocabulary of {len(extra['vocab'])} characters" if extra.get("vocab") else ""))
        print("  runs as the network's ONNX export (Network.to_onnx): rnnengine.load, run, bench and streams "
              "use it; `rnnengine train ... --export OUT.onnx` writes that ONNX file")
    for k in sorted(wf.metadata):
        v = wf.metadata[k]
        if ckpt and k == "train.extra" and isinstance(v, dict) and isinstance(v.get("vocab"), str):
            v = {**v, "vocab": v["vocab"] if len(v["vocab"]) <= 60 else v["vocab"][:60] + "..."}
        print(f"  {k} = {v}")
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
        if not ckpt or name == "params":  # a checkpoint also holds optimiser moments
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
    from rnnengine import convert
    from rnnengine.format.store import load
    from rnnengine.verify import TOLERANCE, OnnxRuntimeError, verify
    t0 = time.perf_counter()
    given = {k: _value(v) for k, v in _kv(args.input, "--input").items()}
    dims = _kv(args.dim, "--dim", int)
    # scalar --input values are fixed at conversion (so If nodes that test them fold), as
    # `convert --input` does; onnxruntime still receives them as inputs
    baked = {k: v for k, v in given.items() if np.ndim(v) == 0}
    ref = None
    source = args.onnx
    if not os.path.exists(args.onnx):
        raise FileNotFoundError(f"no such file: {args.onnx}")
    if _is_weight_file(args.onnx):  # a training checkpoint carries its network's ONNX graph
        if args.model:
            raise ValueError(f"{args.onnx} is a weight file: verify takes the ONNX source first "
                             "(verify MODEL.onnx --model FILE)")
        _progress(f"loading {args.onnx}", t0)
        model = load(args.onnx)
        source = getattr(model, "onnx_source", None)
        if source is None:
            raise ValueError(f"{args.onnx} is a converted weight file: give its ONNX source, "
                             f"verify MODEL.onnx --model {args.onnx}")
        dtype = "float32"
    elif args.model:
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
    try:
        rep = verify(model, source, dims, feeds, seed=args.seed, ref=ref, ort_extra=baked)
    except OnnxRuntimeError as e:
        symbols = sorted({str(d) for i in model.inputs for d in (i["shape"] or []) if isinstance(d, str)})
        hint = (f" (a model exported for fixed sizes needs them given: --dim NAME=SIZE for {', '.join(symbols)})"
                if symbols and "cannot run" in str(e) else "")
        print(f"rnnengine verify: cannot compare, {e}{hint}", file=sys.stderr)
        return 2
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


def _zero_states(model, feeds):
    """Zero arrays for the explicit state inputs missing from ``feeds`` (where a run or a
    stream starts). A state dimension no data input names (tf2onnx gives the batch of x and
    of h0 unrelated symbols) takes the size of a data input's dimension: the one size with
    which the graph runs and gives each paired output its state's shape."""
    from rnnengine.runtime.graph import NP_DTYPES
    missing = [(a, o) for a, o in model.state_pairs if a not in feeds]
    out, unknown = {}, []
    for a, o in missing:
        try:
            out[a] = model._zero_state(a, feeds)
        except ValueError as e:
            unknown.append((a, o, e))
    if not unknown:
        return out
    specs = {i["name"]: i for i in model.inputs}
    sizes = sorted({int(g) for n, arr in feeds.items() if specs.get(n, {}).get("shape")
                    for d, g in zip(specs[n]["shape"], arr.shape) if not isinstance(d, int)})
    fits = []
    for k in sizes:
        trial = dict(out)
        for a, _, _ in unknown:
            trial[a] = np.zeros([d if isinstance(d, int) else k for d in specs[a]["shape"]],
                                NP_DTYPES[specs[a]["dtype"]])
        try:
            got = dict(model.plan({**feeds, **trial}).outputs)
        except ValueError:
            continue
        if all(got[o].shape == trial[a].shape for a, o in model.state_pairs if a in trial):
            fits.append(trial)
    if len(fits) != 1:
        raise unknown[0][2]
    return fits[0]


def _shapes_of(model, feeds):
    """Output name -> an empty stand-in with the output's whole-sequence shape (no run)."""
    return {name: np.broadcast_to(np.float32(0), v.shape) for name, v in model.plan(feeds).outputs}


def _stream_run(model, given, chunk):
    """Runs ``given`` through a stream: CHUNK time steps per call, or, for a model without a
    time axis whose state is graph I/O (one chunk of audio per call), one entry of a leading
    axis of calls per call. The stream carries the state: state inputs the caller gives are
    where it starts, the others start at zero. Returns (outputs, description)."""
    from rnnengine.verify import feed_in_chunks, input_roles, join_chunks, stream_refusal, time_axes
    carried = [a for a, _ in model.state_pairs]
    state_outputs = {o for _, o in model.state_pairs}
    calls = None
    if carried:
        specs = {i["name"]: i for i in model.inputs}
        lead = {n for n, v in given.items() if n not in carried and specs.get(n, {}).get("shape") is not None
                and np.ndim(v) == len(specs[n]["shape"]) + 1}
        if lead:  # chunk-per-call model, inputs stacked along a leading axis of calls
            calls = {n: np.asarray(given[n]) for n in lead}
            n_calls = {v.shape[0] for v in calls.values()}
            if len(n_calls) != 1:
                raise ValueError(f"--stream: inputs {sorted(lead)} have different numbers of calls "
                                 f"(leading axes {sorted(n_calls)})")
            given = {**given, **{n: v[0] for n, v in calls.items()}}
    feeds = model._check_feeds(given, allow_missing=set(carried))
    start = {a: feeds[a] for a in carried if a in feeds}
    start.update(_zero_states(model, feeds))
    data = {k: v for k, v in feeds.items() if k not in carried}
    full = {**data, **start}
    refusal = stream_refusal(model, full)
    if refusal is not None:
        raise refusal
    axes = {} if calls else time_axes(model, full)
    stream = model.stream()
    if carried:
        stream.set_state({"inputs": start})
    if axes:
        parts, T = feed_in_chunks(stream, data, axes, chunk, roles=input_roles(model))
        like = _shapes_of(model, full)
        out = join_chunks([{k: v for k, v in p.items() if k not in state_outputs} for p in parts], T, like,
                          axes=stream.output_axes)
        out.update({o: parts[-1][o] for o in state_outputs})
        return {n: out[n] for n in parts[0]}, f"streamed in chunks of {chunk} time step(s)"
    if not carried:
        raise ValueError("--stream: no input has a time axis the recurrent layers run over, and the model "
                         "carries no state: there is nothing to stream; run it without --stream")
    if chunk != 1:
        raise ValueError(f"--stream {chunk}: this model has no time axis; it takes one chunk "
                         f"({', '.join(f'{n}{v.shape}' for n, v in data.items())}) per call with its state "
                         f"{carried} carried by the stream. Use --stream 1 and stack the chunks along a "
                         "new leading axis of the input")
    k_calls = next(iter(calls.values())).shape[0] if calls else 1
    parts = []
    for k in range(k_calls):
        f = dict(data)
        if calls:
            f.update(model._check_feeds({**given, **{n: v[k] for n, v in calls.items()}},
                                        allow_missing=set(carried)))
            f = {n: v for n, v in f.items() if n not in carried}
        parts.append(stream(f))
    out = {}
    for n in parts[0]:
        out[n] = parts[-1][n] if n in state_outputs or not calls else np.stack([p[n] for p in parts])
    return out, f"streamed {k_calls} call(s), state carried by the stream"


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
    if args.stream:
        out, how = _stream_run(model, given, args.stream)
    else:
        carried = {a for a, _ in model.state_pairs}
        feeds = model._check_feeds(given, allow_missing=carried)
        out, how = model.run({**feeds, **_zero_states(model, feeds)}), "whole sequence"
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
    print(f"{args.output}: {saved} ({dt * 1e3:.2f} ms, {how})")
    return 0


def cmd_bench(args):
    from rnnengine.cli.bench import bench_model
    return bench_model(args)


def cmd_train(args):
    from rnnengine.train.fit import Network, char_vocab, export_char_lm, fit, load_checkpoint
    rng_seed = args.seed
    state = None
    if args.resume:
        net, state = load_checkpoint(args.resume)
        print(f"resuming {args.resume} at step {state['optimizer'].t}", file=sys.stderr)
    # --batch / --seq-len / --clip-norm: on --resume the checkpoint's unless given (fit refuses others)
    stored = state["options"] if state else {}
    shown_batch = args.batch if args.batch is not None else stored.get("batch_size") or 32
    seq_len = args.seq_len if args.seq_len is not None else stored.get("seq_len") or 64
    if args.data.endswith(".npy"):
        ids = np.load(args.data)
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise ValueError(f"{args.data}: a .npy file holds one 1-D array of token ids (language model); "
                             f"got {ids.dtype} {ids.shape}. Sequences to classify go in an .npz with "
                             "'inputs' and 'targets'")
        if args.task not in (None, "lm"):
            raise ValueError("a .npy file of token ids trains a language model (--task lm)")
        if len(ids) and ids.min() < 0:
            raise ValueError(f"{args.data}: token id {ids.min()} at index {int(np.argmin(ids))} is negative")
        task, vocab = "lm", None
        ids = ids.astype(np.int32)
        n_val = int(len(ids) * args.val_fraction)
        tr, va = (ids[:len(ids) - n_val], None), ((ids[len(ids) - n_val:], None) if n_val > seq_len else None)
        in_size = out_size = int(ids.max()) + 1 if len(ids) else 0
    elif args.data.endswith(".npz"):
        task = args.task or "classify"
        if task == "lm":
            raise ValueError("--task lm trains on a text file; .npy/.npz data are for classify/regress")
        data = np.load(args.data)
        if "inputs" not in data or "targets" not in data:
            raise ValueError(f"{args.data} must hold arrays named 'inputs' (N, T, I) and 'targets'")
        X, Y = data["inputs"], data["targets"]
        if X.ndim != 3:
            raise ValueError(f"{args.data}: 'inputs' must be (N, T, I), got shape {X.shape}")
        n_val = int(len(X) * args.val_fraction)
        tr, va = (X[n_val:], Y[n_val:]), ((X[:n_val], Y[:n_val]) if n_val else None)
        in_size = X.shape[2]
        if task == "classify":
            out_size = _classes_of(Y, args.data)
        else:
            out_size = Y.shape[-1] if Y.ndim > 1 else 1
        vocab = None
    else:
        task = "lm"
        with open(args.data, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) < 1000:
            raise ValueError(f"{args.data} has {len(text)} characters; a language model needs more text")
        vocab, ids = char_vocab(text)
        if state and state["extra"].get("vocab") and state["extra"]["vocab"] != vocab:
            # the checkpoint's token ids are its vocabulary's: encode this text with it
            vocab = state["extra"]["vocab"]
            index = {ch: k for k, ch in enumerate(vocab)}
            unknown = sorted(set(text) - set(index))
            if unknown:
                raise ValueError(f"{args.data} has characters the checkpoint's vocabulary lacks: "
                                 f"{''.join(unknown)[:40]!r}")
            ids = np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
        n_val = int(len(ids) * args.val_fraction)
        tr, va = (ids[:len(ids) - n_val], None), ((ids[len(ids) - n_val:], None) if n_val > seq_len else None)
        in_size = out_size = len(vocab)
    if state is None:
        net = Network(args.kind, in_size, args.hidden, out_size, num_layers=args.layers,
                      embedding=args.embedding if task == "lm" else None, seed=rng_seed,
                      forget_bias=args.forget_bias)
    elif args.forget_bias is not None:
        raise ValueError("--forget-bias initialises a new network; a resumed one keeps its trained biases")
    print(f"rnnengine train: {task}, {net.kind} {net.L}x{net.H}, {net.size:,} parameters, "
          f"{args.steps} steps of {shown_batch} x {seq_len}", file=sys.stderr)
    lr = args.lr if (args.lr is not None or state) else 2e-3
    try:
        hist = fit(net, tr[0], tr[1], task, args.steps,
                   # (None: the checkpoint's; one written before train.options kept none: the CLI's 32)
                   batch_size=args.batch if args.batch is not None or stored.get("batch_size") else 32,
                   seq_len=args.seq_len if args.seq_len is not None or state else (64 if task == "lm" else None),
                   lr=lr,
                   optimizer=args.optimizer, clip_norm=args.clip_norm, weight_decay=args.weight_decay,
                   seed=rng_seed, val=va, val_every=args.val_every, progress=not args.quiet, checkpoint=args.output,
                   checkpoint_every=args.checkpoint_every, state=state, extra={"vocab": vocab} if vocab else None,
                   threads=args.threads)
    except FloatingPointError as e:  # the loss or gradient became NaN / Inf: say at which step
        print(f"\nrnnengine: error: {e}", file=sys.stderr)
        return 2
    vals = [v for _, _, v in hist if v is not None]
    print(f"final loss {hist[-1][1]:.4f}" + (f", validation {vals[-1]:.4f}" if vals else "")
          + f"; checkpoint {args.output}")
    if args.export:
        if vocab:
            export_char_lm(net, vocab, args.export)
        else:
            net.to_onnx(args.export, state_io=True)
        print(f"exported {args.export}")
    return 0


def _classes_of(labels, source):
    """The number of classes of integer labels 0..K-1; refuses non-integer or negative labels
    and labels that skip classes (a stray label would silently add classes)."""
    Y = np.asarray(labels)
    if Y.ndim != 1:
        raise ValueError(f"{source}: classify 'targets' must be one label per sequence (N,), got shape {Y.shape}")
    if Y.dtype.kind == "f" and not (np.isfinite(Y).all() and (Y == np.round(Y)).all()):
        at = int(np.argmax(~np.isfinite(Y) | (Y != np.round(np.nan_to_num(Y)))))
        raise ValueError(f"{source}: labels must be whole numbers; targets[{at}] = {Y[at]}")
    if Y.dtype.kind not in "iuf":
        raise ValueError(f"{source}: labels must be integers, got dtype {Y.dtype}")
    if len(Y) == 0:
        raise ValueError(f"{source}: no labels")
    if Y.min() < 0:
        raise ValueError(f"{source}: labels must be 0..K-1; targets[{int(np.argmin(Y))}] = {Y.min()}")
    present = np.unique(Y.astype(np.int64))
    K = int(present[-1]) + 1
    if len(present) != K:
        missing = sorted(set(range(K)) - set(present.tolist()))
        at = int(np.argmax(Y == present[-1]))
        raise ValueError(f"{source}: labels must be 0..K-1 with every class present; targets[{at}] = "
                         f"{int(present[-1])} but {len(missing)} classes below it never occur "
                         f"(first: {missing[0]}); renumber the labels")
    return K


def build_parser():
    p = argparse.ArgumentParser(prog="rnnengine",
                                description="Fast, faithful CPU inference for recurrent networks from ONNX.")
    p.add_argument("--version", action="version", version=f"rnnengine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="stream the bundled character LSTM beside onnxruntime",
                       description="Streams the bundled character-level LSTM language model (trained by "
                                   "rnnengine's own C training path, tools/train_demo_model.py) one character "
                                   "per call: prints the text it writes, its next-character probabilities "
                                   "beside onnxruntime's, and the per-character time of both; exits 1 if the "
                                   "probabilities differ by more than 1e-5.")
    d.add_argument("--steps", type=int, default=200, help="characters to generate (default 200)")
    d.add_argument("--prompt", default="Return the ", help="text fed first (default 'Return the ')")
    d.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    d.add_argument("--show", type=int, default=6, help="steps whose probabilities to print (default 6)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    d.add_argument("--model", help="another character model exported by rnnengine train --export")
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
                                   "against the bound documented in docs/FORMAT.md. What cannot be streamed "
                                   "is reported as 'not streamable: <node>: <reason>'. Exit codes: 0 within "
                                   "tolerance, 1 above it, 2 when the comparison cannot be made (bad "
                                   "arguments, a conversion error, onnxruntime refusing the model).")
    v.add_argument("onnx", metavar="MODEL.onnx", help="the ONNX model (or a training checkpoint)")
    v.add_argument("--model", metavar="OUT", help="a weight file converted from MODEL.onnx to check instead")
    v.add_argument("--input", action="append", metavar="NAME=VALUE|NAME=FILE.npy",
                   help="use this value for an input instead of a random one (repeatable)")
    v.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a symbolic dimension (default: 2 for batch-like names, 5 otherwise)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tolerance", type=float, help="override the tolerance")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("run", help="run a model on .npy inputs",
                       description="Runs FILE (a weight file, a training checkpoint or an ONNX file) on the "
                                   "inputs and saves the outputs: one output to a .npy file, all of them to a "
                                   ".npz file. State inputs the graph pairs with outputs (h0 -> hn) may be "
                                   "left out: they start at zero. With --stream the inputs go through a stream "
                                   "CHUNK time steps per call, the stream carrying every state (the state "
                                   "outputs saved are the final ones); a model without a time axis whose state "
                                   "is graph I/O (one chunk of audio per call) takes its chunks stacked along "
                                   "a new leading axis, one per call (--stream 1). A model that cannot be "
                                   "streamed is reported as 'not streamable: <node>: <reason>'.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--input", action="append", required=True, metavar="x.npy|NAME=x.npy")
    r.add_argument("-o", "--output", required=True, metavar="y.npy|y.npz")
    r.add_argument("--output-name", help="which output to save to a .npy file (default: the first)")
    r.add_argument("--stream", type=int, metavar="CHUNK",
                   help="feed the input through a stream, CHUNK time steps per call")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("train", help="train a recurrent network (char-level LM on a text file, or .npz data)",
                       description="Trains with backprop through time in C: a character-level language model "
                                   "on a text file (or a language model on a 1-D .npy of token ids), or "
                                   "sequence classification / regression on an .npz holding "
                                   "'inputs' (N, T, I) and 'targets'. Shows loss, tokens/s and ETA; writes a "
                                   "checkpoint (a weight file) every --checkpoint-every steps and at the end; "
                                   "--resume continues one. Deterministic given --seed.")
    t.add_argument("data", metavar="TEXT|DATA.npz|TOKENS.npy")
    t.add_argument("-o", "--output", required=True, metavar="CKPT", help="checkpoint to write")
    t.add_argument("--task", choices=["lm", "classify", "regress"], help="default: lm for text, classify for .npz")
    t.add_argument("--kind", choices=["LSTM", "GRU", "RNN"], default="LSTM")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--embedding", type=int, default=32, help="token embedding size (lm)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, help="sequences per update (default 32; on --resume the checkpoint's)")
    t.add_argument("--seq-len", type=int, help="time steps per update (truncated BPTT; default 64; on --resume "
                                              "the checkpoint's)")
    t.add_argument("--lr", type=float, help="learning rate (default 2e-3; on --resume the checkpoint's)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default adam; on --resume the checkpoint's")
    t.add_argument("--weight-decay", type=float, help="decoupled (adam) or L2 (sgd) weight decay (default 0)")
    t.add_argument("--forget-bias", type=float, metavar="B",
                   help="LSTM: start every forget-gate bias at B (e.g. 1.0) instead of random")
    t.add_argument("--clip-norm", type=float, help="global gradient-norm clip (0: off; default 1.0; on --resume "
                                                 "the checkpoint's)")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    t.add_argument("--export", metavar="OUT.onnx", help="also export the trained model to ONNX")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="split each batch's rows over this many threads")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

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

    s = sub.add_parser("serve", help="serve a model's streams over WebSocket and whole runs over HTTP",
                       description="Serves FILE (a weight file or an ONNX file): GET /stream (WebSocket, one "
                                   "connection = one session with its own state; binary frames with the header "
                                   "documented in rnnengine/server.py, or JSON text frames), POST /run (a whole "
                                   "sequence, JSON), GET /health, GET /metrics (Prometheus text). Steps of "
                                   "concurrent sessions are batched (rnnengine.Batcher). Needs the extra "
                                   "[server] (aiohttp).")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--input", action="append", metavar="NAME=VALUE",
                   help="fix an input of an ONNX file at conversion (e.g. sr=16000), repeatable")
    s.add_argument("--max-batch", type=int, default=64, help="sessions per batched call (default 64)")
    s.add_argument("--max-wait-us", type=float, default=200.0,
                   help="how long a waiting step may wait for others to join its batch (default 200)")
    s.add_argument("--threads", type=int, default=1, help="threads of each batched call (default 1)")
    s.add_argument("--idle-timeout", type=float, default=600.0,
                   help="seconds after which an unused session is freed (default 600; 0: never)")
    s.add_argument("--max-queue", type=int, default=4096,
                   help="calls waiting at most; more wait for room (back-pressure, default 4096)")
    s.add_argument("--batch-graphs", choices=["auto", "on", "off"], default="auto",
                   help="a converted graph's steps batched while that pays (auto, default), always (on) "
                        "or never (off: each session's steps run alone: in the event loop while short, else on "
                        "worker threads)")
    s.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="the event loop: uvloop (installed with the [server] extra, not on Windows), the standard "
                        "asyncio one, or auto (uvloop when installed, default)")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes accepting connections on the one port (default 1): an event loop "
                        "runs on one core, so a machine with more cores serves more sessions with more workers; "
                        "a connection stays with its worker")
    s.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)  # (a worker of --workers)
    s.set_defaults(func=cmd_serve)

    sc = sub.add_parser("score", help="score many whole sequences (shards) locally, on Ray or on Dask",
                        description="Runs MODEL (a weight file or an ONNX file) on every row of INPUTS (shard "
                                    "files or directories of them: .npy (rows, T, features), .npz with 'x' and "
                                    "optional 'lengths', or .parquet with a column 'x', one whole sequence per "
                                    "row) and writes one output shard per input shard into OUTPUTS (.npz with "
                                    "'y' and 'lengths', or .parquet with 'y' and the input's other columns). "
                                    "Every row runs alone, so every engine and worker count gives the same "
                                    "result. Shards whose output exists are skipped (resume by running again). "
                                    "--engine ray needs the extra [ray], dask the extra [dask], Parquet pyarrow.")
    sc.add_argument("model", metavar="MODEL")
    sc.add_argument("inputs", nargs="+", metavar="INPUTS")
    sc.add_argument("-o", "--output", required=True, metavar="OUTPUTS", help="directory for the output shards")
    sc.add_argument("--engine", choices=["local", "ray", "dask"], default="local",
                    help="local (this process, default), ray (Ray Data actor pool) or dask (a local cluster)")
    sc.add_argument("--workers", type=int, default=1, help="Ray actors / Dask worker processes (default 1)")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    sc.add_argument("--shared", action="store_true",
                    help="a weight file's packed weights mapped from its panel cache (MODEL.panels, written on "
                         "first use), so the workers on one machine share one copy of them")
    sc.set_defaults(func=cmd_score)
    return p


def cmd_score(args):
    from rnnengine.scoring import score_files  # imports Ray / Dask only for those engines
    summary = score_files(args.model, args.inputs, args.output, engine=args.engine, workers=args.workers,
                          progress=not args.quiet, shared=args.shared)
    print(f"scored {summary['rows']} rows in {summary['shards']} shards ({summary['skipped']} already done) "
          f"with {summary['engine']} in {summary['seconds']} s")
    return 0


def cmd_serve(args):
    try:
        from rnnengine.server import loop_kind, serve  # the [server] extra: aiohttp, imported only here
    except ImportError as e:
        raise ValueError(f"rnnengine serve needs the server extra: pip install 'rnnengine[server]' ({e})") from None
    loop_kind(args.loop)  # --loop uvloop without uvloop: refused before the model is loaded
    if not 1 <= args.workers <= 256:
        raise ValueError(f"--workers must be 1 to 256, got {args.workers}")
    if args.workers > 1 and args.worker_fd is None:
        from rnnengine.server import run_workers
        del_me = _load_any(args.file, _kv(args.input, "--input", _value) or None)  # refused here, not per worker
        del del_me
        command = [sys.executable, "-m", "rnnengine.cli", "serve", args.file, "--max-batch", str(args.max_batch),
                   "--max-wait-us", repr(args.max_wait_us), "--threads", str(args.threads),
                   "--idle-timeout", repr(args.idle_timeout), "--max-queue", str(args.max_queue),
                   "--batch-graphs", args.batch_graphs, "--loop", args.loop]
        for item in args.input or ():
            command += ["--input", item]
        return run_workers(command, args.host, args.port, args.workers)
    model = _load_any(args.file, _kv(args.input, "--input", _value) or None)
    sock = None
    if args.worker_fd is not None:
        import socket
        sock = socket.socket(fileno=args.worker_fd)
    serve(model, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_us=args.max_wait_us,
          threads=args.threads, idle_timeout=args.idle_timeout or None, max_queue=args.max_queue,
          batch_graphs={"auto": None, "on": True, "off": False}[args.batch_graphs], loop=args.loop, sock=sock)
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps must be at least 1")
    def one_line(e):
        return " ".join(str(e).split("\n")).strip() or type(e).__name__
    # every failure is one line on stderr, never a traceback; exit 2 (1 is for mismatches)
    try:
        return args.func(args)
    except NotStreamableError as e:
        print(one_line(e), file=sys.stderr)
    except OnnxRuntimeError as e:
        print(f"rnnengine {args.command}: {one_line(e)}", file=sys.stderr)
    except (ValueError, TypeError, OSError, KeyError) as e:
        print(f"rnnengine: error: {one_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("rnnengine: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("RNNENGINE_TRACEBACK"):
            raise
        print(f"rnnengine: internal error ({type(e).__name__}): {one_line(e)} "
              "(set RNNENGINE_TRACEBACK=1 to see where)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
