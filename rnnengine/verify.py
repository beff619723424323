"""verify.py - run a converted model and onnxruntime on the same random valid inputs and
report the error per output, for whole sequences and for streams (used by `rnnengine verify`
and the corpus tests).

Random inputs are valid by construction: token ids lie within the vocabulary of the
embedding they index, sequence lengths within the time axis (sorted longest first, as
``pack_padded_sequence`` wants by default), floats are standard normal. Symbolic dimensions
take the sizes given with ``dims`` or defaults (batch-like names 2, others 5).
"""
from __future__ import annotations

import numpy as np

from rnnengine.ops.codes import NP_DTYPES, RECURRENT_OPS, SLOT_SEQUENCE_LENS
from rnnengine.ops.handlers import NotStreamableError
from rnnengine.errors import OnnxRuntimeError  # noqa: F401 (re-exported)

# Max error per output: absolute for values of magnitude <= 1, relative above. float32 is
# checked against onnxruntime; float16 / int8 weight files against the float32 conversion
# of the same model (the bounds documented in docs/FORMAT.md).
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "int8": 5e-2}


def _consumers(graph):
    uses = {}
    for n in graph["nodes"]:
        for k, x in enumerate(n["inputs"]):
            if x:
                uses.setdefault(x, []).append((n, k))
    return uses


