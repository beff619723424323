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

from rnnengine.errors import NotStreamableError, OnnxRuntimeError  # noqa: F401 (re-exported)
from rnnengine.runtime.roles import axis_roles, input_roles, random_feeds, time_axes  # noqa: F401 (re-exported)

# Max error per output: absolute for values of magnitude <= 1, relative above. float32 is
# checked against onnxruntime; float16 / int8 weight files against the float32 conversion
# of the same model (the bounds documented in docs/FORMAT.md).
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "int8": 5e-2}


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