def _follow(uses, name, through=("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape")):
    """(node, input index) pairs that read `name`, looking through dtype/shape glue."""
    out, todo, seen = [], [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for n, k in uses.get(t, []):
            if n["op"] in through and k == 0:
                todo.extend(o for o in n["outputs"] if o)
            else:
                out.append((n, k))
    return out


def input_roles(model):
    """For each integer input: ("tokens", vocab) when it indexes an embedding, ("lengths",)
    when it reaches a recurrent layer's sequence_lens, else ("int",)."""
    uses = _consumers(model.graph)
    roles = {}
    for spec in model.inputs:
        if spec["dtype"] not in ("int64", "int32"):
            continue
        role = ("int",)
        for n, k in _follow(uses, spec["name"]):
            if n["op"] == "Gather" and k == 1 and n["inputs"][0] in model.tensors:
                table = model.tensors[n["inputs"][0]]
                axis = n.get("attrs", {}).get("axis", 0)
                if not isinstance(axis, int) or not -table.ndim <= axis < table.ndim:
                    continue  # not a lookup (the Gather is refused when planned)
                role = ("tokens", int(table.shape[axis]))
                break
            if n["op"] in RECURRENT_OPS and k == SLOT_SEQUENCE_LENS:
                role = ("lengths",)
                break
        if role == ("int",) and "len" in spec["name"].lower():
            role = ("lengths",)
        roles[spec["name"]] = role
    return roles


def default_dim(name):
    low = str(name).lower()
    return 2 if ("batch" in low or low in ("b", "n")) else 5


def random_feeds(model, dims=None, fixed=None, seed=0, time_size=None, states=True):
    """Random valid inputs for every input; explicit state inputs get random values too
    (a non-zero starting state) unless ``states`` is False."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    fixed = dict(fixed or {})
    roles = input_roles(model)
    carried = {a for a, _ in model.state_pairs}
    feeds = {}
    lengths_inputs = []
    for spec in model.inputs:
        name = spec["name"]
        if name in fixed:
            feeds[name] = np.asarray(fixed[name], NP_DTYPES[spec["dtype"]])
            continue
        if name in carried and not states:
            continue
        shape = []
        for d in spec["shape"] or []:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = d if d is not None else f"{name}_{len(shape)}"
                if key not in dims:
                    dims[key] = default_dim(key)
                shape.append(dims[key])
        dt = NP_DTYPES[spec["dtype"]]
        role = roles.get(name, ("float",))
        if role[0] == "tokens":
            feeds[name] = rng.integers(0, role[1], size=shape).astype(dt)
        elif role[0] == "lengths":
            lengths_inputs.append((name, shape, dt))
        elif role[0] == "int":
            feeds[name] = rng.integers(0, 3, size=shape).astype(dt)
        elif dt == np.bool_:
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dt)
    for name, shape, dt in lengths_inputs:
        T = time_size or _guess_time(model, feeds) or 5
        n = int(np.prod(shape))
        lens = np.sort(rng.integers(1, T + 1, size=n))[::-1].copy()
        if n:
            lens[0] = T
        feeds[name] = lens.reshape(shape).astype(dt)
    return feeds


def _guess_time(model, feeds):
    axes = time_axes(model, feeds)
    for name, axis in axes.items():
        return feeds[name].shape[axis]
    return None


def time_axes(model, feeds):
    """{input name: axis} of the inputs a stream is fed along (GraphModel.time_axes)."""
    return model.time_axes(feeds)


def axis_roles(model):
    """{input name: {axis: "batch" | "time"}} for the symbolic axes of the model's inputs,
    found by planning random inputs with the axis one longer (with every axis of the same
    symbol, and if that alone does not plan, with the symbolic axes of the state inputs too):
    a batch axis changes the recurrent layers' batch, a time axis their T. Used to word
    errors in the user's terms; computed once per model."""
    cached = model.__dict__.get("_axis_roles")
    if cached is not None:
        return cached
    roles = {}
    model.__dict__["_axis_roles"] = roles
    try:
        feeds = random_feeds(model, seed=0)
        base = model.plan(feeds)
    except Exception:
        return roles
    if not base.recurrent:
        return roles
    carried = {a for a, _ in model.state_pairs}

    def grown(axes):
        f = dict(feeds)
        for n, ax in axes:
            if f[n].shape[ax] == 0:
                return None
            f[n] = np.concatenate([f[n], np.take(f[n], [-1], axis=ax)], axis=ax)
        return f

    def probe(axes):
        f = grown(axes)
        if f is None:
            return None
        try:
            plan = model.plan(f)
        except Exception:
            return None
        if len(plan.recurrent) != len(base.recurrent):
            return None
        if any(a["B"] != b["B"] for a, b in zip(base.recurrent, plan.recurrent)):
            return "batch"
        if any(a["T"] != b["T"] for a, b in zip(base.recurrent, plan.recurrent)):
            return "time"
        return None
    symbolic = [(i["name"], k, d) for i in model.inputs for k, d in enumerate(i["shape"] or [])
                if not (isinstance(d, int) and d >= 0) and i["name"] in feeds]
    for name, axis, d in symbolic:
        same = {(n, k) for n, k, d2 in symbolic if (n, k) == (name, axis) or (isinstance(d, str) and d2 == d)}
        role = probe(sorted(same))
        if role is None and name not in carried:
            states = {(n, k) for n, k, _ in symbolic if n in carried}
            role = probe(sorted(same | states))
            if role == "batch":
                for n, k in states:
                    roles.setdefault(n, {}).setdefault(k, "batch")
        if role is not None:
            roles.setdefault(name, {})[axis] = role
    for name, axis, d in symbolic:  # by name, and the other axis of an input with a time axis
        low = str(d).lower()
        mine = roles.setdefault(name, {})
        if axis not in mine and ("batch" in low or "time" in low or "seq" in low):
            mine[axis] = "batch" if "batch" in low else "time"
        others = [k for n, k, _ in symbolic if n == name and k not in mine]
        if "time" in mine.values() and "batch" not in mine.values() and others == [axis]:
            mine[axis] = "batch"
    return roles


def errors(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return {"shape": (got.shape, want.shape), "abs": np.inf, "rel": np.inf}
    if got.size == 0:
        return {"abs": 0.0, "rel": 0.0}
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    diff = np.where(same, 0.0, np.abs(got - want))
    rel = diff / np.maximum(np.abs(want), 1.0)  # relative above 1, absolute below
    return {"abs": float(np.nan_to_num(diff, nan=np.inf).max()), "rel": float(np.nan_to_num(rel, nan=np.inf).max())}


def _ort_reason(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def ort_session(onnx_source):
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxRuntimeError("onnxruntime is not installed: pip install 'rnnengine[verify]' "
                               "(or pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # its failures come back as OnnxRuntimeError, not as log lines
    data = onnx_source if isinstance(onnx_source, (bytes, str)) else onnx_source.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxRuntimeError(f"onnxruntime cannot load the model: {_ort_reason(e)}") from None


def ort_feeds(sess, feeds):
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


class _Session:
    """onnxruntime with the inputs that were fixed at conversion added to every run."""

    def __init__(self, sess, extra):
        self.sess, self.extra = sess, extra

    def get_outputs(self):
        return self.sess.get_outputs()

    def run(self, names, feeds):
        f = ort_feeds(self.sess, {**self.extra, **feeds})
        try:
            return self.sess.run(names, f)
        except Exception as e:
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in f.items())
            raise OnnxRuntimeError(f"onnxruntime cannot run the model on inputs {shapes}: {_ort_reason(e)}") from None


def verify(model, onnx_source, dims=None, fixed=None, seed=0, chunks=(1, 3), calls=4, ref=None, ort_extra=None):
    """Compares the model with onnxruntime. Returns a report dict:
    {"whole": {output: errors}, "stream": {output: errors} or None, "stream_note": str}.
    ``ref`` (optional) is another GraphModel to compare with instead of onnxruntime for the
    whole-sequence check (e.g. a float32 file when checking a float16 one). ``ort_extra``
    are inputs fixed at conversion that onnxruntime still needs."""
    sess = _Session(ort_session(onnx_source), ort_extra or {})
    feeds = random_feeds(model, dims, fixed, seed)
    for a, _ in model.state_pairs:
        if a not in feeds:
            feeds[a] = model._zero_state(a, feeds)
    out_names = [o.name for o in sess.get_outputs()]
    want = dict(zip(out_names, sess.run(None, feeds)))
    got = model.run(feeds)
    report = {"whole": {n: errors(got[n], want[n]) for n in out_names}, "inputs": {k: v.shape for k, v in feeds.items()}}
    if ref is not None:
        r = ref.run(feeds)
        report["vs_float32"] = {n: errors(got[n], r[n]) for n in out_names}
    report["stream"], report["stream_note"] = _verify_stream(model, sess, feeds, want, out_names, chunks, calls,
                                                             seed, dims, fixed)
    return report


def stream_refusal(model, feeds=None):
    """The NotStreamableError model.stream() raises (naming the node that mixes time steps),
    or None when the model streams."""
    try:
        model.stream()
    except NotStreamableError as e:
        return e
    return None


def _verify_stream(model, sess, feeds, want, out_names, chunks, calls, seed, dims, fixed):
    try:
        probe = model.stream()  # refuses a graph that mixes time steps, naming the node
    except NotStreamableError as e:
        return None, str(e)
    taxes = probe._taxes if probe._taxes is not None else model.time_axes(feeds)
    carried = {a for a, _ in model.state_pairs}
    try:
        if taxes:
            return _stream_chunks(model, feeds, want, out_names, taxes, chunks, carried)
        if model.state_pairs:
            return _stream_calls(model, sess, feeds, out_names, calls, seed, dims, fixed)
    except NotStreamableError as e:  # the stream constructor or a call refused the graph
        return None, str(e)
    return None, "no time axis and no explicit state: nothing to stream"


def feed_in_chunks(stream, feeds, taxes, chunk, skip=(), roles=None):
    """Feeds whole-sequence inputs to a stream `chunk` time steps per call (lengths inputs
    clipped to each chunk: the valid steps of each row in that chunk), then finish() (the
    outputs it held back, if any); returns the list of per-call outputs."""
    roles = roles or {}
    T = next(feeds[n].shape[a] for n, a in taxes.items())
    parts = []
    for t0 in range(0, T, chunk):
        f = {}
        for name, arr in feeds.items():
            if name in skip:
                continue
            if name in taxes:
                sl = [slice(None)] * arr.ndim
                sl[taxes[name]] = slice(t0, min(T, t0 + chunk))
                f[name] = np.ascontiguousarray(arr[tuple(sl)])
            elif roles.get(name, ("",))[0] == "lengths":
                f[name] = np.clip(arr - t0, 0, min(chunk, T - t0)).astype(arr.dtype)
            else:
                f[name] = arr
        parts.append(stream(f))
    tail = stream.finish()
    if tail:
        parts.append(tail)
    return parts, T


def join_chunks(parts, T, like=None, axes=None):
    """Per output: the chunks concatenated along its time axis (``axes``, from the stream's
    plan; guessed from the shapes when not given), or the last chunk's value (final states)."""
    out = {}
    for n in parts[0]:
        pieces = [p[n] for p in parts]
        if axes is not None and n in axes:
            axis = axes[n]
        else:
            axis = _time_axis_of_output(pieces, like[n] if like is not None else None, T)
        out[n] = pieces[-1] if axis is None else np.concatenate(pieces, axis=axis)
    return out


def _stream_chunks(model, feeds, want, out_names, taxes, chunks, carried):
    roles = input_roles(model)
    worst = {}
    for chunk in chunks:
        s = model.stream()
        if carried:
            s.set_state({"inputs": {a: feeds[a] for a in carried}})
        parts, T = feed_in_chunks(s, feeds, taxes, chunk, skip=carried, roles=roles)
        got = join_chunks(parts, T, want, axes=s.output_axes)
        for n in out_names:
            e = errors(got[n], want[n])
            if n not in worst or e["abs"] > worst[n]["abs"]:
                worst[n] = e
    return worst, f"time axis {taxes}, chunks of {', '.join(map(str, chunks))} step(s)"


def _time_axis_of_output(pieces, whole, T):
    if len(pieces) == 1:
        return None
    nd = pieces[0].ndim
    for axis in range(nd):
        if sum(p.shape[axis] for p in pieces) == T and all(p.ndim == nd for p in pieces) and \
                (whole is None or (whole.ndim == nd and whole.shape[axis] == T)):
            return axis
    return None


def _stream_calls(model, sess, feeds, out_names, calls, seed, dims, fixed):
    """Chunk-per-call models (state as graph I/O): several calls, onnxruntime fed its own
    state outputs back, the stream carrying its state itself."""
    s = model.stream()
    ort_state = {a: feeds[a] for a, _ in model.state_pairs}
    s.set_state({"inputs": dict(ort_state)})
    worst = {}
    for k in range(calls):
        # a new random chunk each call (same shapes; fixed inputs such as a sample rate kept)
        f = random_feeds(model, dims, fixed, seed + k) if k else feeds
        f = {n: v for n, v in f.items() if n not in ort_state}
        got = s(f)
        res = dict(zip(out_names, sess.run(None, {**f, **ort_state})))
        for a, o in model.state_pairs:
            ort_state[a] = res[o]
        for n in out_names:
            e = errors(got[n], res[n])
            if n not in worst or e["abs"] > worst[n]["abs"]:
                worst[n] = e
    return worst, f"{calls} calls, state carried by the stream"


def within_tolerance(report, tol=TOLERANCE["float32"]):
    for part in ("whole", "stream"):
        for e in (report.get(part) or {}).values():
            if not e["rel"] <= tol:
                return False
    return True
